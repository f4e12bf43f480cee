"""Decoder LLM int4/int8 benchmark (issue 17): ours next to onnxruntime's MatMulNBitsQuantizer and
onnxruntime-genai's model builder, on one trained model and one held-out text.

    python benchmarks/llm/bench_llm.py CHECKPOINT_DIR WORK_DIR [--output benchmarks/results/llm.md]

CHECKPOINT_DIR comes from ``train.py``. Every row is a folder that onnxruntime-genai can load (the
builder's genai_config.json and tokenizer files next to the model). Tool time and peak RSS: each tool
in a fresh child process (``harness.run_measured``). Quality and speed: ``evaluate.py``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from bench_quantize import CLI  # noqa: E402
from evaluate import PROMPT, Decoder, quality, speed, windows  # noqa: E402

from optimizer.graph.bit_count import measure_bits  # noqa: E402

WINDOWS = 199
PROMPTS = 16
NEW_TOKENS = 64
ROUNDS = 15
CALIBRATION_WINDOWS = 32
BUILDER = "import sys, runpy; sys.argv[0] = 'builder'; runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__')"
ORT_NBITS = """
import sys, numpy as np, onnx, glob
from onnxruntime.quantization import matmul_nbits_quantizer as mq
from onnxruntime.quantization import CalibrationDataReader
algo, source, target, data = sys.argv[1:5]
class Reader(CalibrationDataReader):
    def __init__(self):
        self.items = iter([dict(np.load(f)) for f in sorted(glob.glob(data + '/*.npz'))])
    def get_next(self):
        return next(self.items, None)
