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

import psutil
from dagster import (
    DagsterEvent,
    DagsterEventType,
    Enum,
    EnumValue,
    Executor,
    Field,
    InitExecutorContext,
    executor,
    in_process_executor,
    multiple_process_executor_requirements,
    multiprocess_executor,
)

from platform_defs.execution_mode import DEFAULT_IN_PROCESS_MAX_CHUNKS, ExecutionMode, choose_mode
from platform_defs.limits import apply_pools, current_limits, manage_pools
from platform_defs.sqlite_keepalive import sqlite_files_held
from quiver.errors import QuiverError
from quiver.memory import MEMORY_TAG, NEED_TAG_PREFIX, Limits, preflight
from quiver.oom import explain_kill, oom_counter
from quiver.sampling import Sampler

DEFINITIONS_MODULE = "platform_defs.definitions"
PRELOAD_MODULE = "platform_defs.preload"
CRASH_PREFIX = "Multiprocess executor: child process for step "


class MemoryPreflightError(QuiverError):
    """A run whose steps cannot fit in the memory available: refused before any step started."""


THREADS_ENV = "QUIVER_MODEL_THREADS"


def _multiprocess(init_context: InitExecutorContext, config: dict[str, Any]) -> Executor:
    """Dagster's multiprocess executor, created through its own executor definition with this config."""
    return multiprocess_executor.executor_creation_fn(InitExecutorContext(  # type: ignore[misc]
        job=init_context.job, executor_def=multiprocess_executor, executor_config=config,
        instance=init_context.instance))


def _in_process(init_context: InitExecutorContext, config: dict[str, Any]) -> Executor:
    """Dagster's in-process executor: every step in the run's own process, one at a time."""
    return in_process_executor.executor_creation_fn(InitExecutorContext(  # type: ignore[misc]
        job=init_context.job, executor_def=in_process_executor, executor_config={"retries": config["retries"]},
        instance=init_context.instance))


def default_max_concurrent() -> int:
    """What Dagster's multiprocess executor runs at once when not told: its environment variable, else the CPUs."""
    return int(os.environ.get("DAGSTER_MULTIPROCESS_EXECUTOR_MAX_CONCURRENT") or multiprocessing.cpu_count())


class StepRss(Sampler):
    """The peak resident memory of each step process of a run, sampled every 0.2 s while it runs: the
    evidence of what a step held when it was killed."""

    interval_s = 0.2

    def __init__(self) -> None:
        super().__init__()
        self._pids: dict[str, psutil.Process] = {}
        self._peaks: dict[str, int] = {}

    def watch(self, step_key: str, pid: int) -> None:
        try:
            self._pids[step_key] = psutil.Process(pid)
        except psutil.Error:
            pass

    def peak(self, step_key: str) -> int | None:
        return self._peaks.get(step_key)

    def sample(self) -> None:
        for step_key, proc in list(self._pids.items()):
            try:
                self._peaks[step_key] = max(self._peaks.get(step_key, 0), proc.memory_info().rss)
            except psutil.Error:
                self._pids.pop(step_key, None)


