"""Pipeline: passes in order over one imported graph, reports kept per pass."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx

from optimizer.errors import PassError
from optimizer.fileio.checker import check_model_full
from optimizer.graph.convert import export_model, import_graph, release_mapped_values
from optimizer.graph.export_scopes import value_info_names
from optimizer.internal_errors import internal_stage
from optimizer.pass_base import Pass, PassContext


@dataclass
class PassRun:
    """One pass application, as it goes into the report."""

    name: str
    options: dict[str, Any]
    modified: bool
    report: dict[str, Any]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": {k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()},
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "report": self.report,
        }


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    modified: bool
    runs: list[PassRun] = field(default_factory=list)


def model_shell(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model-level fields export needs (opsets, metadata, docs, training info), no weights."""
    shell = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name == "graph":
            continue
        if isinstance(value, (list, tuple)) or hasattr(value, "extend"):
            getattr(shell, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(shell, descriptor.name).CopyFrom(value)
        else:
            setattr(shell, descriptor.name, value)
    if model.graph.doc_string:
        shell.graph.doc_string = model.graph.doc_string
    return shell


class Pipeline:
    """Run ``passes`` in order on a copy of a model.

    With ``check_each_pass`` the model is exported after every pass and checked with
    ``onnx.checker.check_model(full_check=True)``, so the pass that broke it is named.
    """

    def __init__(
        self, passes: Sequence[Pass], *, check_each_pass: bool = False, context: PassContext | None = None
    ) -> None:
        for item in passes:
            if not isinstance(item, Pass):
                raise TypeError(f"Pipeline takes Pass instances, got {type(item).__name__}")
        self.passes = list(passes)
        self.check_each_pass = check_each_pass
        self.context = context or PassContext()

    def run(self, model: onnx.ModelProto) -> PipelineResult:
        working = onnx.ModelProto()
        working.CopyFrom(model)
        template = model_shell(working)
        declared = value_info_names(working.graph)
        graph = import_graph(working)
        del working
        runs: list[PassRun] = []
        for item in self.passes:
            started = time.perf_counter()
            with internal_stage("run passes", item.name):
                result = item(graph, self.context)
            graph = result.graph
            runs.append(
                PassRun(item.name, item.options(), result.modified, result.report, time.perf_counter() - started)
            )
            release_mapped_values(graph)
            if self.check_each_pass:
                self._check(export_model(graph, template, declared_value_info=declared), item.name)
        output = export_model(graph, template, declared_value_info=declared)
        return PipelineResult(output, any(run.modified for run in runs), runs)

    @staticmethod
    def _check(model: onnx.ModelProto, pass_name: str) -> None:
        try:
            check_model_full(model)
        except onnx.checker.ValidationError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else "invalid model"
            raise PassError(f"after pass '{pass_name}': onnx.checker rejects the model: {first_line}") from error
