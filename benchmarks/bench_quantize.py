"""Quantization on real models, side by side with onnxruntime's quantizer, same data.

For all-MiniLM-L6-v2, PP-OCRv4 rec and PP-OCRv4 det: fp32; onnxruntime's quantize_dynamic and
quantize_static (QDQ, per channel, its default MinMax calibration) on the model as shipped and,
where that fails (weights in Constant nodes), on a copy normalized by constants-to-initializers;
onnx-compress's default (dynamic) mode, weight-only int8, static int8 (32 samples, the default,
and every sample) and (MiniLM) weight-only int4 (GPTQ, the default with calibration data, and
round-to-nearest), each run through the CLI. Per output: file size, the task's real metric against fp32
(benchmarks/harness.py), CPU latency ratio to fp32 (interleaved in one process, threads=2),
the tool's wall time and peak RSS (fresh child process), and whether onnx's full checker passes
and onnxruntime loads it.

Run: bash benchmarks/run.sh quantize [--tasks minilm,ocr-rec,ocr-det,yolov8n,layout] [--quick]
Writes benchmarks/results/quantize.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import passes  # noqa: E402,F401
import passes.quantize.quantize_pass  # noqa: E402,F401
from benchmarks.harness import TASKS, file_size_bytes, ocr_det_task, markdown_table, run_measured, save_feeds, session  # noqa: E402
from optimizer.verify.benchmark import benchmark  # noqa: E402
from optimizer.fileio.checker import check_model_full  # noqa: E402
from optimizer.verify.fusion import check_fusion  # noqa: E402
from optimizer.fileio.model import load_model  # noqa: E402
from optimizer.fileio.save import save_model  # noqa: E402
from optimizer.pipeline import Pipeline  # noqa: E402
from optimizer.registry import create_pass  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quantize.md"
CALIBRATION_SAMPLES = {"minilm": 100, "ocr-rec": 100, "ocr-det": 9, "yolov8n": 32, "layout": 24}  # all the recipes have
ROUNDS = {"minilm": 100, "ocr-rec": 100, "ocr-det": 60, "yolov8n": 60, "layout": 60}
CLI = "import sys, passes.quantize.quantize_pass; from optimizer.cli import main; sys.exit(main(sys.argv[1:]))"

ORT_SCRIPT = '''
import glob, sys
import numpy as np
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_dynamic, quantize_static)
kind, source, target, data = sys.argv[1:5]

class Folder(CalibrationDataReader):
    def __init__(self):
        self.files = iter(sorted(glob.glob(data + "/*.npz")))
    def get_next(self):
        path = next(self.files, None)
        return None if path is None else dict(np.load(path))

if kind == "dynamic":
    quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8)
else:
    quantize_static(source, target, Folder(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
'''


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    name: str
    path: Path | None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    valid: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    latency_ratio: float | None = None
    latency_min_ratio: float | None = None
    latency_paired: float | None = None
    note: str = ""


def _ratio_text(candidate: dict) -> str:
    ratio = candidate.get("latency_ratio")
    return f"{ratio}x " if ratio is not None else "(not timed) "


def our_variant(name: str, source: Path, folder: Path, calibration: Path, arguments: list[str]) -> Variant:
    target = folder / f"{name.replace(' ', '_')}.onnx"
    report = target.with_suffix(".json")
    command = [sys.executable, "-c", CLI, "optimize", str(source), "-o", str(target), *arguments,
               "--calibration-data", str(calibration), "--report", str(report)]
    run = run_measured(command)
    variant = Variant(name, target if run.returncode == 0 else None, run.seconds, run.peak_rss_mb)
    if run.returncode:
        variant.note = run.stderr.strip().splitlines()[-1][:160] if run.stderr.strip() else f"exit {run.returncode}"
    elif report.exists():
        auto = json.loads(report.read_text()).get("auto") or {}
        if auto.get("candidates"):
            tried = ", ".join(f"{c.get('name', c['value'])} {_ratio_text(c)}{'pass' if c['passed'] else 'fail'}"
                              for c in auto["candidates"] if c.get("error") is None and c.get("same_as") is None)
            chosen = auto.get("chosen_name") or auto["chosen"]
            rounds = auto.get("timing_rounds")
            variant.note = f"auto chose {chosen} (tried: {tried}; noise floor {auto['noise_floor']}, {rounds} rounds)"
    return variant


def ort_variant(name: str, kind: str, source: Path, folder: Path, calibration: Path) -> Variant:
    script = folder / "ort_quantize.py"
    script.write_text(ORT_SCRIPT)
    target = folder / f"{name.replace(' ', '_').replace('/', '_')}.onnx"
    run = run_measured([sys.executable, str(script), kind, str(source), str(target), str(calibration)])
    variant = Variant(name, target if run.returncode == 0 and target.exists() else None, run.seconds, run.peak_rss_mb)
    if variant.path is None:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        variant.note = "onnxruntime's quantizer failed: " + (lines[-1][:160] if lines else f"exit {run.returncode}")
    return variant


def validate(variant: Variant) -> None:
    """Full checker and an onnxruntime session; the outcome goes into ``variant.valid``."""
    try:
        check_model_full(onnx.load(str(variant.path)))
        checker = "ok"
    except Exception as error:  # onnx raises ValidationError and others
        checker = f"fails ({' '.join(str(error).split())[:80]})"
    try:
        session(variant.path)
        loads = "ok"
    except Exception as error:  # onnxruntime exceptions share no base class
        loads = f"fails ({' '.join(str(error).split())[:100]})"
        variant.path = None
    variant.valid = f"checker {checker}; ORT load {loads}"


def same_as_fp32(variants: list[Variant]) -> None:
    """Say so when onnxruntime runs exactly fp32's ops (weights folded at load): its latency ratio
    can then differ from 1.0 by measurement noise only."""
    reference = check_fusion(variants[0].path).run_ops
    for variant in variants[1:]:
        if variant.path is not None and check_fusion(variant.path).run_ops == reference:
            variant.note = "; ".join(filter(None, ["onnxruntime runs fp32's ops, op for op", variant.note]))


def normalized_copy(source: Path, folder: Path) -> Path:
    result = Pipeline([create_pass("constants-to-initializers"), create_pass("cleanup")]).run(load_model(source))
    return save_model(result.model, folder / "normalized.onnx")


def run_task(key: str, quick: bool) -> tuple[list[Variant], dict]:
    task = ocr_det_task(calibration_limit=736) if key == "ocr-det" else TASKS[key]()  # RapidOCR's own size
    folder = Path(tempfile.mkdtemp(prefix=f"bench-quantize-{key}-"))
    samples = 16 if quick else CALIBRATION_SAMPLES[key]
    feeds = task.calibration(samples)
    if len(feeds) < samples:
        feeds = [feeds[i % len(feeds)] for i in range(samples)]
    calibration = save_feeds(feeds, folder / "calibration")
    log(f"{task.name}: {len(feeds)} calibration samples in {calibration}")
    normalized = normalized_copy(task.model, folder)
    variants = [Variant("fp32", task.model, valid="checker ok; ORT load ok")]
    for kind in ("dynamic", "static"):
        log(f"{task.name}: onnxruntime quantize_{kind}")
        shipped = ort_variant(f"ORT quantize_{kind}", kind, task.model, folder, calibration)
        if shipped.path is None:
            variants.append(shipped)
            shipped = ort_variant(f"ORT quantize_{kind} (on constants-to-initializers copy)", kind, normalized,
                                  folder, calibration)
        variants.append(shipped)
    ours = [("onnx-compress default (auto)", ["--quantize", "int8"]),
            ("onnx-compress dynamic int8", ["--quantize", "int8", "--quantize-mode", "dynamic"]),
            ("onnx-compress weights int8", ["--quantize", "int8", "--quantize-mode", "weights"]),
            ("onnx-compress static int8", ["--quantize", "int8", "--quantize-mode", "static"]),
            ("onnx-compress static int8, every sample (percentile)",
             ["--quantize", "int8", "--quantize-mode", "static", "--set", "quantize.calibration_samples=0"])]
    if key == "minilm":
        ours.append(("onnx-compress weights int4 (GPTQ)", ["--quantize", "int4", "--quantize-mode", "weights"]))
        ours.append(("onnx-compress weights int4, nearest rounding",
                     ["--quantize", "int4", "--quantize-mode", "weights", "--set", "quantize.weight_rounding=nearest"]))
    for name, arguments in ours:
        log(f"{task.name}: {name}")
        variants.append(our_variant(name, task.model, folder, calibration, arguments))
    for variant in variants[1:]:
        if variant.path is not None:
            validate(variant)
    same_as_fp32(variants)
    for variant in variants:
        if variant.path is not None:
            log(f"{task.name}: evaluating {variant.name}")
            variant.metrics = task.evaluate(variant.path, task.model)
    control = Variant("fp32, second session (noise floor)", task.model, valid=variants[0].valid,
                      metrics=dict(variants[0].metrics),
                      note="the same file in its own session: how far two identical graphs' ratios drift apart")
    variants.insert(1, control)
    timed = [v for v in variants[1:] if v.path is not None]
    log(f"{task.name}: latency of fp32 and {len(timed)} models, interleaved round by round")
    result = benchmark([str(task.model)] + [str(v.path) for v in timed], task.latency_feeds(),
                       names=["fp32"] + [v.name for v in timed], threads=2, rounds=4 if quick else ROUNDS[key], warmup=3)
    reference, *timings = result.models
    for variant, timing in zip(timed, timings):
        variant.latency_ratio = timing.ratio_p50
        variant.latency_min_ratio = timing.min_ms / reference.min_ms
        variant.latency_paired = timing.ratio_paired
    variants[0].latency_ratio = variants[0].latency_min_ratio = variants[0].latency_paired = 1.0
    return variants, {"fp32_bytes": file_size_bytes(task.model), "name": task.name, "samples": len(feeds),
                      "fp32_p50_ms": reference.p50_ms}


def table(variants: list[Variant], info: dict) -> str:
    metric_names = sorted({k for v in variants for k in v.metrics})
    header = ["variant", "size MB", "size / fp32", *metric_names, "latency / fp32 (paired)", "latency / fp32 (p50)", "latency / fp32 (min)", "tool s", "tool peak RSS MB",
              "checker / ORT load", "note"]
    rows = []
    for v in variants:
        size = file_size_bytes(v.path) if v.path is not None and v.path.exists() else None
        rows.append([
            v.name, f"{size / 1e6:.2f}" if size else "-", f"{size / info['fp32_bytes']:.3f}" if size else "-",
            *[f"{v.metrics[m]:.4f}" if m in v.metrics else "-" for m in metric_names],
            f"{v.latency_paired:.3f}" if v.latency_paired is not None else "-",
            f"{v.latency_ratio:.3f}" if v.latency_ratio is not None else "-",
            f"{v.latency_min_ratio:.3f}" if v.latency_min_ratio is not None else "-",
            f"{v.seconds:.1f}" if v.seconds else "-", f"{v.peak_rss_mb:.0f}" if v.peak_rss_mb else "-",
            v.valid or "-", v.note or "",
        ])
    return markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="minilm,ocr-rec,ocr-det,yolov8n,layout")
    parser.add_argument("--quick", action="store_true", help="16 calibration samples, 4 latency rounds")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    sections = [
        "# Quantization: onnx-compress vs onnxruntime's quantizer (same calibration and evaluation data)",
        "",
        "CPU, onnxruntime 1.32, threads=2, every variant of a model timed in the same rounds as fp32 "
        "(`optimizer.verify.benchmark`: each round runs every model once, the order reversed every other round, "
        "sessions without spinning threads), "
        "ratio to fp32 as the median of same-round ratios (paired: a slow spell of the shared machine hits both "
        "sides of a pair), then the ratios of p50s and of minima (lower is faster). Tool time and peak RSS: the CLI (or onnxruntime's "
        "quantizer) in a fresh child process (`harness.run_measured`), calibration included. "
        "onnx-compress runs with its default pipeline (constants-to-initializers, share, cleanup, quantize) and is "
        "given the same calibration folder as onnxruntime: static mode reads its first 32 samples by default "
        "(`quantize.calibration_samples`; the 'every sample' row reads all of them), 4-bit weight-only rounds "
        "by GPTQ on them (the 'nearest rounding' row without); the default with calibration data (auto) builds "
        "weights, dynamic and static, checks each on calibration samples past the first 32 and keeps the fastest "
        "that passes (its note lists what it measured). "
        "2 cores shared with other jobs: latency ratios move by a few percent between runs.",
        "",
    ]
    for key in args.tasks.split(","):
        variants, info = run_task(key, args.quick)
        sections += [f"## {info['name']}", "",
                     f"Calibration: {info['samples']} samples (harness `calibration`), evaluation held out. "
                     f"fp32 p50 {info['fp32_p50_ms']:.1f} ms.", "", table(variants, info), ""]
        Path(args.output).write_text("\n".join(sections))
        log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
