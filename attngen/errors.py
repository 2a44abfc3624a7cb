"""Exceptions raised by attngen. Each message names the field, the value and what is allowed."""


class SpecError(ValueError):
    """A spec field (or a keyword argument that builds one) is missing, of the wrong type or out of range."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"spec field '{field}': got {shown(value)}; allowed: {allowed}")


def shown(value, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: a message names a bad value, it does not reprint a file."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class PlanError(ValueError):
    """No tile configuration fits the device, or a requested tile override does not fit."""


class CompileError(RuntimeError):
    """NVRTC rejected a rendered kernel; the message carries the log and the path of the source (also
    as the attributes `log` and `source_path`; the path is None where no folder could take the file)."""

    def __init__(self, message: str, *, log: str = "", source_path=None):
        self.log, self.source_path = log, source_path
        super().__init__(message)
