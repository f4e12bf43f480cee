"""share: store equal weights once.

Exact copies (same dtype, shape and bytes; hash first, then bytes) become one tensor, in the
main graph and in subgraphs, keeping scope: a subgraph may read an outer tensor, never the
reverse. A copy that equals another weight transposed, reshaped or cast to a narrower float
type is replaced by one Transpose / Reshape / Cast node on the kept tensor (or by flipping a
Gemm's transA/transB); onnxruntime folds such nodes at session creation, so run time is the
same and the file is smaller. Lossless by default; ``near_duplicate_rtol`` makes it lossy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from optimizer.errors import OptionError
from optimizer.graph.duplicates import Relation, exact_classes, near_pairs, transform_relations
from optimizer.graph.edit import toposort
from optimizer.graph.names import NameAllocator
from optimizer.graph.walk import ScopeTree
from optimizer.graph.weights import Weight, collect_weights
from optimizer.internal_errors import working_on
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option
from optimizer.registry import register
from passes.share.scope import drop_constant_node, replace_input


@dataclass
class _State:
    """What one run works on: the graph tree, the taken names, the report."""

    tree: ScopeTree
    names: NameAllocator
    report: PassReport
    digests: dict[int, bytes]
    modified: bool = False


@register
class ShareWeightsPass(Pass):
    name = "share"
    summary = "store equal weights once; derive transposed, reshaped or cast copies with one cheap node"
    lossless = True  # near_duplicate_rtol (off by default) makes the pass lossy

    transformed: bool = option(
        True, "also share copies equal to another weight transposed, reshaped or cast (adds a folded node)"
    )
    near_duplicate_rtol: float | None = option(
        None, "LOSSY when set: merge same-shape float weights whose max |a-b| <= rtol * max |kept|"
    )

    def __post_init__(self) -> None:
        rtol = self.near_duplicate_rtol
        if rtol is not None and not (math.isfinite(rtol) and 0.0 <= rtol < 1.0):
            raise OptionError(
                f"pass '{self.name}' option 'near_duplicate_rtol' must be None or a number in [0, 1), got {rtol!r}"
            )

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        state = _State(ScopeTree.build(graph), NameAllocator(graph, reserve_node_names=False), PassReport(), {})
        state.report.details["groups"] = []
        weights = collect_weights(graph, state.digests)
        _share_exact(weights, state)
        live = [w for w in weights if w.tensor.outputs and not w.protected]
        if self.near_duplicate_rtol is not None:
            _share_near(live, self.near_duplicate_rtol, state)
            live = [w for w in live if w.tensor.outputs]
        if self.transformed:
            relations = _oriented(transform_relations(_single_copies(live)))
            applied = []
            for relation in relations:
                with working_on("tensor", relation.derived.name):
                    applied.append(_share_transformed(relation, state))
            if any(applied):
                state.tree = ScopeTree.build(graph)
                _share_exact(collect_weights(graph, state.digests), state)
        if state.modified:
            toposort(graph)
        if not state.report.details["groups"]:
            del state.report.details["groups"]
        return PassResult(graph, state.modified, state.report.to_dict())


def _single_copies(weights: list[Weight]) -> list[Weight]:
    """Weights with no exact copy left (copies left in sibling subgraphs are not transformed)."""
    return [group[0] for group in exact_classes(weights) if len(group) == 1]


def _share_exact(weights: list[Weight], state: _State) -> None:
    for group in exact_classes(weights):
        if len(group) > 1:
            _merge(group, state, "exact")


def _share_near(weights: list[Weight], rtol: float, state: _State) -> None:
    for kept, other, error, relative in near_pairs(weights, rtol):
        if kept.tensor.outputs and other.tensor.outputs:
            detail = _merge([kept, other], state, "near")
            if detail is not None:
                detail.update(max_abs_error=error, max_rel_error=relative)


def _merge(group: list[Weight], state: _State, kind: str) -> dict | None:
    """Point every reader of the copies at one kept tensor, per scope component."""
    members = []
    for weight in group:
        if weight.protected:
            state.report.skip("tensor", weight.label(state.tree), weight.protected)
        else:
            members.append(weight)
    if len(members) < 2:
        return None
    components = _scope_components(members, state.tree)
    if len(components) > 1:
        labels = ", ".join(w.label(state.tree) for w in members)
        common = state.tree.path(state.tree.common_ancestor([g for w in members for g in w.storage_graphs(state.tree)]))
        state.report.skip(
            "tensor",
            labels,
            (
                f"copies in sibling subgraphs: no node of their common graph '{common}' reads the tensor, "
                "and the exporter stores an initializer in every graph whose nodes read it; one copy kept per subgraph"
            ),
        )
    detail = None
    for component in components:
        if len(component) > 1:
            detail = _merge_component(component, state, kind) or detail
    return detail


def _scope_components(members: list[Weight], tree: ScopeTree) -> list[list[Weight]]:
    """Members grouped by the outermost storage graph they live under (siblings stay apart)."""
    storage = {id(w): w.storage_graphs(tree) for w in members}
    anchors = tree.outermost([g for graphs in storage.values() for g in graphs])
    components: list[tuple[set[int], list[Weight]]] = []
    for weight in members:
        keys = {id(a) for a in anchors if any(tree.is_within(g, a) for g in storage[id(weight)])}
        joined = [c for c in components if c[0] & keys]
        for c in joined:
            components.remove(c)
            keys |= c[0]
        components.append((keys, sorted([weight] + [w for c in joined for w in c[1]], key=lambda w: w.order)))
    return sorted((c[1] for c in components), key=lambda ws: ws[0].order)


def _merge_component(component: list[Weight], state: _State, kind: str) -> dict | None:
    tree, report = state.tree, state.report
    labels = {id(w): w.label(tree) for w in component}
    kept = _choose_kept(component, tree)
    if kept is None or state.names.others(kept.tensor):
        reason = (
            "no copy is visible from every reader" if kept is None else "another tensor in a subgraph has the same name"
        )
        report.skip("tensor", ", ".join(labels.values()), reason)
        return None
    before = sum(len(w.storage_graphs(tree)) * w.nbytes for w in component)
    replaced = []
    for other in component:
        if other is kept:
            continue
        if other.has_custom_consumer():
            report.skip("tensor", labels[id(other)], "read by a custom-domain op; left as is")
            continue
        with working_on("tensor", labels[id(other)]):
            for node in other.consumers:
                replace_input(node, other.tensor, kept.tensor)
            drop_constant_node(other)
        replaced.append(labels[id(other)])
    after = sum(len(w.storage_graphs(tree)) * w.nbytes for w in component if w.tensor.outputs)
    if not replaced:
        return None
    state.modified = True
    report.count(f"{kind}_copies_removed", len(replaced))
    report.saved_bytes += before - after
    detail = {"kind": kind, "kept": labels[id(kept)], "replaced": replaced, "saved_bytes": before - after}
    report.details["groups"].append(detail)
    return detail


def _choose_kept(component: list[Weight], tree: ScopeTree) -> Weight | None:
    """A copy every reader can see; one read by a custom op first, then initializers, then order."""
    storage = [g for w in component for g in w.storage_graphs(tree)]

    def visible(weight: Weight) -> bool:
        return weight.node is None or all(tree.is_within(g, weight.home) for g in storage)

    ranked = sorted(component, key=lambda w: (not w.has_custom_consumer(), w.node is not None, w.order))
    return next((w for w in ranked if visible(w)), None)


def _gemm_flip_slot(node: gs.Node, tensor: gs.Tensor) -> str | None:
    """The Gemm attribute (transA/transB) that can absorb a 2-D transpose of ``tensor``, if any."""
    if node.op != "Gemm" or node.domain not in ("", None, "ai.onnx"):
        return None
    slots = [i for i, t in enumerate(node.inputs) if t is tensor]
    if slots == [0]:
        return "transA"
    if slots == [1]:
        return "transB"
    return None


def _node_cost(relation: Relation) -> int:
    """1 when keeping ``source`` needs a new node for ``derived``'s readers, else 0 (Gemm flips)."""
    if (
        relation.kind == "transposed"
        and relation.perm == (1, 0)
        and all(_gemm_flip_slot(n, relation.derived.tensor) for n in relation.derived.consumers)
    ):
        return 0
    return 1


