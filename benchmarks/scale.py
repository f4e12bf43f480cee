"""Scale: synthetic transformer-shaped models of 0.5, 1, 2 and 4 GB (external data), compressed by
onnx-compress (int8 weight-only quantization; dedup) and by onnxruntime's quantize_dynamic, each
run in its own child under /usr/bin/time -v for wall time and peak RSS. Writes
benchmarks/results/scale.md.

Each model: a 32000 x 1024 embedding (Gather) and N layers of four 1024 x 1024 MatMul weights and
a 1024 x 4096 / 4096 x 1024 pair, random fp32 from a fixed seed, written tensor by tensor straight
to the data file (the builder never holds the model either).

Run: python benchmarks/scale.py [--sizes 0.5,1,2,4] [--work /tmp/onnx-compress-scale] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from optimizer.fileio.output_files import data_locations  # noqa: E402  (the checkout, not an installed copy)

RESULTS = REPO / "benchmarks" / "results" / "scale.md"
HIDDEN, VOCAB, ALIGNMENT_BYTES = 1024, 32000, 4096
LAYER_BYTES = 12 * HIDDEN * HIDDEN * 4
EMBEDDING_BYTES = VOCAB * HIDDEN * 4
MEMORY_LIMIT_BYTES = 16 * 2**30
DISK_MARGIN = 3.5  # input + outputs + onnxruntime's temporary copies, as multiples of the model size

OUR_CHILD = """
import importlib, sys
import passes
from optimizer.registry import pass_names
if "quantize" not in pass_names():
    importlib.import_module("passes.quantize.quantize_pass")
from optimizer.cli import main
sys.exit(main(sys.argv[1:]))
"""

ORT_CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, use_external_data_format=True)
"""


@dataclass
class Measured:
    size_label: str
    model_mb: float
    tool: str
    seconds: float | None
    peak_rss_mb: float | None
    output_mb: float | None
    status: str


def layer_count(size_gb: float) -> int:
    return max(1, round((size_gb * 2**30 - EMBEDDING_BYTES) / LAYER_BYTES))


def _write_tensor(stream, rng: np.random.Generator, name: str, shape: tuple[int, int]) -> TensorProto:
    offset = -(-stream.tell() // ALIGNMENT_BYTES) * ALIGNMENT_BYTES
    stream.write(bytes(offset - stream.tell()))
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(0.02)
    stream.write(values.tobytes())
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", f"{stream.name.rsplit('/', 1)[-1]}"), ("offset", offset),
                       ("length", values.nbytes)):  # fmt: skip
        tensor.external_data.add(key=key, value=str(value))
    return tensor


def _layer_nodes(index: int, x: str) -> tuple[list[onnx.NodeProto], list[tuple[str, tuple[int, int]]], str]:
    """Attention-shaped (q, k, v, o: d x d) and MLP-shaped (d x 4d, 4d x d) MatMuls with residuals."""
    p = f"layer{index}"
    weights = [(f"{p}.{n}", (HIDDEN, HIDDEN)) for n in ("q", "k", "v", "o")]
    weights += [(f"{p}.up", (HIDDEN, 4 * HIDDEN)), (f"{p}.down", (4 * HIDDEN, HIDDEN))]
    make = helper.make_node
    nodes = [make("MatMul", [x, f"{p}.{n}"], [f"{p}_{n}"]) for n in ("q", "k", "v")]
    nodes += [make("Add", [f"{p}_q", f"{p}_k"], [f"{p}_qk"]), make("Add", [f"{p}_qk", f"{p}_v"], [f"{p}_a"]),
              make("MatMul", [f"{p}_a", f"{p}.o"], [f"{p}_o"]), make("Add", [x, f"{p}_o"], [f"{p}_r1"]),
              make("MatMul", [f"{p}_r1", f"{p}.up"], [f"{p}_u"]), make("Relu", [f"{p}_u"], [f"{p}_g"]),
              make("MatMul", [f"{p}_g", f"{p}.down"], [f"{p}_d"]), make("Add", [f"{p}_r1", f"{p}_d"], [f"{p}_out"])]
    return nodes, weights, f"{p}_out"


def build_model(folder: Path, size_gb: float, seed: int = 0) -> Path:
    """The model file and its data file, one tensor in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Gather", ["embedding", "ids"], ["x0"])]
    shapes = [("embedding", (VOCAB, HIDDEN))]
    x = "x0"
    for index in range(layer_count(size_gb)):
        layer, weights, x = _layer_nodes(index, x)
        nodes += layer
        shapes += weights
    with open(folder / "model.onnx.data", "wb") as stream:
        initializers = [_write_tensor(stream, rng, name, shape) for name, shape in shapes]
    graph = helper.make_graph(nodes, "synthetic_transformer",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
                              initializers)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def _parse_time_report(text: str) -> tuple[float | None, float | None, str | None]:
    """(wall seconds, peak RSS MB, signal note) from GNU time -v."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    killed = re.search(r"Command terminated by signal (\d+)", text)
    seconds = None
    if wall:
        seconds = sum(float(part) * 60**power for power, part in enumerate(reversed(wall.group(1).split(":"))))
    return seconds, int(rss.group(1)) / 1024 if rss else None, f"killed by signal {killed.group(1)}" if killed else None


def run_timed(command: list[str], timeout_s: float) -> tuple[float | None, float | None, str]:
    """Run under /usr/bin/time -v in its own process group (killed whole on timeout)."""
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True, cwd=REPO)  # fmt: skip
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return None, None, f"timeout after {timeout_s:.0f} s"
    seconds, peak_mb, killed = _parse_time_report(stderr)
    if process.returncode == 0:
        return seconds, peak_mb, "ok"
    lines = [line.strip() for line in stderr.split("Command being timed")[0].splitlines()
             if line.strip() and not line.startswith(("Command exited", "Command terminated"))]
    reason = killed or (lines[-1][:160] if lines else f"exit {process.returncode}")
    return seconds, peak_mb, f"failed: {reason}"


