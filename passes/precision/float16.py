"""float16 and bfloat16: weights stored in half the bytes, or the computation converted.

``float16`` mode ``storage`` (``passes.precision.storage``): float32 weights stored as float16 with
a Cast back that onnxruntime folds at load: fp32's graph and speed, half the file.
``float16`` mode ``compute`` and ``bfloat16`` (``passes.precision.compute``): the graph computes
in the lower type, with float32 islands chosen by op, by size arithmetic and by the calibrated
range of each tensor; graph inputs and outputs stay float32. bfloat16 needs a provider that runs
it (CUDA): on CPU the pass refuses, since onnxruntime's CPU provider lacks bfloat16 kernels for
most ops. On CPU, float16 compute runs (onnxruntime casts around the ops it lacks float16 kernels
for), but its timing says nothing about a GPU's.
"""

from __future__ import annotations

from typing import Literal

import onnx
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError
from optimizer.graph.edit import cleanup, toposort
from optimizer.graph.patterns import invalid_pattern
from optimizer.graph.tensor_types import tensor_types
from optimizer.graph.walk import iter_graphs
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from optimizer.verify.runtime import resolve_provider
from passes.precision.compute import ComputeConfig, Target, bfloat16_target, convert_compute, float16_target
from passes.precision.ranges import float_ranges
from passes.precision.storage import StorageConfig, store_float16

Float16Mode = Literal["storage", "compute"]
CPU_TIMING_NOTE = (
    "float16 compute on CPU: onnxruntime casts around the ops it has no float16 kernel for; "
    "CPU timing says nothing about a GPU"
)


def _check_patterns(name: str, key: str, patterns: tuple[str, ...]) -> None:
    bad = invalid_pattern(patterns)
    if bad:
        raise OptionError(f"pass '{name}' option '{key}': bad regular expression {bad}")


def _compute(graph: gs.Graph, context: PassContext, config: ComputeConfig, report: PassReport) -> bool:
    template = onnx.ModelProto(ir_version=8)
    template.opset_import.extend(graph.import_domains or [onnx.helper.make_opsetid("", int(graph.opset))])
    types = tensor_types(graph, template)
    target = config.target.elem_type
    computed = (t for g in iter_graphs(graph) for node in g.nodes if node.op != "Constant" for t in node.outputs)
    if any(types.get(t.name) == target for t in computed):
        report.skip("graph", graph.name, f"already computes in {config.target.name}: nothing converted")
        return False
    ranges = float_ranges(graph, types, context, report)
    changed = convert_compute(graph, types, config, ranges, report)
    if changed:
        cleanup(graph)
        toposort(graph)
    return changed


@register
class Float16Pass(Pass):
    name = "float16"
    summary = "weights stored as float16 (storage), or the computation in float16 with float32 islands (compute)"
    backoff_option = "keep_float32"

    mode: Float16Mode = option(
        "storage",
        "storage: weights stored as float16, cast back to float32 at load (fp32's graph, half the file); "
        "compute: the graph computes in float16 with float32 islands, inputs and outputs stay float32",
    )
    min_elements: int = option(16, "storage: weights with fewer elements stay float32 (scalars, epsilons)")
    exclude_tensors: tuple[str, ...] = option((), "storage: weight names (glob, or re:regex) left in float32")
    keep_float32: tuple[str, ...] = option(
        (), "op types or node names (glob, or re:regex) kept float32 (storage: the weights they read)"
    )
    range_limit: float = option(16384.0, "compute: a tensor whose calibrated |x| exceeds this keeps its ops float32")

    def __post_init__(self) -> None:
        if self.min_elements < 1:
            raise OptionError(f"pass '{self.name}' option 'min_elements' must be >= 1, got {self.min_elements}")
        if not 0 < self.range_limit <= 65504:
            raise OptionError(f"pass '{self.name}' option 'range_limit' must be in (0, 65504], got {self.range_limit}")
        _check_patterns(self.name, "exclude_tensors", self.exclude_tensors)
        _check_patterns(self.name, "keep_float32", self.keep_float32)

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        if self.mode == "storage":
            storage = StorageConfig(self.min_elements, self.exclude_tensors, self.keep_float32)
            changed = store_float16(graph, storage, report)
            return PassResult(graph, changed, report.to_dict())
        config = ComputeConfig(float16_target(), self.keep_float32, self.range_limit)
        changed = _compute(graph, context, config, report)
        if changed and resolve_provider(context.provider).providers[0] == "CPUExecutionProvider":
            report.details.setdefault("notes", []).append(CPU_TIMING_NOTE)
        return PassResult(graph, changed, report.to_dict())


@register
class Bfloat16Pass(Pass):
    name = "bfloat16"
    summary = "the computation in bfloat16 with float32 islands (providers that run bfloat16: CUDA)"
    required_provider = "cuda"
    backoff_option = "keep_float32"

    mode: Literal["compute"] = option(
        "compute", "compute: the graph computes in bfloat16 with float32 islands (needs --provider cuda)"
    )
    keep_float32: tuple[str, ...] = option((), "op types or node names (glob, or re:regex) kept float32")

    def __post_init__(self) -> None:
        _check_patterns(self.name, "keep_float32", self.keep_float32)

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        choice = resolve_provider(context.provider)
        if choice.providers[0] != "CUDAExecutionProvider":
            raise OptionError(_bfloat16_refusal(choice.note))
        report = PassReport()
        config = ComputeConfig(bfloat16_target(), self.keep_float32, bfloat16_target().largest)
        return PassResult(graph, _compute(graph, context, config, report), report.to_dict())


def _bfloat16_refusal(cuda_note: str | None) -> str:
    reason = (cuda_note or "the provider is CPU").removesuffix("; falling back to CPU")
    return (
        f"bfloat16 compute needs a provider with bfloat16 kernels (CUDA: --provider cuda); {reason}. "
        "onnxruntime's CPU provider has no bfloat16 kernels for most ops: use --float16 storage (half the "
        "file, fp32 speed) or --float16 compute on CPU"
    )


__all__ = ["Bfloat16Pass", "Float16Pass", "Target"]
