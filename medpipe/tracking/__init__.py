"""MLflow tracking of bundle jobs, its plots, and the runs table."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
