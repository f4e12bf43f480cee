"""The long fuzzing run: seeded mutants of every sample model through every command that reads a model.

    python benchmarks/fuzz.py --mutants 10000 --seed 1 --jobs 2

Prints a table of outcomes per command (exit 0/1/2 counts, findings by kind), the distinct findings
(deduplicated by kind, exception type and innermost project frame) with one reproduction each, and
writes the same as Markdown to benchmarks/results/fuzz.md. Exit status 1 when there is any finding.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.reliability.fuzz_runner import Outcome, mutant_cases, run_cases, signature
from tests.reliability.mutate import make_mutant

SAMPLES = sorted((ROOT / "models").glob("*.onnx"))


def _table(outcomes: list[Outcome]) -> list[str]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for outcome in outcomes:
        row = counts[outcome.case.command.name]
        row["runs"] += 1
        row[f"exit {outcome.exit_code}" if outcome.exit_code in (0, 1, 2) else "other exit"] += 1
        row["milliseconds"] += int(outcome.duration_s * 1000)
        for finding in outcome.findings:
            row[finding.kind] += 1
    kinds = sorted({k for row in counts.values() for k in row} - {"runs", "exit 0", "exit 1", "exit 2", "milliseconds"})
    header = ["command", "runs", "exit 0", "exit 1", "exit 2", *kinds, "mean s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in sorted(counts):
        row = counts[name]
        cells = [name] + [str(row[k]) for k in header[1:-1]] + [f"{row['milliseconds'] / 1000 / row['runs']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _distinct(outcomes: list[Outcome]) -> list[str]:
    first: dict[str, tuple[Outcome, int]] = {}
    for outcome in outcomes:
        for finding in outcome.findings:
            key = signature(outcome, finding)
            seen = first.get(key)
            first[key] = (seen[0], seen[1] + 1) if seen else (outcome, 1)
    lines = []
    for key in sorted(first):
        outcome, count = first[key]
        lines += [f"### {key} (x{count})", "```", outcome.describe(), "```", ""]
    return lines


def _dump(seed: int, start: int, count: int, folder: Path) -> int:
    for index in range(start, start + count):
        mutant = make_mutant(seed, index, SAMPLES)
        for name, data in mutant.files.items():
            (folder / str(index) / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / str(index) / name).write_bytes(data)
        print(f"{folder / str(index)}: {mutant.ident}")
    return 0


def _write(args: argparse.Namespace, outcomes: list[Outcome], elapsed: float, partial: bool) -> str:
    state = " (PARTIAL, still running)" if partial else ""
    title = (f"# Fuzzing: {args.mutants} mutants (seed {args.seed}, from {args.start}), {len(outcomes)} runs, "
             f"{elapsed:.0f} s, jobs {args.jobs}{state}")
    report = [title, "", *_table(outcomes), "", "## Distinct findings", "", *(_distinct(outcomes) or ["none"])]
    text = "\n".join(report) + "\n"
    Path(args.output).write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start", type=int, default=0, help="first mutant index (to resume or reproduce)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--extra", type=int, default=1, help="rotating commands per mutant besides inspect/optimize")
    parser.add_argument("--deadline", type=float, default=60.0, help="hard deadline of one run, seconds")
    parser.add_argument("--dump", metavar="DIR", help="only write the mutants' files to DIR/<index>/ and stop")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "fuzz.md"))
    args = parser.parse_args()
    if args.dump:
        return _dump(args.seed, args.start, args.mutants, Path(args.dump))
    started = time.monotonic()
    outcomes: list[Outcome] = []
    total = args.mutants * (2 + args.extra)

    def progress(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if len(outcomes) % 3000 == 0:
            _write(args, outcomes, time.monotonic() - started, partial=True)
        if len(outcomes) % 200 == 0 or outcome.findings:
            found = sum(bool(o.findings) for o in outcomes)
            print(f"[{time.monotonic() - started:7.0f} s] {len(outcomes)}/{total} runs, {found} with findings"
                  + (f"  <- {outcome.findings[0].kind}: {outcome.case.ident}" if outcome.findings else ""),
                  flush=True)

    cases = mutant_cases(args.seed, args.mutants, SAMPLES, extra=args.extra, start=args.start)
    run_cases(cases, jobs=args.jobs, deadline_s=args.deadline, on_outcome=progress)
    print(_write(args, outcomes, time.monotonic() - started, partial=False))
    return 1 if any(o.findings for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
