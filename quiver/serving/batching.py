"""Micro-batching: requests that arrive while the model is busy, or within a short window of each other, are
answered together, so that N concurrent queries cost one forward pass and one index search instead of N.

One worker takes the first waiting request, then keeps taking requests until the batch holds `max_batch`
queries or `window_s` has passed since the first one; the batch runs in one thread (the model's), and the
requests that came in meanwhile form the next batch. With batching off every request is a batch of its own.
"""

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchSettings:
    enabled: bool = True
    max_batch: int = 64  # queries per batch (a single larger request goes alone)
    window_s: float = 0.002  # longest wait for company after the first request of a batch

    @property
    def limit(self) -> int:
        return self.max_batch if self.enabled else 1


@dataclass
class _Pending(Generic[T, R]):
    item: T
    size: int
    future: "asyncio.Future[R]"


class MicroBatcher(Generic[T, R]):
    """Runs `run(items)` (which returns one result or exception per item, in order) on batches of submitted
    items, in a thread of its own; `on_batch(items, seconds)` is told about each batch."""

    def __init__(self, run: Callable[[list[T]], list[R | BaseException]], settings: BatchSettings,
                 size: Callable[[T], int] = lambda _: 1,
                 on_batch: Callable[[list[T], float], None] = lambda items, seconds: None) -> None:
        self.run = run
        self.settings = settings
        self.size = size
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._carried: _Pending[T, R] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quiver-batch")

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="quiver-micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def submit(self, item: T) -> R:
        """The item's result, once the batch it joined has run (its exception, raised, when it failed)."""
        assert self._queue is not None, "the batcher was not started"
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, self.size(item), future))
        return await future

    async def _next_batch(self) -> list[_Pending[T, R]]:
        assert self._queue is not None
        first = self._carried or await self._queue.get()
        self._carried = None
        batch, queries = [first], first.size
        deadline = time.perf_counter() + self.settings.window_s
        while queries < self.settings.limit:
            try:  # what is waiting already joins at once; then whatever comes within the window
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if queries + pending.size > self.settings.limit:
                self._carried = pending  # the first of the next batch
                break
            batch.append(pending)
            queries += pending.size
        return batch

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [p for p in await self._next_batch() if not p.future.done()]  # a client that gave up
            if not batch:
                continue
            items = [p.item for p in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run, items)
            except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
                results = [exc] * len(items)
            self.on_batch(items, time.perf_counter() - started)
            for pending, result in zip(batch, results, strict=True):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)
