"""Loading a sentence-transformers model and running it: no Dagster here, the model pool resource builds on it.

Weights load on CPU (CUDA must never be initialized before a fork); an instance may then move to a GPU. A
model's fingerprint part, `weights_hash`, hashes the files that decide its vectors, by content, so a model
moved with its environment keeps its caches.
"""

import hashlib
import os
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from quiver.errors import ModelPoolError

PROBE_TEXT = "quiver model health probe"


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


@cache
def load_tokenizer(path: str) -> Any:
    if Path(path).is_dir():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    transformers.logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.model_max_length = 1 << 30  # we chunk ourselves; silence "sequence too long" warnings
    return tokenizer


def probe_ok(model: Any, dimension: int, preprocess: Any = None) -> bool:
    """Whether a model encodes a probe text into one finite vector of its dimension (a compiled runner is
    given the model's preprocessing)."""
    try:
        if isinstance(model, CompiledRunner):
            vector = model(preprocess([PROBE_TEXT]))
        else:
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


class CompiledRunner:
    """An exported model (ONNX Runtime or OpenVINO) run on tokenized features, with its own intra-op threads.

    Built in the process that runs it, never before a fork: neither runtime's thread pools survive one."""

    def __init__(self, backend: str, directory: Path, inputs: list[str], threads: int) -> None:
        self.backend, self.inputs = backend, inputs
        threads = max(1, threads)
        if backend.startswith("onnx"):
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # no busy-waiting between runs: the tokenizing and writing threads of the step need those cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.session = ort.InferenceSession(str(directory / "model.onnx"), options,
                                                providers=["CPUExecutionProvider"])
            self._run = lambda feed: self.session.run(None, feed)[0]
        else:
            import openvino as ov

            compiled = ov.Core().compile_model(str(directory / "model.xml"), "CPU", {
                "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                # fp32 wherever the graph is not int8: OpenVINO would otherwise run bf16 on CPUs that have it
                "INFERENCE_PRECISION_HINT": "f32"})
            self.request = compiled.create_infer_request()
            self._run = lambda feed: self.request.infer(feed)[0]

    def __call__(self, features: dict[str, Any]) -> np.ndarray:
        feed = {name: np.ascontiguousarray(np.asarray(features[name], dtype=np.int64)) for name in self.inputs}
        return np.asarray(self._run(feed), dtype=np.float32)


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def run_forward(model: Any, device: str, features: dict[str, Any], normalize: bool) -> np.ndarray:
    """float32 vectors of tokenized features, on the model's device, L2-normalized when asked."""
    if isinstance(model, CompiledRunner):
        vectors = model(features)
        if normalize:
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors.astype(np.float32, copy=False)
    import torch

    with torch.inference_mode():
        inputs = dict(features)  # modules add their outputs to the dict they are given
        if device != "cpu":
            from sentence_transformers.util import batch_to_device

            inputs = batch_to_device(inputs, torch.device(device))
        embeddings = model(inputs)["sentence_embedding"]
        if normalize:
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
        return embeddings.float().cpu().numpy()
