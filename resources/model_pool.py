"""The embedding model as a Dagster resource, loaded once per OS process and shared.

Every asset, step, batch and thread in a process gets the same loaded model from a process-wide
registry keyed by the model's fingerprint, so nothing reloads the weights per task.
"""

import hashlib
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from dagster import ConfigurableResource, get_dagster_logger
from pydantic import Field

from quiver.settings import BUNDLED_MODEL, resolve_model

_REGISTRY: dict[str, "LoadedModel"] = {}
_REGISTRY_LOCK = threading.Lock()
# Loads that happened in this process, by fingerprint; a forked child inherits the parent's counts.
LOADS: Counter[str] = Counter()
LOADS_PID = os.getpid()


def loads_in_this_process() -> int:
    """Model loads performed by this very process (not inherited from a parent before fork)."""
    return sum(LOADS.values()) if LOADS_PID == os.getpid() else 0


def _reset_after_fork() -> None:
    global LOADS_PID
    LOADS_PID = os.getpid()
    LOADS.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


@cache
def _weights_hash(path: str, sizes: tuple[tuple[str, int, float], ...]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in sizes:
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


@dataclass
class LoadedModel:
    fingerprint: str
    model: Any  # sentence_transformers.SentenceTransformer
    dimension: int
    max_seq_length: int
    load_seconds: float
    loaded_by_pid: int
    lock: threading.Lock


def _load(path: str, device: str, max_seq_length: int | None) -> Any:
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model never needs the hub
    import transformers
    from sentence_transformers import SentenceTransformer

    transformers.logging.set_verbosity_error()
    model = SentenceTransformer(path, device=device)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    model.eval()
    return model


class ModelPool(ConfigurableResource):
    """Sentence-transformers model shared by everything in the process."""

    model: str = Field(default=BUNDLED_MODEL,
                       description="Any sentence-transformers name or path; 'bundled' is the packaged MiniLM.")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N or auto.")
    batch_size: int = Field(default=64, ge=1)
    max_seq_length: int | None = Field(default=None, description="Tokens per text; default: the model's.")
    normalize: bool = Field(default=True, description="L2-normalize vectors (cosine = inner product).")

    @property
    def model_path(self) -> str:
        return resolve_model(self.model)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def fingerprint(self) -> str:
        """What determines the vectors: weights, max length, normalization."""
        parts = [self.model_path, weights_hash(self.model_path), str(self.max_seq_length),
                 str(self.normalize)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]

    def loaded(self) -> LoadedModel:
        fingerprint = self.fingerprint()
        found = _REGISTRY.get(fingerprint)
        if found is not None:
            return found
        with _REGISTRY_LOCK:
            found = _REGISTRY.get(fingerprint)
            if found is not None:
                return found
            started = time.perf_counter()
            model = _load(self.model_path, self.resolved_device(), self.max_seq_length)
            loaded = LoadedModel(
                fingerprint=fingerprint,
                model=model,
                dimension=int(model.get_embedding_dimension()),
                max_seq_length=int(model.max_seq_length),
                load_seconds=time.perf_counter() - started,
                loaded_by_pid=os.getpid(),
                lock=threading.Lock(),
            )
            LOADS[fingerprint] += 1
            _REGISTRY[fingerprint] = loaded
            get_dagster_logger().info(
                f"Loaded model {self.model} ({loaded.dimension}-d) in {loaded.load_seconds:.1f}s in pid {os.getpid()}"
            )
            return loaded

    def tokenizer(self) -> Any:
        """The model's own tokenizer; cheap, without loading the weights."""
        return _tokenizer(self.model_path)

    def dimension(self) -> int:
        return self.loaded().dimension

    def encode(self, texts: list[str]) -> np.ndarray:
        """float32 vectors, L2-normalized when configured, one row per text in order."""
        loaded = self.loaded()
        if not texts:
            return np.zeros((0, loaded.dimension), dtype=np.float32)
        with loaded.lock:
            vectors = loaded.model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                convert_to_numpy=True, show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


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