def _output_mb(path: Path) -> float | None:
    """The model file plus every external-data file it records, or None when it was not written."""
    if not path.exists():
        return None
    model = onnx.load_model(str(path), load_external_data=False)
    files = [path, *(path.parent / name for name in data_locations(model))]
    return sum(file.stat().st_size for file in files if file.exists()) / 2**20


def _remove_outputs(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.name.startswith("out-"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def tool_commands(source: Path, folder: Path) -> dict[str, tuple[list[str], Path]]:
    python = sys.executable
    ours = [python, "-c", OUR_CHILD, "optimize", str(source), "--quiet", "--no-fusion-check"]
    quant_out, dedup_out = folder / "out-int8.onnx", folder / "out-dedup.onnx"
    ort_out = folder / "out-ort" / "model.onnx"
    return {
        "onnx-compress int8 weight-only": ([*ours, "-o", str(quant_out), "--passes", "constants-to-initializers,cleanup",
                                            "--quantize", "int8", "--quantize-mode", "weights"], quant_out),
        "onnx-compress dedup (share)": ([*ours, "-o", str(dedup_out), "--passes", "share,cleanup"], dedup_out),
        "onnxruntime quantize_dynamic int8": ([python, "-c", ORT_CHILD, str(source), str(ort_out),
                                               str(MEMORY_LIMIT_BYTES)], ort_out),
    }  # fmt: skip


def measure_size(size_gb: float, work: Path, timeout_s: float) -> list[Measured]:
    folder = work / f"{size_gb:g}gb"
    started = time.perf_counter()
    source = build_model(folder, size_gb)
    model_mb = _output_mb(source)
    print(f"built {source} ({model_mb:.0f} MB) in {time.perf_counter() - started:.0f} s; disk use of {work}: "
          f"{sum(f.stat().st_size for f in work.rglob('*') if f.is_file()) / 2**30:.1f} GB", flush=True)
    rows = []
    for tool, (command, output) in tool_commands(source, folder).items():
        output.parent.mkdir(exist_ok=True)
        seconds, peak_mb, status = run_timed(command, timeout_s)
        rows.append(Measured(f"{size_gb:g} GB", model_mb, tool, seconds, peak_mb, _output_mb(output), status))
        print(f"  {tool}: {status}, {seconds} s, peak {peak_mb} MB", flush=True)
        _remove_outputs(folder)
    return rows


def markdown(rows: list[Measured]) -> str:
    header = "| model | model MB | tool | wall s | peak RSS MB | output MB | status |\n|---|---:|---|---:|---:|---:|---|"
    def cell(value: float | None, digits: int = 0) -> str:
        return "-" if value is None else f"{value:.{digits}f}"
    lines = [f"| {r.size_label} | {cell(r.model_mb)} | {r.tool} | {cell(r.seconds, 1)} | {cell(r.peak_rss_mb)} | "
             f"{cell(r.output_mb)} | {r.status} |" for r in rows]  # fmt: skip
    return "\n".join([header, *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0.5,1,2,4", help="model sizes in GB, comma-separated (ascending)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/onnx-compress-scale"), help="work folder")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per tool run")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Markdown table to write")
    args = parser.parse_args()
    sizes = sorted(float(size) for size in args.sizes.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    rows: list[Measured] = []
    try:
        for size_gb in sizes:
            free_gb = shutil.disk_usage(args.work).free / 2**30
            if free_gb < DISK_MARGIN * size_gb + 1:
                print(f"stopping before {size_gb:g} GB: {free_gb:.0f} GB free on {args.work}", flush=True)
                break
            rows.extend(measure_size(size_gb, args.work, args.timeout))
            if not args.keep:
                shutil.rmtree(args.work / f"{size_gb:g}gb")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    table = markdown(rows)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(_report(table, rows))
    print(table)
    return 0


def _report(table: str, rows: list[Measured]) -> str:
    scaling = []
    for tool in dict.fromkeys(row.tool for row in rows):
        done = [row for row in rows if row.tool == tool and row.status == "ok" and row.seconds]
        if len(done) >= 2:
            per_gb = ", ".join(f"{row.seconds / (row.model_mb / 1024):.1f}" for row in done)
            scaling.append(f"- {tool}: seconds per GB of model {per_gb} (smallest to largest)")
    return (f"# Scale\n\n{__doc__.split(chr(10) + chr(10), 1)[1].split('Run:')[0].strip()}\n\n"
            f"Machine: {os.cpu_count()} cores; peak RSS is GNU time's \"Maximum resident set size\"; onnxruntime's "
            f"quantizer runs under a {MEMORY_LIMIT_BYTES // 2**30} GB address-space limit.\n\n{table}\n\n"
            + "\n".join(scaling) + "\n\n" + NOTES)


NOTES = """Why onnx-compress stays bounded: models with more than 256 MB of external data load lazily (every
check is made, no weight is read; passes see read-only memory maps whose clean pages are dropped from
the process every 0.1 s), arrays a pass creates are spilled to a temporary file at export, and the
save copies every tensor file-to-file. int8 weight-only quantization therefore peaks at about its
int8 output plus one tensor's temporaries; dedup peaks at a constant set by the share pass's own
per-tensor work. Time per GB falls with size because process start-up (~1 s) is fixed.
onnxruntime's quantize_dynamic loads the whole model and holds about three copies.
"""


if __name__ == "__main__":
    sys.exit(main())
