"""The staged pipeline runner: order, back-pressure, errors, and sync/async equivalence."""

import random
import threading
import time

import pytest

from quiver.stages import Stage, run_stages


def _alive(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


def _jitter(seed: int):  # noqa: ANN202
    rng = random.Random(seed)
    lock = threading.Lock()

    def sleep() -> None:
        with lock:
            delay = rng.uniform(0, 0.004)
        time.sleep(delay)

    return sleep


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_ordered_stage_sees_source_order_whatever_the_workers_did(mode: str) -> None:
    jitter = _jitter(1)
    seen: list[int] = []

    def square(x: int) -> int:
        jitter()
        return x * x

    def record(x: int) -> int:
        seen.append(x)
        return x

    flushed: list[str] = []
    report = run_stages(range(200), [
        Stage("square", square, workers=4),
        Stage("plus", lambda x: x + 1, workers=3),
        Stage("record", record, ordered=True, finish=lambda: flushed.append("done") or -1),
        Stage("last", lambda x: x),
    ], mode=mode, queue_maxsize=2, thread_prefix="t-order")
    assert seen == [i * i + 1 for i in range(200)]
    assert flushed == ["done"]
    assert report.items == 200 and report.stages["square"].items == 200
    assert report.stages["last"].items == 201  # the finishing stage's extra item went on downstream
    assert _alive("t-order") == []


def test_bounded_queues_hold_back_the_reader() -> None:
    """With a slow last stage, the source is never more than the queues and workers ahead of it."""
    read = 0
    done = 0
    ahead: list[int] = []
    lock = threading.Lock()

    def source():  # noqa: ANN202
        nonlocal read
        for i in range(60):
            with lock:
                read += 1
                ahead.append(read - done)
            yield i

    def slow(x: int) -> int:
        nonlocal done
        time.sleep(0.005)
        with lock:
            done += 1
        return x

    run_stages(source(), [Stage("a", lambda x: x), Stage("slow", slow)], queue_maxsize=3, thread_prefix="t-bp")
    # queue before a (3) + a's worker (1) + queue before slow (3) + slow's worker (1) + the item being read
    assert max(ahead) <= 9
    assert done == 60


def test_error_in_a_middle_stage_stops_everything_and_surfaces_the_original() -> None:
    processed_after: list[int] = []
    consumed = 0

    class EncoderBroke(RuntimeError):
        pass

    def source():  # noqa: ANN202
        nonlocal consumed
        for i in range(10_000):
            consumed += 1
            yield i

    def encode(x: int) -> int:
        if x == 5:
            raise EncoderBroke(f"item {x} cannot be encoded")
        time.sleep(0.001)
        return x

    def insert(x: int) -> int:
        processed_after.append(x)
        return x

    with pytest.raises(EncoderBroke, match="item 5 cannot be encoded") as raised:
        run_stages(source(), [Stage("prepare", lambda x: x, workers=2), Stage("encode", encode),
                              Stage("insert", insert)], queue_maxsize=4, thread_prefix="t-err")
    assert raised.value.__traceback__ is not None
    assert _alive("t-err") == []
    assert 5 not in processed_after and max(processed_after, default=0) < 5
    assert consumed < 100  # the reader stopped too, instead of draining the source


def test_error_in_the_source_is_raised() -> None:
    def source():  # noqa: ANN202
        yield 1
        raise ValueError("corrupt batch in chunks.parquet")

    with pytest.raises(ValueError, match="corrupt batch"):
        run_stages(source(), [Stage("a", lambda x: x)], thread_prefix="t-src")
    assert _alive("t-src") == []


def test_progress_callback_runs_while_the_pipeline_runs() -> None:
    calls: list[int] = []

    def slow(x: int) -> int:
        time.sleep(0.01)
        return x

    run_stages(range(40), [Stage("slow", slow)], on_progress=calls.append, progress_every_s=0.05)
    assert len(calls) >= 2 and calls == sorted(calls) and calls[-1] <= 40


def test_invalid_stages_are_rejected() -> None:
    with pytest.raises(ValueError, match="needs exactly one worker"):
        Stage("x", lambda x: x, workers=2, ordered=True)
    with pytest.raises(ValueError, match="at least 1"):
        Stage("x", lambda x: x, workers=0)
