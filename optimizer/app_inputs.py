"""What optimize() and the commands read: the model (with the files it consists of), the feeds
checked against its inputs, the calibration data, and a summary of its size."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from optimizer.calibration.decoder_io import empty_cache_shapes, feed_completer
from optimizer.calibration.feeds import (
    Feed,
    check_feeds,
    check_npz_feeds,
    generate_feeds,
    metadata_shapes,
    model_input_specs,
    npz_feed_files,
)
from optimizer.errors import OptionError, RuntimeSessionError
from optimizer.fileio.genai_files import copy_genai_files
from optimizer.fileio.model import (
    LAZY_LOAD_ABOVE_BYTES,
    fits_one_message,
    load_model,
    load_model_with_files,
    model_size_bytes,
)
from optimizer.fileio.output_files import previous_data_files
from optimizer.graph.inspection import weight_bytes_by_dtype
from optimizer.optimize_options import FeedOptions, FeedSource, ModelInput
from optimizer.pass_base import CalibrationFactory
from optimizer.report.report import ModelSummary
from optimizer.verify.run_limit import RunTimeoutError
from optimizer.verify.runtime import external_data_locations


def resolve_feeds(
    model: onnx.ModelProto,
    feeds: FeedSource,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    samples: int = 4,
    seed: int = 0,
    folder: Path | None = None,
) -> list[Feed]:
    """Feeds checked against the model's inputs: from a folder, an iterable, or generated.
    ``folder``: where the model file is (a decoder's genai_config.json gives its cache sizes; given
    samples of a decoder may hold only its tokens, see ``optimizer.calibration.decoder_io``)."""
    specs = model_input_specs(model)
    if feeds is None:
        if samples < 1:
            raise OptionError(f"samples must be >= 1, got {samples}")
        given = dict(shapes or {})
        shapes = {**metadata_shapes(model, specs), **empty_cache_shapes(specs, folder, given), **given}
        return generate_feeds(specs, count=samples, seed=seed, shapes=shapes)
    complete = feed_completer(specs, folder)
    if isinstance(feeds, (str, os.PathLike)):
        return list(check_npz_feeds(specs, feeds, complete))
    return check_feeds(specs, feeds, complete)


def calibration_factory(
    model: onnx.ModelProto, calibration: FeedSource, folder: Path | None = None
) -> CalibrationFactory | None:
    """A factory that yields the calibration feeds anew on every call, checked against the model.

    A folder is re-read on each call (memory stays bounded); an iterable is read once and kept.
    ``folder``: where the model file is (see ``resolve_feeds``).
    """
    if calibration is None:
        return None
    specs = model_input_specs(model)
    complete = feed_completer(specs, folder)
    if isinstance(calibration, (str, os.PathLike)):
        data = calibration
        npz_feed_files(data)
        return lambda: check_npz_feeds(specs, data, complete)
    kept = check_feeds(specs, calibration, complete)
    return lambda: iter(kept)


def resolve_feed_options(model: onnx.ModelProto, feeds: FeedOptions, path: Path | None = None) -> list[Feed]:
    """``resolve_feeds`` with the library's options; ``path``: the model's file, when it has one."""
    folder = path.parent if path is not None else None
    return resolve_feeds(
        model, feeds.source, shapes=feeds.shapes, samples=feeds.samples, seed=feeds.seed, folder=folder
    )


def load_input(
    model: ModelInput,
    max_input_bytes: int | None,
    allow_symlinks_under: Sequence[str | os.PathLike] = (),
) -> tuple[onnx.ModelProto, tuple[Path, ...], Path | None]:
    if isinstance(model, (str, os.PathLike)):
        loaded, files = load_model_with_files(
            model,
            max_input_bytes=max_input_bytes,
            lazy_above_bytes=LAZY_LOAD_ABOVE_BYTES,
            allow_symlinks_under=allow_symlinks_under,
        )
        return loaded, files, Path(model)
    return load_model(model, max_input_bytes=max_input_bytes), (), None


def runnable_reference(source: onnx.ModelProto, path: Path | None, files: Sequence[Path]) -> ModelInput:
    """What validation and the benchmark run as the input model: its file, unless an external data
    file lies outside the model's folder (a symlink allowed by allow_symlinks_under), which
    onnxruntime refuses ("path escapes model directory"); then the loaded model, when its data is
    all in memory. ``files``: the model file then its data files, real paths (load_input)."""
    if path is None:
        return source
    folder = path.parent.resolve()
    outside = any(not data.is_relative_to(folder) for data in files[1:])
    if outside and not external_data_locations(source) and fits_one_message(source):
        return source
    return path


def model_summary(model: onnx.ModelProto, path: str | os.PathLike | None, files: Sequence[Path] = ()) -> ModelSummary:
    """Path, size on disk (or serialized) and stored weight bytes by dtype. ``files``: the model
    file and every data file it was read from (``load_input``), whatever their names; without
    them, the data files next to ``path`` that carry our output pattern."""
    return _summary(model, Path(path) if path is not None else None, files)


def _summary(model: onnx.ModelProto, path: Path | None, files: Sequence[Path] = ()) -> ModelSummary:
    if files:
        size = sum(file.stat().st_size for file in dict.fromkeys(files))
    else:
        size = _size_on_disk(path) if path is not None else model_size_bytes(model)
    return ModelSummary(str(path) if path is not None else None, size, weight_bytes_by_dtype(model))


def _size_on_disk(path: Path) -> int:
    """The model file plus the data files it records (content-named, next to it)."""
    data_files = [path.parent / name for name in previous_data_files(path)]
    return path.stat().st_size + sum(data.stat().st_size for data in data_files if data.exists())


@contextmanager
def generated_feeds_hint(feeds: Sequence[Feed], generated: bool) -> Iterator[None]:
    """A model that fails on generated inputs is often one that needs other sizes (YOLO and OCR
    models divide by 32): name the shapes that were generated and the flags that fix it."""
    try:
        yield
    except RunTimeoutError:
        raise
    except RuntimeSessionError as error:
        if not generated or not feeds:
            raise
        shapes = ", ".join(f"{name}={'x'.join(map(str, np.shape(value)))}" for name, value in feeds[0].items())
        first = next(iter(feeds[0]))
        raise RuntimeSessionError(
            f"{error}; the inputs were generated ({shapes}): give real inputs (--data DIR) or the sizes "
            f"the model needs (--shape {first}=DxDx..)"
        ) from error


def genai_files_notes(reference: Path | None, saved: Path | None, enabled: bool) -> list[str]:
    """Copy a decoder's onnxruntime-genai config and tokenizer files next to the output (see
    ``optimizer.fileio.genai_files``); the report's note on what was copied, if anything."""
    if saved is None or reference is None or not enabled:
        return []
    note = copy_genai_files(reference, saved).note()
    return [note] if note is not None else []
