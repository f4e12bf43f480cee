"""Weight sharing and codebook clustering on real models; writes benchmarks/results/share.md.

1. transformer_tied (bundled): `share` stores the tied embedding once (lm_head = Transpose of
   embed.weight). File size, bit-exactness, what onnxruntime runs after its graph optimizations,
   and interleaved latency against the original.
2. all-MiniLM-L6-v2: `cluster` at 4 bits (per channel and per tensor) against uniform symmetric
   4-bit weight quantization of the same tensors at the same granularity (fake-quantized in
   numpy and stored as float: same accuracy as real int4), on held-out sentence embeddings and
   the retrieval task; file size ratio and interleaved latency.

Run: bash benchmarks/run.sh share [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import passes  # noqa: E402,F401
import passes.share.cluster  # noqa: E402,F401
import passes.share.share_pass  # noqa: E402,F401
from benchmarks import harness  # noqa: E402
from optimizer.verify.benchmark import benchmark  # noqa: E402
from optimizer.fileio.model import load_model  # noqa: E402
from optimizer.pipeline import Pipeline  # noqa: E402
from optimizer.registry import create_pass  # noqa: E402
from passes.share.kmeans import uniform_fake_quantize  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "share.md"


def run_passes(model: onnx.ModelProto, *steps: tuple[str, dict]):
    started = time.perf_counter()
    result = Pipeline([create_pass(name, **options) for name, options in steps], check_each_pass=True).run(model)
    return result, time.perf_counter() - started


def ops_onnxruntime_runs(path: Path, folder: Path) -> dict[str, int]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / f"{path.stem}.ort.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    counts: dict[str, int] = {}
    for node in optimized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def tied_section(folder: Path, rounds: int) -> list[str]:
    original_path = REPO / "models" / "transformer_tied.onnx"
    original = load_model(original_path)
    result, seconds = run_passes(original, ("share", {}))
    shared_path = folder / "transformer_tied.share.onnx"
    onnx.save(result.model, shared_path)
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 512, (2, 32), dtype=np.int64)} for _ in range(8)]
    reference = ort.InferenceSession(str(original_path), providers=["CPUExecutionProvider"])
    candidate = ort.InferenceSession(str(shared_path), providers=["CPUExecutionProvider"])
    identical = all(np.array_equal(a, b) for feed in feeds
                    for a, b in zip(reference.run(None, feed), candidate.run(None, feed)))
    copy_bytes = 512 * 64 * 4
    size_before, size_after = original_path.stat().st_size, shared_path.stat().st_size
    latency_feeds = [{"input_ids": np.random.default_rng(0).integers(0, 512, (1, 32), dtype=np.int64)}]
    bench = benchmark([str(original_path), str(shared_path)], latency_feeds, names=["original", "share"],
                      threads=2, warmup=20, rounds=rounds, progress=True)
    report = result.runs[0].report
    return [
        "## transformer_tied: `share` (tied embedding stored once)", "",
        harness.markdown_table(["file", "bytes", "saved bytes", "copy bytes", "saved / copy", "outputs bit-identical",
                                "pass s"], [
            ["original", size_before, "", "", "", "", ""],
            ["share", size_after, size_before - size_after, copy_bytes, (size_before - size_after) / copy_bytes,
             identical, seconds]]),
        "", f"pass report: counts {report['counts']}, groups {report['details']['groups']}", "",
        f"ops onnxruntime runs (original): {ops_onnxruntime_runs(original_path, folder)}",
        f"ops onnxruntime runs (share): {ops_onnxruntime_runs(shared_path, folder)}", "",
        "Interleaved latency (CPU, 2 threads, input 1x32):", "", bench.to_markdown(), "",
    ]


def uniform_baseline(model: onnx.ModelProto, details: list[dict], bits: int) -> onnx.ModelProto:
    """The same tensors fake-quantized uniformly (symmetric, same granularity), stored as float."""
    baseline = onnx.ModelProto()
    baseline.CopyFrom(model)
    chosen = {d["tensor"]: d["granularity"] for d in details}
    for index, tensor in enumerate(baseline.graph.initializer):
        if tensor.name not in chosen:
            continue
        values = numpy_helper.to_array(tensor)
        granularity = chosen[tensor.name]
        axis = -1 if granularity == "per-tensor" else int(granularity.split("axis ")[1].rstrip(")"))
        rows = values.reshape(1, -1) if axis < 0 else np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
        fake = uniform_fake_quantize(rows, bits).astype(values.dtype)
        restored = fake.reshape(values.shape) if axis < 0 else np.moveaxis(
            fake.reshape((values.shape[axis],) + tuple(np.delete(values.shape, axis))), 0, axis)
        baseline.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(restored), tensor.name))
    return baseline


def minilm_section(folder: Path, rounds: int) -> list[str]:
    task = harness.minilm_task()
    original = load_model(task.model)
    size_original = task.model.stat().st_size
    rows, error_rows, paths = [], [], {}
    for granularity in ("per-channel", "per-tensor"):
        result, seconds = run_passes(original, ("cluster", {"bits": 4, "granularity": granularity}))
        details = result.runs[0].report["details"]["tensors"]
        clustered = folder / f"minilm.cluster4.{granularity}.onnx"
        onnx.save(result.model, clustered)
        uniform = folder / f"minilm.uniform4.{granularity}.onnx"
        onnx.save(uniform_baseline(original, details, 4), uniform)
        paths[granularity] = clustered
        for label, path, pass_seconds in ((f"cluster 4-bit {granularity}", clustered, f"{seconds:.1f}"),
                                          (f"uniform 4-bit {granularity} (fake-quant, float file)", uniform, "")):
            metrics = task.evaluate(path, task.model)
            rows.append([label, path.stat().st_size / size_original, metrics["cosine_mean"], metrics["cosine_min"],
                         metrics["r1"], metrics["mrr"], pass_seconds])
        for d in details:
            error_rows.append([d["tensor"], granularity, d["kmeans_sqnr_db"], d["uniform_sqnr_db"],
                               d["kmeans_mse"], d["uniform_mse"]])
    reference = task.evaluate(task.model, task.model)
    rows.insert(0, ["fp32", 1.0, reference["cosine_mean"], reference["cosine_min"], reference["r1"],
                    reference["mrr"], ""])
    bench = benchmark([str(task.model), str(paths["per-channel"])], task.latency_feeds(),
                      names=["fp32", "cluster 4-bit per-channel"], threads=2, warmup=5, rounds=rounds, progress=True)
    error_rows.sort(key=lambda row: (row[1], row[0]))
    return [
        "## all-MiniLM-L6-v2: `cluster` at 4 bits vs uniform 4-bit weights (same tensors, same granularity)", "",
        "cosine = embedding cosine vs fp32 on held-out sentences; r1/mrr = retrieval task.", "",
        harness.markdown_table(["model", "size / fp32", "cosine mean", "cosine min", "r1", "mrr", "pass s"], rows), "",
        f"ops onnxruntime runs (cluster per-channel): {ops_onnxruntime_runs(paths['per-channel'], folder)}", "",
        "Interleaved latency (CPU, 2 threads, 1x128 tokens):", "", bench.to_markdown(), "",
        "Per-tensor error (SQNR dB, higher is better):", "",
        harness.markdown_table(["tensor", "granularity", "k-means SQNR", "uniform SQNR", "k-means MSE",
                                "uniform MSE"], error_rows), "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_share_") as scratch:
        folder = Path(scratch)
        lines = ["# Weight sharing and codebook clustering", "",
                 f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, CPU, 2 threads.", ""]
        lines += tied_section(folder, args.rounds)
        lines += minilm_section(folder, max(20, args.rounds // 4))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
