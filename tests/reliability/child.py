"""Run the CLI in a child process as a user would, under an address-space limit and with an
audit hook that records every file the process opens, so tests can assert what was touched.

Relative paths in the record come from ``os.open(name, dir_fd=...)``: the loader walks external
data locations one folder at a time from a descriptor of the model's folder, so a relative
record is a single name inside that walk.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[2]
CHILD_MEMORY_LIMIT_BYTES = 3 * 2**30
CHILD_TIMEOUT_S = 120

_CHILD_SCRIPT = r"""
import json, os, resource, signal, sys
log_path, limit, file_limit, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
if limit:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
if file_limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
opened = []
def hook(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes)):
        path = os.fsdecode(args[0])
        opened.append(os.path.realpath(path) if os.path.isabs(path) else path)
sys.addaudithook(hook)
from optimizer.cli import main
try:
    code = main(argv)
finally:
    record = list(opened)
    with open(log_path, "w") as log:
        json.dump(record, log)
sys.exit(code)
"""


@dataclass
class ChildRun:
    returncode: int
    stdout: str
    stderr: str
    opened: list[str]

    def opened_under(self, root: Path) -> list[str]:
        """Absolute paths opened below ``root`` (resolved when they were opened)."""
        prefix = str(root.resolve()) + os.sep
        return sorted({path for path in self.opened if path.startswith(prefix)})

    def relative_opens(self) -> list[str]:
        return sorted({path for path in self.opened if not os.path.isabs(path)})


def run_cli_child(
    argv: list[str], *, workspace: Path, memory_limit_bytes: int | None = CHILD_MEMORY_LIMIT_BYTES,
    file_size_limit_bytes: int | None = None, env: dict[str, str] | None = None,
) -> ChildRun:  # fmt: skip
    """``optimizer.cli.main(argv)`` in a child whose cwd and TMPDIR are inside ``workspace``.

    ``file_size_limit_bytes`` sets RLIMIT_FSIZE (with SIGXFSZ ignored): a write past it fails
    with EFBIG, as on a full disk, after the child has imported everything.
    """
    for name in ("cwd", "tmp"):
        (workspace / name).mkdir(exist_ok=True)
    log_path = workspace / "opened.json"
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(workspace / "tmp"),
                 **(env or {})}  # fmt: skip
    command = [sys.executable, "-c", _CHILD_SCRIPT, str(log_path),
               str(memory_limit_bytes or 0), str(file_size_limit_bytes or 0),
               json.dumps(argv)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=workspace / "cwd",
                            env=child_env, timeout=CHILD_TIMEOUT_S)  # fmt: skip
    opened = json.loads(log_path.read_text()) if log_path.exists() else []
    log_path.unlink(missing_ok=True)
    return ChildRun(result.returncode, result.stdout, result.stderr, opened)


def tree_state(root: Path) -> dict[str, str]:
    """Every entry below ``root`` without following links: kind, size, mtime and a digest of
    regular files under 64 MB (a sparse multi-GB file is compared by size and mtime)."""
    state = {}
    for folder, names, files in os.walk(root):
        for name in sorted(names + files):
            path = Path(folder) / name
            info = os.lstat(path)
            entry = f"{stat.S_IFMT(info.st_mode):o}"
            if not stat.S_ISDIR(info.st_mode):
                entry += f":{info.st_size}:{info.st_mtime_ns}"
            if stat.S_ISREG(info.st_mode) and info.st_size < 64 * 2**20:
                entry += ":" + hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                entry += ":" + os.readlink(path)
            state[str(path.relative_to(root))] = entry
    return state


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def weight_model(element_count: int, *, seed: int = 0, name: str = "W") -> onnx.ModelProto:
    """y = x + W over ``element_count`` floats: a model whose size is all weight (a seeded
    pattern repeated, so that 200 MB take no time to make)."""
    pattern = np.random.default_rng(seed).standard_normal(min(element_count, 4096))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", name], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [element_count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [element_count])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    weight = model.graph.initializer.add(name=name, data_type=TensorProto.FLOAT)
    weight.dims.append(element_count)
    weight.raw_data = np.resize(pattern.astype(np.float32), element_count).tobytes()
    return model
