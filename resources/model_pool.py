"""The embedding model as a Dagster resource, loaded once per OS process and shared.

A process-wide registry keyed by the model's fingerprint holds the weights, loaded on CPU. In a
multiprocess run the forkserver loads them before it forks (platform_defs/preload.py), so every step
process inherits them copy-on-write; a step that finds no preloaded model loads it and says so.
Workers take an instance with acquire/release, so no two threads ever run one instance at once; an
instance that fails or returns non-finite vectors is health-checked and reloaded, a bounded number of
times.
"""

import copy
import hashlib
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from dagster import ConfigurableResource, InitResourceContext, get_dagster_logger
from pydantic import Field

from quiver.errors import QuiverError
from quiver.settings import BUNDLED_MODEL, resolve_model

PROBE_TEXT = "quiver model health probe"

# Loads by the pid that performed them. A forked child inherits its parent's entries, so a step
# process that inherited the model shows the forkserver's pid here and none of its own.
LOADS_BY_PID: Counter[int] = Counter()
_STATES: dict[str, "PoolState"] = {}
_STATES_LOCK = threading.Lock()


class ModelPoolError(QuiverError):
    """An instance kept failing after the allowed reloads."""


def loads_in_this_process() -> int:
    return LOADS_BY_PID[os.getpid()]


@cache
def _weights_hash(path: str, files: tuple[tuple[str, int, float], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in files:
        with open(os.path.join(path, name), "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def weights_hash(name_or_path: str) -> str:
    """sha256 of a local model's weight files; a hub name stands for itself."""
    path = Path(name_or_path)
    if not path.is_dir():
        return hashlib.sha256(name_or_path.encode()).hexdigest()
    files = sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime)
        for p in path.rglob("*")
        if p.suffix in (".safetensors", ".bin", ".pt", ".onnx") and p.is_file()
    )
    return _weights_hash(str(path), tuple(files))


def load_sentence_transformer(path: str, max_seq_length: int | None) -> Any:
    """Load on CPU: CUDA must never be initialized before a fork."""
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the hub
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # our own progress reporting covers loading
    model = SentenceTransformer(path, device="cpu")
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


@dataclass
class ModelInstance:
    slot: int
    device: str
    model: Any
    healthy: bool = True
    failures: int = 0
    reloads: int = 0


@dataclass
class PoolMetrics:
    texts: int = 0
    tokens: int = 0
    batches: int = 0
    encode_seconds: float = 0.0
    wait_seconds: float = 0.0
    reloads: int = 0
    failures: int = 0

    def minus(self, earlier: "PoolMetrics") -> "PoolMetrics":
        return PoolMetrics(*(getattr(self, f) - getattr(earlier, f) for f in self.__dataclass_fields__))


@dataclass
class PoolState:
    """One model in one process: the CPU weights as loaded (or inherited), and the instances."""

    fingerprint: str
    path: str
    max_seq_length_setting: int | None
    base: Any
    dimension: int
    max_seq_length: int
    load_seconds: float
    loaded_by_pid: int
    instances: list[ModelInstance] = field(default_factory=list)
    available: "queue.Queue[ModelInstance]" = field(default_factory=queue.Queue)
    metrics: PoolMetrics = field(default_factory=PoolMetrics)
    lock: threading.Lock = field(default_factory=threading.Lock)
    instance_pid: int = -1  # instances are built per process, inside the step, never before a fork

    @property
    def inherited(self) -> bool:
        return self.loaded_by_pid != os.getpid()


def _probe_ok(model: Any, dimension: int) -> bool:
    try:
        vector = model.encode([PROBE_TEXT], convert_to_numpy=True, show_progress_bar=False)
    except Exception:  # noqa: BLE001 - any failure means unhealthy
        return False
    return vector.shape == (1, dimension) and bool(np.isfinite(vector).all())


def resolve_devices(device: str, instances: int) -> list[str]:
    """Device of each instance; 'cuda' spreads instances over the visible GPUs."""
    if device == "cpu":
        return ["cpu"] * instances
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            return ["cpu"] * instances
    if not torch.cuda.is_available():
        raise ModelPoolError(f"device {device!r} requested but CUDA is not available in this process")
    if device == "cuda":
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(instances)]
    return [device] * instances


