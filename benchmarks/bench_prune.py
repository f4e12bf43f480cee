"""Pruning on real models: MiniLM unstructured (uniform, global, sensitivity-allocated, Wanda, SparseGPT)
and 2:4; MiniLM structured (feed-forward units and attention heads) and PP-OCRv4 det Conv channels,
by weight norm and from calibration data with least-squares refit.

Run: bash benchmarks/run.sh prune [--quick]   (writes benchmarks/results/prune.md)
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # noqa: E402,F401
import passes.prune.prune_pass  # noqa: E402,F401
import passes.prune.channels  # noqa: E402,F401
from benchmarks.harness import (  # noqa: E402
    file_size_bytes,
    markdown_table,
    minilm_task,
    ocr_det_task,
    run_measured,
    save_feeds,
)
from optimizer.verify.benchmark import benchmark  # noqa: E402
from optimizer.fileio.checker import check_model_full  # noqa: E402
from optimizer.fileio.model import load_model  # noqa: E402
from optimizer.fileio.save import save_model  # noqa: E402
from optimizer.pass_base import PassContext  # noqa: E402
from optimizer.pipeline import Pipeline  # noqa: E402
from optimizer.registry import create_pass  # noqa: E402
from optimizer.calibration.sensitivity import magnitude_order, sensitivity_scan, zero_count  # noqa: E402
from optimizer.graph.sparse_storage import size_report, to_sparse_initializers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "prune.md"
SPARSITIES = (0.1, 0.3, 0.5, 0.7, 0.9)
CALIBRATION_SAMPLES = 8
WANDA_SAMPLES = 256
PARTS = ("unstructured", "channels", "det")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_pass(model: onnx.ModelProto, name: str, context: PassContext | None = None, **options):
    result = Pipeline([create_pass(name, **options)], context=context).run(model)
    return result.model, result.runs[0].report


def save(model: onnx.ModelProto, folder: Path, name: str) -> Path:
    return save_model(model, folder / f"{name}.onnx")


def apply_allocation(model: onnx.ModelProto, allocation: dict[str, float]) -> onnx.ModelProto:
    """The prune pass's sensitivity mode with a precomputed allocation (one scan for all targets)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        if tensor.name in allocation:
            values = numpy_helper.to_array(tensor)
            flat = values.ravel().copy()
            flat[magnitude_order(values)[: zero_count(allocation[tensor.name], values.size)]] = 0
            tensor.CopyFrom(numpy_helper.from_array(flat.reshape(values.shape), tensor.name))
    return result


