"""A fork server that runs the CLI on many hostile cases and checks what every run left behind.

The parent imports the CLI, numpy and onnxruntime once and never opens an onnxruntime session; each
case runs in a forked child (its own process group, stdout/stderr to files, a private TMPDIR, cwd the
case folder) that calls ``main(argv)`` and, on exit 0, loads every output with onnx and onnxruntime.
The parent enforces a hard deadline (SIGKILL of the whole group) and then checks: exit code in
{0, 1, 2}; an exit 2 says one line "onnx-compress: error: ..."; every input byte unchanged; no file
left but the inputs and, on exit 0, the outputs; no process of the group still alive.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from tests.helpers.runtime import open_session  # imports onnxruntime once so children start warm; no session here
from tests.reliability.mutate import OUTSIDE_NAME

EXIT_ESCAPED = 99
CHILD_ADDRESS_SPACE_BYTES = 8 * 2**30
ORPHAN_GRACE_S = 10.0  # a spawned child still importing when the CLI exits notices only after its import
OK_EXITS = (0, 1, 2)
# onnxruntime's import writes a session marker "$TMPDIR/.ses" in every fresh process (spawned children)
IGNORED_IN_TMPDIR = frozenset({".ses"})
_ROOT = Path(__file__).resolve().parents[2]
Main = Callable[[Sequence[str]], int | None]


@dataclass(frozen=True)
class Command:
    """One CLI invocation; "{M}" in argv stands for the case's model. outputs are loaded on exit 0."""

    name: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...] = ()
    side_outputs: tuple[str, ...] = ()

    def resolve(self, model: str) -> list[str]:
        """The argv with the model filled in and --debug, so an internal error carries its traceback."""
        return [self.argv[0], "--debug"] + [model if part == "{M}" else part for part in self.argv[1:]]


@dataclass(frozen=True)
class Case:
    ident: str
    files: dict[str, bytes]
    command: Command
    model: str = "m.onnx"


@dataclass(frozen=True)
class Finding:
    kind: str  # exit3, signal, escaped, hang, stderr, input-changed, leftover, bad-output, orphan
    detail: str


@dataclass
class Outcome:
    case: Case
    exit_code: int | None = None
    duration_s: float = 0.0
    stderr: str = ""
    findings: list[Finding] = field(default_factory=list)

    def describe(self) -> str:
        argv = " ".join(self.case.command.resolve(self.case.model))
        lines = [f"{self.case.ident}", f"  command: onnx-compress {argv}", f"  exit: {self.exit_code}"]
        lines += [f"  FINDING {f.kind}: {f.detail}" for f in self.findings]
        lines += [f"  stderr: {line}" for line in self.stderr.strip().splitlines()[-12:]]
        return "\n".join(lines)


def _sha256_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- the child ----------------------------------------------------------------------------------

def _redirect(logs: Path) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        target = os.open(logs / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", closefd=False, buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1, encoding="utf-8", errors="backslashreplace")  # noqa: SIM115


def _external_locations(model: onnx.ModelProto) -> list[str]:
    from tests.reliability.mutate import iter_graphs
    found = []
    for graph in iter_graphs(model.graph):
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
        for tensor in tensors:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                found += [entry.value for entry in tensor.external_data if entry.key == "location"]
    return sorted(set(found))


def _loads(name: str) -> str:
    try:
        onnx.load(name)
        open_session(Path(name))
    except Exception as error:  # any failure to load is the finding
        return f"{name}: {type(error).__name__}: {str(error)[:300]}"
    return ""


def _check_outputs(command: Command, model: str) -> dict:
    """In the child after exit 0: every declared output exists and loads in onnx and onnxruntime.

    An output that onnxruntime refuses is excused when the input is refused too: a lossless pass
    need not repair a model, only not break one.
    """
    report: dict = {"missing": [], "bad": [], "external": [], "inherited": []}
    for name in command.outputs:
        if not os.path.exists(name):
            report["missing"].append(name)
            continue
        problem = _loads(name)
        if not problem:
            report["external"] += _external_locations(onnx.load(name, load_external_data=False))
        if problem:
            report["inherited" if _loads(model) else "bad"].append(problem)
    return report


def _child(case: Case, folder: Path, tmp: Path, logs: Path, main: Main) -> None:
    code = EXIT_ESCAPED
    try:
        os.setpgid(0, 0)
        faulthandler.disable()  # pytest's handler would print to the terminal, not the case's stderr
        _redirect(logs)
        resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE_BYTES, CHILD_ADDRESS_SPACE_BYTES))
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = str(tmp)
        os.chdir(folder)
        try:
            code = int(main(case.command.resolve(case.model)) or 0)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
        except BaseException:  # anything escaping main() is the finding
            traceback.print_exc()
            code = EXIT_ESCAPED
        if code == 0 and case.command.outputs:
            (logs / "check.json").write_text(json.dumps(_check_outputs(case.command, case.model)))
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


