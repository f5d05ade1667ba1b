"""A background thread that samples something at a fixed interval while a `with` block runs (peak memory of
step processes in the executor, of process trees in the benchmarks)."""

import threading


class Sampler:
    """Calls `sample()` every `interval_s` while the `with` block runs."""

    interval_s = 0.1

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"quiver-{type(self).__name__}")

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
