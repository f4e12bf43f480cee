from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import onnx
import onnx_graphsurgeon as gs
import pytest

import passes  # noqa: F401
from optimizer import registry
from optimizer.errors import OptionError, PassError
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.pipeline import Pipeline


@dataclass(frozen=True, kw_only=True)
class TypedPass(Pass):
    name = "typed-test-pass"
    summary = "test only"

    ratio: float = option(0.5, "a float")
    count: int = option(1, "an int")
    mode: Literal["a", "b"] = option("a", "a choice")
    names: tuple[str, ...] = option((), "a list")
    limit: int | None = option(None, "optional")

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        return PassResult(graph, False, PassReport().to_dict())


@pytest.fixture
def typed_pass():
    registry.register(TypedPass)
    yield TypedPass.name
    registry._PASSES.pop(TypedPass.name)


def test_option_types_are_checked(typed_pass):
    made = registry.create_pass(typed_pass, ratio=1, count=3, mode="b", names=("x",), limit=None)
    assert made.options() == {"ratio": 1, "count": 3, "mode": "b", "names": ("x",), "limit": None}
    for bad in ({"count": 1.5}, {"count": True}, {"mode": "c"}, {"names": ["x"]}, {"ratio": "0.5"}):
        with pytest.raises(OptionError, match=f"option '{next(iter(bad))}' must be"):
            registry.create_pass(typed_pass, **bad)
    with pytest.raises(OptionError, match="valid options: count, limit, mode, names, ratio"):
        registry.create_pass(typed_pass, ration=0.1)


def test_cli_text_is_converted_by_type(typed_pass):
    parse = registry.parse_option_text
    assert parse(typed_pass, "ratio", "0.25") == 0.25
    assert parse(typed_pass, "count", "7") == 7
    assert parse(typed_pass, "mode", "b") == "b"
    assert parse(typed_pass, "names", "a, b,c") == ("a", "b", "c")
    assert parse(typed_pass, "limit", "none") is None and parse(typed_pass, "limit", "4") == 4
    with pytest.raises(OptionError, match="one of 'a', 'b'"):
        parse(typed_pass, "mode", "z")
    with pytest.raises(OptionError, match="must be int"):
        parse(typed_pass, "count", "many")


def test_unknown_pass_lists_the_known_ones():
    with pytest.raises(OptionError, match=r"known passes: .*cleanup"):
        registry.get_pass_class("nope")


def test_register_makes_a_frozen_keyword_only_dataclass_and_refuses_a_taken_name():
    class Loose(Pass):
        name = "loose-test-pass"
        summary = ""
        level: int = option(1, "a typed option")

        def run(self, graph, context):
            return PassResult(graph, False, {})

    registered = registry.register(Loose)
    registry._PASSES.pop("loose-test-pass")
    instance = registered(level=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        instance.level = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        registered(2)  # type: ignore[misc]  # keyword-only

    @dataclass(frozen=True, kw_only=True)
    class Impostor(TypedPass):
        name = "cleanup"

    with pytest.raises(TypeError, match="taken"):
        registry.register(Impostor)


@dataclass(frozen=True, kw_only=True)
class BreakingPass(Pass):
    """Renames a node input to a tensor nobody produces."""

    name = "breaking-test-pass"
    summary = "test only"

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        graph.nodes[0].inputs[0] = gs.Variable("nowhere", dtype=None)
        return PassResult(graph, True, PassReport().to_dict())


@dataclass(frozen=True, kw_only=True)
class SilentSkipPass(Pass):
    name = "silent-skip-test-pass"
    summary = "test only"

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        return PassResult(graph, False, {"skipped": [{"node": "n"}]})


def small_model() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) { a = Relu(x)
                                      y = Neg(a) }""")


def test_check_each_pass_names_the_pass_that_broke_the_model():
    cleanup = registry.create_pass("cleanup")
    with pytest.raises(PassError, match=r"after pass 'breaking-test-pass': onnx\.checker rejects"):
        Pipeline([cleanup, BreakingPass(), cleanup], check_each_pass=True).run(small_model())


def test_contract_rejects_a_skip_without_reason():
    with pytest.raises(PassError, match="without a reason"):
        Pipeline([SilentSkipPass()]).run(small_model())


def test_pipeline_does_not_mutate_the_callers_model():
    model = small_model()
    before = model.SerializeToString()
    result = Pipeline([registry.create_pass("cleanup")]).run(model)
    assert model.SerializeToString() == before and result.model is not model
