"""Building each backend's export from a loaded sentence-transformers model, into a given directory.

Chosen tools, none of which pins transformers: `torch.onnx.export` (the TorchScript exporter, opset 17) of the
whole model, onnxruntime's own transformer optimizer and quantizer, OpenVINO's converter, NNCF for static
quantization and model2vec for distillation. (optimum's exporters pin transformers releases that conflict
with the installed sentence-transformers.)
"""

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from quiver.backends import (
    DONE,
    INT8_RECIPES,
    ONNX_FILE,
    OPENVINO_FILE,
    ExportSpec,
    check_exportable,
    ensure_export,
)
from quiver.errors import ModelPoolError
from quiver.settings import PROJECT_ROOT

OPSET = 17
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# int8 per optimum's CPU configs: without VNNI, weights use 7 bits so that u8 x s8 sums never saturate.
REDUCE_RANGE = {"avx2": True, "avx512": True, "avx512_vnni": False, "arm64": False}


def model_inputs(model: Any) -> list[str]:
    names = list(model[0].tokenizer.model_input_names)
    return [n for n in INPUTS if n in names]


def export_onnx(model: Any, out: Path, fuse: bool = True) -> dict[str, Any]:
    """The whole model (transformer, pooling, normalization) as one ONNX graph with dynamic batch and length,
    output `sentence_embedding`; fused by onnxruntime's transformer optimizer when `fuse`."""
    import torch

    names = model_inputs(model)

    class Whole(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: Any) -> Any:
            return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    sample = model.preprocess(["an example text to trace the graph with", "and a second, longer one to pad"])
    raw = out / ("raw.onnx" if fuse else ONNX_FILE)
    dynamic = {**{n: {0: "batch", 1: "sequence"} for n in names}, "sentence_embedding": {0: "batch"}}
    with torch.inference_mode(), warnings.catch_warnings():
        # The tracer warns that shapes become graph constants: they do not (both axes are dynamic, and the
        # exported graph is checked against the model's own vectors by the tests).
        warnings.simplefilter("ignore")
        torch.onnx.export(Whole().eval(), tuple(sample[n] for n in names), str(raw), input_names=names,
                          output_names=["sentence_embedding"], dynamic_axes=dynamic,
                          opset_version=OPSET, dynamo=False)
    if not fuse:
        return {"inputs": names, "fused": False}
    from onnxruntime.transformers.optimizer import optimize_model

    config = model[0].auto_model.config
    optimized = optimize_model(str(raw), model_type="bert", num_heads=int(config.num_attention_heads),
                               hidden_size=int(config.hidden_size), opt_level=1)
    optimized.save_model_to_file(str(out / ONNX_FILE))
    fused = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    raw.unlink()
    return {"inputs": names, "fused": True, "fused_operators": fused}


def quantize_onnx_int8(model: Any, out: Path, quantization: str) -> dict[str, Any]:
    """The fused graph with int8 weights (per channel) and activations quantized at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    facts = export_onnx(model, out)
    fp32 = out / "fp32.onnx"
    (out / ONNX_FILE).rename(fp32)
    reduce_range = REDUCE_RANGE[quantization]
    # The fused operators are onnxruntime's own (com.microsoft), which ONNX shape inference cannot type: their
    # outputs are float.
    quantize_dynamic(str(fp32), str(out / ONNX_FILE), weight_type=QuantType.QInt8, per_channel=True,
                     reduce_range=reduce_range, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    fp32.unlink()
    return {**facts, "weights": "int8 per channel", "activations": "int8, dynamic", "reduce_range": reduce_range}


def attention_value_matmuls(graph: Any) -> list[str]:
    """The matmuls that weigh the values by attention probabilities: an input from a Softmax, through the
    exporter's pass-through ops (the NaN guard's Select, reshapes, converts)."""
    passing = ("Select", "Convert", "Reshape", "Transpose")

    def from_softmax(node: Any, hops: int = 4) -> bool:
        kind = node.get_type_name()
        if kind == "Softmax":
            return True
        return hops > 0 and kind in passing and any(
            from_softmax(i.get_source_output().get_node(), hops - 1) for i in node.inputs())

    return [op.get_friendly_name() for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"
            and any(from_softmax(i.get_source_output().get_node()) for i in op.inputs())]


def export_openvino(model: Any, out: Path, calibration: Sequence[str] | None = None) -> dict[str, Any]:
    """OpenVINO IR from the plain ONNX graph; statically quantized to int8 by NNCF on `calibration` texts, by
    the recipe in `INT8_RECIPES` (which is part of the export's key)."""
    import openvino as ov

    facts = export_onnx(model, out, fuse=False)
    graph = ov.convert_model(str(out / ONNX_FILE))
    if calibration is not None:
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            AdvancedSmoothQuantParameters,
        )

        recipe = INT8_RECIPES["openvino-int8"]
        names = facts["inputs"]
        size = int(recipe["calibration_batch"])
        batches = [model.preprocess(list(calibration[i:i + size])) for i in range(0, len(calibration), size)]
        dataset = nncf.Dataset([{n: b[n].numpy() for n in names} for b in batches])
        fp32 = attention_value_matmuls(graph)
        graph = nncf.quantize(
            graph, dataset, model_type=nncf.ModelType(recipe["model_type"]),
            preset=nncf.QuantizationPreset(recipe["preset"]), subset_size=len(batches),
            fast_bias_correction=bool(recipe["fast_bias_correction"]),
            ignored_scope=nncf.IgnoredScope(names=fp32) if fp32 else None,
            advanced_parameters=AdvancedQuantizationParameters(
                smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(recipe["smooth_quant_matmul"]))))
        facts.update(weights="int8", activations="int8, static (calibrated)", calibration_texts=len(calibration),
                     fp32_attention_value_matmuls=len(fp32), recipe=recipe)
    ov.save_model(graph, str(out / OPENVINO_FILE), compress_to_fp16=False)
    (out / ONNX_FILE).unlink()
    return facts


