"""emorph: EfficientMorph 3D registration from training to TensorRT engines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("emorph-deploy")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
