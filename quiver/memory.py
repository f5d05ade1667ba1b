"""Memory-bound concurrency: how many steps of each memory class may run at once.

The incident behind this (seed 001): 100-150 workers each loading ~250 MB pushed a machine into swap for
40 hours. Its remedy is a formula, max workers = available memory x 80% / memory per worker. Quiver
applies it per class of step (the `quiver/memory` op tag): each class gets a share of the budget, so
that all classes at their limits together still fit, and a class that computes never gets more
workers than there are cores.
"""

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from quiver.retry import ServiceUnavailableError

MEMORY_TAG = "quiver/memory"
MEMORY_CLASSES = ("model", "io", "light")
COMPUTE_BOUND = frozenset({"model", "light"})  # more workers than cores only adds contention
DEFAULT_FRACTION = 0.8
MiB = 2**20
GiB = 2**30
DEFAULT_SHARES = {"model": 0.6, "io": 0.25, "light": 0.15}
ENV_AVAILABLE = "QUIVER_MEMORY_AVAILABLE"
ENV_BUDGET = "QUIVER_MEMORY_BUDGET"
ENV_FRACTION = "QUIVER_MEMORY_FRACTION"
ENV_CORES = "QUIVER_CPU_COUNT"
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": MiB, "mb": 10**6, "mib": MiB, "g": GiB,
          "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def env_need(memory_class: str) -> str:
    return f"QUIVER_MEMORY_NEED_{memory_class.upper()}"


def pool_name(memory_class: str) -> str:
    """The Dagster concurrency pool of a memory class: the limit that holds across runs."""
    return f"quiver-{memory_class}"


def parse_size(text: str | int | float) -> int:
    """Bytes from 1073741824, 512MiB, 1.5GiB, 2G (binary), 2GB (decimal)."""
    if isinstance(text, int | float):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512MiB, 1.5GiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(size: float) -> str:
    return f"{size / GiB:.2f} GiB" if abs(size) >= GiB else f"{size / MiB:.0f} MiB"


@dataclass(frozen=True)
class MemorySettings:
    """What the limits are computed from; `sources` says where each figure came from."""

    available: int  # bytes the machine has available
    budget: int  # bytes steps may use together
    needs: dict[str, int]  # bytes one step of a class needs
    cores: int
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    sources: dict[str, str] = field(default_factory=dict)
    fraction: float = DEFAULT_FRACTION  # of what is available that steps may use


@dataclass(frozen=True)
class ClassLimit:
    memory_class: str
    need: int
    limit: int
    bound_by: str  # "memory", "cores" or "does not fit"

    @property
    def pool(self) -> str:
        return pool_name(self.memory_class)


@dataclass(frozen=True)
class Limits:
    settings: MemorySettings
    classes: dict[str, ClassLimit]

    def tag_concurrency_limits(self) -> list[dict[str, Any]]:
        """The multiprocess executor's limits within one run."""
        return [{"key": MEMORY_TAG, "value": c.memory_class, "limit": c.limit} for c in self.classes.values()]

    def pool_limits(self) -> dict[str, int]:
        """Dagster concurrency pools: the same limits across runs."""
        return {c.pool: c.limit for c in self.classes.values()}

    def worst_case(self) -> int:
        return sum(c.limit * c.need for c in self.classes.values())

    def rows(self) -> list[list[str]]:
        return [[c.memory_class, format_size(c.need), f"{self.settings.shares[c.memory_class]:.0%}", str(c.limit),
                 c.bound_by, c.pool] for c in self.classes.values()]

    def describe(self) -> str:
        s = self.settings
        parts = [f"{c.memory_class} {c.limit} ({format_size(c.need)} each, by {c.bound_by})"
                 for c in self.classes.values()]
        return (f"memory limits: {'; '.join(parts)}; budget {format_size(s.budget)} of {format_size(s.available)} "
                f"available ({s.sources.get('budget', '')}), {s.cores} cores")


def compute_limits(settings: MemorySettings) -> Limits:
    """limit = share of the budget / need, at most the cores for classes that compute, at least 1 (a class
    whose single step does not fit is left to the preflight check, which refuses the run)."""
    classes = {}
    for memory_class in MEMORY_CLASSES:
        need = settings.needs[memory_class]
        by_memory = math.floor(settings.budget * settings.shares[memory_class] / need) if need > 0 else 10**6
        limit, bound_by = by_memory, "memory"
        if memory_class in COMPUTE_BOUND and settings.cores < limit:
            limit, bound_by = settings.cores, "cores"
        if limit < 1:
            limit, bound_by = 1, "does not fit"
        classes[memory_class] = ClassLimit(memory_class, need, limit, bound_by)
    return Limits(settings, classes)


