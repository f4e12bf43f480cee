"""optimizer.verify.pass_bisect: name the first pass after which the model fails the checker, onnxruntime
or the tolerance, with a binary search over cumulative snapshots."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from optimizer.errors import PassError
from optimizer.pass_base import Pass, PassContext, PassResult
from optimizer.verify.pass_bisect import bisect_passes
from optimizer.verify.validate import Tolerance

LOSSLESS = Tolerance(max_abs=1e-6)


@dataclass(frozen=True, kw_only=True)
class EditPass(Pass):
    """A test pass that applies ``edit`` to the graph; subclasses name it and give the edit."""

    name: ClassVar[str] = "edit"
    summary: ClassVar[str] = "test pass"
    modifies: ClassVar[bool] = True

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        self.edit(graph)
        return PassResult(graph, self.modifies, {})

    def edit(self, graph: gs.Graph) -> None:
        """Change nothing."""


class Noop(EditPass):
    name, modifies = "noop", False


class ScaleWeights(EditPass):
    name = "scale-weights"

    def edit(self, graph: gs.Graph) -> None:
        """Double W1: numerically wrong, structurally fine."""
        graph.tensors()["W1"].values = graph.tensors()["W1"].values * 2


class Dangle(EditPass):
    name = "dangle"

    def edit(self, graph: gs.Graph) -> None:
        """Make the last node read a tensor nobody produces."""
        graph.nodes[-1].inputs[0] = gs.Variable("nowhere", dtype=np.float32, shape=[2, 8])


class CustomRelu(EditPass):
    name = "custom-relu"

    def edit(self, graph: gs.Graph) -> None:
        """Move Relu to a domain onnxruntime does not know."""
        for node in graph.nodes:
            if node.op == "Relu":
                node.domain = "custom.domain"


class Explode(EditPass):
    name = "explode"

    def edit(self, graph: gs.Graph) -> None:
        raise PassError("explode: cannot handle this graph")


def two_layer_model():
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("W1", (4, 8)), ("W2", (8, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    model.opset_import.add(domain="custom.domain", version=1)
    return model


FEEDS = [{"x": np.random.default_rng(seed).standard_normal((2, 4)).astype(np.float32)} for seed in range(2)]


def bisect(passes, **options):
    model = two_layer_model()
    before = model.SerializeToString()
    result = bisect_passes(model, passes, FEEDS, tolerance=LOSSLESS, provider="cpu",
                           isolate=options.pop("isolate", False), **options)
    assert model.SerializeToString() == before
    return result


def max_checks(count: int) -> int:
    return 1 + math.ceil(math.log2(count))


def test_a_clean_pipeline_blames_nobody_after_one_check():
    result = bisect([Noop() for _ in range(8)])
    assert (result.first_bad_pass, result.index, result.reason) == (None, None, None)
    assert result.checks == 1 and result.per_step[-1].passed is True


@pytest.mark.parametrize("bad_index", range(8))
def test_numeric_breakage_is_found_by_binary_search(bad_index):
    passes: list[Pass] = [Noop() for _ in range(8)]
    passes[bad_index] = ScaleWeights()
    result = bisect(passes)
    assert (result.first_bad_pass, result.index) == ("scale-weights", bad_index)
    assert result.reason.startswith("outside tolerance: output 'y'")
    assert result.checks <= max_checks(8)
    assert all(step.passed for step in result.per_step[:bad_index] if step.checked)
    assert all(step.applied for step in result.per_step)


def test_checker_failure_is_named():
    result = bisect([Noop(), Noop(), Dangle(), Noop()])
    assert (result.first_bad_pass, result.index) == ("dangle", 2)
    assert "onnx.checker" in result.reason and "nowhere" in result.reason


def test_onnxruntime_refusal_is_quoted():
    result = bisect([Noop(), CustomRelu(), Noop(), Noop()])
    assert (result.first_bad_pass, result.index) == ("custom-relu", 1)
    assert "onnxruntime cannot load" in result.reason and "custom.domain" in result.reason


def test_a_raising_pass_bounds_the_search_but_an_earlier_break_wins():
    result = bisect([Noop(), ScaleWeights(), Noop(), Explode(), Noop()])
    assert (result.first_bad_pass, result.index) == ("scale-weights", 1)
    assert [step.applied for step in result.per_step] == [True, True, True, False, False]
    raised = bisect([Noop(), Explode()])
    assert (raised.first_bad_pass, raised.index) == ("explode", 1)
    assert raised.reason == "pass raised PassError: explode: cannot handle this graph"


def test_isolated_checks_give_the_same_verdict():
    result = bisect([Noop(), CustomRelu()], isolate=True, timeout_s=120)
    assert (result.first_bad_pass, result.index) == ("custom-relu", 1)
    assert "custom.domain" in result.reason


def test_an_original_that_already_fails_cannot_be_bisected():
    model = two_layer_model()
    model.graph.node[1].domain = "custom.domain"
    with pytest.raises(PassError, match="cannot bisect: the original model already fails"):
        bisect_passes(model, [Noop()], FEEDS, tolerance=LOSSLESS, isolate=False)
