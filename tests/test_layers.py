"""Layer gate: imports point down. The I/O layer knows nothing of graphs beyond the leaf walker, the
graph layer nothing of passes, calibration or verification, and nothing below the application layer
(``api``, ``budget``, ``cli`` and their helpers) imports it.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
APPLICATION = (
    "optimizer.api", "optimizer.app_inputs", "optimizer.budget", "optimizer.cli", "optimizer.cli_options",
    "optimizer.cli_parser", "optimizer.optimize_options", "optimizer.shortcuts", "optimizer.auto_mode",
    "optimizer.report_notes", "optimizer.auto_trials", "optimizer.auto_choice", "optimizer.bits_budget",
    "optimizer.budget_stages",
)
LEAF = "optimizer.graph.walk"
"""The one walker imports only onnx and onnx-graphsurgeon, so every layer may use it."""

ALLOWED = {
    LEAF: (),
    "optimizer.fileio": ("optimizer.errors", "optimizer.text", "optimizer.fileio", LEAF),
    "optimizer.graph": ("optimizer.errors", "optimizer.text", "optimizer.fileio", "optimizer.graph"),
    "optimizer.report": ("optimizer.errors", "optimizer.text", "optimizer.fileio", "optimizer.graph",
                         "optimizer.report"),
}
"""Module prefix -> the only optimizer modules it may import (a prefix of theirs)."""


def imports_of(path: pathlib.Path) -> set[str]:
    """Every optimizer/passes module named by an import statement in ``path``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("optimizer", "passes")}


def module_name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def violations(root: pathlib.Path = ROOT) -> list[str]:
    found = []
    for path in sorted([*(root / "optimizer").rglob("*.py"), *(root / "passes").rglob("*.py")]):
        name = module_name(path) if root == ROOT else ".".join(path.relative_to(root).with_suffix("").parts)
        rules = [prefix for prefix in ALLOWED if name == prefix or name.startswith(prefix + ".")]
        allowed = ALLOWED[max(rules, key=len)] if rules else None
        for target in sorted(imports_of(path)):
            below_application = not name.startswith(APPLICATION) and name != "optimizer"
            if below_application and target.startswith(APPLICATION):
                found.append(f"{name} imports the application layer ({target})")
            elif allowed is not None and not any(target == a or target.startswith(a + ".") for a in allowed):
                found.append(f"{name} imports {target}")
    return found


def test_imports_point_down() -> None:
    assert violations() == []


def test_a_graph_module_importing_a_pass_is_caught(tmp_path: pathlib.Path) -> None:
    (tmp_path / "optimizer" / "graph").mkdir(parents=True)
    (tmp_path / "passes").mkdir()
    (tmp_path / "optimizer" / "graph" / "bad.py").write_text("from passes.share import share_pass\n")
    (tmp_path / "passes" / "ok.py").write_text("from optimizer.graph import walk\n")
    (tmp_path / "passes" / "up.py").write_text("import optimizer.api\n")
    assert violations(tmp_path) == ["optimizer.graph.bad imports passes.share", "passes.up imports the "
                                    "application layer (optimizer.api)"]
