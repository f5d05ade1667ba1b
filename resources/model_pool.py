"""The embedding model as a Dagster resource, loaded once per OS process and shared.

A process-wide registry keyed by the model's fingerprint holds the weights, loaded on CPU. In a
multiprocess run the forkserver loads them before it forks (platform_defs/preload.py), so every step
process inherits them copy-on-write; a step that finds no preloaded model loads it and says so.
Encoding is two steps, so that a pipeline can overlap them: `tokenize` (any thread, each with its own
copy of the tokenizer, no instance needed) and `forward` (on an acquired instance). Workers take an
instance with acquire/release, so no two threads ever run one instance at once; an instance that fails
or returns non-finite vectors is health-checked and reloaded, a bounded number of times.
"""

import copy
import hashlib
import json
import os
import queue
import socket
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
from quiver.settings import BUNDLED_MODEL, from_env, resolve_model

PROBE_TEXT = "quiver model health probe"

# Loads by the pid that performed them. A forked child inherits its parent's entries, so a step
# process that inherited the model shows the forkserver's pid here and none of its own.
LOADS_BY_PID: Counter[int] = Counter()
_STATES: dict[str, "PoolState"] = {}
_STATES_LOCK = threading.Lock()
# Each thread tokenizes with its own copy of the tokenizer: a shared fast tokenizer is not thread-safe.
_THREAD_LOCAL = threading.local()


class ModelPoolError(QuiverError):
    """An instance kept failing after the allowed reloads."""


def loads_in_this_process() -> int:
    return LOADS_BY_PID[os.getpid()]


