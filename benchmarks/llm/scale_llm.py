"""Decoder LLM at scale (issue 17): the same Llama architecture with random weights at ~0.5B and
~1B parameters, exported by onnxruntime-genai's builder (fp32, CPU, external data > 2 GB), then
``onnx-compress optimize --quantize int4`` on each: tool time, peak RSS, size, and whether the output
loads in onnxruntime and runs one prefill.

    python benchmarks/llm/scale_llm.py CHECKPOINT_DIR WORK_DIR [--layers 11 22] [--output ...llm_scale.md]

CHECKPOINT_DIR (from ``train.py``) only lends its tokenizer files: the builder wants a tokenizer.

Random weights (``LlamaForCausalLM(config)``'s own initialization, seeded): what is measured is
memory and time, not accuracy. Each tool runs in a fresh child process (``harness.run_measured``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
from bench_llm import BUILDER  # noqa: E402
from bench_quantize import CLI  # noqa: E402

SHAPE = {  # TinyLlama-1.1B's shape, tied embeddings
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
RUN_ONCE = """
import sys, numpy as np, onnxruntime as ort, json
path = sys.argv[1]
session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
config = json.load(open(sys.argv[2]))["model"]["decoder"]
feed = {"input_ids": np.arange(1, 17, dtype=np.int64)[None], "attention_mask": np.ones((1, 16), np.int64)}
names = [i.name for i in session.get_inputs()]
if "position_ids" in names:
    feed["position_ids"] = np.arange(16, dtype=np.int64)[None]
for name in names:
    if name.startswith("past_key_values"):
        feed[name] = np.zeros((1, config["num_key_value_heads"], 0, config["head_size"]), np.float32)
logits = session.run(["logits"], feed)[0]
assert np.isfinite(logits).all(), "non-finite logits"
print("logits", logits.shape)
"""


def checkpoint(layers: int, out: Path, tokenizer: Path) -> int:
    """A seeded random-weight checkpoint with ``layers`` decoder layers (``tokenizer``'s tokenizer
    files beside it); returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **SHAPE))
    count = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    del model
    for item in tokenizer.glob("tokenizer*"):
        shutil.copy(item, out / item.name)
    return count


def measure(work: Path, layers: int, tokenizer: Path) -> dict:
    ckpt, exported, quantized = work / f"ckpt_{layers}", work / f"fp32_{layers}", work / f"int4_{layers}"
    parameters = checkpoint(layers, ckpt, tokenizer)
    export = harness.run_measured(
        [sys.executable, "-c", BUILDER, "-i", str(ckpt), "-o", str(exported), "-p", "fp32", "-e", "cpu", "-c",
         str(work / "cache")]
    )
    shutil.rmtree(ckpt)
    if export.returncode:
        raise SystemExit(f"the builder failed on {layers} layers: {export.stderr[-2000:]}")
    source = exported / "model.onnx"
    row = {"layers": layers, "parameters": parameters, "export_s": export.seconds, "export_rc": export.returncode}
    row["fp32_bytes"] = sum(f.stat().st_size for f in exported.glob("model.onnx*"))
    quantized.mkdir(parents=True, exist_ok=True)
    run = harness.run_measured(
        [sys.executable, "-c", CLI, "optimize", str(source), "-o", str(quantized / "model.onnx"), "--quantize", "int4",
         "--quiet"]
    )
    row.update(tool_s=run.seconds, peak_rss_mb=run.peak_rss_mb, rc=run.returncode, stderr=run.stderr.strip()[-300:])
    row["int4_bytes"] = sum(f.stat().st_size for f in quantized.glob("model.onnx*")) if run.returncode == 0 else None
    if run.returncode == 0:
        loaded = harness.run_measured(
            [sys.executable, "-c", RUN_ONCE, str(quantized / "model.onnx"), str(exported / "genai_config.json")]
        )
        row["runs"] = loaded.returncode == 0
        row["run_note"] = loaded.stderr.strip()[-200:]
    shutil.rmtree(exported)
    shutil.rmtree(quantized)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("--layers", type=int, nargs="+", default=[11, 22])
    parser.add_argument("--output", type=Path, default=HERE.parent / "results" / "llm_scale.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        rows.append(measure(args.work, layers, args.checkpoint))
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Decoder LLM at scale: int4 of random-weight Llama models (onnx-compress, onnxruntime CPU)",
        "",
        "TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 32/4 heads, vocab 32000, tied embeddings) with the layer "
        "counts below, random weights; exported by onnxruntime-genai's builder (fp32, external data); "
        "`onnx-compress optimize model.onnx -o out/model.onnx --quantize int4` (no calibration data: nearest "
        "rounding, blocks of 32) in a fresh process; peak RSS: the largest of that process and its children (the fusion check of an output this size runs onnxruntime in a child). 'runs': the output loads in "
        "onnxruntime and one 16-token prefill gives finite logits.",
        "",
        "| layers | parameters | fp32 GB | int4 GB | tool s | tool peak RSS MB | s per B parameters | runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        size = f"{row['int4_bytes'] / 1e9:.2f}" if row.get("int4_bytes") else f"failed: {row['stderr']}"
        lines.append(
            f"| {row['layers']} | {row['parameters'] / 1e9:.3f}B | {row['fp32_bytes'] / 1e9:.2f} | {size} | "
            f"{row['tool_s']:.1f} | {row['peak_rss_mb']:.0f} | {row['tool_s'] / (row['parameters'] / 1e9):.1f} | "
            f"{row.get('runs', False)} |"
        )
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
