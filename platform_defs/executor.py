"""The executor Quiver runs with: multiprocess, forkserver with the model preloaded, and memory-bound.

When a run starts it computes the memory limits of each class of step (platform_defs/limits.py), runs a
preflight check of what the run's steps will need against what is available now (lowering the
concurrency, or refusing with how much memory is missing), applies the limits as tag concurrency limits
of this run and as the instance's concurrency pools, and then executes like Dagster's multiprocess
executor. A step process killed by SIGKILL is reported with its memory class, whether the kernel's OOM
killer did it, and the limits that were in force.
"""

import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psutil
from dagster import Field, MetadataValue, executor
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.events import DagsterEvent, DagsterEventType, EngineEventData
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.multiprocess import MultiprocessExecutor

from quiver.errors import QuiverError
from quiver.memory import ENV_AVAILABLE, ENV_FRACTION, MEMORY_TAG, Limits, format_size, parse_size, preflight

DEFINITIONS_MODULE = "platform_defs.definitions"
PRELOAD_MODULE = "platform_defs.preload"
CRASH_PREFIX = "Multiprocess executor: child process for step "


class MemoryPreflightError(QuiverError):
    """A run whose steps cannot fit in the memory available: refused before any step started."""


def oom_kills() -> int | None:
    """The kernel's count of processes it killed for memory (Linux), or None where it is not known."""
    try:
        with open("/proc/vmstat", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def available_memory() -> int:
    value = os.environ.get(ENV_AVAILABLE)
    return parse_size(value) if value else int(psutil.virtual_memory().available)


def explain_kill(step_key: str, memory_class: str | None, limits: Limits, kills_before: int | None,
                 kills_now: int | None) -> str:
    by_kernel = kills_before is not None and kills_now is not None and kills_now > kills_before
    cause = (f"killed by the kernel for lack of memory (OOM killer: {kills_now - kills_before} kill(s) during this "
             f"run)" if by_kernel else "killed by SIGKILL, but the kernel's OOM-kill count did not change: something "
                                       "else killed it")
    klass = limits.classes.get(memory_class or "")
    need = f", which needs {format_size(klass.need)} a step" if klass else ""
    return (f"step {step_key} (memory class {memory_class or 'untagged'}{need}) was {cause}. Limits in force: "
            + "; ".join(f"{c.memory_class} {c.limit}" for c in limits.classes.values())
            + f"; budget {format_size(limits.settings.budget)} of {format_size(limits.settings.available)} available. "
              "Lower the concurrency or the batch size, or raise the need of this class "
              f"(QUIVER_MEMORY_NEED_{(memory_class or 'model').upper()}).")


class MemoryBoundExecutor(MultiprocessExecutor):
    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
        from platform_defs.limits import apply_pools, current_limits, manage_pools

        limits = current_limits()
        steps = [execution_plan.get_step_by_key(key) for key in execution_plan.step_keys_to_execute]
        memory_class_of = {step.key: step.tags.get(MEMORY_TAG) for step in steps}
        counts = Counter(c for c in memory_class_of.values() if c)
        fraction = float(os.environ.get(ENV_FRACTION) or 0.8)
        check = preflight(limits, counts, self._max_concurrent, available_memory(), fraction)
        yield DagsterEvent.engine_event(plan_context, limits.describe(), EngineEventData(metadata={
            "limits": MetadataValue.json({c.memory_class: {"need_bytes": c.need, "limit": c.limit,
                                                             "bound_by": c.bound_by, "pool": c.pool}
                                            for c in limits.classes.values()}),
            "budget_bytes": MetadataValue.int(limits.settings.budget),
            "available_bytes": MetadataValue.int(limits.settings.available),
        }))
        yield DagsterEvent.engine_event(plan_context, check.message, EngineEventData(metadata={
            "needed_bytes": MetadataValue.int(check.needed), "allowed_bytes": MetadataValue.int(check.allowed),
            "concurrency": MetadataValue.json(check.concurrency), "max_concurrent": check.max_concurrent}))
        if check.refused:
            raise MemoryPreflightError(check.message)
        if manage_pools():
            for pool, (was, now) in apply_pools(plan_context.instance, limits).items():
                yield DagsterEvent.engine_event(plan_context, f"concurrency pool {pool}: {was} -> {now}",
                                                EngineEventData())
        self._tag_concurrency_limits = check.tag_concurrency_limits()
        self._max_concurrent = check.max_concurrent
        kills_before = oom_kills()
        for event in super().execute(plan_context, execution_plan):
            yield event
            if (event.event_type == DagsterEventType.ENGINE_EVENT and event.step_key and event.message
                    and event.message.startswith(CRASH_PREFIX) and f"signal {signal.SIGKILL.value} " in event.message):
                message = explain_kill(event.step_key, memory_class_of.get(event.step_key), limits, kills_before,
                                       oom_kills())
                yield DagsterEvent.engine_event(plan_context.for_step(execution_plan.get_step_by_key(event.step_key)),
                                                message, EngineEventData())


def job_executor(preload_model: bool = True):  # noqa: ANN201 - an ExecutorDefinition
    """The executor of Quiver's jobs. By default the memory-bound multiprocess executor on this machine; with
    QUIVER_EXECUTOR=celery, Dagster's Celery executor, which sends each step to the queue of its memory class
    (QUIVER_CELERY_BROKER, QUIVER_CELERY_BACKEND) for workers on any machine to run."""
    choice = os.environ.get("QUIVER_EXECUTOR", "multiprocess")
    if choice == "celery":
        from dagster_celery import celery_executor

        return celery_executor.configured(
            {"broker": {"env": "QUIVER_CELERY_BROKER"}, "backend": {"env": "QUIVER_CELERY_BACKEND"}},
            name="quiver_celery")
    if choice != "multiprocess":
        raise QuiverError(f"QUIVER_EXECUTOR={choice!r}: use multiprocess (the default) or celery")
    return quiver_executor(preload_model)


def quiver_executor(preload_model: bool = True, preload: tuple[str, ...] = (DEFINITIONS_MODULE,)):  # noqa: ANN201
    """Steps fork from a forkserver that imported the definitions (and, by default, loaded the model);
    their concurrency is bound by memory. An explicit preload list replaces Dagster's default one, so it
    names the definitions module."""

    @executor(
        name="quiver_multiprocess",
        config_schema={
            "preload_model": Field(bool, default_value=preload_model,
                                   description="Load the model in the forkserver so steps inherit it."),
            "max_concurrent": Field(int, default_value=0, description="Step processes at once; 0: CPU count."),
            "retries": Field({"enabled": Field(dict, is_required=False), "disabled": Field(dict, is_required=False)},
                             default_value={"enabled": {}}, description="Step retries per RetryPolicy."),
        },
        requirements=multiple_process_executor_requirements(),
    )
    def _create(init_context: Any) -> MemoryBoundExecutor:
        config = init_context.executor_config
        return MemoryBoundExecutor(
            retries=RetryMode.from_config(config["retries"]),
            max_concurrent=config["max_concurrent"] or None,
            start_method="forkserver",
            explicit_forkserver_preload=[*preload, *([PRELOAD_MODULE] if config["preload_model"] else [])],
        )

    return _create
