"""Input feeds: what a model expects, seeded random feeds, ``.npz`` folders, and checks.

A feed is one sample: ``{input name: array}``. Every error names the sample, input and reason,
because a feed that does not fit otherwise surfaces as an opaque onnxruntime message.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizer.errors import FeedError
from optimizer.fileio.npz_files import check_regular_file, read_npz_file

Feed = dict[str, np.ndarray]
Completer = Callable[[Mapping[str, Any]], Mapping[str, Any]]

BATCH_DIM_DEFAULT = 1
SEQUENCE_DIM_DEFAULT = 16
OTHER_DIM_DEFAULT = 8
IMAGE_DIM_DEFAULT = 64
"""Height and width of an image-like input ([N, 1|3|4, H, W] with H, W dynamic): a multiple of 32,
the largest stride common detectors and OCR models divide by (8x8 breaks YOLOv8 and PP-OCR det)."""
IMAGE_CHANNELS = (1, 3, 4)
INT_HIGH_EXCLUSIVE = 100

_SEQUENCE_WORDS = ("seq", "length", "token", "time", "step")
CACHE_INPUT = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
"""A decoder's KV-cache input, ``past_key_values.N.key|value`` [batch, kv_heads, past, head_size]."""
TOKEN_IDS = "input_ids"

_ORT_TYPE_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape`` holds ints (fixed), strings (named dynamic) or None (unnamed).

    ``rank_known`` is False when the model declares no shape at all; ``shape`` is then empty.
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    rank_known: bool = True


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Graph inputs that are not initializers (those are weights with a default value)."""
    initializer_names = {tensor.name for tensor in model.graph.initializer}
    specs = []
    for value_info in model.graph.input:
        if value_info.name in initializer_names:
            continue
        if value_info.type.WhichOneof("value") != "tensor_type":
            raise FeedError(f"input {value_info.name!r} is not a tensor; only tensor inputs are fed")
        tensor_type = value_info.type.tensor_type
        dtype = _input_dtype(value_info.name, tensor_type.elem_type)
        rank_known = tensor_type.HasField("shape")
        shape = tuple(_dim_value(dim) for dim in tensor_type.shape.dim)
        specs.append(InputSpec(value_info.name, dtype, shape, rank_known))
    return specs


def _input_dtype(name: str, elem_type: int) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError):
        raise FeedError(
            f"input {name!r} has element type {elem_type}, which is not a data type numpy can feed"
        ) from None


def _dim_value(dim: onnx.TensorShapeProto.Dimension) -> int | str | None:
    """A fixed size, a named dynamic one, or None. A negative size (paddle2onnx writes -1, e.g.
    PP-OCR's cls input [-1, 3, ?, ?]) is dynamic: onnxruntime reads it so."""
    if dim.HasField("dim_value"):
        return dim.dim_value if dim.dim_value >= 0 else None
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


def session_input_specs(session) -> list[InputSpec]:
    """Input specs read from an onnxruntime session, for models known only by path."""
    specs = []
    for node_arg in session.get_inputs():
        numpy_type = _ORT_TYPE_TO_NUMPY.get(node_arg.type)
        if numpy_type is None:
            raise FeedError(f"input {node_arg.name!r} has type {node_arg.type}, which numpy cannot feed")
        shape = node_arg.shape
        rank_known = shape is not None
        specs.append(InputSpec(node_arg.name, np.dtype(numpy_type), tuple(shape or ()), rank_known))
    return specs


def parse_shape_overrides(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``["input_ids=1x128", "x=1,3,224,224"]``; the name is split off at the last ``=``."""
    overrides: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims_text = str(item).rpartition("=")
        dims = [part.strip() for part in re.split(r"[x,]", dims_text.strip())]
        if not sep or not name.strip() or not all(part.isdigit() for part in dims):
            raise FeedError(f"bad shape override {item!r}: expected NAME=DIMxDIM..., e.g. input_ids=1x128")
        if name.strip() in overrides:
            raise FeedError(f"bad shape override {item!r}: input {name.strip()!r} given twice")
        overrides[name.strip()] = tuple(int(part) for part in dims)
    return overrides


def resolve_shapes(
    specs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """Concrete shape per input; the rule for dynamic dims, in order:

    1. an override for the input gives its whole shape, and binds its named dims;
    2. a named dim already bound (by an override or an earlier input) keeps that value, so
       ``input_ids`` and ``attention_mask`` sharing ``sequence`` stay consistent;
    3. a name containing "batch" -> 1; containing seq/length/token/time/step -> 16;
    4. height and width of an image-like input ([N, 1|3|4, H, W]) -> 64;
    5. the past length of a decoder's cache (``past_key_values.N.key``, with ``input_ids``) -> 0,
       an empty cache, as generation starts;
    6. otherwise the first dim -> 1 (batch-like), any other dim -> 8.
    (``metadata_shapes`` reads sizes the exporter recorded; callers pass them as overrides.)
    """
    overrides = dict(shapes or {})
    names = [spec.name for spec in specs]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise FeedError(f"shape override for unknown input(s) {', '.join(unknown)}; model inputs: {', '.join(names)}")
    bound: dict[str, int] = {}
    for spec in specs:
        if spec.name in overrides:
            _check_override(spec, overrides[spec.name])
            for dim, value in zip(spec.shape, overrides[spec.name], strict=False):
                if isinstance(dim, str):
                    bound.setdefault(dim, value)
    for dim in _cache_length_dims(specs):
        bound.setdefault(dim, 0)
    resolved = {}
    for spec in specs:
        if spec.name in overrides:
            resolved[spec.name] = tuple(overrides[spec.name])
            continue
        if not spec.rank_known:
            raise FeedError(f"input {spec.name!r} has no shape in the model; pass a shape override ({spec.name}=...)")
        image = _is_image_like(spec)
        resolved[spec.name] = tuple(
            IMAGE_DIM_DEFAULT if image and axis >= 2 and dim is None else _default_dim(dim, axis, bound, image)
            for axis, dim in enumerate(spec.shape)
        )
    return resolved


def _cache_length_dims(specs: Sequence[InputSpec]) -> list[str]:
    """The named past-length dims of a decoder's cache inputs (none unless it reads ``input_ids``)."""
    if not any(spec.name == TOKEN_IDS for spec in specs):
        return []
    return [
        spec.shape[2]
        for spec in specs
        if CACHE_INPUT.match(spec.name) and len(spec.shape) == 4 and isinstance(spec.shape[2], str)
    ]


def _is_image_like(spec: InputSpec) -> bool:
    """[N, C, H, W] floats with C fixed to 1, 3 or 4 and a dynamic height or width."""
    shape = spec.shape
    return (
        spec.dtype.kind == "f"
        and len(shape) == 4
        and shape[1] in IMAGE_CHANNELS
        and any(not isinstance(dim, int) for dim in shape[2:])
    )


def metadata_shapes(model: onnx.ModelProto, specs: Sequence[InputSpec]) -> dict[str, tuple[int, ...]]:
    """Input shapes the model's own metadata gives: Ultralytics exports write ``imgsz`` ("[320, 320]"
    or "640"), the size its image input was trained and exported for."""
    text = next((entry.value for entry in model.metadata_props if entry.key == "imgsz"), None)
    sizes = [int(number) for number in re.findall(r"\d+", text or "")][:2]
    if not sizes or any(size < 1 or size > 16384 for size in sizes):
        return {}
    height, width = sizes if len(sizes) == 2 else sizes * 2
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if _is_image_like(spec):
            batch = spec.shape[0] if isinstance(spec.shape[0], int) else BATCH_DIM_DEFAULT
            shapes[spec.name] = (batch, int(spec.shape[1] or 0), height, width)
    return shapes


def _check_override(spec: InputSpec, shape: tuple[int, ...]) -> None:
    if not spec.rank_known:
        return
    if len(shape) != len(spec.shape):
        raise FeedError(
            f"shape override for {spec.name!r} has rank {len(shape)}, model expects rank "
            f"{len(spec.shape)} {_format_shape(spec.shape)}"
        )
    for axis, (dim, value) in enumerate(zip(spec.shape, shape, strict=False)):
        if isinstance(dim, int) and dim != value:
            raise FeedError(
                f"shape override for {spec.name!r} sets dim {axis} to {value}, model fixes it to "
                f"{dim} {_format_shape(spec.shape)}"
            )


def _default_dim(dim: int | str | None, axis: int, bound: dict[str, int], image: bool = False) -> int:
    if isinstance(dim, int):
        return dim
    if isinstance(dim, str):
        if dim not in bound:
            bound[dim] = _default_for_name(dim.lower(), axis, image)
        return bound[dim]
    return BATCH_DIM_DEFAULT if axis == 0 else OTHER_DIM_DEFAULT


def _default_for_name(name: str, axis: int, image: bool = False) -> int:
    if "batch" in name:
        return BATCH_DIM_DEFAULT
    if image and axis >= 2:
        return IMAGE_DIM_DEFAULT
    if any(word in name for word in _SEQUENCE_WORDS):
        return SEQUENCE_DIM_DEFAULT
    return BATCH_DIM_DEFAULT if axis == 0 else OTHER_DIM_DEFAULT


def generate_feeds(
    specs: Sequence[InputSpec],
    *,
    count: int = 4,
    seed: int = 0,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[Feed]:
    """Seeded random feeds (numpy PCG64); identical arguments give identical arrays.

    Values stay in ranges models accept: floats are standard normal; integer inputs named like
    "mask" are ones, "token_type"/"segment" zeros, "position" ``0..n-1`` along the last axis,
    anything else (``input_ids``, indices) uniform in [0, 100); bools are fair coin flips.
    """
    if count < 1:
        raise FeedError(f"feed count must be at least 1, got {count}")
    resolved = resolve_shapes(specs, shapes)
    _check_generated_size(specs, resolved, count)
    rng = np.random.Generator(np.random.PCG64(seed))
    return [{spec.name: _random_array(spec, resolved[spec.name], rng) for spec in specs} for _ in range(count)]


MAX_GENERATED_FEED_BYTES = 2**31
"""Generated feeds (all samples, all inputs) may take at most this much memory."""


def _check_generated_size(specs: Sequence[InputSpec], resolved: Mapping[str, tuple[int, ...]], count: int) -> None:
    """A hostile shape such as 2^40 must be a clear error, not a MemoryError."""
    total_bytes = 0
    for spec in specs:
        shape = resolved[spec.name]
        if any(dim < 0 for dim in shape):
            raise FeedError(f"input {spec.name!r}: negative dimension in shape {list(shape)}")
        element_bytes = max(spec.dtype.itemsize, 8)  # float64/int64 intermediates while generating
        total_bytes += count * math.prod(shape) * element_bytes
        if total_bytes > MAX_GENERATED_FEED_BYTES:
            raise FeedError(
                f"input {spec.name!r}: shape {list(shape)} x {count} samples needs "
                f"{total_bytes} bytes of generated data, over the limit of "
                f"{MAX_GENERATED_FEED_BYTES}; pass --shape or an .npz folder"
            )


def _random_array(spec: InputSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    name = spec.name.lower()
    kind = spec.dtype.kind
    if kind == "f":
        return rng.standard_normal(shape).astype(spec.dtype)
    if kind == "b":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if kind in "iu":
        if "mask" in name:
            return np.ones(shape, dtype=spec.dtype)
        if "token_type" in name or "segment" in name:
            return np.zeros(shape, dtype=spec.dtype)
        if "position" in name and shape:
            return np.broadcast_to(np.arange(shape[-1], dtype=spec.dtype), shape).copy()
        return rng.integers(0, INT_HIGH_EXCLUSIVE, size=shape).astype(spec.dtype)
    raise FeedError(
        f"cannot generate random data for input {spec.name!r} of dtype {spec.dtype}; provide feeds from an .npz folder"
    )


def load_npz_feeds(folder: str | os.PathLike) -> Iterator[Feed]:
    """One feed per ``*.npz`` file, in file-name order (zero-pad numbers: ``10`` sorts before ``2``).

    The folder is checked now; files are read lazily, so large calibration sets stream.
    """
    return _read_npz_files(npz_feed_files(folder))


def npz_feed_files(folder: str | os.PathLike) -> list[Path]:
    """The ``*.npz`` files of a feeds folder in file-name order, each checked to be a regular file."""
    path = Path(folder)
    if not path.is_dir():
        raise FeedError(f"feeds folder {os.fspath(folder)!r} does not exist or is not a folder")
    files = sorted(path.glob("*.npz"), key=lambda file: file.name)
    if not files:
        raise FeedError(f"feeds folder {os.fspath(folder)!r} holds no .npz files")
    for file in files:
        check_regular_file(file)
    return files


def check_npz_feeds(
    specs: Sequence[InputSpec], folder: str | os.PathLike, complete: Completer | None = None
) -> Iterator[Feed]:
    """Each file's sample checked against the specs, read one at a time; an error names the file.
    ``complete`` fills in inputs a sample may leave out (a decoder's cache, see ``decoder_io``)."""
    for index, file in enumerate(npz_feed_files(folder)):
        feed = read_npz_file(file)
        yield check_feed(specs, complete(feed) if complete else feed, index, label=f"feed file {os.fspath(file)!r}")


def _read_npz_files(files: list[Path]) -> Iterator[Feed]:
    """Regular files only (a FIFO would block forever), sizes checked first: ``optimizer.fileio.npz_files``."""
    for file in files:
        yield read_npz_file(file)


def check_feed(specs: Sequence[InputSpec], feed: Mapping[str, Any], index: int, label: str | None = None) -> Feed:
    """Check one sample against the specs; returns it with inputs in model order. Errors name the
    sample by ``label`` (e.g. its file) or else by ``index``."""
    label = label or f"sample {index}"
    if not isinstance(feed, Mapping):
        raise FeedError(f"{label}: expected a dict of input name -> array, got {type(feed).__name__}")
    names = [spec.name for spec in specs]
    missing = [name for name in names if name not in feed]
    extra = sorted(set(feed) - set(names))
    if missing or extra:
        parts = [f"missing input(s) {', '.join(missing)}"] if missing else []
        parts += [f"unknown input(s) {', '.join(extra)}"] if extra else []
        _check_given(specs, feed, label, "; ".join(parts))
        raise FeedError(f"{label}: {'; '.join(parts)} (model inputs: {', '.join(names)})")
    return {spec.name: _checked_array(spec, feed[spec.name], label) for spec in specs}


def _check_given(specs: Sequence[InputSpec], feed: Mapping[str, Any], label: str, also: str) -> None:
    """The inputs a sample does give, checked first: one of the wrong type or rank is the more
    direct reason (a decoder sample whose cache has the wrong rank is not completed, so its mask
    is missing too)."""
    for spec in specs:
        if spec.name in feed:
            try:
                _checked_array(spec, feed[spec.name], label)
            except FeedError as error:
                raise FeedError(f"{error}; also {also}") from None


def _checked_array(spec: InputSpec, value: object, label: str) -> np.ndarray:
    where = f"{label}, input {spec.name!r}"
    if isinstance(value, np.generic):
        value = np.asarray(value)
    if not isinstance(value, np.ndarray):
        raise FeedError(f"{where}: expected a numpy array, got {type(value).__name__}")
    if value.dtype != spec.dtype and not (value.dtype.kind in "US" and spec.dtype == np.object_):
        raise FeedError(f"{where}: dtype {value.dtype}, model expects {spec.dtype}")
    if not spec.rank_known:
        return value
    if value.ndim != len(spec.shape):
        raise FeedError(
            f"{where}: rank {value.ndim} {value.shape}, model expects rank {len(spec.shape)} "
            f"{_format_shape(spec.shape)}"
        )
    for axis, (dim, size) in enumerate(zip(spec.shape, value.shape, strict=False)):
        if isinstance(dim, int) and dim != size:
            raise FeedError(f"{where}: dim {axis} is {size}, model fixes it to {dim} {_format_shape(spec.shape)}")
    return value


def check_feeds(
    specs: Sequence[InputSpec], feeds: Iterable[Mapping[str, Any]], complete: Completer | None = None
) -> list[Feed]:
    """Check every sample (see ``check_feed``, and ``check_npz_feeds`` for ``complete``); use
    ``check_feed`` to stay streaming."""
    checked = [
        check_feed(specs, complete(feed) if complete and isinstance(feed, Mapping) else feed, index)
        for index, feed in enumerate(feeds)
    ]
    if not checked:
        raise FeedError("no feeds given: need at least one sample")
    return checked


def _format_shape(shape: Sequence[int | str | None]) -> str:
    return "[" + ", ".join("?" if dim is None else str(dim) for dim in shape) + "]"