def minilm_unstructured(task, folder: Path, sparsities, lines: list[str]) -> None:
    model = load_model(task.model)
    feeds = task.calibration(CALIBRATION_SAMPLES)
    context = PassContext(calibration=lambda: iter(feeds))
    _, report = run_pass(model, "prune", sparsity=0.0)
    weights = sorted(report["details"]["tensors"])
    started = time.perf_counter()
    table = sensitivity_scan(model, feeds, weights=weights, provider="cpu", progress=True)
    scan_seconds = time.perf_counter() - started
    wanda_feeds = task.calibration(WANDA_SAMPLES)
    wanda = PassContext(calibration=lambda: iter(wanda_feeds))
    rows, sizes = [], []
    for sparsity in sparsities:
        candidates = {
            "uniform": run_pass(model, "prune", sparsity=sparsity)[0],
            "global": run_pass(model, "prune", mode="global", sparsity=sparsity)[0],
            "sensitivity": apply_allocation(model, table.allocate(sparsity)),
            "wanda": run_pass(model, "prune", wanda, mode="wanda", sparsity=sparsity)[0],
            "sparsegpt": run_pass(model, "prune", wanda, mode="sparsegpt", sparsity=sparsity)[0],
        }
        row = [f"{sparsity:.0%}"]
        for mode, candidate in candidates.items():
            metrics = task.evaluate(save(candidate, folder, f"minilm_{mode}"), task.model)
            row += [metrics["cosine_mean"], metrics["r1"]]
            log(f"minilm {mode} {sparsity}: {metrics}")
        rows.append(row)
        if sparsity in (0.5, 0.7, 0.9):
            sizes.append(size_row(sparsity, candidates["uniform"], weights))
    nm_rows = []
    for label, context in (("magnitude", None), ("wanda", wanda), ("sparsegpt", wanda)):
        pruned = run_pass(model, "prune", context, mode="nm", criterion=label)[0]
        metrics = task.evaluate(save(pruned, folder, f"minilm_nm_{label}"), task.model)
        nm_rows.append([label, metrics["cosine_mean"], metrics["cosine_min"], metrics["r1"]])
        log(f"minilm 2:4 {label}: {metrics}")
    table.allocate(0.5)
    lines += [
        "## all-MiniLM-L6-v2, unstructured pruning", "",
        f"{len(weights)} MatMul weights ({sum(layer.elements for layer in table.layers):,} parameters; "
        f"embeddings (Gather) excluded by default). Sensitivity scan: {CALIBRATION_SAMPLES} calibration "
        f"sentences x {len(table.sparsities)} sparsities, {scan_seconds:.0f} s; the same scan serves every target. "
        "Metrics on held-out sentences against fp32: mean embedding cosine, and R@1 on the 79-topic retrieval task.", "",
        f"Wanda: |w| x the input feature's L2 norm over {WANDA_SAMPLES} calibration sentences (the first "
        f"{CALIBRATION_SAMPLES} are the scan's), compared within each output. SparseGPT: X^T X over the same "
        f"{WANDA_SAMPLES} sentences, pruned and updated row by row.", "",
        markdown_table(["sparsity", "uniform cos", "uniform R@1", "global cos", "global R@1",
                        "sensitivity cos", "sensitivity R@1", "wanda cos", "wanda R@1",
                        "sparsegpt cos", "sparsegpt R@1"], rows), "",
        "2:4 semi-structured (every MatMul weight, groups of 4 along the reduction axis):", "",
        markdown_table(["ranked by", "cosine mean", "cosine min", "R@1"], nm_rows), "",
        "Size (uniform pruning; raw file, gzip of the file, sparse_initializer storage where smaller):", "",
        markdown_table(["sparsity", "raw MB", "gzip MB", "sparse-storage MB", "tensors stored sparse"], sizes), "",
        "<details><summary>Sensitivity table and the allocation for 50%</summary>", "", table.to_markdown(), "",
        "</details>", ""]
    check_sensitivity_pass(model, context, table, lines)
    cli_rows(task, folder, wanda_feeds, lines)


CLI = "import sys; from optimizer.cli import main; sys.exit(main(sys.argv[1:]))"


INT4_GPTQ = ["--quantize", "int4", "--quantize-mode", "weights", "--set", "quantize.weight_rounding=gptq"]


def cli_rows(task, folder: Path, feeds, lines: list[str]) -> None:
    """50% through the CLI in a child process each: tool time and peak RSS, and pruning then int8."""
    calibration = save_feeds(feeds, folder / "calibration")
    requests = {
        "magnitude 50%": ["--prune", "0.5", "--prune-mode", "uniform"],
        "wanda 50%": ["--prune", "0.5", "--prune-mode", "wanda"],
        "50%, default mode (auto: sparsegpt)": ["--prune", "0.5"],
        "sparsegpt 50% + int8 (default mode)": ["--prune", "0.5", "--quantize", "int8"],
        "int8 alone (default mode)": ["--quantize", "int8"],
        "sparsegpt 50% + int4 GPTQ (zeros kept)": ["--prune", "0.5", *INT4_GPTQ],
        "int4 GPTQ alone": INT4_GPTQ,
    }
    rows = []
    for label, flags in requests.items():
        target = folder / "cli.onnx"
        run = run_measured([sys.executable, "-c", CLI, "optimize", str(task.model), "-o", str(target), *flags,
                            "--calibration-data", str(calibration), "--quiet"])
        if run.returncode:
            rows.append([label, "-", "-", "-", "-", f"{run.seconds:.1f}", f"{run.peak_rss_mb:.0f}"])
            continue
        metrics = task.evaluate(target, task.model)
        rows.append([label, f"{file_size_bytes(target) / file_size_bytes(task.model):.3f}", metrics["cosine_mean"],
                     metrics["cosine_min"], metrics["r1"], f"{run.seconds:.1f}", f"{run.peak_rss_mb:.0f}"])
        log(f"minilm cli {label}: {metrics} {run.seconds:.1f} s {run.peak_rss_mb:.0f} MB")
    lines += ["Through the CLI (`optimize --prune 0.5 ... --calibration-data DIR`, a child process each; tool time "
              "and peak RSS include loading, calibration and saving):", "",
              markdown_table(["request", "size / fp32", "cosine mean", "cosine min", "R@1", "tool s", "peak RSS MB"],
                             rows), ""]