configs = {
    "default": lambda: mq.DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=False),
    "hqq": lambda: mq.HQQWeightOnlyQuantConfig(block_size=32),
    "rtn": lambda: mq.RTNWeightOnlyQuantConfig(),
    "k_quant": lambda: mq.KQuantWeightOnlyQuantConfig(),
    "gptq": lambda: mq.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader()),
}
quantizer = mq.MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=False, algo_config=configs[algo]())
quantizer.process()
quantizer.model.save_model_to_file(target, use_external_data_format=True)
"""
ORT_DYNAMIC = """
import sys
from onnxruntime.quantization import QuantType, quantize_dynamic
quantize_dynamic(sys.argv[1], sys.argv[2], weight_type=QuantType.QInt8, use_external_data_format=True)
"""
GENERATE = """
import sys, onnxruntime_genai as og
model = og.Model(sys.argv[1]); tokenizer = og.Tokenizer(model)
params = og.GeneratorParams(model); params.set_search_options(max_length=48, do_sample=False)
generator = og.Generator(model, params); generator.append_tokens(tokenizer.encode(sys.argv[2]))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
"""


def tool(command: list[str]) -> harness.ToolRun:
    run = harness.run_measured(command)
    if run.returncode:
        print(" ".join(command[:6]), "failed:", run.stderr[-2000:], flush=True)
    return run


def builder(checkpoint: Path, out: Path, precision: str, *extra: str) -> harness.ToolRun:
    cache = out.parent / "cache"
    command = [sys.executable, "-c", BUILDER, "-i", str(checkpoint), "-o", str(out), "-p", precision, "-e", "cpu"]
    return tool(command + ["-c", str(cache)] + (["--extra_options", *extra] if extra else []))


def with_genai_files(fp32: Path, out: Path) -> None:
    for item in fp32.iterdir():
        if item.suffix in (".json", ".txt", ".model") or item.name.startswith("tokenizer"):
            shutil.copy(item, out / item.name)


def calibration(tokenizer_dir: Path, folder: Path, decoder: Decoder) -> None:
    """npz feeds from the training split (never the held-out text): prefill windows, empty cache."""
    sys.path.insert(0, str(HERE))
    from train import documents, held_out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "\n\n".join(t for n, t in documents() if not held_out(n))
    ids = tokenizer(text[: 400_000])["input_ids"]
    folder.mkdir(parents=True, exist_ok=True)
    for i, window in enumerate(windows(ids, CALIBRATION_WINDOWS)):
        np.savez(folder / f"{i:03d}.npz", **decoder.layout.feed(window))  # complete: onnxruntime's GPTQ reads them too


def build_rows(checkpoint: Path, work: Path, cal: Path) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    fp32 = work / "fp32"
    source = fp32 / "model.onnx"
    for label, extra in (("genai builder -p int4", ()), ("genai builder -p int4, k_quant_mixed", ("algo_config=k_quant_mixed",))):
        out = work / label.replace(" ", "_").replace(",", "")
        rows[label] = {"run": builder(checkpoint, out, "int4", *extra), "dir": out}
    for algo in ("default", "hqq", "rtn", "k_quant", "gptq"):
        out = work / f"ort_{algo}"
        out.mkdir(parents=True, exist_ok=True)
        run = tool([sys.executable, "-c", ORT_NBITS, algo, str(source), str(out / "model.onnx"), str(cal)])
        with_genai_files(fp32, out)
        rows[f"ORT MatMulNBitsQuantizer {algo}"] = {"run": run, "dir": out}
    out = work / "ort_dynamic_int8"
    out.mkdir(parents=True, exist_ok=True)
    run = tool([sys.executable, "-c", ORT_DYNAMIC, str(source), str(out / "model.onnx")])
    with_genai_files(fp32, out)
    rows["ORT quantize_dynamic (int8)"] = {"run": run, "dir": out}
    gptq = ["--quantize-mode", "weights", "--calibration-data", str(cal)]
    ours = [
        ("ours int8 (default, no calibration: dynamic)", "ours_int8", ["--quantize", "int8"]),
        ("ours int4 (nearest)", "ours_int4_nearest", ["--quantize", "int4"]),
        ("ours int4 (GPTQ)", "ours_int4_GPTQ", ["--quantize", "int4", *gptq]),
        ("ours int4 (AWQ)", "ours_int4_AWQ", ["--quantize", "int4", *gptq, "--set", "quantize.weight_rounding=awq"]),
        (
            "ours int4 (GPTQ), 1/8 of the table's rows 8-bit",
            "ours_int4_GPTQ_rows",
            ["--quantize", "int4", *gptq, "--set", "quantize.frequent_rows=0.125"],
        ),
    ]
    budget = ["--quantize", "int4", "--calibration-data", str(cal), "--workers", "2", "--bits-per-weight"]
    for bits in ("4.5", "5.0"):
        ours.append((f"ours int4/int8 mixed, <= {bits} bits/weight (GPTQ)", f"ours_bpw_{bits}", [*budget, bits]))
    for label, folder, extra in ours:
        out = work / folder
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", CLI, "optimize", str(source), "-o", str(out / "model.onnx"), "--quiet"]
        run = tool(command + extra)
        with_genai_files(fp32, out)
        rows[label] = {"run": run, "dir": out}
    return rows


def held_out_tokens(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer((checkpoint / "heldout.txt").read_text(encoding="utf-8"))["input_ids"]


def measure(rows: dict[str, dict], checkpoint: Path, parameters: int) -> None:
    tokens = held_out_tokens(checkpoint)
    chunks = windows(tokens, WINDOWS)
    prompts = [c[0, :PROMPT].tolist() for c in chunks[:PROMPTS]]
    reference = Decoder(rows["fp32"]["dir"] / "model.onnx")
    source = onnx.load(rows["fp32"]["dir"] / "model.onnx")
    loaded = {"fp32": reference, "fp32, second session (noise floor)": Decoder(rows["fp32"]["dir"] / "model.onnx")}
    for label, row in rows.items():
        model = row["dir"] / "model.onnx"
        row["size"] = harness.file_size_bytes(model) if model.exists() else None
        if row["run"].returncode or not model.exists():
            continue
        generated = harness.run_measured([sys.executable, "-c", GENERATE, str(row["dir"]), "def read_file(path):"])
        row["genai"] = "generates" if generated.returncode == 0 else "genai failed: " + generated.stderr.strip()[-200:]
        try:
            decoder = loaded.get(label) or Decoder(model)
        except Exception as error:  # noqa: BLE001 - a row that does not load is a result
            row["load_error"] = str(error)[:200]
            continue
        loaded[label] = decoder
        row["quality"] = quality(reference, decoder, chunks, prompts, NEW_TOKENS)
        row["bits_per_weight"] = 8 * row["size"] / parameters
        row["bits"] = measure_bits(source, onnx.load(model)).bits_per_weight
        print(label, row["quality"], flush=True)
    timing = speed(loaded, chunks[0], NEW_TOKENS, ROUNDS)
    for label, values in timing.items():
        rows.setdefault(label, {"dir": rows["fp32"]["dir"], "run": None, "size": rows["fp32"]["size"]})
        rows[label]["speed"] = values
    rows["fp32, second session (noise floor)"]["quality"] = rows["fp32"]["quality"]
    rows["fp32, second session (noise floor)"]["bits_per_weight"] = rows["fp32"]["bits_per_weight"]
    rows["fp32, second session (noise floor)"]["bits"] = rows["fp32"]["bits"]
    rows["fp32, second session (noise floor)"]["genai"] = rows["fp32"].get("genai", "")


COLUMNS = (
    "variant | size MB | bits/weight | bits/param | perplexity | perplexity - fp32 (+-2 SE) | KL | top-1 | greedy match (64) | greedy exact | "
    "prefill tok/s | decode tok/s | prefill time / fp32 | decode time / fp32 | tool s | tool peak RSS MB | onnxruntime-genai"
)


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| " + COLUMNS + " |", "|" + "---|" * len(COLUMNS.split(" | "))]
    order = ["fp32", "fp32, second session (noise floor)"] + [k for k in rows if not k.startswith("fp32")]
    for label in order:
        row = rows[label]
        q, s, run = row.get("quality"), row.get("speed"), row.get("run")
        bits = row.get("bits") or None  # 0: the tool compressed nothing (fp32)
        cells = [label, _num(row.get("size"), 1e6, 2), _num(bits, 1, 2), _num(row.get("bits_per_weight"), 1, 2)]
        delta = f"{q.perplexity_delta:+.3f} (+-{q.perplexity_2se:.3f})" if q else "-"
        cells += [f"{q.perplexity:.3f}", delta, f"{q.kl:.4f}", f"{q.top1:.4f}", f"{q.greedy_match:.3f}", f"{q.greedy_exact:.3f}"] if q else ["-"] * 6
        cells += [f"{s['prefill_tok_s']:.0f}", f"{s['decode_tok_s']:.1f}", f"{s['prefill_ratio']:.3f}", f"{s['decode_ratio']:.3f}"] if s else ["-"] * 4
        cells += [f"{run.seconds:.1f}", f"{run.peak_rss_mb:.0f}"] if run else ["-", "-"]
        note = row.get("genai", "")
        if run and run.returncode:
            note = "tool failed: " + run.stderr.strip().splitlines()[-1][:160] if run.stderr.strip() else "tool failed"
        cells.append(row.get("load_error", note))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _num(value, scale, digits):
    return "-" if value is None else f"{value / scale:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "llm.md")
    args = parser.parse_args()
    trained = json.loads((args.checkpoint / "train.json").read_text())
    cal = args.work / "calibration"
    rows = {"fp32": {"run": builder(args.checkpoint, args.work / "fp32", "fp32"), "dir": args.work / "fp32"}}
    calibration(args.checkpoint, cal, Decoder(args.work / "fp32" / "model.onnx"))
    rows.update(build_rows(args.checkpoint, args.work, cal))
    measure(rows, args.checkpoint, trained["parameters"])
    head = [
        "# Decoder LLM: int4 (and our default int8), ours vs onnxruntime's MatMulNBitsQuantizer and onnxruntime-genai's builder",
        "",
        f"Model: {trained['parameters'] / 1e6:.1f}M-parameter Llama-architecture decoder (train.py: "
        f"{trained['steps']} steps, {trained['seconds']:.0f} s on this CPU, final train loss {trained['loss_last_50_mean']}), "
        "exported by onnxruntime-genai's builder (fp32, CPU: GroupQueryAttention, KV-cache inputs, external data).",
        f"Held-out text: {WINDOWS} windows of 256 tokens for perplexity, KL(fp32 || variant) and top-1 agreement per "
        f"position; {PROMPTS} prompts of {PROMPT} tokens for greedy generation of {NEW_TOKENS} tokens with the KV cache "
        "(match: share of tokens equal to fp32's before the first difference). Speed: onnxruntime CPU, 2 threads, "
        f"{ROUNDS} interleaved rounds, a 256-token prefill then {NEW_TOKENS} decode steps; time ratios are medians of "
        "same-round ratios to fp32 (lower is faster). bits/weight: stored bytes of the tensors the tool changed "
        "(integers, scales, zero points) x 8 / the weights they replaced (optimizer.graph.bit_count; a row that "
        "leaves the LM head float counts only what it compressed); bits/param: every stored byte x 8 / every "
        "parameter (RMSNorm weights and the rotary caches included). perplexity - fp32: with twice its standard "
        "error from the paired per-window differences (a difference inside it is the text's noise, not the "
        "model's). Calibration for GPTQ rows and the bits budget's trials: "
        f"{CALIBRATION_WINDOWS} windows of 256 tokens of the training text (prefill, empty cache).",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(head + table(rows)) + "\n")
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