class ModelPool(ConfigurableResource):
    """Sentence-transformers model shared by every asset, step, batch and thread of the process."""

    model: str = Field(default=BUNDLED_MODEL,
                       description="Any sentence-transformers name or path; 'bundled' is the packaged MiniLM.")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N or auto.")
    batch_size: int = Field(default=8, ge=1, description="Texts per forward pass: 8 is as fast as larger batches "
                            "for MiniLM on CPU and keeps activation memory per step small (bench/model_pool.py).")
    max_seq_length: int | None = Field(default=None, description="Tokens per text; default: the model's.")
    normalize: bool = Field(default=True, description="L2-normalize vectors (cosine = inner product).")
    instances: int = Field(default=1, ge=1, description="Independent instances (one per GPU, or CPU copies).")
    max_reload_attempts: int = Field(default=3, ge=1, description="Reloads of a failing instance before giving up.")
    acquire_timeout_s: float = Field(default=600.0, description="Longest wait for a free instance.")
    torch_threads: int = Field(default=0, ge=0, description="Intra-op CPU threads per process; 0 keeps torch's "
                               "default. Set cores / concurrent model steps so that steps do not oversubscribe.")

    @property
    def model_path(self) -> str:
        return resolve_model(self.model)

    def fingerprint(self) -> str:
        """What determines the vectors: weights, max length, normalization."""
        parts = [self.model_path, weights_hash(self.model_path), str(self.max_seq_length), str(self.normalize)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]

    def setup_for_execution(self, context: InitResourceContext) -> None:
        state = _STATES.get(self.fingerprint())
        log = context.log or get_dagster_logger()
        if state is None:
            log.info(f"model {self.model} is not preloaded in pid {os.getpid()}: it will be loaded here on first "
                     "use (is platform_defs.preload in the executor's preload_modules?)")
        elif state.inherited:
            log.info(f"model {self.model} inherited from pid {state.loaded_by_pid} (forkserver preload): no load")

    # -- loading ---------------------------------------------------------------------------------
    def state(self) -> PoolState:
        """The process-wide state for this model, loading the CPU weights on first use."""
        fingerprint = self.fingerprint()
        found = _STATES.get(fingerprint)
        if found is not None:
            return found
        with _STATES_LOCK:
            found = _STATES.get(fingerprint)
            if found is not None:
                return found
            started = time.perf_counter()
            base = load_sentence_transformer(self.model_path, self.max_seq_length)
            state = PoolState(
                fingerprint=fingerprint, path=self.model_path, max_seq_length_setting=self.max_seq_length,
                base=base, dimension=int(base.get_embedding_dimension()), max_seq_length=int(base.max_seq_length),
                load_seconds=time.perf_counter() - started, loaded_by_pid=os.getpid(),
            )
            LOADS_BY_PID[os.getpid()] += 1
            _STATES[fingerprint] = state
            get_dagster_logger().info(
                f"loaded model {self.model} ({state.dimension}-d) in {state.load_seconds:.1f}s in pid {os.getpid()}")
            return state

    def preload(self) -> PoolState:
        """Load the CPU weights now (the forkserver calls this before forking steps)."""
        return self.state()

    def _instances(self) -> PoolState:
        state = self.state()
        if state.instance_pid == os.getpid():
            return state
        with state.lock:
            if state.instance_pid != os.getpid():
                if self.torch_threads:
                    import torch

                    torch.set_num_threads(self.torch_threads)
                devices = resolve_devices(self.device, self.instances)
                state.instances = []
                state.available = queue.Queue()
                for slot, device in enumerate(devices):
                    model = state.base if slot == 0 else copy.deepcopy(state.base)
                    if device != "cpu":
                        model = model.to(device)
                    instance = ModelInstance(slot, device, model)
                    state.instances.append(instance)
                    state.available.put(instance)
                state.instance_pid = os.getpid()
        return state

    def loaded(self) -> PoolState:
        return self._instances()

    def dimension(self) -> int:
        return self.state().dimension

    def tokenizer(self) -> Any:
        """The model's own tokenizer, loaded alone (no weights) and cached per process (preloaded too)."""
        return _tokenizer(self.model_path)

    # -- instances -------------------------------------------------------------------------------
    @contextmanager
    def acquire(self) -> Iterator[ModelInstance]:
        """An instance for this worker alone; a previously failed one is checked (and reloaded) first."""
        state = self._instances()
        started = time.perf_counter()
        try:
            instance = state.available.get(timeout=self.acquire_timeout_s)
        except queue.Empty as exc:
            raise ModelPoolError(f"no model instance became free within {self.acquire_timeout_s}s") from exc
        with state.lock:
            state.metrics.wait_seconds += time.perf_counter() - started
        try:
            if not instance.healthy:
                self._heal(state, instance)
            yield instance
        finally:
            state.available.put(instance)

    def _heal(self, state: PoolState, instance: ModelInstance) -> None:
        if _probe_ok(instance.model, state.dimension):
            instance.healthy = True
            return
        last_error = "probe encode failed or returned non-finite vectors"
        for attempt in range(1, self.max_reload_attempts + 1):
            try:
                fresh = load_sentence_transformer(state.path, state.max_seq_length_setting)
                LOADS_BY_PID[os.getpid()] += 1
                if instance.device != "cpu":
                    fresh = fresh.to(instance.device)
                instance.reloads += 1
                with state.lock:
                    state.metrics.reloads += 1
                if _probe_ok(fresh, state.dimension):
                    instance.model = fresh
                    instance.healthy = True
                    get_dagster_logger().warning(
                        f"model instance {instance.slot} on {instance.device} reloaded after a failure "
                        f"(attempt {attempt})")
                    return
            except Exception as exc:  # noqa: BLE001 - reported below, with the attempts made
                last_error = f"{type(exc).__name__}: {exc}"
        raise ModelPoolError(
            f"model instance {instance.slot} of {self.model} on {instance.device} is unhealthy and "
            f"{self.max_reload_attempts} reload attempt(s) failed; last error: {last_error}")

    # -- encoding --------------------------------------------------------------------------------
    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 vectors, L2-normalized when configured, one row per text in order."""
        state = self._instances()
        if not texts:
            return np.zeros((0, state.dimension), dtype=np.float32)
        last: BaseException | None = None
        for _ in range(self.max_reload_attempts + 1):
            with self.acquire() as instance:
                started = time.perf_counter()
                try:
                    vectors = instance.model.encode(
                        texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                        convert_to_numpy=True, show_progress_bar=False)
                    if vectors.shape != (len(texts), state.dimension) or not np.isfinite(vectors).all():
                        raise ModelPoolError(f"instance {instance.slot} returned non-finite or misshapen vectors")
                    elapsed = time.perf_counter() - started
                    # The instance's own tokenizer, while this worker holds the instance: thread-safe.
                    tokens = _count_tokens(instance.model.tokenizer, texts, state.max_seq_length)
                except Exception as exc:  # noqa: BLE001 - the instance is marked and healed on next acquire
                    instance.healthy = False
                    instance.failures += 1
                    with state.lock:
                        state.metrics.failures += 1
                    last = exc
                    get_dagster_logger().warning(f"model instance {instance.slot} failed: {exc}; will reload")
                    continue
            with state.lock:
                m = state.metrics
                m.texts += len(texts)
                m.tokens += tokens
                m.batches += -(-len(texts) // self.batch_size)
                m.encode_seconds += elapsed
            return np.ascontiguousarray(vectors, dtype=np.float32)
        raise ModelPoolError(f"encoding failed after {self.max_reload_attempts + 1} attempts: {last}") from last

    def metrics(self) -> PoolMetrics:
        state = self.state()
        with state.lock:
            return copy.copy(state.metrics)

    def describe(self) -> dict[str, Any]:
        """Facts for materialization metadata: where the weights came from and what loading cost."""
        state = self.state()
        return {
            "model": self.model,
            "model_fingerprint": state.fingerprint,
            "model_inherited": state.inherited,
            "model_loaded_by_pid": state.loaded_by_pid,
            "model_loads_in_step_process": loads_in_this_process(),
            "model_loads_by_pid": {str(pid): n for pid, n in LOADS_BY_PID.items()},
            "step_pid": os.getpid(),
            "step_parent_pid": os.getppid(),
            "model_load_seconds": round(state.load_seconds, 3) if not state.inherited else 0.0,
            "model_instances": self.instances,
            "model_device": self.device,
        }


def _count_tokens(tokenizer: Any, texts: list[str], limit: int) -> int:
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=limit)
    return sum(len(ids) for ids in encoded["input_ids"])


def metrics_metadata(delta: PoolMetrics) -> dict[str, float | int]:
    seconds = delta.encode_seconds or 1e-9
    return {
        "texts_encoded": delta.texts,
        "tokens_encoded": delta.tokens,
        "encode_batches": delta.batches,
        "encode_seconds": round(delta.encode_seconds, 3),
        "texts_per_second": round(delta.texts / seconds, 1) if delta.texts else 0.0,
        "tokens_per_second": round(delta.tokens / seconds, 1) if delta.tokens else 0.0,
        "instance_wait_seconds": round(delta.wait_seconds, 4),
        "instance_reloads": delta.reloads,
    }


@cache
def _tokenizer(path: str) -> Any:
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 30  # we chunk ourselves; silence "sequence too long" warnings
    return tokenizer
