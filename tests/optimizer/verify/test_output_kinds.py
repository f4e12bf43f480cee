"""Output kinds: a detector output must be judged by its boxes and class scores, not by a cosine
over the whole tensor (YOLOv8n pruned 30% PASSed at whole-tensor cosine 0.99 with class-score
cosine 0.71); top-1 is shown only for class scores; the user can set a kind."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.cli import main
from optimizer.errors import OptionError
from optimizer.verify.output_kinds import KIND_LIMITS, KindStats, infer_kind
from optimizer.verify.tolerances import LOSSY_TOLERANCE, Tolerance
from optimizer.verify.validate import compare

CLASSES, ANCHORS = 18, 2100


def yolo_output(seed: int = 0) -> np.ndarray:
    """[1, 4+C, A]: boxes in pixels (cx, cy, w, h), then sigmoid class scores; 12 confident anchors."""
    rng = np.random.default_rng(seed)
    boxes = np.concatenate([rng.uniform(20, 300, (2, ANCHORS)), rng.uniform(10, 80, (2, ANCHORS))])
    scores = rng.uniform(0.0, 0.05, (CLASSES, ANCHORS))
    hits = rng.choice(ANCHORS, 12, replace=False)
    scores[rng.integers(0, CLASSES, 12), hits] = rng.uniform(0.5, 0.95, 12)
    return np.concatenate([boxes, scores])[None].astype(np.float32)


def weakened_scores(output: np.ndarray) -> np.ndarray:
    """What damaged class scores look like: confident scores cut to a fifth, boxes untouched."""
    weakened = output.copy()
    weakened[0, 4:] = np.where(weakened[0, 4:] > 0.25, weakened[0, 4:] * 0.2, weakened[0, 4:])
    return weakened


def test_a_yolo_head_is_recognised_and_judged_by_boxes_and_scores():
    reference = yolo_output()
    kind, why = infer_kind("output0", reference)
    assert kind == "detector" and why.startswith("[1, 4+C, A]")
    stats = KindStats(kind, why, why)
    stats.add(reference, weakened_scores(reference))
    values = stats.values()
    assert values["f1"] == 0.0 and values["candidate_cosine"] < 0.98
    assert [text.split()[0] for text, _ in stats.failures(KIND_LIMITS["detector"])] == ["F1", "candidate"]
    same = KindStats(kind, why, why)
    same.add(reference, reference)
    assert same.values()["f1"] == 1.0 and same.failures(KIND_LIMITS["detector"]) == []


def _identity_model(shape: list[int], name: str = "output0") -> bytes:
    graph = helper.make_graph([helper.make_node("Identity", ["x"], [name])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _scaled_scores_model(shape: list[int]) -> bytes:
    """Multiplies rows 4: (the class scores) by a mask: confident ones shrink, as a bad prune would."""
    scale = np.ones(shape, np.float32)
    scale[0, 4:] = 0.2
    nodes = [helper.make_node("Mul", ["x", "s"], ["scaled"]), helper.make_node("Less", ["x", "t"], ["low"]),
             helper.make_node("Where", ["low", "x", "scaled"], ["output0"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, shape)],
                              [numpy_helper.from_array(scale, "s"),
                               numpy_helper.from_array(np.full(shape, 0.25, np.float32), "t")])
    threshold = np.full(shape, 0.25, np.float32)
    threshold[0, :4] = np.inf  # boxes always kept
    graph.initializer[1].CopyFrom(numpy_helper.from_array(threshold, "t"))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_the_lossy_verdict_fails_a_detector_whose_whole_tensor_cosine_passes():
    shape = [1, 4 + CLASSES, ANCHORS]
    reference, candidate = _identity_model(shape), _scaled_scores_model(shape)
    feeds = [{"x": yolo_output(seed)} for seed in range(3)]
    whole_only = compare(reference, candidate, feeds, tolerance=Tolerance(min_cosine=0.99, min_sqnr_db=20.0))
    assert whole_only.passed and whole_only.outputs[0].cosine > 0.99
    result = compare(reference, candidate, feeds, tolerance=LOSSY_TOLERANCE)
    (output,) = result.outputs
    assert not result.passed and output.kind == "detector" and output.top1_agreement is None
    assert output.kind_metrics["f1"] == 0.0 and output.kind_metrics["f1_worst_sample"] == 0.0
    assert any(failure.startswith("F1 0 < 0.9") for failure in output.failures)


def test_top1_only_for_class_scores_and_the_kind_can_be_set(tmp_path, capsys):
    mel = _identity_model([1, 80, 100], name="mel")
    feeds = [{"x": np.random.default_rng(0).standard_normal((1, 80, 100)).astype(np.float32)}]
    (output,) = compare(mel, mel, feeds, tolerance=LOSSY_TOLERANCE).outputs
    assert output.kind == "dense" and output.top1_agreement is None
    (forced,) = compare(mel, mel, feeds, tolerance=LOSSY_TOLERANCE, output_kinds={"mel": "sequence"}).outputs
    assert forced.kind == "sequence" and forced.kind_reason == "set by --output-kind" and forced.top1_agreement == 1
    with pytest.raises(OptionError, match="output kind 'boxes' for 'mel'"):
        compare(mel, mel, feeds, output_kinds={"mel": "boxes"})
    path = tmp_path / "mel.onnx"
    path.write_bytes(mel.SerializeToString())
    assert main(["validate", str(path), str(path), "--output-kind", "mel=embedding", "--json"]) == 0
    assert '"kind": "embedding"' in capsys.readouterr().out
    assert main(["validate", str(path), str(path), "--output-kind", "mel=boxes"]) == 2
    assert main(["validate", str(path), str(path), "--output-kind", "nope=dense"]) == 2
    assert "unknown output 'nope'" in capsys.readouterr().err


def _judge(reference: np.ndarray, candidate: np.ndarray) -> tuple[str, list[str]]:
    kind, why = infer_kind("out", reference)
    stats = KindStats(kind, why)
    stats.add(reference, candidate)
    return kind, [text for text, _ in stats.failures(KIND_LIMITS[kind])]


def test_a_probability_map_is_judged_by_its_masks_not_its_whole_tensor_sqnr():
    """PP-OCRv4 det static int8: whole-map SQNR 13.7 dB FAILed while the text mask at 0.3 kept
    IoU 0.95. A map in [0, 1] is judged by its masks at 0.3 and 0.5; cosine and SQNR are reported."""
    rng = np.random.default_rng(0)
    reference = np.zeros((1, 1, 64, 64), np.float32)
    reference[0, 0, 10:30, 5:60] = 0.9
    softened = np.clip(reference * 0.7 + rng.uniform(0, 0.12, reference.shape), 0, 1).astype(np.float32)
    assert _judge(reference, softened) == ("map", [])
    eroded = reference.copy()
    eroded[0, 0, 10:20] = 0.4  # half the text mask drops under 0.5, stays over 0.3
    kind, failures = _judge(reference, eroded)
    assert kind == "map" and failures == ["mask IoU at 0.5 0.5 < 0.9"]


def test_a_sequence_is_judged_by_what_greedy_decoding_reads():
    """PP-OCRv4 rec static int8: per-row cosine 0.975 of peaky CTC rows FAILed while the decoded text
    kept its CER, and per-step argmax agreement 0.93 FAILed too: argmax flips where a character
    starts or ends leave the text. The decoded sequences decide; a changed character still fails."""
    reference = np.full((1, 40, 30), 0.05 / 29, np.float32)
    reference[0, np.arange(40), np.arange(40) % 30] = 0.95
    flatter = np.full_like(reference, 0.45 / 29)
    flatter[0, np.arange(40), np.arange(40) % 30] = 0.55
    kind, failures = _judge(reference, flatter)
    assert kind == "sequence" and failures == []
    changed = reference.copy()
    changed[0, :4] = reference[0, 4:8]
    assert _judge(reference, changed)[1] == ["decoded sequence agreement 0.897 < 0.97"]


def _ctc_rows(labels: list[int], classes: int = 12) -> np.ndarray:
    rows = np.full((1, len(labels), classes), 0.02 / (classes - 1), np.float32)
    rows[0, np.arange(len(labels)), labels] = 0.98
    return rows


def test_ctc_boundaries_that_move_keep_the_decoded_text():
    text = [0, 3, 3, 0, 0, 5, 5, 0, 7, 0, 0, 2, 2, 0, 0, 0, 9, 9, 0, 0] * 2  # 0: blank
    moved = list(text)
    moved[3], moved[6], moved[21] = 3, 0, 0  # three character boundaries a step off: per step 0.925
    kind, failures = _judge(_ctc_rows(text), _ctc_rows(moved))
    assert kind == "sequence" and failures == [], failures
    swapped = list(moved)
    swapped[8] = 4  # one character of ten read differently
    assert _judge(_ctc_rows(text), _ctc_rows(swapped))[1] == ["decoded sequence agreement 0.9 < 0.97"]


def _with_duplicates(output: np.ndarray, score: float) -> np.ndarray:
    """Each confident anchor's box repeated on the next two anchors at ``score``: what a detector
    head really gives before non-maximum suppression."""
    table = output[0].T.copy()  # [A, 4+C]
    hits = np.flatnonzero(table[:, 4:].max(axis=1) > 0.25)
    for hit in hits:
        for offset in (1, 2):
            twin = (hit + offset) % len(table)
            table[twin] = table[hit]
            table[twin, 4:] = np.where(table[hit, 4:] > 0.25, score, table[twin, 4:])
    return table.T[None].copy()


def test_detector_boxes_are_compared_after_nms():
    """Overlapping anchors of one object are one box after NMS: duplicates falling under the score
    threshold in the candidate do not count as lost detections; a lost object still does."""
    reference = _with_duplicates(yolo_output(), 0.4)
    kind, why = infer_kind("out", reference)
    assert kind == "detector" and why.endswith("boxes + scores")
    kept = KindStats(kind, why, why)
    kept.add(reference, _with_duplicates(yolo_output(), 0.2))
    assert kept.values()["f1"] == 1.0  # before NMS: 2 * 12 / (36 + 12) = 0.5
    lost = _with_duplicates(yolo_output(), 0.2)
    table = lost[0].T
    gone = np.flatnonzero(table[:, 4:].max(axis=1) > 0.25)[:3]
    table[gone, 4:] = 0.01  # three objects not found at all
    missing = KindStats(kind, why, why)
    missing.add(reference, lost)
    assert 0.8 < missing.values()["f1"] < KIND_LIMITS["detector"]["f1"]  # ~2 * 9 / (12 + 9): fails


def test_a_language_models_logits_are_judged_by_next_token_kl_and_top1(tmp_path, capsys):
    """[N, T, V] logits of a model that reads input_ids: the next-token distributions decide (KL,
    top-1), not CTC decoding (int4 of a decoder FAILed 'decoded sequence agreement 0.963 < 0.97'
    with KL 0.0013 and top-1 0.97)."""
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 16, 300)).astype(np.float32) * 3
    assert infer_kind("logits", logits, tokens=True)[0] == "next_token"
    assert infer_kind("logits", logits)[0] == "sequence"  # no input_ids: CTC-style rows
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert infer_kind("logits", probabilities, tokens=True)[0] == "sequence"
    stats = KindStats("next_token", "test")
    close, far = logits + rng.standard_normal(logits.shape).astype(np.float32) * 0.05, logits.copy()
    far[1] = rng.standard_normal(far[1].shape) * 3  # the second sample's distributions are unrelated
    stats.add(logits, close)
    values = stats.values()
    ref = logits.reshape(-1, 300).astype(np.float64)
    cand = close.reshape(-1, 300).astype(np.float64)
    p, q = (np.exp(x - x.max(-1, keepdims=True)) for x in (ref, cand))
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    assert values["kl"] == pytest.approx(float((p * np.log(p / q)).sum(-1).mean()), rel=1e-9)
    assert stats.failures(KIND_LIMITS["next_token"]) == []
    broken = KindStats("next_token", "test")
    broken.add(logits, close)
    broken.add(logits, far)
    kl = broken.values()
    assert kl["kl_worst_sample"] > kl["kl"] > 0.02  # the worst sample of a lower-is-better metric is its max
    failures = [text for text, _ in broken.failures(KIND_LIMITS["next_token"])]
    assert failures[0] == f"next-token KL {kl['kl']:.3g} > 0.02" and failures[1].startswith("top-1 agreement")
    # end to end: validate names the kind and passes an int8 copy of the tied transformer sample
    from tests.helpers.samples import MODELS_DIR
    candidate = tmp_path / "int8.onnx"
    assert main(["optimize", str(MODELS_DIR / "transformer_tied.onnx"), "-o", str(candidate), "--quiet"]) == 0
    assert main(["validate", str(MODELS_DIR / "transformer_tied.onnx"), str(candidate)]) == 0
    printed = capsys.readouterr().out
    assert "next_token" in printed and "kl " in printed
