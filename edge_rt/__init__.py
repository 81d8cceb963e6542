"""edge-rt: an on-device LLM runtime."""

from edge_rt.errors import (
    ContextOverflowError,
    DeviceError,
    EdgeRTError,
    InvalidOptionError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a model; see `edge_rt.api.load`."""
    from edge_rt.api import load as _load

    return _load(*args, **kwargs)


__all__ = [
    "load",
    "EdgeRTError",
    "ModelNotFoundError",
    "ModelFormatError",
    "UnsupportedModelError",
    "DeviceError",
    "InvalidOptionError",
    "ContextOverflowError",
    "__version__",
]
