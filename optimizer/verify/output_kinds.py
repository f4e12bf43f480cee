"""What each model output is, and the metrics that judge it.

A cosine over a whole output tensor hides what users care about: a detector output joins box
coordinates (hundreds of pixels) and class scores (0 to 1), so scores can round away while the
cosine stays at 0.998. Each output therefore gets a kind, recognised from its shape and the
reference's values on the first sample (or set by the user), and the metrics of its kind:

- ``classes``: class scores or logits, [N, C]: top-1 agreement and per-row cosine;
- ``sequence``: per-step class scores, [N, T, C] rows that are probabilities: what greedy/CTC
  decoding reads decides: the decoded sequences (argmax per step, repeats merged, the reference's
  most frequent class dropped as CTC's blank) agree to 1 - edit distance / length >= 0.97, and the
  per-step argmax agreement is >= 0.9 (argmax flips at character boundaries leave the text: PP-OCRv4
  rec static int8 has per-step agreement 0.93 and the CER of fp32); the per-row cosine is reported;
- ``detector``: a YOLO-style head [1, 4+C, A] or [1, A, 4+C] (boxes in pixels, then scores in
  [0, 1]): box-set F1 at IoU 0.5 (same class, score >= 0.25, after per-class NMS at IoU 0.45: the
  boxes post-processing keeps, not every overlapping anchor) and the class-score cosine over the
  candidate anchors; a score map [1, A, C] in [0, 1] without boxes: the F1 of the (anchor, class)
  pairs over 0.25 and the same candidate cosine;
- ``next_token``: a language model's logits [N, T, V] (an output named like logits of a model that
  reads ``input_ids``): the KL divergence of each position's next-token distribution from the
  reference's (mean, nats; <= 0.02: int4 of the benchmark's decoder is 0.002-0.005, a broken
  model 0.1 and more) and top-1 agreement (>= 0.9; int4 0.94-0.96, int8 0.98);
- ``embedding``: per-row cosine (rows of the last axis);
- ``map``: a map of values in [0, 1] with 3 or more axes (text or segmentation probabilities): the
  IoU of its masks thresholded at 0.3 and at 0.5 (what post-processing reads; PP-OCRv4 det static
  int8 has whole-map SQNR 13.7 dB and a 0.3-mask IoU of 0.95);
- ``dense``: anything else (whole-tensor cosine and SQNR).

Every kind metric is computed per sample; the worst sample is reported next to the total.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from optimizer.errors import OptionError
from optimizer.verify.metrics import kl_sum

KINDS = ("classes", "sequence", "next_token", "detector", "embedding", "map", "dense")
SCORE_THRESHOLD = 0.25
IOU_THRESHOLD = 0.5
NMS_IOU = 0.45
"""Detector boxes are compared after per-class NMS at this IoU (YOLO's default post-processing)."""
MAP_THRESHOLDS = (0.3, 0.5)
"""A ``map`` is thresholded at each (DB text detection binarises at 0.3, masks commonly at 0.5)."""
_EMBEDDING_WORDS = ("embed", "hidden", "pool", "feature", "sentence", "vector")
_CLASS_WORDS = ("logit", "prob", "class", "score", "label", "softmax")


KIND_LIMITS: dict[str, dict[str, float]] = {
    "classes": {"top1": 0.98, "row_cosine": 0.99},
    "sequence": {"decoded_agreement": 0.97, "top1": 0.9},
    "next_token": {"kl": 0.02, "top1": 0.9},
    "detector": {"f1": 0.9, "candidate_cosine": 0.95},
    "embedding": {"row_cosine": 0.99},
    "map": {"map_iou_0.3": 0.9, "map_iou_0.5": 0.9},
    "dense": {},
}
"""The default verdict of each kind: metric -> minimum, or maximum for ``LOWER_IS_BETTER`` (README:
"What the verdict means"). Classes: top-1 agreement 0.98 bounds the accuracy drop by 2 points (the
PP-OCR direction classifier clustered to 4 bits agreed on 0.975 of lines and lost 2.5 points; 0.9
passed it)."""
LOWER_IS_BETTER = frozenset({"kl"})
TOP1_KINDS = ("classes", "sequence", "next_token")
"""Kinds whose rows are class scores: argmax agreement means something."""
METRIC_LABELS = {
    "top1": "top-1 agreement",
    "kl": "next-token KL",
    "decoded_agreement": "decoded sequence agreement",
    "row_cosine": "row cosine",
    "f1": "F1",
    "candidate_cosine": "candidate score cosine",
    "map_iou_0.3": "mask IoU at 0.3",
    "map_iou_0.5": "mask IoU at 0.5",
}


def checked_output_kinds(kinds: Mapping[str, str] | None, output_names: Sequence[str]) -> dict[str, str]:
    """The user's kinds by output name, refused with the valid names when an output or kind is unknown."""
    kinds = dict(kinds or {})
    for name, kind in kinds.items():
        if name not in output_names:
            raise OptionError(f"output kind for unknown output {name!r}; outputs: {', '.join(output_names)}")
        if kind not in KINDS:
            raise OptionError(f"output kind {kind!r} for {name!r}: use one of {', '.join(KINDS)}")
    return kinds


def infer_kind(name: str, reference: np.ndarray, tokens: bool = False) -> tuple[str, str]:
    """(kind, why) from the output's name, shape and the reference's values on one sample;
    ``tokens``: the model reads token ids (an ``input_ids`` input)."""
    if reference.dtype.kind != "f" or reference.ndim == 0 or reference.size == 0:
        return "dense", "not a float tensor"
    lowered = name.lower()
    finite = reference[np.isfinite(reference)]
    unit = finite.size > 0 and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0
    if tokens and reference.ndim == 3 and reference.shape[-1] >= 2 and "logit" in lowered and not unit:
        return "next_token", f"[N, T, V] '{name}' of a model that reads input_ids"
    if reference.ndim == 3 and reference.shape[0] == 1:
        layout = detector_layout(reference)
        if layout is not None:
            return "detector", layout
    if any(word in lowered for word in _EMBEDDING_WORDS):
        return "embedding", f"name '{name}' reads like an embedding"
    rows_sum_to_one = unit and reference.shape[-1] >= 2 and np.allclose(reference.sum(axis=-1), 1.0, atol=1e-3)
    class_name = any(word in lowered for word in _CLASS_WORDS)
    if reference.ndim == 3 and reference.shape[-1] >= 2 and reference.shape[1] > 1 and (rows_sum_to_one or class_name):
        return "sequence", "[N, T, C] rows of probabilities" if rows_sum_to_one else f"[N, T, C] '{name}'"
    if reference.ndim == 3 and unit and reference.shape[-1] >= 2 and reference.shape[1] >= 8 * reference.shape[-1]:
        return "detector", "score map [1, A, C] in [0, 1]"
    if reference.ndim == 2 and reference.shape[-1] >= 2:
        if rows_sum_to_one or class_name:
            return "classes", "[N, C] class scores"
        return "embedding", "[N, D] rows, not probabilities"
    if unit and reference.ndim >= 3:
        return "map", "map of values in [0, 1]"
    return "dense", f"shape {list(reference.shape)}"


def detector_layout(reference: np.ndarray) -> str | None:
    """'[1, 4+C, A]' or '[1, A, 4+C]' when the values look like boxes (some > 1) then scores in [0, 1]."""
    for channels_first in (True, False):
        table = reference[0].T if channels_first else reference[0]  # [A, 4+C]
        anchors, width = table.shape
        if width < 5 or anchors < 8 * width:
            continue
        boxes, scores = table[:, :4], table[:, 4:]
        if np.isfinite(table).all() and scores.min() >= 0.0 and scores.max() <= 1.0 and boxes.max() > 1.0:
            return "[1, 4+C, A] boxes + scores" if channels_first else "[1, A, 4+C] boxes + scores"
    return None


@dataclass
class KindStats:
    """Kind metrics of one output, accumulated sample by sample."""

    kind: str
    why: str
    layout: str = ""
    matches: dict[str, list[float]] = field(default_factory=dict)
    """metric -> per-sample values (rates) or [hits, total] pairs for pooled metrics."""
    pooled: dict[str, list[float]] = field(default_factory=dict)

    @property
    def scores_classes(self) -> bool:
        """Rows of class scores: argmax agreement means something."""
        return self.kind in TOP1_KINDS

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
        if (self.scores_classes or self.kind == "embedding") and reference.ndim >= 2:
            self._rows(reference.reshape(-1, reference.shape[-1]), candidate.reshape(-1, candidate.shape[-1]))
        if self.kind == "next_token" and reference.ndim >= 2:
            summed, rows = kl_sum(reference, candidate)
            self._pool("kl", max(0.0, summed), float(rows))
        if self.kind == "sequence" and reference.ndim >= 3:
            self._sequences(reference, candidate)
        elif self.kind == "detector" and reference.ndim == 3:
            self._detections(reference, candidate)
        elif self.kind == "map":
            for threshold in MAP_THRESHOLDS:
                self._pool(f"map_iou_{threshold:g}", *_mask_overlap(reference >= threshold, candidate >= threshold))

    def _rows(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        cosines = _row_cosines(reference, candidate)
        self.matches.setdefault("row_cosine", []).append(float(cosines.mean()))
        if self.kind != "embedding":
            agree = np.argmax(reference, axis=-1) == np.argmax(candidate, axis=-1)
            self._pool("top1", float(agree.sum()), float(agree.size))

    def _sequences(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Greedy decodings of every [T, C] row set compared by edit distance (pooled over samples)."""
        ref_steps = np.argmax(reference, axis=-1).reshape(-1, reference.shape[-2])
        cand_steps = np.argmax(candidate, axis=-1).reshape(-1, candidate.shape[-2])
        blank = int(np.bincount(ref_steps.ravel()).argmax())
        for ref_row, cand_row in zip(ref_steps, cand_steps, strict=True):
            want, got = _greedy_decode(ref_row, blank), _greedy_decode(cand_row, blank)
            length = max(len(want), len(got))
            self._pool("decoded_agreement", float(length - _edit_distance(want, got)), float(length))

    def _detections(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        if self.layout.startswith("[1, 4+C, A]"):
            reference, candidate = reference[0].T, candidate[0].T
        else:
            reference, candidate = reference[0], candidate[0]
        boxes = self.layout.endswith("boxes + scores")
        ref_scores, cand_scores = (reference[:, 4:], candidate[:, 4:]) if boxes else (reference, candidate)
        anchors = ref_scores.max(axis=1) >= SCORE_THRESHOLD
        if anchors.any():
            cosine = _row_cosines(ref_scores[anchors].reshape(1, -1), cand_scores[anchors].reshape(1, -1))
            self.matches.setdefault("candidate_cosine", []).append(float(cosine[0]))
        if boxes:
            self._pool("f1", *_box_matches(reference, candidate))
        else:
            self._pool("f1", *_pair_matches(ref_scores >= SCORE_THRESHOLD, cand_scores >= SCORE_THRESHOLD))

    def _pool(self, metric: str, hits: float, total: float) -> None:
        """Pooled metrics keep (hits, total) per sample: the total is sum(hits) / sum(total)."""
        self.pooled.setdefault(metric, []).extend([hits, total])

    def values(self) -> dict[str, float | None]:
        """Each metric over all samples and, as ``<metric>_worst_sample``, on the worst sample."""
        found: dict[str, float | None] = {}
        for metric, per_sample in self.matches.items():
            found[metric] = float(np.mean(per_sample))
            found[f"{metric}_worst_sample"] = float(min(per_sample))
        for metric, pairs in self.pooled.items():
            hits, totals = np.array(pairs[0::2]), np.array(pairs[1::2])
            found[metric] = float(hits.sum() / totals.sum()) if totals.sum() > 0 else None
            rates = [h / t for h, t in zip(hits, totals, strict=True) if t > 0]
            worst = max if metric in LOWER_IS_BETTER else min
            found[f"{metric}_worst_sample"] = float(worst(rates)) if rates else None
        return found

    def failures(self, limits: dict[str, float]) -> list[tuple[str, float]]:
        """(failure text, violation ratio) for every kind limit (metric -> minimum) the output misses."""
        values = self.values()
        misses = []
        for metric, limit in limits.items():
            value = values.get(metric)
            if metric in LOWER_IS_BETTER:
                if value is not None and value > limit:
                    misses.append(
                        (f"{METRIC_LABELS[metric]} {value:.3g} > {limit:g}", value / limit if limit else np.inf)
                    )
                continue
            if value is None or value >= limit:
                continue
            allowed = 1.0 - limit
            ratio = (1.0 - value) / allowed if allowed > 0 else np.inf
            misses.append((f"{METRIC_LABELS[metric]} {value:.3g} < {limit:g}", ratio))
        return misses


def _greedy_decode(steps: np.ndarray, blank: int) -> list[int]:
    """CTC's greedy decoding: repeats merged, then the blank class dropped."""
    merged = steps[np.concatenate([[True], steps[1:] != steps[:-1]])] if steps.size else steps
    return [int(value) for value in merged if value != blank]


def _edit_distance(first: list[int], second: list[int]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), one row at a time."""
    previous = list(range(len(second) + 1))
    for i, item in enumerate(first, 1):
        current = [i]
        for j, other in enumerate(second, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item != other)))
        previous = current
    return previous[-1]


def _row_cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine of each row; two all-zero rows agree (1.0), one all-zero row does not (0.0)."""
    dot = (reference * candidate).sum(axis=-1)
    norms = np.linalg.norm(reference, axis=-1) * np.linalg.norm(candidate, axis=-1)
    both_zero = (np.abs(reference).sum(axis=-1) == 0) & (np.abs(candidate).sum(axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.clip(np.where(both_zero, 1.0, cosine), -1.0, 1.0)


def _mask_overlap(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(intersection, union) of two masks; two empty masks count as one agreeing element."""
    union = float(np.logical_or(reference, candidate).sum())
    return (float(np.logical_and(reference, candidate).sum()), union) if union else (1.0, 1.0)


def _pair_matches(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(2 * common, |ref| + |cand|) of two sets of (anchor, class) pairs: F1 once pooled."""
    common = float(np.logical_and(reference, candidate).sum())
    total = float(reference.sum() + candidate.sum())
    return (2 * common, total) if total else (1.0, 1.0)


def _box_matches(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """(2 * matched boxes, |ref| + |cand|): boxes over the score threshold, matched one to one by
    class and IoU >= 0.5, best IoU first (F1 once pooled over the samples)."""
    ref, cand = _candidates(reference), _candidates(candidate)
    total = float(len(ref[0]) + len(cand[0]))
    if not len(ref[0]) or not len(cand[0]):
        return (0.0, total) if total else (1.0, 1.0)
    iou = _iou(ref[0], cand[0]) * (ref[1][:, None] == cand[1][None, :])
    used_rows, used_columns = set(), set()
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        row, column = divmod(int(flat), iou.shape[1])
        if iou[row, column] < IOU_THRESHOLD:
            break
        if row not in used_rows and column not in used_columns:
            used_rows.add(row)
            used_columns.add(column)
    return 2.0 * len(used_rows), total


def _candidates(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x1y1x2y2 boxes, classes) a detector's post-processing keeps: anchors whose best class score
    is over the threshold, then per-class non-maximum suppression at IoU ``NMS_IOU``."""
    scores = table[:, 4:]
    keep = scores.max(axis=1) >= SCORE_THRESHOLD
    centre, size = table[keep, :2], table[keep, 2:4]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    classes, best = scores[keep].argmax(axis=1), scores[keep].max(axis=1)
    kept = _nms(boxes, classes, best)
    return boxes[kept], classes[kept]


def _nms(boxes: np.ndarray, classes: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Indices kept by greedy per-class non-maximum suppression, best score first."""
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    suppressed = np.zeros(len(order), bool)
    for index in order:  # one row of IoUs per kept box: memory stays O(boxes) however many pass 0.25
        if suppressed[index]:
            continue
        kept.append(int(index))
        suppressed |= (_iou(boxes[index : index + 1], boxes)[0] > NMS_IOU) & (classes == classes[index])
    return np.array(sorted(kept), np.int64)


def _iou(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    top_left = np.maximum(first[:, None, :2], second[None, :, :2])
    bottom_right = np.minimum(first[:, None, 2:], second[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = lambda boxes: np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(axis=1)  # noqa: E731
    union = area(first)[:, None] + area(second)[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
