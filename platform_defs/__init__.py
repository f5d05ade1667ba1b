"""Quiver's Dagster definitions."""

from platform_defs.definitions import defs

__all__ = ["defs"]
