"""The executor Quiver runs with: multiprocess, forkserver with the model preloaded, and memory-bound.

Built on Dagster's public executor API: `quiver_executor` is an `@executor` whose executor, when a run
starts, computes the memory limits of each class of step (platform_defs/limits.py), runs the preflight
check of what the run's steps will need against what may be used now (lowering the concurrency, or refusing
with how much memory is missing), and then hands the run to Dagster's own multiprocess executor configured
with those limits as its tag concurrency limits. A step process killed by SIGKILL is reported with its
memory class, whether the kernel's OOM killer did it, and the limits that were in force.
"""

import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Iterator
from typing import Any

from dagster import (
    DagsterEvent,
    DagsterEventType,
    Executor,
    Field,
    InitExecutorContext,
    executor,
    multiple_process_executor_requirements,
    multiprocess_executor,
)

from platform_defs.limits import apply_pools, current_limits, manage_pools
from quiver.errors import QuiverError
from quiver.memory import MEMORY_TAG, explain_kill, oom_kills, preflight

DEFINITIONS_MODULE = "platform_defs.definitions"
PRELOAD_MODULE = "platform_defs.preload"
CRASH_PREFIX = "Multiprocess executor: child process for step "


class MemoryPreflightError(QuiverError):
    """A run whose steps cannot fit in the memory available: refused before any step started."""


def _multiprocess(init_context: InitExecutorContext, config: dict[str, Any]) -> Executor:
    """Dagster's multiprocess executor, created through its own executor definition with this config."""
    return multiprocess_executor.executor_creation_fn(InitExecutorContext(  # type: ignore[misc]
        job=init_context.job, executor_def=multiprocess_executor, executor_config=config,
        instance=init_context.instance))


def default_max_concurrent() -> int:
    """What Dagster's multiprocess executor runs at once when not told: its environment variable, else the CPUs."""
    return int(os.environ.get("DAGSTER_MULTIPROCESS_EXECUTOR_MAX_CONCURRENT") or multiprocessing.cpu_count())


class MemoryBoundExecutor(Executor):
    """Runs a plan on a multiprocess executor whose concurrency the run's memory preflight decided."""

    def __init__(self, init_context: InitExecutorContext, config: dict[str, Any]) -> None:
        self._init_context = init_context
        self._config = config
        self._base = _multiprocess(init_context, config)

    @property
    def retries(self) -> Any:
        return self._base.retries

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
        limits = current_limits(log=plan_context.log)
        memory_class_of = {key: execution_plan.get_step_by_key(key).tags.get(MEMORY_TAG)
                           for key in execution_plan.step_keys_to_execute}
        counts = Counter(c for c in memory_class_of.values() if c)
        check = preflight(limits, counts, self._config.get("max_concurrent") or default_max_concurrent(),
                          limits.settings.available, limits.settings.fraction)
        # Log lines of the run (an engine event's metadata needs a private Dagster type): the figures are in them.
        plan_context.log.info(limits.describe())
        plan_context.log.info(check.message)
        if check.refused:
            raise MemoryPreflightError(check.message)
        if manage_pools():
            for pool, (was, now) in apply_pools(plan_context.instance, limits).items():
                plan_context.log.info(f"concurrency pool {pool}: {was} -> {now}")
        bounded = _multiprocess(self._init_context, {
            **self._config, "max_concurrent": check.max_concurrent,
            "tag_concurrency_limits": check.tag_concurrency_limits()})
        kills_before = oom_kills()
        for event in bounded.execute(plan_context, execution_plan):
            yield event
            if (event.event_type == DagsterEventType.ENGINE_EVENT and event.step_key and event.message
                    and event.message.startswith(CRASH_PREFIX) and f"signal {signal.SIGKILL.value} " in event.message):
                step = plan_context.for_step(execution_plan.get_step_by_key(event.step_key))
                step.log.error(explain_kill(event.step_key, memory_class_of.get(event.step_key), limits,
                                            kills_before, oom_kills()))


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
    def _create(init_context: InitExecutorContext) -> MemoryBoundExecutor:
        config = init_context.executor_config
        modules = [*preload, *([PRELOAD_MODULE] if config["preload_model"] else [])]
        return MemoryBoundExecutor(init_context, {
            "max_concurrent": config["max_concurrent"] or None, "tag_concurrency_limits": [],
            "retries": config["retries"], "start_method": {"forkserver": {"preload_modules": modules}}})

    return _create


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
