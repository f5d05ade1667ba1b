"""Inference backends of the embedding model and their offline exports: no Dagster here.

`torch` runs the sentence-transformers model as loaded. The others run an export of it, made once per machine
from the local model directory into a cache directory keyed by the weights' sha256, the backend, the
quantization config and the versions of the libraries that made it:

- `onnx`: `torch.onnx.export` of the whole model (transformer, pooling, normalization), then onnxruntime's
  transformer graph fusion (attention, layer norm, GELU as single kernels);
- `onnx-int8`: that fused graph with int8 weights per channel and int8 activations quantized at run time
  (onnxruntime's `quantize_dynamic`), `reduce_range` where the CPU lacks VNNI (as optimum's configs do);
- `openvino`: the exported graph converted by OpenVINO, fp32;
- `openvino-int8`: that graph statically quantized by NNCF (activation ranges calibrated on real chunk texts),
  the attention probabilities kept fp32 where they weigh the values (`INT8_RECIPES`);
- `static`: a static embedding model distilled from the model by model2vec (one vector per token, averaged),
  saved as a sentence-transformers directory.

An export is built in a temporary directory beside its final place and renamed into it when complete, under
a file lock, so two processes exporting at once build it once and a reader never sees half an export.
"""

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from quiver.errors import ModelPoolError

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8", "static")
QUANTIZATION_CONFIGS = ("avx2", "avx512", "avx512_vnni", "arm64")
INT8_BACKENDS = ("onnx-int8", "openvino-int8")
COMPILED_BACKENDS = ("onnx", "onnx-int8", "openvino", "openvino-int8")  # run by a runtime, not by torch
# The libraries that make (and so decide) each backend's export and its vectors.
_LIBRARIES = {
    "torch": ("torch", "transformers", "sentence-transformers"),
    "onnx": ("torch", "transformers", "onnx", "onnxruntime"),
    "onnx-int8": ("torch", "transformers", "onnx", "onnxruntime"),
    "openvino": ("torch", "transformers", "onnx", "openvino"),
    "openvino-int8": ("torch", "transformers", "onnx", "openvino", "nncf"),
    "static": ("transformers", "model2vec", "sentence-transformers", "tokenizers"),
}
DONE = "export.json"  # written last into an export: its presence means complete
# How quiver/exporters.py makes exports (opset, fusion, distillation): part of every export's key, raised whenever
# a change there would make different exports.
EXPORT_RECIPE = 1
# How the int8 backends are quantized (openvino-int8's exporter reads its settings from here): each backend's recipe
# is part of its export's key, so a changed recipe makes a new export and model fingerprint, never reuses an old one.
INT8_RECIPES: dict[str, dict[str, Any]] = {
    "onnx-int8": {"weights": "int8 per channel", "activations": "int8, dynamic"},
    "openvino-int8": {
        "preset": "mixed", "model_type": "transformer", "smooth_quant_matmul": 0.95, "fast_bias_correction": True,
        # The attention probabilities stay fp32 where they meet the values: int8 steps of 1/127 round most of a
        # 256-token window's probabilities (about 1/256 each) to zero, the largest error int8 made on long chunks.
        "fp32": "softmax x values matmuls",
        # Default-corpus chunks cut to the window, or batches sorted by length, measured no closer to fp32.
        "calibration": "default corpus documents, every ninth", "calibration_batch": 8,
    },
}
ONNX_FILE = "model.onnx"
OPENVINO_FILE = "model.xml"


def default_export_dir() -> Path:
    """Exports are made once per machine: under the user's cache directory."""
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("QUIVER_CACHE_DIR") or user_cache / "quiver") / "exports"


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ModelPoolError(f"unknown model backend {backend!r}: use one of {', '.join(BACKENDS)}")
    return backend


def cpu_quantization_config(cpuinfo: str | None = None, machine: str | None = None) -> str:
    """The int8 kernels this CPU supports best: arm64, avx512_vnni, avx512 or avx2."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return "arm64"
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if "avx512_vnni" in flags or "avx512vnni" in flags:
        return "avx512_vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2"


def check_exportable(model_path: str, backend: str) -> None:
    if not Path(model_path).is_dir():
        raise ModelPoolError(
            f"cannot export {model_path!r} to the {backend} backend: exports are made offline from a local "
            "sentence-transformers directory, and this is not one (a hub name needs the hub). Download the model "
            "to a directory and set QUIVER_MODEL to its path, or use the torch backend.")


def check_quantization(config: str) -> str:
    if config not in QUANTIZATION_CONFIGS:
        raise ModelPoolError(f"unknown quantization config {config!r}: use one of {', '.join(QUANTIZATION_CONFIGS)}")
    return config


def library_versions(backend: str) -> dict[str, str]:
    versions = {"python": platform.python_version()} if backend == "openvino-int8" else {}  # the calibration corpus
    for name in _LIBRARIES[backend]:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


@dataclass(frozen=True)
class ExportSpec:
    """What decides an export: the model's weights (by content), the backend, the quantization config, the
    model's window and the libraries' versions."""

    model_path: str
    weights_sha256: str
    backend: str
    quantization: str
    max_seq_length: int
    versions: tuple[tuple[str, str], ...]
    calibration_texts: int = 0  # static quantization's calibration texts (openvino-int8)

    def key(self) -> str:
        parts = [self.weights_sha256, self.backend, self.quantization if self.backend in INT8_BACKENDS else "",
                 str(self.max_seq_length), json.dumps(self.versions), str(self.calibration_texts), str(EXPORT_RECIPE),
                 json.dumps(INT8_RECIPES.get(self.backend), sort_keys=True)]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:20]

    def directory(self, cache_dir: Path) -> Path:
        suffix = f"-{self.quantization}" if self.backend in INT8_BACKENDS else ""
        return cache_dir / f"{self.backend}{suffix}-{self.key()}"


def ensure_export(spec: ExportSpec, cache_dir: Path, build: Callable[[Path], dict[str, Any]],
                  log: Callable[[str], None] = lambda _m: None) -> Path:
    """The export's directory, building it first when it is not there (once, whoever else is building it)."""
    from filelock import FileLock

    final = spec.directory(cache_dir)
    if (final / DONE).is_file():
        return final
    check_exportable(spec.model_path, spec.backend)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / DONE).is_file():
            return final
        if final.exists():  # a crashed build never renamed it in, so this cannot be: but never trust it
            shutil.rmtree(final)
        for stale in cache_dir.glob(f".{final.name}.*"):  # left by a builder killed before it cleaned up
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
        try:
            started = time.perf_counter()
            log(f"exporting {spec.model_path} to the {spec.backend} backend into {final} (once per machine)")
            facts = build(tmp)
            record = {"backend": spec.backend, "quantization": spec.quantization, "model_path": spec.model_path,
                      "weights_sha256": spec.weights_sha256, "max_seq_length": spec.max_seq_length,
                      "versions": dict(spec.versions), "export_seconds": round(time.perf_counter() - started, 1),
                      **facts}
            (tmp / DONE).write_text(json.dumps(record, indent=1))
            tmp.chmod(0o755)  # a per-machine cache: readable by every user (mkdtemp makes it private)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"exported to {final} in {time.perf_counter() - started:.1f}s")
    return final


def export_record(directory: Path) -> dict[str, Any]:
    return json.loads((directory / DONE).read_text())
