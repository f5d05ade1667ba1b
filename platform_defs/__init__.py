"""Quiver's Dagster definitions, built on first use of `defs`.

Dagster finds `defs` by name (`-m platform_defs`, workspace.yaml); everything else in the package, such as
`quiver search` against a running server, imports platform_defs.cli without paying for Dagster and every
asset (about 3 s).
"""

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from platform_defs.definitions import defs

        return defs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), "defs"})