def _oriented(relations: list[Relation]) -> list[Relation]:
    """Each transposed pair turned so the kept side needs fewest nodes (an embedding's layout wins)."""
    oriented = []
    for relation in relations:
        if relation.kind == "transposed":
            inverse = tuple(int(i) for i in np.argsort(relation.perm))
            flipped = Relation("transposed", relation.derived, relation.source, inverse)
            if _orientation_key(flipped) < _orientation_key(relation):
                relation = flipped
        oriented.append(relation)
    return sorted(oriented, key=lambda r: (r.derived.order, r.source.order))


def _orientation_key(relation: Relation) -> tuple:
    gathered = any(n.op == "Gather" and n.inputs[0] is relation.source.tensor for n in relation.source.consumers)
    return (_node_cost(relation), not gathered, relation.source.node is not None, relation.source.order)


def _share_transformed(relation: Relation, state: _State) -> bool:
    tree, report = state.tree, state.report
    source, derived = relation.source, relation.derived
    kept_label, copy_label = source.label(tree), derived.label(tree)
    reason = _transform_refusal(relation, state)
    if reason:
        report.skip("tensor", f"{copy_label} = {relation.kind}({kept_label})", reason)
        return False
    flips = {id(n): _gemm_flip_slot(n, derived.tensor) for n in derived.consumers} if _node_cost(relation) == 0 else {}
    before = len(source.storage_graphs(tree)) * source.nbytes + len(derived.storage_graphs(tree)) * derived.nbytes
    for node in derived.consumers:
        if flips.get(id(node)):
            replace_input(node, derived.tensor, source.tensor)
            node.attrs[flips[id(node)]] = 1 - int(node.attrs.get(flips[id(node)], 0))
            report.count("gemm_transpose_flags_flipped")
    if derived.tensor.outputs:
        _add_derive_node(relation, state)
    drop_constant_node(derived)
    saved = before - len(source.storage_graphs(tree)) * source.nbytes
    state.modified = True
    report.count(f"{relation.kind}_copies_removed")
    report.saved_bytes += saved
    detail = {"kind": relation.kind, "kept": kept_label, "replaced": [copy_label], "saved_bytes": saved}
    if relation.kind == "transposed":
        detail["perm"] = list(relation.perm)
    report.details["groups"].append(detail)
    return True


