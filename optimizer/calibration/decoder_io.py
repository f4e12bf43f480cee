"""The inputs and outputs of a decoder language model with a KV cache, and how to drive it.

The layout onnxruntime-genai's model builder and Hugging Face Optimum export: ``input_ids`` in,
``logits`` out, ``past_key_values.N.key|value`` in and ``present.N.key|value`` out as
``[batch, kv_heads, sequence, head_size]``, an ``attention_mask`` over past and new tokens and
optionally ``position_ids``. The cache's head count and size come from the model's input shapes
when they are numbers, else from the ``genai_config.json`` the builder writes next to the model
(its shapes name them ``kv_cache_dim``), else from a feed that has a cache.

Generated feeds for such a model start from an empty cache (past length 0, as generation does):
random past tensors with a guessed head size are refused by the attention kernels. Given feeds may
hold only the tokens (``input_ids``, and a mask where there is padding): ``feed_completer`` fills in
an empty cache, a mask of ones and positions counted over the kept tokens, as a generation's
prefill has them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.calibration.feeds import CACHE_INPUT, TOKEN_IDS, Completer, Feed, InputSpec, resolve_shapes
from optimizer.errors import FeedError
from optimizer.fileio.genai_files import GENAI_CONFIG, read_genai_config

LOGITS = "logits"
MASK = "attention_mask"
POSITIONS = "position_ids"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


@dataclass(frozen=True)
class DecoderLayout:
    """How to feed one decoder: its cache inputs in layer order and the outputs that refill them."""

    past: tuple[str, ...]
    present: tuple[str, ...]
    kv_heads: int
    head_size: int
    cache_dtype: np.dtype
    mask: bool
    positions: bool
    integer_types: tuple[np.dtype, np.dtype, np.dtype] = (np.dtype(np.int64),) * 3
    """Element types of the tokens, the mask and the positions, as the model declares them."""

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_size), self.cache_dtype) for _ in self.past]

    def feed(self, ids: np.ndarray, cache: Sequence[np.ndarray] | None = None) -> Feed:
        """The inputs of one step: ``ids`` [batch, new tokens] after ``cache`` (None: empty)."""
        cache = self.empty_cache(ids.shape[0]) if cache is None else cache
        done = int(cache[0].shape[2]) if cache else 0
        total = done + ids.shape[1]
        tokens, mask, positions = self.integer_types
        feed: Feed = {TOKEN_IDS: ids.astype(tokens)}
        if self.mask:
            feed[MASK] = np.ones((ids.shape[0], total), mask)
        if self.positions:
            feed[POSITIONS] = np.broadcast_to(np.arange(done, total, dtype=positions), ids.shape).copy()
        feed.update(zip(self.past, cache, strict=True))
        return feed

    def output_names(self) -> list[str]:
        return [LOGITS, *self.present]


def cache_inputs(specs: Sequence[InputSpec]) -> list[InputSpec]:
    """The ``past_key_values.N.key|value`` inputs, in layer order (key before value)."""
    keyed = []
    for spec in specs:
        match = CACHE_INPUT.match(spec.name)
        if match is not None:
            keyed.append(((int(match.group(1)), match.group(2)), spec))
    return [spec for _, spec in sorted(keyed, key=lambda item: item[0])]


def find_decoder(
    specs: Sequence[InputSpec], outputs: Sequence[str], folder: Path | None = None, feed: Mapping | None = None
) -> DecoderLayout | None:
    """The layout when the model is a KV-cache decoder this module can drive, else None.

    None also when it has inputs other than tokens, mask, positions and cache (nothing here knows
    what to feed them). A decoder whose cache sizes cannot be found raises ``FeedError`` naming
    the ways to give them."""
    names = {spec.name for spec in specs}
    past = cache_inputs(specs)
    if TOKEN_IDS not in names or LOGITS not in outputs or not past:
        return None
    present = [spec.name.replace(PAST_PREFIX, PRESENT_PREFIX, 1) for spec in past]
    if any(name not in outputs for name in present) or names - {TOKEN_IDS, MASK, POSITIONS, *(s.name for s in past)}:
        return None
    kv_heads, head_size = _cache_sizes(past[0], folder, feed)
    dtypes = {spec.name: spec.dtype for spec in specs}
    default = np.dtype(np.int64)
    return DecoderLayout(
        tuple(spec.name for spec in past),
        tuple(present),
        kv_heads,
        head_size,
        past[0].dtype,
        MASK in names,
        POSITIONS in names,
        (dtypes[TOKEN_IDS], dtypes.get(MASK, default), dtypes.get(POSITIONS, default)),
    )


def _cache_sizes(spec: InputSpec, folder: Path | None, feed: Mapping | None) -> tuple[int, int]:
    """[kv_heads, head_size] of the cache: the input's shape, genai_config.json, or a given feed."""
    shape = spec.shape
    if len(shape) != 4:
        raise FeedError(f"cache input {spec.name!r} has shape {shape}; expected [batch, kv_heads, sequence, head_size]")
    if isinstance(shape[1], int) and isinstance(shape[3], int):
        return shape[1], shape[3]
    if feed is not None and spec.name in feed and np.ndim(feed[spec.name]) == 4:
        given = np.shape(feed[spec.name])
        return int(given[1]), int(given[3])
    config = _genai_decoder(folder)
    if config is not None:
        return int(config["num_key_value_heads"]), int(config["head_size"])
    raise FeedError(
        f"cache input {spec.name!r} has shape {list(shape)}: its head count and size are not numbers, and "
        f"there is no {GENAI_CONFIG} next to the model to read them from; give real inputs (--data DIR) or "
        f"the shape of one cache input (--shape {spec.name}=1xHEADSx0xSIZE: an empty cache, every layer alike)"
    )


