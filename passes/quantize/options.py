"""The quantize pass's options as a typed, frozen config: the helpers of the pass family take
this (never the pass object or a dict), so mypy checks every option they read."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NoReturn

from optimizer.errors import OptionError
from optimizer.graph.patterns import invalid_pattern
from optimizer.pass_base import option
from passes.quantize.targets import WEIGHT_INPUTS, Selection
from passes.weight_guard import NON_FINITE_OPTION_HELP

DEFAULT_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "LSTM", "GRU", "RNN")
PASS_NAME = "quantize"
STATIC_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FINE_BLOCK = 32
FREQUENT_ROW_CHOICES = (0.0625, 0.125, 0.25, 0.5)
"""The ``frequent_rows`` the bits budget tries for a tied table."""


@dataclass(frozen=True, kw_only=True)
class QuantizeOptions:
    """Every option of the quantize pass, with its checks and the values derived from it."""

    mode: Literal["auto", "weights", "dynamic", "static"] = option(
        "auto",
        "weights: weight-only; dynamic: MatMul quantized at run time, the rest weight-only "
        "(never slower on CPU); static: QDQ with calibrated activation ranges (needs calibration data); "
        "auto: with calibration data, optimize() builds weights, dynamic and static, checks each like "
        "--validate and keeps the fastest that passes (timed against the input); without it, dynamic",
    )
    weight_type: Literal["int8", "uint8", "int4", "uint4"] = option(
        "int8", "integer type of weights; 4-bit is blocked (block_size) on MatMul/Gemm/Gather, int8 elsewhere"
    )
    activation_type: Literal["uint8", "int8"] = option("uint8", "integer type of activations in static mode")
    per_channel: bool = option(True, "one scale per output channel (False: one per tensor)")
    symmetric_weights: bool | None = option(
        None,
        "zero point 0 for weights; False: min/max with an integer zero point; None (auto): symmetric "
        "for 8-bit, asymmetric for 4-bit (16 levels are too few to waste one side)",
    )
    symmetric_activations: bool = option(False, "zero point 0 for activations in static mode")
    block_size: int = option(32, "4-bit block length along the dot-product axis (a power of two >= 16)")
    weight_only_form: Literal["auto", "dequantize_linear", "fold_at_load"] = option(
        "auto",
        "float view of weight-only weights: DequantizeLinear (MatMul -> MatMulNBits, less memory at "
        "run time) or a Cast/Mul chain onnxruntime folds at load (fp32 speed); auto: DequantizeLinear for 4-bit "
        "MatMul only (8-bit MatMulNBits measured 1.28x fp32 on all-MiniLM-L6-v2, 4-bit 0.94x)",
    )
    dynamic_weight_only: tuple[str, ...] = option(
        ("auto",),
        "MatMuls kept weight-only in dynamic and static modes: 'gelu-output' (input comes from a GELU, "
        "whose outliers per-tensor uint8 handles badly), 'auto' (gelu-output, except in dynamic mode when "
        "calibration data measures the outlier channels to split off), 'none', or node-name globs / re:",
    )
    dynamic_min_k: int = option(
        256,
        "dynamic mode: MatMuls whose reduction dimension K is smaller stay weight-only (there the run-time "
        "quantization costs more than int8 saves: PP-OCRv4 rec's K=120/240 MatMuls ran 1.1-1.25x slower)",
    )
    outlier_channels: int = option(
        8,
        "dynamic mode with calibration data: at most this many outlier input channels per activation "
        "computed in float beside the int8 MatMul (0: off)",
    )
    outlier_ratio: float = option(
        12.0, "a channel is an outlier when its |max| exceeds this many times the median channel's"
    )
    weight_rounding: Literal["auto", "nearest", "gptq", "awq"] = option(
        "auto",
        "weights mode: 'nearest' rounds each weight alone; 'gptq' (needs calibration data) rounds the rows "
        "of a blocked MatMul weight in turn and moves each rounding error onto the rows left, weighted by the "
        "input's X^T X, so the error of X @ W is what shrinks (GPTQ); 'awq' (needs calibration data) scales the "
        "input channels of 4-bit MatMul weights by their activations' size, folded into the normalization "
        "before them, then rounds to nearest (AWQ); auto: gptq for 4-bit with calibration data",
    )
    gptq_act_order: bool = option(
        True,
        "weight_rounding gptq: round a weight's rows by decreasing input energy (the X^T X diagonal, GPTQ's "
        "act-order), every block's scales chosen first from the weight as given (static groups), so the layout "
        "stays the plain blocked one MatMulNBits reads; False: natural row order",
    )
    calibration_samples: int = option(
        32,
        "calibration samples read (0: all): dynamic mode finds outlier channels on them, static mode its "
        "activation ranges, 4-bit GPTQ its X^T X. MiniLM and PP-OCRv4 det static: the same accuracy from 32 as "
        "from 100 samples; PP-OCRv4 rec: CER 0.019 from 32, 0.036 from 100 (benchmarks/results/quantize.md)",
    )
    calibration_method: Literal["minmax", "percentile", "entropy", "mse"] = option(
        "percentile",
        "how static mode turns calibration statistics into activation ranges; entropy (KL) clips long "
        "tails hard and is for post-ReLU activations: on PP-OCRv4 det (Conv outputs before BatchNorm) it gave "
        "IoU 0.0 where percentile gave 0.949, mse 0.945, minmax 0.945",
    )
    int32_bias: bool = option(
        False,
        "static mode: store every Conv/Gemm bias as int32 behind a DequantizeLinear; default (False) leaves the "
        "float bias where onnxruntime (>= 1.21, WeightBiasQuantization) turns it into the same int32 bias at "
        "load (input scale x weight scale): one scale tensor and one node fewer per layer (PP-OCRv4 det: 39 KB)",
    )
    integer_forms: bool = option(
        True,
        "fold BatchNorm into the Conv before it (every mode: fewer float bytes); static mode also rewrites "
        "HardSigmoid/HardSwish as Add/Clip/Mul and folds positive scalar Mul/Div into scales, so those blocks "
        "run as integer kernels (False: float islands between DequantizeLinear and QuantizeLinear; PP-OCRv4 det "
        "0.98x -> 0.5x fp32 time with them)",
    )
    percentile: float = option(99.999, "percentile of |activation| kept by calibration_method=percentile")
    op_types: tuple[str, ...] = option(DEFAULT_OP_TYPES, "op types whose weights are quantized")
    exclude_nodes: tuple[str, ...] = option((), "node names left in float: globs, or regular expressions after 're:'")
    int8_weight_only_nodes: tuple[str, ...] = option(
        (),
        "node names whose weights are stored int8 weight-only (float activations) whatever the mode and "
        "weight_type: the next-best format, the accuracy budget's first back-off step before float",
    )
    fine_block_nodes: tuple[str, ...] = option(
        (),
        f"node names whose 4-bit weights take blocks of {FINE_BLOCK} whatever block_size (finer scales: the "
        "bits budget's step before 8-bit; a tied embedding and LM head of a small decoder gains the most)",
    )
    frequent_rows: float = option(
        0.0,
        "4-bit tied embedding and LM head (read by lookups and a MatMul; needs calibration data): this fraction "
        "of its rows, the tokens the calibration data looks up most, stored at 8 bits for both uses (0: none; "
        "--bits-per-weight tries 1/16, 1/8, 1/4 and 1/2). On the benchmark's 16M-parameter decoder, the table alone "
        "at 4 bits: KL to fp32 0.00178, with 1/8 of its rows at 8 bits 0.00085",
    )
    exclude_op_types: tuple[str, ...] = option((), "op types left in float")
    exclude_first: int = option(0, "leave the first N quantizable layers in float")
    exclude_last: int = option(0, "leave the last N quantizable layers in float")
    min_weight_elements: int | None = option(
        None,
        "leave weights with fewer elements in float; None (auto): 256, except static mode's Conv/MatMul/Gemm "
        "weights, where a small weight left float breaks the integer chain (PP-OCRv4 det: 0.92 -> 0.81x fp32 time)",
    )
    allow_non_finite: bool = option(False, NON_FINITE_OPTION_HELP)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.op_types) - set(WEIGHT_INPUTS))
        if unknown:
            _fail(f"option 'op_types': unknown {unknown}; valid: {', '.join(WEIGHT_INPUTS)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            _fail(f"option 'block_size' must be a power of two >= 16, got {self.block_size}")
        for key in ("exclude_first", "exclude_last", "min_weight_elements", "dynamic_min_k", "calibration_samples"):
            if (getattr(self, key) or 0) < 0:
                _fail(f"option '{key}' must be >= 0, got {getattr(self, key)}")
        if self.outlier_channels < 0 or self.outlier_ratio <= 1.0:
            _fail("options 'outlier_channels' >= 0 and 'outlier_ratio' > 1 are required")
        for key in ("exclude_nodes", "int8_weight_only_nodes", "fine_block_nodes", "dynamic_weight_only"):
            bad = invalid_pattern(getattr(self, key))
            if bad:
                _fail(f"option '{key}': bad regular expression {bad}")
        if self.frequent_rows and self.mode not in ("weights", "auto"):
            _fail(f": frequent_rows applies to mode 'weights' (4-bit tables), not {self.mode!r}")
        if self.weight_rounding in ("gptq", "awq") and self.mode not in ("weights", "auto"):
            _fail(f": weight_rounding {self.weight_rounding!r} applies to mode 'weights', not {self.mode!r}")
        if self.mode == "static" and self.weight_type not in ("int8", "uint8"):
            _fail(
                f": mode 'static' takes weight_type 'int8' or 'uint8' (QLinear kernels are 8-bit), "
                f"got {self.weight_type!r}"
            )
        if not 0.0 <= self.frequent_rows < 1.0:
            _fail(f"option 'frequent_rows' must be in [0, 1), got {self.frequent_rows}")
        if not 0.0 < self.percentile <= 100.0:
            _fail(f"option 'percentile' must be in (0, 100], got {self.percentile}")

    def weights_symmetric(self) -> bool:
        if self.symmetric_weights is not None:
            return self.symmetric_weights
        return self.weight_type in ("int8", "uint8")

    def storage_type(self) -> str:
        """The integer type weights are stored as: asymmetric 4-bit (auto) uses uint4 and a zero
        point, the form onnxruntime's MatMulNBits takes natively."""
        if self.weight_type == "int4" and self.symmetric_weights is None:
            return "uint4"
        return self.weight_type

    def eight_bit(self) -> QuantizeOptions:
        """These options with 8-bit weights (the weight-only int8 of ``int8_weight_only_nodes``)."""
        if self.weight_type in ("int8", "uint8"):
            return self
        return replace(self, weight_type="int8", symmetric_weights=None, weight_rounding="nearest")

    def min_elements(self) -> int:
        return 256 if self.min_weight_elements is None else self.min_weight_elements

    def small_weight_ops(self) -> tuple[str, ...]:
        """Ops whose weights are quantized whatever their size: static mode's compute ops by default."""
        return STATIC_COMPUTE_OPS if self.min_weight_elements is None and self.mode == "static" else ()

    def selection(self) -> Selection:
        return Selection(
            self.op_types,
            self.exclude_nodes,
            self.exclude_op_types,
            self.exclude_first,
            self.exclude_last,
            self.min_elements(),
            self.allow_non_finite,
            self.small_weight_ops(),
        )


def _fail(detail: str) -> NoReturn:
    separator = "" if detail.startswith(":") else " "
    raise OptionError(f"pass '{PASS_NAME}'{separator}{detail}") from None
