"""Bundle jobs: config stacks, declared parameters, running a job, offline verification."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
