"""Progress of the command line's own waits (a Dagster run it started, an export in a process of its own): on a
terminal, a bar of the steps done with the time elapsed, ticking while a step works; elsewhere, plain lines."""

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

TICK_S = 0.5


class Progress:
    """`total` steps, each announced by `step(what)`; the bar's clock keeps moving while one runs."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        on_terminal = self.stream.isatty()
        # a terminal that does not say its size (0 x 0) would get no bar at all: assume 100 x 24 there
        sized = on_terminal and os.get_terminal_size(self.stream.fileno()).columns > 0
        self.bar = tqdm(total=total, desc=label, unit="step", file=self.stream, dynamic_ncols=sized,
                        ncols=None if sized else 100, nrows=None if sized else 24, disable=not on_terminal,
                        bar_format="{desc}: {n_fmt}/{total_fmt} steps |{bar}| {elapsed}{postfix}")
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if not self.bar.disable:
            self._ticker = threading.Thread(target=self._tick, name="quiver-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            self.bar.refresh()

    def say(self, message: str) -> None:
        """A line for the user, above the bar on a terminal (never through it)."""
        if self.quiet:
            return
        if self.bar.disable:
            print(message, file=self.stream, flush=True)
        else:
            self.bar.write(message, file=self.stream)

    def out(self, message: str) -> None:
        """A result on stdout, kept clear of the bar on a terminal."""
        if self.bar.disable:
            print(message, flush=True)
        else:
            self.bar.write(message, file=sys.stdout)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.say(f"==> {what}")
        self.bar.set_postfix_str(what, refresh=True)
        try:
            yield
        finally:
            self.bar.update(1)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.bar.set_postfix_str("done", refresh=False)
        self.bar.close()


@contextmanager
def progress(label: str, total: int, quiet: bool = False) -> Iterator[Progress]:
    bar = Progress(label, total, quiet=quiet)
    try:
        yield bar
    finally:
        bar.close()
