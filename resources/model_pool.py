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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from dagster import ConfigurableResource, InitResourceContext, get_dagster_logger
from pydantic import Field

from quiver.backends import (
    COMPILED_BACKENDS,
    ExportSpec,
    check_backend,
    check_exportable,
    check_quantization,
    cpu_quantization_config,
    default_export_dir,
    library_versions,
)
from quiver.encoding import (
    PoolMetrics,
    TokenizedBatch,
    padded_tokens,
    plan_batches,
    thread_preprocessor,
    token_lengths,
)
from quiver.errors import ModelPoolError
from quiver.exporters import export_in_subprocess, model_inputs
from quiver.models import (
    CompiledRunner,
    load_sentence_transformer,
    load_tokenizer,
    probe_ok,
    resolve_devices,
    run_forward,
    weights_hash,
)
from quiver.settings import BUNDLED_MODEL, resolve_model
from resources.env import from_env
from resources.model_state import (  # noqa: F401 - _STATES: the process-wide registry, reset by benchmarks
    _STATES,
    _STATES_LOCK,
    LOADS_BY_PID,
    InstanceSet,
    ModelInstance,
    PoolState,
    loads_in_this_process,
    pool_facts,
)


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
    threads: int = Field(default_factory=lambda: int(os.environ.get("QUIVER_MODEL_THREADS") or 0), ge=0,
                         description="Intra-op CPU threads of every backend in a process; 0: cores / concurrent "
                         "model steps of the run (the memory-bound executor sets QUIVER_MODEL_THREADS), else all "
                         "cores.")
    backend: str = Field(default_factory=from_env("QUIVER_MODEL_BACKEND", "torch"),
                         description="torch, onnx, onnx-int8, openvino, openvino-int8 or static "
                         "(QUIVER_MODEL_BACKEND); all but torch run an export made once per machine.")
    quantization: str = Field(default_factory=from_env("QUIVER_MODEL_QUANTIZATION", cpu_quantization_config),
                              description="int8 kernels: avx2, avx512, avx512_vnni or arm64; default: what this "
                              "CPU supports (QUIVER_MODEL_QUANTIZATION).")
    export_dir: str = Field(default_factory=from_env("QUIVER_EXPORT_DIR", lambda: str(default_export_dir())),
                            description="Where exports are kept, keyed by weights, backend and quantization "
                            "(QUIVER_EXPORT_DIR; default ~/.cache/quiver/exports).")
    calibration_texts: int = Field(default=240, ge=8, description="Texts of the bundled default corpus that "
                                   "calibrate openvino-int8's activation ranges (made once, with the export).")
    batch_window: int = Field(default=4096, ge=1, description="Texts sorted by token length together before they "
                              "are cut into batches (less padding); output order is kept.")

    @property
    def model_path(self) -> str:
        return resolve_model(self.model)

    def fingerprint(self) -> str:
        """What determines the vectors: weights (by content, wherever they lie: a moved environment keeps its
        caches), max length, normalization, and for any backend but torch the backend, its quantization and
        the versions of the libraries that export and run it (torch's fingerprint is as it always was)."""
        parts = [weights_hash(self.model_path), str(self.max_seq_length), str(self.normalize)]
        spec = self.export_spec()
        if spec is not None:  # the export's key: backend, int8 config, recipe, calibration, library versions
            parts += [spec.backend, spec.key()]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]

    def tokenizer_fingerprint(self) -> str:
        """What decides the chunks: the model's own tokenizer and window, whatever backend runs it."""
        return self.model_copy(update={"backend": "torch"}).fingerprint()

    def export_spec(self) -> ExportSpec | None:
        """What the backend's export is made of (None for torch, which runs the model as loaded)."""
        if check_backend(self.backend) == "torch":
            return None
        check_exportable(self.model_path, self.backend)
        return ExportSpec(model_path=self.model_path, weights_sha256=weights_hash(self.model_path),
                          backend=self.backend, quantization=check_quantization(self.quantization),
                          max_seq_length=self.configured_window(),
                          versions=tuple(sorted(library_versions(self.backend).items())),
                          calibration_texts=self.calibration_texts if self.backend == "openvino-int8" else 0)

    def intra_op_threads(self) -> int:
        """Threads of each instance: as configured (or given by the executor), else this process's CPUs, shared
        by the instances."""
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, (self.threads or cpus) // self.instances)

    def setup_for_execution(self, context: InitResourceContext) -> None:
        state = _STATES.get(self.fingerprint())
        log = context.log or get_dagster_logger()
        if state is None:
            log.info(f"model {self.model} is not preloaded in pid {os.getpid()}: it will be loaded here on first "
                     "use (is platform_defs.preload in the executor's preload_modules?)")
        elif state.inherited:
            log.info(f"model {self.model} inherited from {state.loaded_where}, loaded in {state.load_seconds:.1f}s")

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
            spec = self.export_spec()
            # Made in a process of its own (the exporters' thread pools never live in a process that forks
            # steps, such as the forkserver), once per machine; here only loaded.
            export = export_in_subprocess(spec, Path(self.export_dir), get_dagster_logger().info) if spec else None
            # The static backend is its own sentence-transformers model; the compiled ones keep the model's own
            # preprocessing.
            static = export is not None and self.backend == "static"
            base = load_sentence_transformer(str(export) if static else self.model_path,
                                             None if static else self.max_seq_length)
            state = PoolState(
                fingerprint=fingerprint, path=self.model_path, max_seq_length_setting=self.max_seq_length,
                base=base, dimension=int(base.get_embedding_dimension()),
                # a static model reads any length (infinite): the chunks are still cut to the model's window
                max_seq_length=self.window_tokens() if self.backend == "static" else int(base.max_seq_length),
                load_seconds=time.perf_counter() - started, loaded_by_pid=os.getpid(),
                backend=self.backend, export_dir=export,
            )
            LOADS_BY_PID[os.getpid()] += 1
            _STATES[fingerprint] = state
            get_dagster_logger().info(
                f"loaded model {self.model} ({state.dimension}-d) in {state.load_seconds:.1f}s in pid {os.getpid()}")
            return state

    def preload(self) -> PoolState:
        """Load the CPU weights now (the forkserver calls this before forking steps)."""
        return self.state()

    def _instances(self, state: PoolState | None = None) -> tuple[PoolState, InstanceSet]:
        """The model (`state`, else this pool's) and this pool's instances of it (device and count as
        configured), built on first use."""
        state = state or self.state()
        key = (self.device, self.instances)
        found = state.instance_sets.get(key) if state.instance_pid == os.getpid() else None
        if found is not None:
            return state, found
        with state.lock:
            if state.instance_pid != os.getpid():  # a forked child: its parent's instances are not its own
                state.instance_sets = {}
                state.instance_pid = os.getpid()
                if self.threads:
                    import torch

                    torch.set_num_threads(self.threads)
            found = state.instance_sets.get(key)
            if found is None:
                devices = tuple(resolve_devices(self.device, self.instances))
                found = InstanceSet(devices, [], queue.Queue())
                for slot, device in enumerate(devices):
                    # Slot 0 on CPU is the loaded weights themselves; anything else is a copy, so that moving it
                    # to a GPU never moves the weights another configuration runs on.
                    share = slot == 0 and device == "cpu" and not any(
                        s.instances and s.instances[0].model is state.base for s in state.instance_sets.values())
                    if state.backend in COMPILED_BACKENDS:
                        model = self._runner(state)
                    else:
                        model = state.base if share else copy.deepcopy(state.base)
                        if device != "cpu":
                            model = model.to(device)
                    instance = ModelInstance(slot, device, model)
                    found.instances.append(instance)
                    found.available.put(instance)
                state.instance_sets[key] = found
        return state, found

    def _runner(self, state: PoolState) -> CompiledRunner:
        if self.device not in ("cpu", "auto"):
            raise ModelPoolError(f"the {state.backend} backend runs on the CPU only; device is {self.device!r}")
        assert state.export_dir is not None
        return CompiledRunner(state.backend, state.export_dir, model_inputs(state.base), self.intra_op_threads())

    def loaded(self) -> InstanceSet:
        """This pool's instances, built now if they were not yet."""
        return self._instances()[1]

    def dimension(self) -> int:
        return self.state().dimension

    def configured_window(self) -> int:
        """The window as configured or as the model directory says (0 when neither says), never loading."""
        if self.max_seq_length:
            return self.max_seq_length
        config = Path(self.model_path) / "sentence_bert_config.json"
        if config.is_file():
            value = json.loads(config.read_text()).get("max_seq_length")
            if value:
                return int(value)
        return 0

    def window_tokens(self) -> int:
        """Tokens the model reads of a text (special tokens included), known without loading its weights."""
        return self.configured_window() or self.state().max_seq_length

    def tokenizer(self) -> Any:
        """The model's own tokenizer, loaded alone (no weights) and cached per process (preloaded too)."""
        return load_tokenizer(self.model_path)

    # -- instances -------------------------------------------------------------------------------
    @contextmanager
    def acquire(self, state: PoolState | None = None) -> Iterator[ModelInstance]:
        """An instance for this worker alone; a previously failed one is checked (and reloaded) first."""
        state, instance_set = self._instances(state)
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
        if probe_ok(instance.model, state.dimension, thread_preprocessor(state)):
            instance.healthy = True
            return
        last_error = "probe encode failed or returned non-finite vectors"
        for attempt in range(1, self.max_reload_attempts + 1):
            try:
                if state.backend in COMPILED_BACKENDS:
                    fresh = self._runner(state)
                else:
                    fresh = load_sentence_transformer(str(state.export_dir or state.path),
                                                      None if state.export_dir else state.max_seq_length_setting)
                LOADS_BY_PID[os.getpid()] += 1
                if instance.device != "cpu":
                    fresh = fresh.to(instance.device)
                instance.reloads += 1
                with state.lock:
                    state.metrics.reloads += 1
                if probe_ok(fresh, state.dimension, thread_preprocessor(state)):
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
    def tokenize(self, texts: list[str], state: PoolState | None = None) -> list[TokenizedBatch]:
        """Texts as model inputs, one TokenizedBatch per forward pass; safe to call from any thread."""
        state = state or self.state()
        started = time.perf_counter()
        preprocess = thread_preprocessor(state)
        lengths = token_lengths(state, texts)
        batches = []
        for positions in plan_batches(lengths, self.batch_size, self.batch_window):
            features = preprocess([texts[i] for i in positions])
            mask = features.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else sum(lengths[i] for i in positions)
            batches.append(TokenizedBatch(positions, features, tokens))
        if state.backend == "static":  # a static model pads nothing (and its lengths are characters)
            padded = unsorted = sum(b.tokens for b in batches)
        else:
            padded = sum(padded_tokens([lengths[i] for i in b.positions]) for b in batches)
            unsorted = sum(padded_tokens(lengths[i:i + self.batch_size])
                           for i in range(0, len(texts), self.batch_size))
        with state.lock:
            state.metrics.tokenize_seconds += time.perf_counter() - started
            state.metrics.padded_tokens += padded
            state.metrics.padded_tokens_in_input_order += unsorted
        return batches

    def forward(self, batches: list[TokenizedBatch], rows: int, state: PoolState | None = None) -> np.ndarray:
        """float32 vectors (L2-normalized when configured) for tokenized batches, placed at their positions.

        Runs on one acquired instance; a failure or a non-finite vector marks the instance failed, and
        the work is retried on a healed instance, a bounded number of times.
        """
        state = state or self.state()
        out = np.zeros((rows, state.dimension), dtype=np.float32)
        if not batches:
            return out
        last: BaseException | None = None
        for _ in range(self.max_reload_attempts + 1):
            with self.acquire(state) as instance:  # the same model, not found a third time
                started = time.perf_counter()
                try:
                    for batch in batches:
                        out[batch.positions] = run_forward(instance.model, instance.device, batch.features,
                                                           self.normalize)
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

    def encoder(self, fingerprint: str) -> Callable[[list[str]], np.ndarray]:
        """`encode` on the loaded model of this fingerprint, found once: a server encodes every batch with the
        model its fingerprint names, without hashing the model's files and reading the libraries' versions
        again for every batch (a fingerprint took 3 ms with torch, 36 ms with openvino-int8, on a loaded
        machine; encode takes two)."""
        state = _STATES.get(fingerprint)
        if state is None:
            raise ModelPoolError(f"no model of fingerprint {fingerprint} is loaded in pid {os.getpid()}")
        return lambda texts: self.forward(self.tokenize(texts, state), len(texts), state)

    def loaded_state(self) -> PoolState | None:
        """The process's state for this model if it is loaded already (never loads it)."""
        return _STATES.get(self.fingerprint())

    def metrics(self) -> PoolMetrics:
        """What this process's pool has done so far (nothing, without loading the model, if it is not loaded)."""
        state = self.loaded_state()
        if state is None:
            return PoolMetrics()
        with state.lock:
            return copy.copy(state.metrics)

    def describe(self) -> dict[str, Any]:
        """Facts for materialization metadata: where the weights came from and what loading cost (a step that
        encoded nothing did not load the model, and says so)."""
        return pool_facts(self, self.loaded_state())
