"""Errors a user can act on: each names the file, line or record at fault."""


class QuiverError(Exception):
    """Base class of every error Quiver raises on purpose."""


class InputError(QuiverError):
    """Bad input in a source: the message names the file and line or record."""

    def __init__(self, location: str, problem: str) -> None:
        super().__init__(f"{location}: {problem}")
        self.location = location
        self.problem = problem


class FileRefError(QuiverError):
    """A FileRef that cannot be trusted (outside the storage root, or tampered with)."""


class ConfigError(QuiverError):
    """A configuration value that cannot work; never retried."""


class ModelPoolError(QuiverError):
    """A model that cannot be used: a device that is not there, an instance that kept failing its reloads."""


class BusyError(QuiverError):
    """A store that another process holds now (a Milvus Lite database): asking again later can succeed."""
