"""Accuracy budget on real models (issue 5).

- all-MiniLM-L6-v2: int8 with an embedding-cosine budget of 0.995, measured during the search on
  half of the held-out sentences and checked afterwards on the other half.
- PP-OCRv4 rec: int8 with a user metric, the character error rate (``rec_cer`` below, a plain
  function of reference and candidate outputs), budget +0.005 over fp32; checked afterwards on
  the harness's evaluation sentences, which the search never saw.

Run: bash benchmarks/run.sh budget   (writes benchmarks/results/budget.md)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from optimizer.api import BudgetOptions, FeedOptions, OptimizeOptions, optimize, plan_passes  # noqa: E402
from optimizer.executor import ExecutorOptions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "budget.md"
_REC: dict[str, object] = {}


def _rec_setup() -> dict[str, object]:
    """Ground truth for the CER metric: the sentences drawn in the budget feeds, in order."""
    if not _REC:
        import _ocr
        task = harness.ocr_rec_task()
        evaluation, calibration_text = harness._ocr_sentences()
        texts = calibration_text[40:100]
        _REC.update(task=task, texts=texts, chars=_ocr.char_list_from_model(str(task.model)),
                    feeds=[{"x": _ocr.rec_preprocess(_ocr.render_line(text))} for text in texts])
    return _REC


def rec_cer(reference_outputs: list[dict], candidate_outputs: list[dict]) -> float:
    """Mean character error rate of the candidate's CTC decoding against the drawn sentences."""
    import _ocr
    setup = _rec_setup()
    errors = []
    for outputs, text in zip(candidate_outputs, setup["texts"], strict=True):
        probabilities = next(iter(outputs.values()))[0]
        errors.append(_ocr.cer(_ocr.ctc_greedy(probabilities, setup["chars"]).strip(), text))
    return float(np.mean(errors))


def int8_matmul_fraction(original: onnx.ModelProto, compressed: onnx.ModelProto) -> float:
    """Share of the original MatMul weight elements stored as 8-bit integers in the result."""
    weights = {t.name: t for t in original.graph.initializer}
    matmul = [weights[n.input[1]] for n in original.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    total = sum(int(np.prod(t.dims)) for t in matmul)
    shapes = {tuple(t.dims) for t in matmul}
    integer = [t for t in compressed.graph.initializer
               if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) and tuple(t.dims) in shapes]
    return min(1.0, sum(int(np.prod(t.dims)) for t in integer) / total)


def minilm(folder: Path, max_drop: float = 0.005, max_trials: int = 24) -> list[str]:
    task = harness.minilm_task()
    recipe, tokenizer, queries, docs, sentences = harness._minilm_data()
    held_out = sentences[1::2]
    search_texts, check_texts = held_out[0::2], held_out[1::2]
    feeds = [harness._encode(tokenizer, [text]) for text in search_texts]
    names, options = plan_passes(quantize="int8", quantize_mode="dynamic")
    started = time.perf_counter()
    result = optimize(task.model, folder / "minilm.int8.onnx", OptimizeOptions(
        passes=names, pass_options=options, calibration=task.calibration(100), feeds=FeedOptions(source=feeds),
        budget=BudgetOptions(max_drop=max_drop, metric="cosine", max_trials=max_trials),
        executor=ExecutorOptions(workers=2)))
    seconds = time.perf_counter() - started
    check = harness.session(result.output_path), harness.session(task.model)
    got, want = recipe.embed(check[0], tokenizer, check_texts), recipe.embed(check[1], tokenizer, check_texts)
    cosine = (got * want).sum(1)
    r1, mrr = recipe.retrieval(check[0], tokenizer, queries, docs)
    fraction = int8_matmul_fraction(onnx.load(task.model), onnx.load(result.output_path))
    budget = result.report.budget
    lines = [f"## all-MiniLM-L6-v2: int8 dynamic, embedding cosine >= {1 - max_drop:g} (max drop {max_drop:g})", "",
             f"Search data: {len(search_texts)} held-out sentences; check: {len(check_texts)} other held-out "
             f"sentences; calibration: 100 training-side texts; 2 worker processes; {seconds:.0f} s.", "",
             "| search: cosine | met | trials | backed off | check: cosine mean | check: cosine min | R@1 | MRR | "
             "MatMul weights int8 | size / fp32 |", "|---|---|---|---|---|---|---|---|---|---|",
             f"| {budget['value']:.5f} | {budget['met']} | {budget['trials']} | "
             f"{', '.join(budget['backed_off']) or 'none'} | {cosine.mean():.5f} | {cosine.min():.5f} | {r1:.3f} | "
             f"{mrr:.3f} | {fraction:.1%} | {harness.file_size_bytes(result.output_path) / harness.file_size_bytes(task.model):.3f} |",
             "", "Report excerpt:", "", _excerpt(result.report.to_markdown()), ""]
    return lines


def rec(folder: Path) -> list[str]:
    setup = _rec_setup()
    task = setup["task"]
    names, options = plan_passes(quantize="int8")
    started = time.perf_counter()
    result = optimize(task.model, folder / "rec.int8.onnx", OptimizeOptions(
        passes=names, pass_options=options, calibration=task.calibration(100),
        feeds=FeedOptions(source=setup["feeds"]),
        budget=BudgetOptions(max_drop=0.005, metric="bench_budget:rec_cer", higher_is_better=False,
                             max_trials=16)))
    seconds = time.perf_counter() - started
    fp32 = task.evaluate(task.model, task.model)
    got = task.evaluate(result.output_path, task.model)
    budget = result.report.budget
    size = harness.file_size_bytes(result.output_path) / harness.file_size_bytes(task.model)
    return ["## PP-OCRv4 rec: int8 (default mode), user metric CER, max increase 0.005", "",
            f"Search data: {len(setup['texts'])} rendered sentences (not in the evaluation set); "
            f"metric `benchmarks/bench_budget.py:rec_cer`; {seconds:.0f} s.", "",
            "| search: CER fp32 | search: CER int8 | met | trials | backed off | eval: CER fp32 | eval: CER int8 | "
            "eval: exact | size / fp32 |", "|---|---|---|---|---|---|---|---|---|",
            f"| {budget['baseline']:.4f} | {budget['value']:.4f} | {budget['met']} | {budget['trials']} | "
            f"{', '.join(budget['backed_off']) or 'none'} | {fp32['cer']:.4f} | {got['cer']:.4f} | {got['exact']:.3f} | "
            f"{size:.3f} |", ""]


def _excerpt(markdown: str) -> str:
    keep, on = [], False
    for line in markdown.splitlines():
        if line.startswith("## "):
            on = line in ("## Accuracy budget", "## Per layer", "## What onnxruntime runs")
        if on:
            keep.append(line)
    return "\n".join(keep)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="onnx-compress-budget-") as tmp:
        folder = Path(tmp)
        lines = ["# Accuracy budget on real models", "", "onnxruntime 1.32 CPU. `benchmarks/bench_budget.py`.", ""]
        lines += minilm(folder)
        lines += minilm(folder, max_drop=0.001, max_trials=48)
        lines += rec(folder)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