@cache
def _weights_hash(path: str, files: tuple[tuple[str, int, float], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in files:
        digest.update(name.encode() + b"\x00")
        with open(os.path.join(path, name), "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# Files of a model directory that decide its vectors: weights, and the configuration of its modules
# (tokenizer, pooling, normalization). READMEs and the like do not.
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx", ".json", ".txt", ".model")


def weights_hash(name_or_path: str) -> str:
    """sha256 of the files of a local model that decide its vectors; a hub name stands for itself."""
    path = Path(name_or_path)
    if not path.is_dir():
        return hashlib.sha256(name_or_path.encode()).hexdigest()
    files = sorted(
        (p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime)
        for p in path.rglob("*")
        if p.suffix in _MODEL_SUFFIXES and p.is_file() and "__pycache__" not in p.parts
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
class TokenizedBatch:
    """One forward pass's texts, tokenized: which rows of the caller's list they fill, and the model inputs."""

    positions: list[int]
    features: dict[str, Any]
    tokens: int


def plan_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Positions of texts grouped into forward passes, longest first, so that padding stays small.

    Every encoding path uses this one plan, so the same texts always meet the same neighbours and get
    bit-identical vectors, whichever path (sync, async, query) encoded them.
    """
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


@dataclass
class PoolMetrics:
    texts: int = 0
    tokens: int = 0
    batches: int = 0
    tokenize_seconds: float = 0.0
    encode_seconds: float = 0.0
    wait_seconds: float = 0.0
    reloads: int = 0
    failures: int = 0

    def minus(self, earlier: "PoolMetrics") -> "PoolMetrics":
        return PoolMetrics(*(getattr(self, f) - getattr(earlier, f) for f in self.__dataclass_fields__))


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

    model: str = Field(default_factory=from_env("QUIVER_MODEL", BUNDLED_MODEL),
                       description="Any sentence-transformers name or path; 'bundled' is the packaged MiniLM.")
    device: str = Field(default_factory=from_env("QUIVER_DEVICE", "cpu"),
                        description="cpu, cuda, cuda:N or auto (QUIVER_DEVICE).")
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
        """What determines the vectors: weights (by content, wherever they lie: a moved environment keeps its
        caches), max length, normalization."""
        parts = [weights_hash(self.model_path), str(self.max_seq_length), str(self.normalize)]
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

    def _instances(self) -> tuple[PoolState, InstanceSet]:
        """The model and this pool's instances of it (device and count as configured), built on first use."""
        state = self.state()
        key = (self.device, self.instances)
        found = state.instance_sets.get(key) if state.instance_pid == os.getpid() else None
        if found is not None:
            return state, found
        with state.lock:
            if state.instance_pid != os.getpid():  # a forked child: its parent's instances are not its own
                state.instance_sets = {}
                state.instance_pid = os.getpid()
                if self.torch_threads:
                    import torch

                    torch.set_num_threads(self.torch_threads)
            found = state.instance_sets.get(key)
            if found is None:
                devices = tuple(resolve_devices(self.device, self.instances))
                found = InstanceSet(devices, [], queue.Queue())
                for slot, device in enumerate(devices):
                    # Slot 0 on CPU is the loaded weights themselves; anything else is a copy, so that moving it
                    # to a GPU never moves the weights another configuration runs on.
                    share = slot == 0 and device == "cpu" and not any(
                        s.instances and s.instances[0].model is state.base for s in state.instance_sets.values())
                    model = state.base if share else copy.deepcopy(state.base)
                    if device != "cpu":
                        model = model.to(device)
                    instance = ModelInstance(slot, device, model)
                    found.instances.append(instance)
                    found.available.put(instance)
                state.instance_sets[key] = found
        return state, found

    def loaded(self) -> InstanceSet:
        """This pool's instances, built now if they were not yet."""
        return self._instances()[1]

    def dimension(self) -> int:
        return self.state().dimension

    # -- memory ---------------------------------------------------------------------------------------
    def footprint_file(self) -> Path:
        cache = Path(os.environ.get("QUIVER_CACHE_DIR") or Path.home() / ".cache" / "quiver")
        return cache / "memory" / f"{self.fingerprint()}-b{self.batch_size}-l{self.window_tokens()}.json"

    def footprint(self, measure: bool = True) -> tuple[int, str]:
        """Bytes one embedding step needs (peak RSS of a fresh process that loads this model and encodes a
        full batch at the model's window), and where the figure came from. Measured once per machine and
        model; the concurrency limits divide the memory budget by it."""
        file = self.footprint_file()
        if file.is_file():
            recorded = json.loads(file.read_text())
            return int(recorded["bytes"]), f"measured {recorded['measured']}"
        if not measure or os.environ.get(FOOTPRINT_PROBE_ENV):
            return self._estimated_footprint(), "estimated (weights x 2 + 400 MiB): not measured yet"
        try:
            measured = measure_footprint(self)
        except Exception as exc:  # noqa: BLE001 - an estimate keeps limits conservative; the reason is logged
            get_dagster_logger().warning(f"could not measure the model's memory footprint: {exc}")
            return self._estimated_footprint(), f"estimated (weights x 2 + 400 MiB): measuring failed ({exc})"
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".tmp-{os.getpid()}-{file.name}")
        tmp.write_text(json.dumps({"bytes": measured, "measured": time.strftime("%Y-%m-%d"), "model": self.model}))
        os.replace(tmp, file)
        return measured, f"measured {time.strftime('%Y-%m-%d')}"

    def _estimated_footprint(self) -> int:
        path = Path(self.model_path)
        weights = sum(p.stat().st_size for p in path.rglob("*.safetensors")) if path.is_dir() else 0
        return 2 * weights + 400 * 2**20

    def window_tokens(self) -> int:
        """Tokens the model reads of a text (special tokens included), known without loading its weights."""
        if self.max_seq_length:
            return self.max_seq_length
        config = Path(self.model_path) / "sentence_bert_config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("max_seq_length")
            if value:
                return int(value)
        return self.state().max_seq_length

    def tokenizer(self) -> Any:
        """The model's own tokenizer, loaded alone (no weights) and cached per process (preloaded too)."""
        return _tokenizer(self.model_path)

    # -- instances -------------------------------------------------------------------------------
    @contextmanager
    def acquire(self) -> Iterator[ModelInstance]:
        """An instance for this worker alone; a previously failed one is checked (and reloaded) first."""
        state, instance_set = self._instances()
        started = time.perf_counter()
        try:
            instance = instance_set.available.get(timeout=self.acquire_timeout_s)
        except queue.Empty as exc:
            raise ModelPoolError(f"no model instance became free within {self.acquire_timeout_s}s") from exc
        with state.lock:
            state.metrics.wait_seconds += time.perf_counter() - started
        try:
            if not instance.healthy:
                self._heal(state, instance)
            yield instance
        finally:
            instance_set.available.put(instance)

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
    def tokenize(self, texts: list[str]) -> list[TokenizedBatch]:
        """Texts as model inputs, one TokenizedBatch per forward pass; safe to call from any thread."""
        state = self.state()
        started = time.perf_counter()
        preprocess = _thread_preprocessor(state)
        batches = []
        for positions in plan_batches(texts, self.batch_size):
            features = preprocess([texts[i] for i in positions])
            mask = features.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else 0
            batches.append(TokenizedBatch(positions, features, tokens))
        with state.lock:
            state.metrics.tokenize_seconds += time.perf_counter() - started
        return batches

    def forward(self, batches: list[TokenizedBatch], rows: int) -> np.ndarray:
        """float32 vectors (L2-normalized when configured) for tokenized batches, placed at their positions.

        Runs on one acquired instance; a failure or a non-finite vector marks the instance failed, and
        the work is retried on a healed instance, a bounded number of times.
        """
        state = self.state()
        out = np.zeros((rows, state.dimension), dtype=np.float32)
        if not batches:
            return out
        last: BaseException | None = None
        for _ in range(self.max_reload_attempts + 1):
            with self.acquire() as instance:
                started = time.perf_counter()
                try:
                    for batch in batches:
                        out[batch.positions] = _run_forward(instance, batch.features, self.normalize)
                    if not np.isfinite(out).all():
                        raise ModelPoolError(f"instance {instance.slot} returned non-finite vectors")
                    elapsed = time.perf_counter() - started
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
                m.texts += sum(len(b.positions) for b in batches)
                m.tokens += sum(b.tokens for b in batches)
                m.batches += len(batches)
                m.encode_seconds += elapsed
            return out
        raise ModelPoolError(f"encoding failed after {self.max_reload_attempts + 1} attempts: {last}") from last

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 vectors, L2-normalized when configured, one row per text in order."""
        return self.forward(self.tokenize(texts), len(texts))

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
            "host": socket.gethostname(),
            "step_pid": os.getpid(),
            "step_parent_pid": os.getppid(),
            "model_load_seconds": round(state.load_seconds, 3) if not state.inherited else 0.0,
            "model_instances": self.instances,
            "model_device": self.device,
        }


# Texts on which a direct Rust tokenizer must reproduce the model's own preprocessing before it is used:
# short and long (past any max length), unicode, case, stray whitespace.
PROBE_TEXTS = [
    "a",
    "Title\nA short body.",
    "  Leading and trailing  whitespace,\tand\ttabs \n",
    "Naïve café — 東京 Ünïcödé, emoji 🙂, and ligatures ﬁ",
    "MiXeD CaSe AND NUMBERS 12345 3.14159 e=mc^2",
    " ".join(f"token{i} supercalifragilisticexpialidocious" for i in range(700)),
]


class RustTextPreprocessor:
    """The model's text preprocessing done by its Rust tokenizer alone.

    Sentence-transformers ends in the same Rust encode_batch (truncate longest-first, pad to the longest),
    but its Python wrapper holds the GIL for most of the time; encode_batch does not, so tokenizing
    threads overlap with each other and with the forward passes. Used only when it reproduces the
    model's own features exactly (see `exact_rust_preprocessing`). Each thread has its own copy.
    """

    def __init__(self, tokenizer: Any, max_length: int, extra: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.names = list(tokenizer.model_input_names)
        self.extra = extra
        self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self.backend.enable_truncation(max_length, strategy="longest_first",
                                       direction=getattr(tokenizer, "truncation_side", "right"))
        self.backend.enable_padding(direction=getattr(tokenizer, "padding_side", "right"),
                                    pad_id=tokenizer.pad_token_id, pad_type_id=tokenizer.pad_token_type_id,
                                    pad_token=tokenizer.pad_token)

    def __call__(self, texts: list[str]) -> dict[str, Any]:
        import torch

        encodings = self.backend.encode_batch(texts, add_special_tokens=True)
        fields = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
        features: dict[str, Any] = {
            name: torch.from_numpy(np.array([getattr(e, fields[name]) for e in encodings], dtype=np.int64))
            for name in self.names
        }
        features.update(self.extra)
        return features


def exact_rust_preprocessing(state: PoolState) -> dict[str, Any] | None:
    """The non-tensor entries of the model's features if RustTextPreprocessor reproduces its preprocessing
    on PROBE_TEXTS, tensor for tensor; None (use the model's own preprocessing) otherwise."""
    import torch

    module = state.base[0]
    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None or not getattr(tokenizer, "is_fast", False) or not hasattr(tokenizer, "backend_tokenizer"):
        return None
    if not set(tokenizer.model_input_names) <= {"input_ids", "token_type_ids", "attention_mask"}:
        return None
    try:
        with state.preprocess_lock:
            expected = state.base.preprocess(PROBE_TEXTS)
        extra = {k: v for k, v in expected.items() if not isinstance(v, torch.Tensor)}
        got = RustTextPreprocessor(tokenizer, module.max_seq_length, extra)(PROBE_TEXTS)
    except Exception:  # noqa: BLE001 - any doubt: the model's own path
        return None
    same = set(got) == set(expected) and all(
        torch.equal(got[k], expected[k]) and got[k].dtype == expected[k].dtype if isinstance(expected[k], torch.Tensor)
        else got[k] == expected[k] for k in expected)
    return extra if same else None


def _thread_preprocessor(state: PoolState) -> Any:
    """This thread's own preprocess function for the model: the Rust tokenizer when it is exact, else
    the model's input module with a private tokenizer (a shared fast tokenizer is not thread-safe)."""
    cache = getattr(_THREAD_LOCAL, "preprocessors", None)
    if cache is None:
        cache = _THREAD_LOCAL.preprocessors = {}
    key = (state.fingerprint, os.getpid())
    found = cache.get(key)
    if found is None:
        if state.rust_check is None:
            with state.lock:
                if state.rust_check is None:
                    state.rust_check = (exact_rust_preprocessing(state),)
        module = state.base[0]
        extra = state.rust_check[0]
        if extra is not None:
            found = RustTextPreprocessor(module.tokenizer, module.max_seq_length, extra)
        elif hasattr(module, "processor"):
            module = copy.copy(module)  # shares the weights; only the tokenizer is private
            module.processor = copy.deepcopy(module.processor)
            found = module.preprocess
        else:  # an input module of another kind: serialize its use instead

            def found(texts: list[str], _state: PoolState = state) -> dict[str, Any]:
                with _state.preprocess_lock:
                    return _state.base.preprocess(texts)

        cache[key] = found
    return found


def _run_forward(instance: ModelInstance, features: dict[str, Any], normalize: bool) -> np.ndarray:
    import torch

    with torch.inference_mode():
        inputs = dict(features)  # modules add their outputs to the dict they are given
        if instance.device != "cpu":
            from sentence_transformers.util import batch_to_device

            inputs = batch_to_device(inputs, torch.device(instance.device))
        embeddings = instance.model(inputs)["sentence_embedding"]
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        return embeddings.float().cpu().numpy()


def metrics_metadata(delta: PoolMetrics) -> dict[str, float | int]:
    seconds = delta.encode_seconds or 1e-9
    return {
        "texts_encoded": delta.texts,
        "tokens_encoded": delta.tokens,
        "encode_batches": delta.batches,
        "tokenize_seconds": round(delta.tokenize_seconds, 3),
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


FOOTPRINT_PROBE_ENV = "QUIVER_FOOTPRINT_PROBE"


def measure_footprint(pool: ModelPool, timeout_s: float = 300) -> int:
    """Peak RSS of a fresh process doing what an embedding step does with this pool's configuration."""
    import subprocess
    import sys

    config = json.dumps({"model": pool.model, "batch_size": pool.batch_size, "max_seq_length": pool.max_seq_length,
                         "normalize": pool.normalize})
    env = {**os.environ, FOOTPRINT_PROBE_ENV: "1", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.run([sys.executable, "-m", "resources.model_pool", config], capture_output=True, text=True,
                          timeout=timeout_s, env=env, cwd=str(Path(__file__).resolve().parent.parent))
    if proc.returncode != 0:
        raise ModelPoolError(f"footprint probe failed: {proc.stderr.strip().splitlines()[-1:]}")
    return int(proc.stdout.strip().splitlines()[-1])


def _probe(config: dict[str, Any]) -> int:
    import resource

    import assets.embed_pipeline  # noqa: F401 - what an embedding step imports besides the model

    pool = ModelPool(**config)
    window = pool.window_tokens()
    pool.encode(["the quick brown fox jumps over the lazy dog " * (window // 4)] * pool.batch_size)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    import sys

    print(_probe(json.loads(sys.argv[1])))
