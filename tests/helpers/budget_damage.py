"""A test-only pass that damages each compute layer by a known amount (see test_budget.py).

Not registered on import: the budget tests register it for their duration, and worker processes
call ``register``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from optimizer import registry
from optimizer.graph.patterns import NamePatterns
from optimizer.pass_base import Pass, PassContext, PassReport, PassResult, option


def matches(name: str, patterns) -> bool:
    return NamePatterns(patterns).matches(name)


DAMAGE = {"fc1.gemm": 0.02, "fc2.matmul": 0.5, "fc3.gemm": 0.03}


@dataclass(frozen=True, kw_only=True)
class DamagePass(Pass):
    """Adds seeded noise to each compute node's weight: DAMAGE[node] (default 0.05) times its std."""

    name = "damage-test"
    summary = "test only"
    backoff_option = "exclude_nodes"
    exclude_nodes: tuple[str, ...] = option((), "nodes left alone")

    def damage(self, name: str) -> float:
        return DAMAGE.get(name, 0.05)

    def run(self, graph: gs.Graph, context: PassContext) -> PassResult:
        report = PassReport()
        for node in graph.nodes:
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if (node.op not in ("Gemm", "MatMul") or not isinstance(weight, gs.Constant)
                    or matches(node.name, self.exclude_nodes)):
                continue
            rng = np.random.default_rng(len(node.name))
            values = weight.values
            noise = rng.standard_normal(values.shape).astype(np.float32) * values.std() * self.damage(node.name)
            weight.values = (values + noise).astype(np.float32)
            report.count("damaged")
        return PassResult(graph, report.counts.get("damaged", 0) > 0, report.to_dict())



@dataclass(frozen=True, kw_only=True)
class SoftDamagePass(DamagePass):
    """DamagePass with a next-best format: nodes named in ``soft_nodes`` get a tenth of the damage."""

    name = "soft-damage-test"
    soften_option = "soft_nodes"
    soft_nodes: tuple[str, ...] = option((), "nodes damaged a tenth as much")

    def damage(self, name: str) -> float:
        return super().damage(name) / (10 if matches(name, self.soft_nodes) else 1)


def register() -> None:
    registry.register(DamagePass)
    registry.register(SoftDamagePass)
