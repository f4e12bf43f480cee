"""Every registered pass, default options, on 20 seeded random graphs (tests/reliability/
random_graphs.py): lossless passes keep every output bit for bit, lossy ones keep every output
finite and within cosine 0.9 (tight bounds live in each pass's own tests), the result passes
the full checker, and a second application changes nothing.

A failure of another engineer's pass is marked in KNOWN_FAILURES as a strict xfail, with the
failure text, and reported to the lead; the pass is not fixed here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import passes  # noqa: F401  (registers every pass)
from optimizer.checker import check_model_full
from optimizer.model import load_model
from optimizer.pass_base import PassContext
from optimizer.pipeline import Pipeline
from optimizer.registry import create_pass, get_pass_class, pass_names
from tests.conftest import assert_same_outputs, run_model, seeded_feeds
from tests.reliability.random_graphs import features, random_model

SEEDS = range(20)
LOSSY_MIN_COSINE = 0.9
_PRUNE_ON_RANDOM_WEIGHTS = "prune (default options) on random Gaussian weights: {}, under the 0.9 bound"
KNOWN_FAILURES: dict[tuple[str, int], str] = {
    ("prune", 9): _PRUNE_ON_RANDOM_WEIGHTS.format("output 0 sample 2: cosine 0.8443"),
    ("prune", 10): _PRUNE_ON_RANDOM_WEIGHTS.format("output 1 sample 3: cosine 0.8624"),
    ("prune", 19): _PRUNE_ON_RANDOM_WEIGHTS.format("output 1 sample 3: cosine 0.8527"),
}
"""(pass, seed) -> the failure, as reported to the lead (passes of other engineers are not
fixed here). Only passes registered when this module is collected are parametrized."""


def _cases() -> list:
    cases = []
    for name in pass_names():
        for seed in SEEDS:
            reason = KNOWN_FAILURES.get((name, seed))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, seed, marks=marks, id=f"{name}-seed{seed}"))
    return cases


def apply(name: str, model: onnx.ModelProto, feeds) -> object:
    context = PassContext(calibration=lambda: iter(feeds))
    return Pipeline([create_pass(name)], context=context).run(model)


def cosine(expected: np.ndarray, actual: np.ndarray) -> float:
    a, b = expected.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return 1.0 if denominator == 0 else float(a @ b / denominator)


def assert_within_lossy_bound(original, candidate, feeds) -> None:
    for sample, (expected, actual) in enumerate(zip(run_model(original, feeds), run_model(candidate, feeds))):
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            assert want.shape == got.shape and want.dtype == got.dtype
            assert np.isfinite(got).all(), f"output {index} of sample {sample} is not finite"
            assert cosine(want, got) >= LOSSY_MIN_COSINE, f"output {index} sample {sample}: cosine {cosine(want, got):.4f}"


@pytest.mark.parametrize(("name", "seed"), _cases())
def test_pass_keeps_random_graph_valid_and_close_and_is_idempotent(name, seed):
    original = load_model(random_model(seed).SerializeToString())
    feeds = seeded_feeds(original, count=4)
    result = apply(name, original, feeds)
    check_model_full(result.model)
    if get_pass_class(name).lossless:
        assert_same_outputs(original, result.model, feeds)
    else:
        assert_within_lossy_bound(original, result.model, feeds)
    again = apply(name, result.model, feeds)
    assert again.modified is False, f"second '{name}' run still changed: {again.runs[0].report}"


def test_generator_is_seeded_valid_and_covers_every_feature():
    seen: set[str] = set()
    for seed in SEEDS:
        model = random_model(seed)
        assert model.SerializeToString() == random_model(seed).SerializeToString()
        onnx.checker.check_model(model, full_check=True)
        seen |= features(model)
    assert seen == {"Conv", "Gemm", "If", "constant-weights", "shared-weight"}
