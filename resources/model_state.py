"""What the model pool holds in one OS process: the loaded model, its instances, and who loaded them.

Kept apart from the resource so that the registry outlives any one resource object: every pool configured the
same way in a process (same fingerprint) shares one PoolState.
"""

import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quiver.encoding import PoolMetrics

# Loads by the pid that performed them. A forked child inherits its parent's entries, so a step
# process that inherited the model shows the forkserver's pid here and none of its own.
LOADS_BY_PID: Counter[int] = Counter()
_STATES: dict[str, "PoolState"] = {}
_STATES_LOCK = threading.Lock()


def loads_in_this_process() -> int:
    return LOADS_BY_PID[os.getpid()]


@dataclass
class ModelInstance:
    slot: int
    device: str
    model: Any
    healthy: bool = True
    failures: int = 0
    reloads: int = 0


@dataclass
class InstanceSet:
    """The instances of one (device, count) configuration of a model, in the process that uses them."""

    devices: tuple[str, ...]
    instances: list[ModelInstance]
    available: "queue.Queue[ModelInstance]"


@dataclass
class PoolState:
    """One model in one process: the CPU weights as loaded (or inherited), and its instance sets."""

    fingerprint: str
    path: str
    max_seq_length_setting: int | None
    base: Any
    dimension: int
    max_seq_length: int
    load_seconds: float
    loaded_by_pid: int
    instance_sets: dict[tuple[str, int], InstanceSet] = field(default_factory=dict)
    metrics: PoolMetrics = field(default_factory=PoolMetrics)
    lock: threading.Lock = field(default_factory=threading.Lock)
    preprocess_lock: threading.Lock = field(default_factory=threading.Lock)
    # (extra feature entries,) once checked whether the Rust tokenizer reproduces the model's preprocessing;
    # (None,) when it does not.
    rust_check: tuple[dict[str, Any] | None] | None = None
    instance_pid: int = -1  # instance sets are built per process, inside the step, never before a fork
    backend: str = "torch"
    export_dir: Path | None = None  # the backend's export (None for torch)

    @property
    def inherited(self) -> bool:
        return self.loaded_by_pid != os.getpid()

    @property
    def loaded_where(self) -> str:
        """Where the weights this process uses were loaded, in words."""
        if self.inherited:
            return (f"pid {self.loaded_by_pid}, before it forked this step's process (a preload: the executor's "
                    "forkserver, or a Celery worker)")
        return f"this step's process (pid {self.loaded_by_pid})"