# --- the parent ---------------------------------------------------------------------------------

@dataclass
class _Running:
    case: Case
    pid: int
    folder: Path
    tmp: Path
    logs: Path
    hashes: dict[str, str]
    started: float
    killed: bool = False


def _start(case: Case, root: Path, number: int, main: Main) -> _Running:
    folder, tmp, logs = root / f"c{number}", root / f"c{number}.tmp", root / f"c{number}.log"
    for path in (folder, tmp, logs):
        path.mkdir()
    for name, data in case.files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    hashes = _sha256_tree(folder)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(case, folder, tmp, logs, main)
    with contextlib.suppress(OSError):  # the child already did it, or already exited
        os.setpgid(pid, pid)
    return _Running(case, pid, folder, tmp, logs, hashes, time.monotonic())


def _reap_group(pgid: int) -> bool:
    """True if processes of the group outlived the child (they are killed)."""
    deadline = time.monotonic() + ORPHAN_GRACE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def _exit_findings(outcome: Outcome, status: int, killed: bool, deadline_s: float) -> None:
    if killed:
        outcome.findings.append(Finding("hang", f"still running after {deadline_s:g} s, killed"))
        return
    code = os.waitstatus_to_exitcode(status)
    outcome.exit_code = code
    if code < 0:
        outcome.findings.append(Finding("signal", f"killed by {signal.Signals(-code).name}"))
    elif code == 3:
        outcome.findings.append(Finding("exit3", _last_line(outcome.stderr)))
    elif code == EXIT_ESCAPED:
        outcome.findings.append(Finding("escaped", _last_line(outcome.stderr)))
    elif code not in OK_EXITS:
        outcome.findings.append(Finding("exit-code", f"exit {code}: {_last_line(outcome.stderr)}"))
    elif code == 2:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        if len(lines) != 1 or not lines[0].startswith("onnx-compress: error:"):
            outcome.findings.append(Finding("stderr", f"exit 2 with {len(lines)} stderr lines: {lines[:3]}"))


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:400] if lines else "(no stderr)"


def _file_findings(outcome: Outcome, run: _Running, outside: tuple[Path, str]) -> None:
    now = _sha256_tree(run.folder)
    changed = [name for name, digest in run.hashes.items() if now.get(name) != digest]
    if changed:
        outcome.findings.append(Finding("input-changed", f"input files changed or removed: {changed}"))
    if hashlib.sha256(outside[0].read_bytes()).hexdigest() != outside[1]:
        outcome.findings.append(Finding("input-changed", f"{OUTSIDE_NAME} outside the case folder changed"))
    allowed = set(run.hashes) | {str(Path(n).parent) for n in run.hashes if Path(n).parent != Path(".")}
    check = _read_check(run.logs)
    if outcome.exit_code == 0:
        command = run.case.command
        allowed |= set(command.outputs) | set(command.side_outputs)
        allowed |= {os.path.normpath(name) for name in check.get("external", [])}
        for name in check.get("missing", []):
            outcome.findings.append(Finding("bad-output", f"exit 0 but {name} was not written"))
        for problem in check.get("bad", []):
            outcome.findings.append(Finding("bad-output", problem))
    leftovers = sorted(_listing(run.folder) - allowed) + [
        f"$TMPDIR/{n}" for n in sorted(_listing(run.tmp) - IGNORED_IN_TMPDIR)
    ]
    if leftovers:
        outcome.findings.append(Finding("leftover", f"files left behind: {leftovers[:8]}"))


def _read_check(logs: Path) -> dict:
    try:
        return json.loads((logs / "check.json").read_text())
    except (OSError, ValueError):
        return {}