def _genai_decoder(folder: Path | None) -> dict | None:
    """The ``model.decoder`` section of onnxruntime-genai's config in ``folder``, when there is one."""
    if folder is None or not (folder / GENAI_CONFIG).exists():
        return None
    config = read_genai_config(folder / GENAI_CONFIG)
    try:
        decoder = config["model"]["decoder"]  # type: ignore[index]
        int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    except (ValueError, KeyError, TypeError):
        raise FeedError(
            f"{folder / GENAI_CONFIG}: not a readable onnxruntime-genai config "
            "(model.decoder.num_key_value_heads and head_size)"
        ) from None
    return decoder


def empty_cache_shapes(
    specs: Sequence[InputSpec], folder: Path | None, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Shape overrides that make generated feeds fit a decoder: every cache input [batch, heads,
    past, size] like the one the user gave a shape (else an empty cache, the sizes as
    ``find_decoder`` finds them), and a mask as long as past and new tokens, positions as long as
    the tokens (inputs the user gave a shape keep it). Empty for a model that is not a decoder."""
    by_name = {spec.name: spec for spec in specs}
    cache = cache_inputs(specs)
    if not cache or TOKEN_IDS not in by_name:
        return {}
    given = {TOKEN_IDS: shapes[TOKEN_IDS]} if TOKEN_IDS in shapes else {}
    tokens = resolve_shapes([by_name[TOKEN_IDS]], given)[TOKEN_IDS]
    example = next((tuple(shapes[spec.name]) for spec in cache if spec.name in shapes), None)
    if example is not None and len(example) == 4:
        batch, kv_heads, past, head_size = example
    else:
        (kv_heads, head_size), batch, past = _cache_sizes(cache[0], folder, None), tokens[0], 0
    overrides: dict[str, tuple[int, ...]] = {
        spec.name: (batch, kv_heads, past, head_size) for spec in cache if spec.name not in shapes
    }
    if MASK in by_name and MASK not in shapes:
        overrides[MASK] = (batch, past + tokens[-1])
    if POSITIONS in by_name and POSITIONS not in shapes:
        overrides[POSITIONS] = (batch, tokens[-1])
    return overrides


def feed_completer(specs: Sequence[InputSpec], folder: Path | None) -> Completer | None:
    """For a KV-cache decoder, a function that completes a sample holding its tokens (see the module's
    docstring); None for any other model. A sample with some cache inputs but not all is left as it
    is, for the feed check to name what is missing."""
    names = {spec.name for spec in specs}
    past = cache_inputs(specs)
    if not past or TOKEN_IDS not in names:
        return None
    dtypes = {spec.name: spec.dtype for spec in specs}
    sizes: list[tuple[int, int]] = []

    def complete(feed: Mapping[str, Any]) -> Mapping[str, Any]:
        ids = feed.get(TOKEN_IDS)
        given = [spec.name in feed for spec in past]
        shaped = all(np.ndim(feed[spec.name]) == 4 for spec in past if spec.name in feed)
        if not isinstance(ids, np.ndarray) or ids.ndim != 2 or (any(given) and not all(given)) or not shaped:
            return feed
        done = int(np.shape(feed[past[0].name])[2]) if all(given) else 0
        batch, total = ids.shape[0], done + ids.shape[1]
        filled = dict(feed)
        if not all(given):
            sizes[:] = sizes or [_cache_sizes(past[0], folder, None)]
            for spec in past:
                filled[spec.name] = np.zeros((batch, *sizes[0][:1], 0, sizes[0][1]), spec.dtype)
        if MASK in names and MASK not in feed:
            filled[MASK] = np.ones((batch, total), dtypes[MASK])
        if POSITIONS in names and POSITIONS not in feed:
            filled[POSITIONS] = _positions(filled.get(MASK), ids.shape, done).astype(dtypes[POSITIONS])
        return filled

    return complete


def _positions(mask: object, shape: tuple[int, ...], done: int) -> np.ndarray:
    """Each new token's position: the count of kept tokens before it (left padding skipped, as
    Hugging Face and onnxruntime-genai number them); ``done`` onwards without a usable mask."""
    if isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.shape == (shape[0], done + shape[1]):
        counted = np.maximum(np.cumsum(mask != 0, axis=1) - 1, 0)
        return counted[:, -shape[1] :]
    return np.broadcast_to(np.arange(done, done + shape[1]), shape).copy()
