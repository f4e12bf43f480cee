"""Atomic publish: save into a staging folder next to the output, check it there, then move it in.

The staging folder is on the output's file system, so publishing is a rename: a reader sees the old
file or the whole new one (model and its content-named data file), never half of it. Every file the
run reads is checked unchanged before anything is written or published, and never written over.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import onnx

from optimizer.errors import ModelSaveError, OptionError
from optimizer.fileio.lazy_io import check_sources_unchanged
from optimizer.fileio.output_files import (
    check_apart,
    commit,
    previous_data_files,
    remove_dead_staging,
    remove_dead_temps,
    staging_prefix,
)
from optimizer.fileio.save import check_output_file, save_model

ExternalData = Literal["auto", "always", "never"]
EXTERNAL_DATA_CHOICES: dict[str, bool | None] = {"auto": None, "always": True, "never": False}


def save_unchanged_sources(
    model: onnx.ModelProto, path: str | os.PathLike, external_data: ExternalData, protected: Sequence[Path]
) -> Path:
    """Save ``model`` to ``path`` once the files the run read are checked unchanged."""
    check_sources_unchanged(protected)
    if external_data not in EXTERNAL_DATA_CHOICES:
        raise OptionError(f"external_data must be one of {', '.join(EXTERNAL_DATA_CHOICES)}, got {external_data!r}")
    return save_model(model, path, external_data=EXTERNAL_DATA_CHOICES[external_data], protected_paths=protected)


def staged_name(output: str | os.PathLike | None) -> str:
    """The file name a model gets in the staging folder (the output's, so data file names match)."""
    return Path(output).name if output is not None else "candidate.onnx"


def staging_folder(output: str | os.PathLike | None) -> tempfile.TemporaryDirectory:
    """A temporary folder next to the output, so the final move is a rename on one file system.

    Its name carries our process id and start time; folders and temporary files whose owner
    is provably dead (see optimizer.fileio.output_files) are removed first.
    """
    folder = None
    if output is not None:
        folder = Path(output).parent
        if not folder.is_dir():
            raise ModelSaveError(f"{output}: output folder '{folder}' does not exist or is not a folder")
        remove_dead_temps(folder)
        for stale in remove_dead_staging(folder):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        return tempfile.TemporaryDirectory(prefix=staging_prefix(), dir=folder)
    except OSError as error:
        reason = error.strerror or error
        raise ModelSaveError(f"{output}: cannot write in output folder '{folder}': {reason}") from error


def publish(staged: Path, output: Path, protected: Sequence[Path]) -> Path:
    """Move a checked file and its content-named data file in; the model's rename commits."""
    check_sources_unchanged(protected)
    final = save_target_check(output, protected)
    data_names = previous_data_files(staged)
    if len(data_names) > 1:
        raise ModelSaveError(f"{output}: the staged model records {len(data_names)} data files")
    data_name = data_names[0] if data_names else None
    if data_name is not None:
        save_target_check(final.with_name(data_name), protected)
    commit(final, staged, staged.with_name(data_name) if data_name else None, data_name, protected)
    return final


def save_target_check(output: Path, protected: Sequence[Path]) -> Path:
    """The same refusals save_model makes, for a file staged elsewhere and moved in."""
    check_output_file(output)
    check_apart([output], protected, "a file this run reads")
    return output
