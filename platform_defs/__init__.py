"""Quiver's Dagster definitions (`defs`), loaded on first use: `dagster ... -m platform_defs` finds them, and a
`quiver` command that needs none of them (a run sent to the warm host) does not pay for importing them."""

from typing import Any

__all__ = ["defs"]


def __getattr__(name: str) -> Any:
    if name == "defs":
        from platform_defs.definitions import defs

        return defs
    raise AttributeError(f"module 'platform_defs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return ["defs"]
