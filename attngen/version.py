"""The package version: part of every kernel's header, cache key and tuned-plan key."""

__version__ = "0.1.0"