def _finish(run: _Running, status: int, deadline_s: float, outside: tuple[Path, str]) -> Outcome:
    outcome = Outcome(run.case, duration_s=time.monotonic() - run.started)
    orphans = _reap_group(run.pid)
    outcome.stderr = (run.logs / "stderr").read_text(encoding="utf-8", errors="backslashreplace")
    _exit_findings(outcome, status, run.killed, deadline_s)
    if orphans and not run.killed:
        outcome.findings.append(Finding("orphan", "processes of the run outlived it (killed)"))
    _file_findings(outcome, run, outside)
    for path in (run.folder, run.tmp, run.logs):
        shutil.rmtree(path, ignore_errors=True)
    return outcome


def _poll(running: dict[int, _Running], deadline_s: float, outside: tuple[Path, str]) -> list[Outcome]:
    done = []
    for pid, run in list(running.items()):
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished == 0 and time.monotonic() - run.started > deadline_s and not run.killed:
            run.killed = True
            _kill_group(pid)
            finished, status = os.waitpid(pid, 0)
        if finished:
            done.append(_finish(running.pop(pid), status, deadline_s, outside))
    return done


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def run_cases(cases: Iterable[Case], *, main: Main | None = None, jobs: int = 2, deadline_s: float = 60.0,
              on_outcome: Callable[[Outcome], None] | None = None) -> list[Outcome]:
    """Run every case in a forked child, `jobs` at a time; return the outcomes in completion order."""
    if main is None:
        from optimizer.cli import main as cli_main
        main = cli_main
    root = Path(tempfile.mkdtemp(prefix="fuzz-"))
    outside_path = root / OUTSIDE_NAME
    outside_path.write_bytes(b"outside the case folder\n" * 64)
    outside = (outside_path, hashlib.sha256(outside_path.read_bytes()).hexdigest())
    pending, outcomes = list(cases), []
    running: dict[int, _Running] = {}
    try:
        number = 0
        while pending or running:
            while pending and len(running) < jobs:
                run = _start(pending.pop(0), root, number, main)
                running[run.pid] = run
                number += 1
            finished = _poll(running, deadline_s, outside)
            for outcome in finished:
                outcomes.append(outcome)
                if on_outcome is not None:
                    on_outcome(outcome)
            if not finished:
                time.sleep(0.01)
    finally:
        for pid in running:
            _kill_group(pid)
            os.waitpid(pid, 0)
        shutil.rmtree(root, ignore_errors=True)
    return outcomes


# --- the commands every mutant meets --------------------------------------------------------------

ALWAYS = (
    Command("inspect", ("inspect", "{M}")),
    Command("optimize", ("optimize", "{M}", "-o", "out.onnx", "--quiet"), outputs=("out.onnx",)),
)
ROTATION = (
    Command("optimize-int8", ("optimize", "{M}", "-o", "q.onnx", "--quantize", "int8", "--quiet", "--timeout", "5"),
            outputs=("q.onnx",)),
    Command("validate", ("validate", "{M}", "{M}", "--samples", "1", "--timeout", "5", "--no-isolate")),
    Command("bench", ("bench", "{M}", "--rounds", "1", "--warmup", "0", "--samples", "1", "--timeout", "5")),
    Command("debug", ("debug", "{M}", "{M}", "--samples", "1", "--timeout", "5")),
    Command("sensitivity", ("sensitivity", "{M}", "--sparsities", "0.5", "--samples", "1", "--timeout", "5")),
    Command("optimize-prune", ("optimize", "{M}", "-o", "p.onnx", "--prune", "0.5", "--quiet"), outputs=("p.onnx",)),
    Command("optimize-cluster", ("optimize", "{M}", "-o", "k.onnx", "--cluster", "4", "--quiet"),
            outputs=("k.onnx",)),
    Command("optimize-int4", ("optimize", "{M}", "-o", "w.onnx", "--quantize", "int4", "--quantize-mode", "weights",
                              "--quiet"), outputs=("w.onnx",)),
    Command("validate-isolated", ("validate", "{M}", "{M}", "--samples", "1", "--timeout", "5")),
    Command("optimize-static", ("optimize", "{M}", "-o", "s.onnx", "--quantize", "int8", "--quantize-mode", "static",
                                "--calibration-data", "cal", "--quiet", "--timeout", "5"), outputs=("s.onnx",)),
    Command("optimize-float16", ("optimize", "{M}", "-o", "h.onnx", "--quantize", "int8", "--float16", "storage",
                                 "--quiet"), outputs=("h.onnx",)),
    Command("optimize-float16-compute", ("optimize", "{M}", "-o", "c.onnx", "--float16", "compute", "--quiet",
                                         "--timeout", "5"), outputs=("c.onnx",)),
)
CALIBRATION_FILE = "cal/0.npz"


