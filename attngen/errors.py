"""Exceptions raised by attngen. Each message names the field, the value and what is allowed."""


class SpecError(ValueError):
    """A spec field (or a keyword argument that builds one) is missing, of the wrong type or out of range."""

    def __init__(self, field: str, value, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"spec field '{field}': got {value!r}; allowed: {allowed}")


class PlanError(ValueError):
    """No tile configuration fits the device, or a requested tile override does not fit."""


class CompileError(RuntimeError):
    """NVRTC rejected a rendered kernel; the message carries the log and the path of the source."""