def memory_settings(needs: Mapping[str, tuple[int, str]], env: Mapping[str, str] | None = None,
                    available: int | None = None, cores: int | None = None) -> MemorySettings:
    """Settings from the machine (psutil), the needs of each class (bytes, and how they were found), and the
    environment, which overrides any figure."""
    import psutil

    env = os.environ if env is None else env
    sources: dict[str, str] = {}
    if env.get(ENV_AVAILABLE):
        available, sources["available"] = parse_size(env[ENV_AVAILABLE]), ENV_AVAILABLE
    elif available is None:
        available, sources["available"] = int(psutil.virtual_memory().available), "psutil"
    fraction = float(env.get(ENV_FRACTION) or DEFAULT_FRACTION)
    if not 0 < fraction <= 1:
        raise ValueError(f"{ENV_FRACTION}={fraction}: use a fraction in (0, 1]")
    if env.get(ENV_BUDGET):
        budget, sources["budget"] = parse_size(env[ENV_BUDGET]), ENV_BUDGET
    else:
        budget, sources["budget"] = int(available * fraction), f"{fraction:.0%} of available"
    figures = {c: needs[c][0] for c in MEMORY_CLASSES}
    sources.update({c: needs[c][1] for c in MEMORY_CLASSES})
    for memory_class in MEMORY_CLASSES:
        if env.get(env_need(memory_class)):
            figures[memory_class] = parse_size(env[env_need(memory_class)])
            sources[memory_class] = env_need(memory_class)
    if cores is None:
        cores = int(env.get(ENV_CORES) or os.cpu_count() or 1)
    return MemorySettings(available=available, budget=budget, needs=figures, cores=cores, sources=sources,
                          fraction=fraction)


@dataclass(frozen=True)
class Preflight:
    """What a run may start with: the per-class concurrency, or a refusal that says what is missing."""

    concurrency: dict[str, int]
    max_concurrent: int
    needed: int
    allowed: int
    refused: bool
    message: str

    def tag_concurrency_limits(self) -> list[dict[str, Any]]:
        return [{"key": MEMORY_TAG, "value": c, "limit": n} for c, n in self.concurrency.items()]


def preflight(limits: Limits, step_counts: Mapping[str, int], max_concurrent: int, available_now: int,
              fraction: float = DEFAULT_FRACTION) -> Preflight:
    """Compares what a run's steps will need at the planned concurrency with what may be used now.

    It lowers the most memory-hungry class first; if the classes' steps still do not fit together it runs
    one step at a time; if a single step does not fit, it refuses.
    """
    allowed = min(limits.settings.budget, int(available_now * fraction))
    need = {c: limits.classes[c].need for c in limits.classes}
    planned = {c: min(limits.classes[c].limit, step_counts.get(c, 0), max_concurrent) for c in limits.classes}

    def total() -> int:
        return sum(planned[c] * need[c] for c in planned)

    wanted = total()
    if wanted <= allowed:
        return Preflight({c: limits.classes[c].limit for c in limits.classes}, max_concurrent, wanted, allowed, False,
                         f"preflight: {format_size(wanted)} needed at most, {format_size(allowed)} may be used")
    for memory_class in sorted(planned, key=lambda c: -need[c]):
        while planned[memory_class] > 1 and total() > allowed:
            planned[memory_class] -= 1
    concurrency = {c: max(1, planned[c]) for c in planned}
    if total() <= allowed:
        return Preflight(concurrency, max_concurrent, total(), allowed, False,
                         f"preflight: lowered concurrency to {concurrency} so that {format_size(total())} fits in "
                         f"the {format_size(allowed)} that may be used (the limits would need {format_size(wanted)})")
    largest = max((c for c in planned if step_counts.get(c, 0)), key=lambda c: need[c], default=None)
    if largest is not None and need[largest] <= allowed:
        return Preflight(concurrency, 1, need[largest], allowed, False,
                         f"preflight: steps run one at a time: the classes together need {format_size(total())}, "
                         f"{format_size(allowed)} may be used")
    one = need[largest] if largest else 0
    return Preflight(concurrency, 1, one, allowed, True,
                     f"preflight refused the run: one '{largest}' step needs {format_size(one)}"
                     f" but only {format_size(allowed)} may be used now ({format_size(available_now)} available, "
                     f"budget {format_size(limits.settings.budget)}): {format_size(one - allowed)} missing. "
                     f"Free memory, or lower the need with {env_need(largest or 'model')} if you know better.")


NEED_TAG_PREFIX = "quiver/need/"  # run tags: what one step of each class needs, set when the run starts


class MemoryShortError(ServiceUnavailableError):
    """A step that cannot fit in the memory its machine has now; retried later, as a busy service would be."""


def step_refusal(memory_class: str, need: int, env: Mapping[str, str] | None = None) -> str | None:
    """Why a step of a class cannot start on this machine now (its need is more than what may be used), or None:
    the worker-side preflight of a step, wherever it runs."""
    import psutil

    env = os.environ if env is None else env
    available = parse_size(env[ENV_AVAILABLE]) if env.get(ENV_AVAILABLE) else int(psutil.virtual_memory().available)
    fraction = float(env.get(ENV_FRACTION) or DEFAULT_FRACTION)
    if need <= available * fraction:
        return None
    return (f"a '{memory_class}' step needs {format_size(need)}, but only {format_size(available * fraction)} may "
            f"be used on this machine now ({format_size(available)} available, {fraction:.0%} of it): it waits and "
            f"is retried; lower the need with {env_need(memory_class)} if you know better")
