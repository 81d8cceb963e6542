"""The exceptions edge-rt raises for bad input.

Every error a user can cause (a bad path, a corrupt file, an option out of range) is an
`EdgeRTError`; its message is one line that says what is wrong and, where there is one, what
to do. The CLI prints that line and exits with code 2; anything else is a bug.
"""


def one_line(e: object, limit: int = 300) -> str:
    """An exception (or message) as one line of text, for error messages."""
    text = " ".join(str(e).split())
    return text[:limit] if text else type(e).__name__


class EdgeRTError(Exception):
    """Base class of every user-facing edge-rt error."""


class ModelNotFoundError(EdgeRTError, FileNotFoundError):
    """The model path does not exist, or the default model is not installed."""


class ModelFormatError(EdgeRTError, ValueError):
    """The file is not a valid model file (bad magic, truncated, inconsistent metadata)."""


class UnsupportedModelError(EdgeRTError, ValueError):
    """The file is valid but uses an architecture or tensor type edge-rt does not run."""


class DeviceError(EdgeRTError, ValueError):
    """An invalid device string, or a device that is not available here."""


class InvalidOptionError(EdgeRTError, ValueError):
    """A generation or sampling option is out of range."""


class ContextOverflowError(EdgeRTError, ValueError):
    """The prompt (or prompt plus history) does not fit in the model's context."""
