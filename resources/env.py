"""Settings of resources that come from the environment, and the Dagster behaviours they work around.

Resource fields read their environment variable when the resource is built, through a default_factory:
Dagster replaces a constructor's value by the field's static default when run config sets another field of
the same resource, and a default_factory survives that. Secrets are given to Definitions as EnvVar, so the
UI shows the variable's name and never its value; a field that may hold one is read through env_value.
"""

import os
from collections.abc import Callable
from typing import Any

from dagster import EnvVar


def from_env(variable: str, default: str | Callable[[], str] = "") -> Callable[[], str]:
    """A resource field's default_factory: the variable's value when the resource is built, else the default
    (or what a default function returns then)."""
    return lambda: os.environ.get(variable) or (default() if callable(default) else default)


def env_set(variable: str) -> Callable[[], bool]:
    """A boolean field's default_factory: whether the variable is set to anything."""
    return lambda: bool(os.environ.get(variable))


def env_flag(variable: str) -> Callable[[], bool]:
    """A boolean field's default_factory: 1, true or yes in the variable."""
    return lambda: os.environ.get(variable, "").strip().lower() in ("1", "true", "yes")


def env_value(value: Any) -> str:
    """A field's value with an EnvVar resolved. Dagster leaves a constructor's EnvVar unresolved when run config
    sets other fields of the same resource."""
    if isinstance(value, EnvVar):
        return value.get_value() or ""
    return value or ""


def secret(field: str, variable: str, resolve: bool) -> dict[str, Any]:
    """Constructor arguments for a secret field: the value itself (the CLI), or an EnvVar (Definitions)."""
    if not os.environ.get(variable):
        return {}
    return {field: os.environ[variable] if resolve else EnvVar(variable)}