def size_row(sparsity: float, model: onnx.ModelProto, weights: list[str]) -> list:
    sparse, decisions = to_sparse_initializers(model, names=weights, storage="auto")
    sizes, sparse_sizes = size_report(model), size_report(sparse)
    stored = sum(1 for d in decisions.values() if d["stored_as"] == "sparse")
    return [f"{sparsity:.0%}", sizes["raw_bytes"] / 1e6, sizes["gzip_bytes"] / 1e6,
            sparse_sizes["raw_bytes"] / 1e6, stored]


def check_sensitivity_pass(model, context, table, lines: list[str]) -> None:
    """The pass in mode 'sensitivity' (its own scan) gives the same tensors as the allocation above."""
    pruned, report = run_pass(model, "prune", context, mode="sensitivity", sparsity=0.5,
                              scan_samples=CALIBRATION_SAMPLES)
    expected = apply_allocation(model, table.allocate(0.5))
    got = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    same = all(np.array_equal(got[t.name], numpy_helper.to_array(t)) for t in expected.graph.initializer)
    lines += [f"Pass `prune` mode `sensitivity` at 50% (own scan): achieved sparsity "
              f"{report['details']['achieved_sparsity']:.4f}, identical to the table's allocation: {same}.", ""]


def parameters(model: onnx.ModelProto, names=None) -> int:
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if names is None or names(t.name))


STRUCTURED_SAMPLES = 288


def structured_rows(task, folder: Path, configs, rounds: int, prefix: str):
    """Each (label, options, calibrated) config pruned with prune-channels, checked, evaluated, then
    timed side by side with fp32 and a second fp32 session (the noise floor)."""
    model = load_model(task.model)
    feeds = task.calibration(STRUCTURED_SAMPLES)
    context = PassContext(calibration=lambda: iter(feeds))
    rows, paths = [], []
    for index, (label, options, calibrated) in enumerate(configs):
        started = time.perf_counter()
        pruned, report = run_pass(model, "prune-channels", context if calibrated else None, **options)
        seconds = time.perf_counter() - started
        check_model_full(pruned)
        path = save(pruned, folder, f"{prefix}_{index}")
        metrics = task.evaluate(path, task.model)
        macs = report["details"].get("macs_total")
        removed = report["counts"].get("macs_removed", 0) / macs if macs else None
        log(f"{prefix} {label}: {metrics} macs removed {removed} in {seconds:.1f} s")
        rows.append([label, report["counts"].get("channels_removed", 0), report["counts"].get("heads_removed", 0),
                     f"{removed:.3f}" if removed is not None else "-", metrics, f"{seconds:.1f}"])
        paths.append(path)
    names = ["fp32", "fp32 (2nd session)"] + [row[0] for row in rows]
    bench = benchmark([task.model, task.model, *paths], task.latency_feeds(), names=names,
                      threads=2, rounds=rounds, warmup=5)
    for row, timing in zip(rows, bench.models[2:], strict=True):
        row.append(f"{timing.ratio_p50:.3f} / {timing.ratio_paired:.3f}")
    return rows, bench


