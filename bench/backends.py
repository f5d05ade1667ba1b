"""Embedding backends: speed on the same chunk texts, and retrieval quality on SciFact, all measured in one run.

Speed: the default corpus's chunks and SciFact's (the first --texts of each, as the pipeline's chunking cuts
them), encoded by the model pool of each backend (what the embedding stage runs), backends rotated within each
repeat, medians of --repeats. chunks/s and tokens/s as ratios to torch fp32, both ways (median of the
per-repeat ratios, ratio of the medians), and each backend's arithmetic rate as a fraction of the machine's
fp32 matmul peak, measured by a probe in the same run. Padding-aware batching (texts sorted by token length
within windows of 4,096) against batches cut in input order, torch, SciFact.

Quality gate: the pipeline with the retrieval_eval asset on SciFact, whole_document and tokens modes, for each
backend (a fresh instance each): nDCG@10 and Recall@100 beside torch fp32's.

    python bench/backends.py [--repeats 3] [--texts 1200] [--backends torch,onnx-int8,...] [--skip-quality]
                             [--skip-speed --quality-backends torch,onnx-int8,openvino-int8]
"""

import argparse
import json
import os
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, fresh_home, median, print_table, write_results  # noqa: E402

DATASETS = Path(os.environ.get("QUIVER_DATASETS") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
BACKENDS = ("torch", "onnx", "onnx-int8", "openvino", "openvino-int8", "static")
INT8 = ("onnx-int8", "openvino-int8")
GATE = 0.005  # nDCG@10 of an int8 backend within this of torch fp32's
RESULTS_FILE = RESULTS / "backends.json"


def chunk_texts(kind: str, path: str, limit: int, pool: Any) -> list[str]:
    """The first `limit` chunks of a source, as the chunks asset cuts them (token windows of the model)."""
    from quiver.chunking import ChunkSettings, chunk_documents
    from quiver.sources import read_documents

    docs = [(d.doc_id, d.title, d.text) for d in islice(read_documents(kind, path, on_bad_record="skip"), limit)]
    chunks = chunk_documents(pool.tokenizer(), docs, ChunkSettings(strategy="tokens",
                                                                   chunk_tokens=pool.window_tokens()))
    return [c.text for c in chunks][:limit]


def matmul_peak(threads: int, seconds: float = 3.0) -> float:
    """GFLOP/s of fp32 matrix products on this machine (torch, `threads` threads): the compute ceiling."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.mm(a, b)
        done += 1
    return done * 2 * 1024**3 / (time.perf_counter() - started) / 1e9


def flops_per_token(model_path: str, mean_padded_length: float) -> float:
    """Multiply-adds x 2 per token of a BERT-like encoder: projections, feed-forward, attention."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    hidden, layers, ff = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    return layers * (2 * (4 * hidden * hidden + 2 * hidden * ff) + 4 * hidden * mean_padded_length)


def speed(backends: list[str], corpora: dict[str, list[str]], repeats: int, threads: int,
          export_dir: str) -> dict[str, Any]:
    from resources.model_pool import ModelPool

    pools = {b: ModelPool(backend=b, threads=threads, export_dir=export_dir) for b in backends}
    pools["torch-input-order"] = ModelPool(threads=threads, batch_window=1)  # batches cut in input order
    for pool in pools.values():
        pool.encode(["warm up: load, export once per machine, first forward"])
    runs: dict[str, dict[str, list[dict[str, float]]]] = {c: {b: [] for b in pools} for c in corpora}
    for repeat in range(repeats):
        order = backends[repeat % len(backends):] + backends[:repeat % len(backends)]
        for corpus, texts in corpora.items():
            # torch in input order right after torch sorted, on SciFact only: the padding comparison
            modes = [m for b in order for m in ((b, "torch-input-order") if b == "torch" and corpus == "scifact"
                                                 else (b,))]
            for mode in modes:
                pool = pools[mode]
                before = pool.metrics()
                started = time.perf_counter()
                pool.encode(texts)
                seconds = time.perf_counter() - started
                delta = pool.metrics().minus(before)
                runs[corpus][mode].append({"seconds": seconds, "texts_per_s": len(texts) / seconds,
                                           "tokens_per_s": delta.tokens / seconds, "tokens": delta.tokens,
                                           "padded_tokens": delta.padded_tokens,
                                           "padded_tokens_in_input_order": delta.padded_tokens_in_input_order})
                print(f"repeat {repeat + 1} {corpus} {mode}: {len(texts) / seconds:.1f} texts/s", flush=True)
    return {"runs": {c: {m: r for m, r in modes.items() if r} for c, modes in runs.items()},
            "texts": {c: len(t) for c, t in corpora.items()}}


def ratios(over: list[dict[str, float]], under: list[dict[str, float]], key: str) -> tuple[float, float]:
    """(median of per-repeat ratios, ratio of medians) of `key`."""
    return (median([a[key] / b[key] for a, b in zip(over, under, strict=True)]),
            median([a[key] for a in over]) / median([b[key] for b in under]))


def quality(backend: str, dataset: Path, export_dir: str) -> dict[str, Any]:
    """retrieval_eval on the dataset, whole_document and tokens modes, in a fresh instance of its own."""
    fresh_home(f"quiver-bench-backends-{backend}-")
    os.environ["QUIVER_MODEL_BACKEND"] = backend
    from dagster import DagsterInstance, materialize

    from platform_defs.definitions import ALL_ASSETS, ALL_CHECKS
    from platform_defs.resources import build_resources
    from platform_defs.runs import add_partition

    res = build_resources(resolve_env=True)
    res["model_pool"] = res["model_pool"].model_copy(update={"export_dir": export_dir})
    out: dict[str, Any] = {}
    with DagsterInstance.get() as instance:
        for chunking in ("whole_document", "tokens"):
            name = f"scifact_{chunking}"
            res["sources"].add(name, str(dataset), "beir", chunking)
            add_partition(name, instance, judged=True)  # a partition of the ingest stages and of retrieval_eval
            started = time.perf_counter()
            meta: dict[str, dict[str, Any]] = {}
            # as the jobs run them: the source's stages, the index over every source, the source's evaluation
            for selection, partition, config in (
                    (["documents", "chunks", "embeddings"], name, {}), (["faiss_index"], None, {}),
                    (["retrieval_eval"], name, {"ops": {"retrieval_eval": {"config": {"stores": "faiss"}}}})):
                # a backend that fails an evaluation check (a floor, if one is set) is reported, not stopped at
                result = materialize([*ALL_ASSETS, *ALL_CHECKS], instance=instance, resources=res,
                                     partition_key=partition, selection=selection, run_config=config,
                                     raise_on_error=selection != ["retrieval_eval"])
                meta.update({e.materialization.asset_key.to_user_string(): {
                    k: v.value for k, v in e.materialization.metadata.items()}
                    for e in result.get_asset_materialization_events()})
            out[chunking] = {"ndcg@10": meta["retrieval_eval"]["faiss_ndcg@10"],
                             "recall@100": meta["retrieval_eval"]["faiss_recall@100"],
                             "chunks": meta["chunks"]["rows"], "pipeline_s": time.perf_counter() - started,
                             "embedding_stage_texts_per_s": meta["embeddings"].get("texts_per_second")}
            print(f"{backend} {chunking}: nDCG@10 {out[chunking]['ndcg@10']:.5f} "
                  f"R@100 {out[chunking]['recall@100']:.5f}", flush=True)
    os.environ.pop("QUIVER_MODEL_BACKEND", None)
    return out


def quality_from_eval(path: Path) -> dict[str, Any]:
    """torch fp32's figures as bench/eval.py measured them (exact FAISS, whole_document and tokens)."""
    results = json.loads(path.read_text())
    rows = {r["mode"]: r for r in results["rows"] if r["store"] == "faiss" and r["index"] == "flat"}
    return {mode: {"ndcg@10": rows[mode]["ndcg@10"], "recall@100": rows[mode]["recall@100"],
                   "chunks": rows[mode]["chunks"], "from": str(path)} for mode in ("whole_document", "tokens")}


def render(results: dict[str, Any], model_path: str) -> None:
    """The tables and targets of measured results, written to bench/results/backends.json."""
    args, peak, runs, texts = results["args"], results["matmul_peak_gflops"], results["speed"]["runs"], \
        results["speed"]["texts"]
    backends, gate = args["backends"].split(","), results["quality"]
    rows, summary = [], {}
    for corpus, modes in runs.items():
        for backend in backends:
            r = modes[backend]
            texts_ratio = ratios(r, modes["torch"], "texts_per_s")
            tokens_ratio = ratios(r, modes["torch"], "tokens_per_s")
            padded = median([x["padded_tokens"] / x["seconds"] for x in r])  # computed tokens/s, padding included
            mean_len = sum(x["padded_tokens"] for x in r) / (texts[corpus] * len(r))
            rate = padded * flops_per_token(model_path, mean_len) / 1e9 if backend != "static" else None
            summary.setdefault(corpus, {})[backend] = {
                "texts_per_s": median([x["texts_per_s"] for x in r]),
                "tokens_per_s": median([x["tokens_per_s"] for x in r]),
                "texts_ratio": texts_ratio, "tokens_ratio": tokens_ratio, "gflops": rate,
                "fraction_of_probe": rate / peak if rate else None}
            s = summary[corpus][backend]
            rows.append([corpus, backend, f"{s['texts_per_s']:.1f}", f"{s['tokens_per_s']:.0f}",
                         f"{texts_ratio[0]:.2f}x / {texts_ratio[1]:.2f}x",
                         "" if rate is None else f"{rate:.0f} ({rate / peak:.0%})"])
    sci = runs["scifact"]
    padding = {"sorted": ratios(sci["torch"], sci["torch-input-order"], "texts_per_s"),
               "padding_fraction_sorted": median([1 - x["tokens"] / x["padded_tokens"] for x in sci["torch"]]),
               "padding_fraction_input_order": median(
                   [1 - x["tokens"] / x["padded_tokens"] for x in sci["torch-input-order"]])}
    table = print_table(
        f"Embedding backends, same chunk texts ({max(texts.values())} per corpus), {args['threads']} thread(s), "
        f"medians of {args['repeats']}; ratio to torch fp32: median of per-repeat ratios / ratio of medians; "
        f"GFLOP/s in fp32-equivalent arithmetic, against an fp32 matmul probe's {peak:.0f} GFLOP/s",
        ["corpus", "backend", "chunks/s", "tokens/s", "vs torch", "GFLOP/s (of the probe)"], rows)
    table += "\n" + print_table("Padding-aware batching, torch, SciFact", ["measure", "value"], [
        ["padding, batches cut in input order", f"{padding['padding_fraction_input_order']:.1%}"],
        ["padding, sorted by token length within 4,096", f"{padding['padding_fraction_sorted']:.1%}"],
        ["speed, sorted / input order", f"{padding['sorted'][0]:.2f}x / {padding['sorted'][1]:.2f}x"]])
    if gate:
        quality_rows = []
        for backend, modes in gate.items():
            for chunking, q in modes.items():
                delta = q["ndcg@10"] - gate["torch"][chunking]["ndcg@10"]
                q["within_gate"] = abs(delta) <= GATE if backend in INT8 else None
                q["no_worse_than_gate"] = delta >= -GATE if backend in INT8 else None
                quality_rows.append([backend, chunking, f"{q['ndcg@10']:.5f}", f"{delta:+.5f}",
                                     f"{q['recall@100']:.5f}", "" if q["within_gate"] is None else q["within_gate"],
                                     "" if q["no_worse_than_gate"] is None else q["no_worse_than_gate"]])
        table += "\n" + print_table("Quality gate: SciFact retrieval_eval (exact FAISS); int8 nDCG@10 against torch "
                                    "fp32's", ["backend", "mode", "nDCG@10", "vs torch", "Recall@100",
                                                f"within ±{GATE}", f"at most {GATE} lower"], quality_rows)
    targets = []
    for reading, key in ((f"within ±{GATE}", "within_gate"), (f"at most {GATE} lower", "no_worse_than_gate")):
        passing = [b for b in INT8 if b in backends and b in gate and all(q[key] for q in gate[b].values())]
        best = max(passing, key=lambda b: min(summary[c][b]["texts_ratio"][k] for c in summary for k in (0, 1)),
                   default=None)
        if best:
            worst = min(summary[c][best]["texts_ratio"][k] for c in summary for k in (0, 1))
            targets.append([f"fastest int8 passing the gate read as {reading} ({best}) / torch, every corpus, "
                            "both ratios", f"{worst:.2f}x", ">= 2.5x", worst >= 2.5])
        elif gate:
            targets.append([f"fastest int8 passing the gate read as {reading}", "none passes", ">= 2.5x", False])
    targets.append(["padding-aware / input order, torch, SciFact (both ratios)",
                    f"{min(padding['sorted']):.2f}x", ">= 1.1x", min(padding["sorted"]) >= 1.1])
    table += "\n" + print_table("Targets", ["measure", "value", "target", "met"], targets)
    write_results("backends", {**results, "summary": summary, "padding": padding, "targets": targets,
                               "table": table})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--texts", type=int, default=1200, help="chunk texts of each corpus in the speed part")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--dataset", default=str(DATASETS / "scifact"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quality-backends", help="the backends the quality gate runs (default: all measured)")
    parser.add_argument("--torch-quality-from", metavar="EVAL_JSON",
                        help="take torch fp32's quality from bench/eval.py's results (exact FAISS rows, the same "
                        "pipeline on the same data) instead of running it again")
    parser.add_argument("--keep-quality", action="store_true", help="measure speed again and keep the quality "
                        "gate's figures already in bench/results/backends.json (written earlier today by this "
                        "script), measuring only the backends it lacks")
    parser.add_argument("--skip-speed", action="store_true", help="run only the quality gate of "
                        "--quality-backends (not timing-sensitive, so fit for a busy machine) and keep the speed "
                        "figures and the other backends' quality already in bench/results/backends.json, flagged "
                        "as from an earlier run")
    args = parser.parse_args()
    backends = args.backends.split(",")
    assert backends[0] == "torch", "torch fp32 is the reference: list it first"
    assert not (args.skip_speed and (args.keep_quality or args.skip_quality)), "--skip-speed measures quality only"
    home = fresh_home("quiver-bench-backends-")
    export_dir = os.environ.get("QUIVER_EXPORT_DIR") or str(home / "exports")
    from resources.model_pool import ModelPool

    reference = ModelPool(threads=args.threads)
    earlier = json.loads(RESULTS_FILE.read_text()) if args.keep_quality or args.skip_speed else {}
    measure = args.quality_backends.split(",") if args.quality_backends else backends
    kept = earlier["quality"] if args.keep_quality else {}
    if args.skip_speed:  # the other backends' quality figures stay as they were
        kept = {b: q for b, q in earlier["quality"].items() if b not in measure}
    if args.skip_speed:  # the speed rows are the earlier run's backends
        args.backends, args.repeats, args.texts = (earlier["args"][k] for k in ("backends", "repeats", "texts"))
        peak, measured = earlier["matmul_peak_gflops"], earlier["speed"]
    else:
        corpora = {"default corpus": chunk_texts("stdlib", "stdlib", args.texts, reference),
                   "scifact": chunk_texts("beir", args.dataset, args.texts, reference)}
        peak = matmul_peak(args.threads)
        print(f"fp32 matmul probe {peak:.0f} GFLOP/s on {args.threads} thread(s)", flush=True)
        measured = speed(backends, corpora, args.repeats, args.threads, export_dir)
    results: dict[str, Any] = {"args": vars(args), "matmul_peak_gflops": peak, "speed": measured,
                               "speed_kept_from_earlier_run": args.skip_speed,
                               "quality": kept, "quality_kept_from_earlier_run": bool(kept)}
    render(results, reference.model_path)  # what is measured so far is kept, whatever happens next
    if not args.skip_quality:
        for backend in measure:
            if backend in kept:
                continue
            if backend == "torch" and args.torch_quality_from:
                results["quality"][backend] = quality_from_eval(Path(args.torch_quality_from))
                continue
            results["quality"][backend] = quality(backend, Path(args.dataset), export_dir)
            render(results, reference.model_path)
    render(results, reference.model_path)


if __name__ == "__main__":
    main()