def _transform_refusal(relation: Relation, state: _State) -> str:
    """Why ``relation`` cannot or should not be applied; empty when it can."""
    tree = state.tree
    source, derived = relation.source, relation.derived
    if source.protected or derived.protected:
        return source.protected or derived.protected
    if not source.tensor.outputs or not derived.tensor.outputs:
        return "one side was already shared in this run"
    if derived.has_custom_consumer():
        return "read by a custom-domain op; left as is"
    if state.names.others(source.tensor):
        return "another tensor in a subgraph has the same name as the kept one"
    readers = source.reader_graphs(tree) + [tree.common_ancestor(derived.reader_graphs(tree))]
    if source.node is not None and not all(tree.is_within(g, source.home) for g in readers):
        return f"the kept copy is a Constant node in '{tree.path(source.home)}', not visible from the copy's readers"
    before = len(source.storage_graphs(tree)) * source.nbytes + len(derived.storage_graphs(tree)) * derived.nbytes
    after = len(tree.outermost(readers)) * source.nbytes if source.node is None else source.nbytes
    if after >= before:
        return "the kept tensor would have to be stored in more graphs than it saves"
    return ""


def _add_derive_node(relation: Relation, state: _State) -> None:
    """One Transpose/Reshape/Cast node, in the innermost graph enclosing every reader of the copy."""
    tree, derived = state.tree, relation.derived
    where = tree.common_ancestor(derived.reader_graphs(tree))
    values = derived.values
    if derived.node is not None:
        output = derived.tensor
        derived.detach_constant_node()
    else:
        output = gs.Variable(derived.name, dtype=values.dtype, shape=list(values.shape))
        for node in derived.consumers:
            replace_input(node, derived.tensor, output)
    inputs: list[gs.Tensor] = [relation.source.tensor]
    attrs: dict[str, object] = {}
    if relation.kind == "transposed":
        op, attrs = "Transpose", {"perm": list(relation.perm)}
    elif relation.kind == "reshaped":
        op = "Reshape"
        shape_name = state.names.fresh(f"{derived.name}.shape")
        inputs.append(gs.Constant(shape_name, np.array(values.shape, dtype=np.int64)))
    else:
        op, attrs = "Cast", {"to": int(onnx.helper.np_dtype_to_tensor_dtype(values.dtype))}
    node = gs.Node(op, name=f"share/{relation.kind}/{derived.name}", attrs=attrs, inputs=inputs, outputs=[output])
    tree.add_node(where, node)
    state.report.count("nodes_added")