def distill_static(model_path: str, out: Path, pca_dims: int | None = 256) -> dict[str, Any]:
    """A model2vec static model distilled from the model (each vocabulary token through it, PCA to `pca_dims`),
    saved as a sentence-transformers directory (StaticEmbedding, then normalization)."""
    import numpy as np
    from model2vec.distill import distill
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, StaticEmbedding

    static = distill(model_name=model_path, pca_dims=pca_dims, device="cpu")
    # model2vec keeps float16 weights; float32 here, as every other backend's vectors are
    module = StaticEmbedding(static.tokenizer, embedding_weights=np.asarray(static.embedding, dtype=np.float32))
    SentenceTransformer(modules=[module, Normalize()], device="cpu").save(str(out))
    return {"dimension": int(static.embedding.shape[1]), "vocabulary": int(static.embedding.shape[0]),
            "distilled_by": "model2vec"}


def default_calibration_texts(count: int = 240) -> list[str]:
    """Calibration texts from the bundled default corpus (the standard library's docstrings), every
    ninth document so that modules of every kind are in it: real text, never a download."""
    from itertools import islice

    from quiver.sources import read_documents

    documents = islice(read_documents("stdlib", "stdlib", on_bad_record="skip"), 0, count * 9, 9)
    return [f"{d.title}\n{d.text}" for d in documents]


def build_export(spec: ExportSpec, load: Callable[[], Any],
                 calibration: Callable[[int], Sequence[str]] = default_calibration_texts) -> Callable[[Path], dict]:
    """The function that builds `spec`'s export into a directory (for `ensure_export`)."""

    def build(out: Path) -> dict[str, Any]:
        if spec.backend == "static":
            return distill_static(spec.model_path, out)
        model = load()
        if spec.backend == "onnx":
            return export_onnx(model, out)
        if spec.backend == "onnx-int8":
            return quantize_onnx_int8(model, out, spec.quantization)
        if spec.backend == "openvino":
            return export_openvino(model, out)
        if spec.backend == "openvino-int8":
            return export_openvino(model, out, list(calibration(spec.calibration_texts)))
        raise ValueError(f"the {spec.backend} backend has no export")

    return build


def export_in_subprocess(spec: ExportSpec, cache_dir: Path, log: Callable[[str], None]) -> Path:
    """The export's directory, made first by a process of its own when missing: the exporters start thread
    pools (torch's tracer, onnxruntime, OpenVINO, NNCF) that must never live in a process that later forks."""
    final = spec.directory(cache_dir)
    if (final / DONE).is_file():
        return final
    check_exportable(spec.model_path, spec.backend)
    path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "quiver.exporters", json.dumps(asdict(spec)), str(cache_dir)],
                          capture_output=True, text=True, cwd=str(PROJECT_ROOT),
                          env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"})
    for line in proc.stderr.splitlines():
        if line.startswith(("exporting ", "exported to ")):
            log(line)
    if proc.returncode != 0 or not (final / DONE).is_file():
        tail = "; ".join(proc.stderr.strip().splitlines()[-3:])
        raise ModelPoolError(f"exporting {spec.model_path} to the {spec.backend} backend failed: {tail}")
    return final


def _main(spec_json: str, cache_dir: str) -> None:
    from quiver.models import load_sentence_transformer

    fields = json.loads(spec_json)
    spec = ExportSpec(**{**fields, "versions": tuple(tuple(v) for v in fields["versions"])})
    ensure_export(spec, Path(cache_dir),
                  build_export(spec, lambda: load_sentence_transformer(spec.model_path, spec.max_seq_length or None)),
                  lambda message: print(message, file=sys.stderr, flush=True))


if __name__ == "__main__":
    _main(*sys.argv[1:3])