class MemoryBoundExecutor(Executor):
    """Runs a plan on a multiprocess executor whose concurrency the run's memory preflight decided."""

    def __init__(self, init_context: InitExecutorContext, config: dict[str, Any]) -> None:
        self._init_context = init_context
        self._config = config
        self._multiprocess_config = {k: v for k, v in config.items() if k not in ("mode", "in_process_max_chunks")}
        self._base = _multiprocess(init_context, self._multiprocess_config)

    @property
    def retries(self) -> Any:
        return self._base.retries

    def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
        # Every event of the run is stored without a checkpoint of the SQLite log each time (sqlite_keepalive).
        with sqlite_files_held(plan_context.instance, plan_context.run_id):
            yield from self._execute(plan_context, execution_plan)

    def _execute(self, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
        limits = current_limits(log=plan_context.log)
        memory_class_of = {key: execution_plan.get_step_by_key(key).tags.get(MEMORY_TAG)
                           for key in execution_plan.step_keys_to_execute}
        counts = Counter(c for c in memory_class_of.values() if c)
        choice = choose_mode(self._config["mode"], self._config["in_process_max_chunks"], plan_context,
                             list(execution_plan.step_keys_to_execute))
        plan_context.log.info(choice.message)
        max_concurrent = 1 if choice.in_process else (self._config.get("max_concurrent") or default_max_concurrent())
        check = preflight(limits, counts, max_concurrent, limits.settings.available, limits.settings.fraction)
        # Log lines of the run (an engine event's metadata needs a private Dagster type): the figures are in them.
        plan_context.log.info(limits.describe())
        plan_context.log.info(check.message)
        if check.refused:
            raise MemoryPreflightError(check.message)
        if manage_pools():  # a pool nobody set yet gets its limit; one that is set is left as it is (no flapping)
            for pool, (was, now) in apply_pools(plan_context.instance, limits, only_unset=True).items():
                plan_context.log.info(f"concurrency pool {pool}: {was} -> {now}")
        record_needs(plan_context, limits)
        if choice.in_process:  # one step at a time, in this process: the model loads here only if a step encodes
            yield from _in_process(self._init_context, self._config).execute(plan_context, execution_plan)
            return
        threads = model_threads(limits.settings.cores, check.concurrency.get("model", 1), counts.get("model", 0),
                                check.max_concurrent)
        if threads:
            plan_context.log.info(f"model steps: {threads} intra-op thread(s) each (cores / concurrent model steps)")
            os.environ[THREADS_ENV] = str(threads)  # inherited by the forkserver this run starts, and its steps
        try:
            yield from self._execute_bounded(plan_context, execution_plan, limits, check, memory_class_of)
        finally:
            if threads:
                os.environ.pop(THREADS_ENV, None)

    def _execute_bounded(self, plan_context: Any, execution_plan: Any, limits: Limits, check: Any,
                         memory_class_of: dict[str, str | None]) -> Iterator[DagsterEvent]:
        bounded = _multiprocess(self._init_context, {
            **self._multiprocess_config, "max_concurrent": check.max_concurrent,
            "tag_concurrency_limits": check.tag_concurrency_limits()})
        run_counter = oom_counter()
        # Each step's OOM-kill count is read from its own process's cgroup when it starts, so a kill is judged by
        # what happened in that cgroup while that step ran, not by other runs or earlier steps.
        counters: dict[str, Any] = {}
        with StepRss() as rss:
            for event in bounded.execute(plan_context, execution_plan):
                yield event
                if event.event_type == DagsterEventType.STEP_START and event.step_key and event.pid:
                    rss.watch(event.step_key, event.pid)
                    counters[event.step_key] = oom_counter(event.pid)
                if (event.event_type == DagsterEventType.ENGINE_EVENT and event.step_key and event.message
                        and event.message.startswith(CRASH_PREFIX)
                        and f"signal {signal.SIGKILL.value} " in event.message):
                    step = plan_context.for_step(execution_plan.get_step_by_key(event.step_key))
                    before = counters.get(event.step_key, run_counter)
                    step.log.error(explain_kill(event.step_key, memory_class_of.get(event.step_key), limits,
                                                before, before.again(), rss.peak(event.step_key)))


def model_threads(cores: int, model_limit: int, model_steps: int, max_concurrent: int) -> int | None:
    """Intra-op threads of each model step, so that the steps running at once do not oversubscribe the cores:
    cores / concurrent model steps, set for the step processes (QUIVER_MODEL_THREADS, unless set already);
    None when the run has no model step or the user chose."""
    if not model_steps or os.environ.get(THREADS_ENV):
        return None
    return max(1, cores // max(1, min(model_limit, model_steps, max_concurrent)))


def record_needs(plan_context: Any, limits: Limits) -> None:
    """Put each class's need on the run, where every step reads it before it starts (the worker-side preflight:
    on a Celery worker, the machine the step runs on decides, not the one the run was launched from)."""
    plan_context.instance.add_run_tags(plan_context.run_id, {
        f"{NEED_TAG_PREFIX}{c.memory_class}": str(c.need) for c in limits.classes.values()})


def quiver_celery_executor():  # noqa: ANN201 - an ExecutorDefinition
    """Dagster's Celery executor (QUIVER_CELERY_BROKER, QUIVER_CELERY_BACKEND), each step sent to the queue of its
    memory class, with each class's need recorded on the run: workers check it before a step starts, and their
    concurrency per queue comes from their own memory (`quiver worker`)."""
    from dagster_celery import celery_executor
    from dagster_celery.executor import CeleryExecutor

    class MemoryBoundCeleryExecutor(CeleryExecutor):  # dagster-celery's loop reads its settings off the executor
        def execute(self, plan_context: Any, execution_plan: Any) -> Iterator[DagsterEvent]:
            limits = current_limits(log=plan_context.log)
            plan_context.log.info(f"{limits.describe()}; on Celery, each worker runs as many steps of its queue's "
                                  "class as its own memory allows (quiver worker), and checks each step's need "
                                  "first")
            record_needs(plan_context, limits)
            return super().execute(plan_context, execution_plan)

    @executor(name="quiver_celery", config_schema=celery_executor.config_schema,
              requirements=multiple_process_executor_requirements())
    def _create(init_context: InitExecutorContext) -> Executor:
        celery = celery_executor.executor_creation_fn(InitExecutorContext(  # type: ignore[misc]
            job=init_context.job, executor_def=celery_executor, executor_config=init_context.executor_config,
            instance=init_context.instance))
        celery.__class__ = MemoryBoundCeleryExecutor  # the same executor, with the needs recorded first
        return celery

    return _create.configured({"broker": {"env": "QUIVER_CELERY_BROKER"},
                               "backend": {"env": "QUIVER_CELERY_BACKEND"}}, name="quiver_celery")


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
            "mode": Field(Enum("QuiverExecutionMode", [EnumValue(m.value) for m in ExecutionMode]),
                          default_value=ExecutionMode.AUTO.value,
                          description="multiprocess: a process per step, forked from the forkserver; in_process: "
                                      "every step in the run's process, one at a time, the model loaded only if a "
                                      "step encodes; auto: in_process for a run whose sources held at most "
                                      "in_process_max_chunks chunks at their last materialization."),
            "in_process_max_chunks": Field(int, default_value=DEFAULT_IN_PROCESS_MAX_CHUNKS,
                                           description="The largest run (chunks) auto runs in process."),
            "retries": Field({"enabled": Field(dict, is_required=False), "disabled": Field(dict, is_required=False)},
                             default_value={"enabled": {}}, description="Step retries per RetryPolicy."),
        },
        requirements=multiple_process_executor_requirements(),
    )
    def _create(init_context: InitExecutorContext) -> MemoryBoundExecutor:
        config = init_context.executor_config
        modules = [*preload, *([PRELOAD_MODULE] if config["preload_model"] else [])]
        return MemoryBoundExecutor(init_context, {
            "mode": config["mode"], "in_process_max_chunks": config["in_process_max_chunks"],
            "max_concurrent": config["max_concurrent"] or None, "tag_concurrency_limits": [],
            "retries": config["retries"], "start_method": {"forkserver": {"preload_modules": modules}}})

    return _create


def job_executor(preload_model: bool = True):  # noqa: ANN201 - an ExecutorDefinition
    """The executor of Quiver's jobs. By default the memory-bound multiprocess executor on this machine; with
    QUIVER_EXECUTOR=celery, Dagster's Celery executor, which sends each step to the queue of its memory class
    (QUIVER_CELERY_BROKER, QUIVER_CELERY_BACKEND) for workers on any machine to run."""
    choice = os.environ.get("QUIVER_EXECUTOR", "multiprocess")
    if choice == "celery":
        return quiver_celery_executor()
    if choice != "multiprocess":
        raise QuiverError(f"QUIVER_EXECUTOR={choice!r}: use multiprocess (the default) or celery")
    return quiver_executor(preload_model)
