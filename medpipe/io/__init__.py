"""Reading and writing medical images: pictures, DICOM, CT volumes and slices, de-identification, DICOM-SEG."""

from medpipe._lazy import lazy_submodules

__getattr__ = lazy_submodules(__name__)