def minilm_channels(task, folder: Path, lines: list[str], rounds: int) -> None:
    ffn = {"include": ("re:intermediate/dense/MatMul$",), "ratio": 0.25}
    samples = {"calibration_samples": STRUCTURED_SAMPLES}
    configs = [
        ("FFN -25%, L2 norm (no data)", ffn, False),
        ("FFN -25%, activation, no refit", {**ffn, **samples, "reconstruct": False}, True),
        ("FFN -25%, activation + refit", {**ffn, **samples}, True),
        ("FFN -25% + heads -25%, refit", {"ratio": 0.25, **samples}, True),
        ("same, 32 samples", {"ratio": 0.25, "calibration_samples": 32}, True),
        ("FLOPs budget 25%, refit", {"flops": 0.25, **samples}, True),
    ]
    rows, bench = structured_rows(task, folder, configs, rounds, "minilm")
    table = [[label, channels, heads, macs, f"{m['cosine_mean']:.4f} / {m['cosine_min']:.4f}", f"{m['r1']:.3f}",
              f"{m['mrr']:.3f}", seconds, latency] for label, channels, heads, macs, m, seconds, latency in rows]
    lines += [
        "## all-MiniLM-L6-v2, structured: feed-forward units and attention heads (prune-channels)", "",
        f"Calibration: {STRUCTURED_SAMPLES} real sentences and document chunks (the even-indexed ones); metrics on "
        "the held-out sentences and the 79-topic retrieval task against fp32. 'activation': channels chosen by "
        "the output error they cause in the next layer (structured optimal brain surgeon from the next layer's "
        "input second moments); 'refit': the next layer's weights and bias re-fitted by least squares so that its "
        "output matches the unpruned one. Heads: whole heads out of Q/K/V and the output projection. "
        "MACs: share of the model's MatMul multiply-adds removed (first calibration sentence's shapes). "
        "Latency: batch 1 x 128 tokens, 2 threads, interleaved; p50 ratio / median of paired ratios; "
        f"noise floor (second fp32 session) {bench.models[1].ratio_p50:.3f} / {bench.models[1].ratio_paired:.3f}.", "",
        markdown_table(["pruned", "FFN units removed", "heads removed", "MACs removed", "cosine mean / min",
                        "R@1", "MRR", "prune s", "latency ratio"], table), "",
        "fp32: R@1 and MRR of the unpruned model are the task's reference (see the quantize table).", "",
        bench.to_markdown(), ""]


def _ffn_weight_names(model: onnx.ModelProto) -> set[str]:
    names = set()
    for node in model.graph.node:
        if "/intermediate/dense/" in node.name or "/output/dense/" in node.name and "attention" not in node.name:
            names.update(name for name in node.input if name)
    return {t.name for t in model.graph.initializer if t.name in names}


def ocr_det_channels(folder: Path, lines: list[str], rounds: int) -> None:
    task = ocr_det_task()
    configs = [
        ("10% of channels, L2 norm (no data)", {"ratio": 0.1}, False),
        ("10%, activation, no refit", {"ratio": 0.1, "reconstruct": False}, True),
        ("10%, activation + refit", {"ratio": 0.1}, True),
        ("10%, activation + refit, any width", {"ratio": 0.1, "channel_multiple": 1}, True),
        ("FLOPs budget 10%, refit", {"flops": 0.1}, True),
        ("FLOPs budget 25%, refit", {"flops": 0.25}, True),
        ("FLOPs budget 40%, refit", {"flops": 0.4}, True),
    ]
    rows, bench = structured_rows(task, folder, configs, rounds, "det")
    table = [[label, channels, macs, f"{m['iou_0.3']:.3f}", f"{m['prob_mean_abs_diff']:.4f}", seconds, latency]
             for label, channels, _, macs, m, seconds, latency in rows]
    lines += [
        "## PP-OCRv4 det (weights in Constant nodes), structured: Conv channels (prune-channels)", "",
        "Calibration: the 9 calibration page images at 320 px (all of them); IoU of the probability map "
        "(threshold 0.3) against fp32 on the held-out real page; latency on the same page, 2 threads, "
        f"interleaved, p50 ratio / median paired ratio; noise floor {bench.models[1].ratio_p50:.3f} / "
        f"{bench.models[1].ratio_paired:.3f}. Groups that feed a residual Add or a Concat are not cut "
        "(the skip reasons are in the report). Kept widths are multiples of 8 (the default when cutting by "
        "ratio or flops: onnxruntime's CPU Conv kernels work in blocks of 8), except in the 'any width' row; "
        "a ratio then removes fewer channels than asked in narrow layers.", "",
        markdown_table(["pruned", "channels removed", "MACs removed", "IoU@0.3", "prob mean abs diff",
                        "prune s", "latency ratio"], table), "",
        bench.to_markdown(), ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="sparsities 0.5 only and fewer latency rounds")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS, help="Markdown file to write")
    args = parser.parse_args()
    parts = args.parts.split(",")
    sparsities = (0.5,) if args.quick else SPARSITIES
    rounds = 20 if args.quick else 60
    lines = ["# Pruning benchmark", "",
             f"onnxruntime CPU, {time.strftime('%Y-%m-%d')}, `benchmarks/bench_prune.py`.", ""]
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as scratch:
        folder = Path(scratch)
        task = minilm_task()
        if "unstructured" in parts:
            minilm_unstructured(task, folder, sparsities, lines)
        if "channels" in parts:
            minilm_channels(task, folder, lines, rounds)
        if "det" in parts:
            ocr_det_channels(folder, lines, rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