def _calibration_npz(sample: Path) -> bytes:
    """One seeded feed of the unmutated sample, so static calibration reaches the mutant's graph."""
    import io

    import numpy as np

    from optimizer.calibration.feeds import generate_feeds, model_input_specs
    [feed] = generate_feeds(model_input_specs(onnx.load(sample)), count=1, seed=0)
    buffer = io.BytesIO()
    np.savez(buffer, **feed)  # type: ignore[arg-type]
    return buffer.getvalue()


def commands_for(index: int, extra: int = 1) -> list[Command]:
    """inspect and the default optimize for every mutant, plus `extra` commands taken in turn."""
    return list(ALWAYS) + [ROTATION[(index * extra + k) % len(ROTATION)] for k in range(extra)]


def mutant_cases(seed: int, count: int, samples: list[Path], extra: int = 1, start: int = 0) -> Iterator[Case]:
    from tests.reliability.mutate import make_mutant
    calibration = {sample.name: _calibration_npz(sample) for sample in samples}
    for index in range(start, start + count):
        mutant = make_mutant(seed, index, samples)
        for command in commands_for(index, extra):
            files = dict(mutant.files)
            if "--calibration-data" in command.argv:
                files[CALIBRATION_FILE] = calibration[mutant.sample]
            yield Case(mutant.ident, files, command)


def signature(outcome: Outcome, finding: Finding) -> str:
    """What makes two findings the same defect: kind, exception type and the innermost project frame."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', outcome.stderr)
    own = [f"{Path(f).relative_to(_ROOT)}:{line} {func}" for f, line, func in frames
           if f.startswith(str(_ROOT)) and "/tests/" not in f]
    error = re.findall(r"^(\w+(?:\.\w+)*(?:Error|Exception|Exit|Interrupt)\b)", outcome.stderr, re.MULTILINE)
    if own or error:
        return f"{finding.kind} | {error[-1] if error else '?'} | {own[-1] if own else '?'}"
    return f"{finding.kind} | {outcome.case.command.name} | {re.sub(r'[0-9]+', 'N', finding.detail)[:120]}"


SWEEP_OPSETS = (7, 9, 11, 13, 21)


def opset_sweep_cases(samples: list[Path]) -> Iterator[Case]:
    """Every unmutated sample declared at old and new opsets, through every command that writes a model:
    a pass must not emit an op the model's opset does not have."""
    for sample in samples:
        files = {CALIBRATION_FILE: _calibration_npz(sample)}
        for version in SWEEP_OPSETS:
            model = onnx.load(sample)
            model.opset_import[0].version = version
            files["m.onnx"] = model.SerializeToString()
            for command in ALWAYS + ROTATION:
                if command.outputs:
                    yield Case(f"{sample.name} declared opset {version}", dict(files), command)


def _cli() -> int:
    """`python -m tests.reliability.fuzz_runner --seed 0 --mutants 300 --json F`: a fresh process for CI,
    so no onnxruntime session or thread of the calling process is ever forked."""
    import argparse
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mutants", type=int, default=300)
    parser.add_argument("--extra", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=60.0)
    parser.add_argument("--json", required=True)
    parser.add_argument("--opset-sweep", action="store_true", help="the samples at other opsets, no mutants")
    args = parser.parse_args()
    samples = sorted((_ROOT / "models").glob("*.onnx"))
    cases = opset_sweep_cases(samples) if args.opset_sweep else mutant_cases(args.seed, args.mutants, samples,
                                                                              extra=args.extra)
    outcomes = run_cases(cases, jobs=args.jobs, deadline_s=args.deadline)
    summary = {"runs": len(outcomes), "commands": sorted({o.case.command.name for o in outcomes}),
               "exits": {str(code): sum(o.exit_code == code for o in outcomes) for code in (0, 1, 2)},
               "findings": [{"signature": signature(o, f), "report": o.describe()} for o in outcomes
                            for f in o.findings]}
    Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
