"""Staged pipelines: the same stage functions run either overlapped (threads and bounded queues) or inline.

In async mode a reader thread feeds the first stage and each stage runs in its own worker threads, with
a bounded queue in front of every stage, so a slow stage applies back-pressure instead of letting work
pile up in memory. An error in any stage stops every other stage at its next queue operation, and the
original exception is raised to the caller once every thread has ended. Sync mode runs the same
functions one item at a time, in order, for debugging and as the baseline the async mode is measured
against.
"""

import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["async", "sync"]
_END = object()
_POLL_S = 0.05


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: `fn` maps each item to exactly one output item.

    `ordered` stages see items in source order whatever the workers before them did; `finish`, called
    once after the last item, may return one more item for the stages after it (None: nothing).
    Both need a single worker.
    """

    name: str
    fn: Callable[[Any], Any]
    workers: int = 1
    ordered: bool = False
    finish: Callable[[], Any] | None = None

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"stage {self.name!r}: workers must be at least 1")
        if (self.ordered or self.finish is not None) and self.workers != 1:
            raise ValueError(f"stage {self.name!r}: an ordered or finishing stage needs exactly one worker")


@dataclass
class StageStats:
    items: int = 0
    busy_seconds: float = 0.0


@dataclass
class PipelineReport:
    mode: Mode
    items: int
    seconds: float
    stages: dict[str, StageStats] = field(default_factory=dict)

    def as_metadata(self) -> dict[str, Any]:
        """Where the time went: a stage busy for nearly all of `seconds` is the bottleneck."""
        return {
            "pipeline_mode": self.mode,
            "pipeline_seconds": round(self.seconds, 3),
            **{f"stage_{name}_busy_seconds": round(s.busy_seconds, 3) for name, s in self.stages.items()},
        }


class _Stopped(Exception):
    """Raised inside a worker when another stage failed: the worker just ends."""


class _Run:
    def __init__(self, source: Iterable[Any], stages: Sequence[Stage], queue_maxsize: int) -> None:
        self.source = source
        self.stages = list(stages)
        self.queues: list[queue.Queue[Any]] = [queue.Queue(maxsize=queue_maxsize) for _ in self.stages]
        self.stats = {stage.name: StageStats() for stage in self.stages}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.read = 0
        self._lock = threading.Lock()
        self._ended = [0] * len(self.stages)

    # -- queue operations that give up when the pipeline is stopping ------------------------------
    def put(self, index: int, item: Any) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                self.queues[index].put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self, index: int) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                return self.queues[index].get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc
        self.stop.set()

    # -- threads ----------------------------------------------------------------------------------
    def reader(self) -> None:
        try:
            for seq, item in enumerate(self.source):
                if self.stop.is_set():
                    return
                self.put(0, (seq, item))
                self.read = seq + 1
            for _ in range(self.stages[0].workers):
                self.put(0, _END)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.fail(exc)

    def worker(self, index: int) -> None:
        stage = self.stages[index]
        stats = self.stats[stage.name]
        last = index == len(self.stages) - 1
        pending: dict[int, Any] = {}
        next_seq = 0
        try:
            while True:
                message = self.get(index)
                if message is _END:
                    break
                ready = [message]
                if stage.ordered:
                    pending[message[0]] = message[1]
                    ready = []
                    while next_seq in pending:
                        ready.append((next_seq, pending.pop(next_seq)))
                        next_seq += 1
                for seq, item in ready:
                    started = time.perf_counter()
                    out = stage.fn(item)
                    with self._lock:
                        stats.items += 1
                        stats.busy_seconds += time.perf_counter() - started
                    if not last:
                        self.put(index + 1, (seq, out))
            with self._lock:
                self._ended[index] += 1
                all_ended = self._ended[index] == stage.workers
            if not all_ended:
                return
            if stage.finish is not None:
                started = time.perf_counter()
                extra = stage.finish()
                with self._lock:
                    stats.busy_seconds += time.perf_counter() - started
                if extra is not None and not last:
                    self.put(index + 1, (self.read, extra))
            if not last:
                for _ in range(self.stages[index + 1].workers):
                    self.put(index + 1, _END)
        except _Stopped:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.fail(exc)


def run_stages(
    source: Iterable[Any],
    stages: Sequence[Stage],
    *,
    mode: Mode = "async",
    queue_maxsize: int = 4,
    on_progress: Callable[[int], None] | None = None,
    progress_every_s: float = 10.0,
    thread_prefix: str = "quiver-stage",
) -> PipelineReport:
    """Push every source item through the stages; returns per-stage timings, raises the first error."""
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    started = time.perf_counter()
    if mode == "sync":
        report = _run_inline(source, stages, on_progress, progress_every_s)
        report.seconds = time.perf_counter() - started
        return report
    if queue_maxsize < 1:
        raise ValueError("queue_maxsize must be at least 1")
    run = _Run(source, stages, queue_maxsize)
    threads = [threading.Thread(target=run.reader, name=f"{thread_prefix}-reader", daemon=True)]
    for index, stage in enumerate(stages):
        threads += [threading.Thread(target=run.worker, args=(index,), name=f"{thread_prefix}-{stage.name}-{w}",
                                     daemon=True) for w in range(stage.workers)]
    for thread in threads:
        thread.start()
    last_report = time.perf_counter()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)
                if on_progress is not None and time.perf_counter() - last_report >= progress_every_s:
                    last_report = time.perf_counter()
                    on_progress(run.stats[stages[-1].name].items)
    except BaseException as exc:  # KeyboardInterrupt, or a failing progress callback: stop the threads too
        run.fail(exc)
        for thread in threads:
            thread.join()
    if run.error is not None:
        raise run.error
    return PipelineReport("async", run.read, time.perf_counter() - started, run.stats)


def _run_inline(source: Iterable[Any], stages: Sequence[Stage], on_progress: Callable[[int], None] | None,
                progress_every_s: float) -> PipelineReport:
    stats = {stage.name: StageStats() for stage in stages}
    last_report = time.perf_counter()
    items = 0

    def through(item: Any, first: int) -> None:
        for stage in stages[first:]:
            started = time.perf_counter()
            item = stage.fn(item)
            stats[stage.name].items += 1
            stats[stage.name].busy_seconds += time.perf_counter() - started

    for item in source:
        items += 1
        through(item, 0)
        if on_progress is not None and time.perf_counter() - last_report >= progress_every_s:
            last_report = time.perf_counter()
            on_progress(stats[stages[-1].name].items)
    for index, stage in enumerate(stages):
        if stage.finish is not None:
            started = time.perf_counter()
            extra = stage.finish()
            stats[stage.name].busy_seconds += time.perf_counter() - started
            if extra is not None and index + 1 < len(stages):
                through(extra, index + 1)
    return PipelineReport("sync", items, 0.0, stats)
