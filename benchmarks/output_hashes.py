"""sha256 of the outputs of fixed requests on the sample models and the real models.

A refactor must leave every one of these byte-identical: record before, record after, compare.

    python benchmarks/output_hashes.py --out before.json [--real] [--repo PATH]
    python benchmarks/output_hashes.py --out after.json --compare before.json [--real]

``--repo`` runs the CLI of another checkout (PYTHONPATH), so a baseline can come from a clean
clone of an older commit. ``--real`` adds MiniLM and PP-OCRv4 rec/det from ../shared/realmodels
(run it with the benchmark environment, benchmarks/setup.sh). Calibration data: seeded random
feeds for the samples, the harness's real calibration sets for the real models (32 samples),
written once into ``--cal-dir`` and reused as they are, so both runs read the same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SAMPLES = sorted((REPO / "models").glob("*.onnx"))
CALIBRATION_SAMPLES = 32

REQUESTS: dict[str, list[str]] = {
    "default": [],
    "int8": ["--quantize", "int8", "--calibration-data", "{cal}"],
    "int8-static": ["--quantize", "int8", "--quantize-mode", "static", "--calibration-data", "{cal}"],
    "int4-weights": ["--quantize", "int4", "--quantize-mode", "weights"],
    "prune-0.5": ["--prune", "0.5"],
    "prune-channels-0.25": ["--prune", "0.25", "--prune-mode", "channels"],
    "cluster-4": ["--cluster", "4"],
}


def sample_calibration(model: Path, folder: Path) -> Path:
    """Seeded random feeds from the model's input specs (the library's own generator)."""
    if folder.is_dir():
        return folder
    sys.path.insert(0, str(REPO))
    from optimizer.calibration.feeds import generate_feeds, model_input_specs
    from optimizer.fileio.model import load_model

    feeds = generate_feeds(model_input_specs(load_model(model)), count=8, seed=0)
    return _save_feeds(feeds, folder)


def _save_feeds(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(folder / f"{index:05d}.npz", **feed)
    return folder


def real_models(work: Path) -> list[tuple[str, Path, Path]]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import harness

    rows = []
    for task in (harness.minilm_task(), harness.ocr_rec_task(), harness.ocr_det_task()):
        folder = work / f"cal-{task.model.stem}"
        if not folder.is_dir():
            _save_feeds(task.calibration(CALIBRATION_SAMPLES), folder)
        rows.append((task.name, task.model, folder))
    return rows


def digest(path: Path) -> str:
    hasher = hashlib.sha256()
    for part in sorted(path.parent.glob(path.name + "*")):
        hasher.update(part.name.removeprefix(path.name).encode())
        hasher.update(part.read_bytes())
    return hasher.hexdigest()


def run_request(repo: Path, model: Path, request: list[str], cal: Path, output: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(repo)}
    argv = [arg.format(cal=cal) for arg in request]
    command = [sys.executable, "-m", "optimizer.cli", "optimize", str(model), "-o", str(output), "--quiet", *argv]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=repo)
    if result.returncode != 0:
        return f"exit {result.returncode}: {result.stderr.strip().splitlines()[-1:]}"
    return digest(output)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--cal-dir", type=Path, default=Path(tempfile.gettempdir()) / "onnx-compress-hash-cal")
    args = parser.parse_args()
    hashes: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        cal_dir = args.cal_dir.resolve()
        models = [(path.stem, path, sample_calibration(path, cal_dir / f"cal-{path.stem}")) for path in SAMPLES]
        if args.real:
            models += real_models(cal_dir)
        for name, model, cal in models:
            for request, argv in REQUESTS.items():
                output = work / "out" / name.replace(" ", "_") / f"{request}.onnx"
                output.parent.mkdir(parents=True, exist_ok=True)
                hashes[f"{name} | {request}"] = run_request(args.repo.resolve(), model, argv, cal, output)
                print(f"{name} | {request}: {hashes[f'{name} | {request}'][:16]}", flush=True)
    args.out.write_text(json.dumps(hashes, indent=2, sort_keys=True) + "\n")
    if args.compare is None:
        return 0
    before = json.loads(args.compare.read_text())
    changed = sorted(key for key in before if hashes.get(key) != before[key])
    print(f"{len(before) - len(changed)} of {len(before)} outputs byte-identical")
    for key in changed:
        print(f"  changed: {key}: {before[key][:16]} -> {hashes.get(key, 'missing')[:16]}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
