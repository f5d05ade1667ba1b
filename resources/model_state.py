"""What the model pool holds in one OS process: the loaded model, its instances, and who loaded them.

Kept apart from the resource so that the registry outlives any one resource object: every pool configured the
same way in a process (same fingerprint) shares one PoolState.
"""

import os
import queue
import socket
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


def pool_facts(pool: Any, state: "PoolState | None") -> dict[str, Any]:
    """A model pool's facts for materialization metadata, from its state in this process (None: not loaded)."""
    from quiver.backends import COMPILED_BACKENDS, INT8_BACKENDS
    from quiver.models import torch_threads

    if state is None:
        return {"model": pool.model, "model_fingerprint": pool.fingerprint(), "model_loaded": False,
                "model_backend": pool.backend, "host": socket.gethostname(), "step_pid": os.getpid()}
    return {
        "model_loaded": True,
        "model": pool.model,
        "model_fingerprint": state.fingerprint,
        "model_inherited": state.inherited,
        "model_loaded_by_pid": state.loaded_by_pid,
        "model_loads_in_step_process": loads_in_this_process(),
        "model_loads_by_pid": {str(pid): n for pid, n in LOADS_BY_PID.items()},
        "host": socket.gethostname(),
        "step_pid": os.getpid(),
        "step_parent_pid": os.getppid(),
        "model_load_seconds": round(state.load_seconds, 3),
        "model_loaded_in": state.loaded_where,
        "model_instances": pool.instances,
        "model_device": pool.device,
        "model_backend": pool.backend,
        **({"model_quantization": pool.quantization} if pool.backend in INT8_BACKENDS else {}),
        **({"model_export": str(state.export_dir)} if state.export_dir else {}),
        "model_threads": pool.intra_op_threads() if state.backend in COMPILED_BACKENDS else torch_threads(),
    }
