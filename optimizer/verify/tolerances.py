"""Tolerances: the limits an output is checked against, one per output, with the defaults the
callers choose (lossless: max abs 1e-6; lossy: cosine and SQNR, plus the metrics of each output's
kind, see ``optimizer.verify.output_kinds``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from optimizer.errors import OptionError

DEFAULT_TOLERANCE_KEY = "*"


@dataclass(frozen=True)
class Tolerance:
    """Limits for one output; None means not checked. Non-float outputs are always exact."""

    max_abs: float | None = None
    max_rel: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None
    by_kind: bool = False
    """Judge each output by the limits of its kind (top-1, box F1, row cosine, ...; see
    ``optimizer.verify.output_kinds.KIND_LIMITS``) instead of whole-output cosine and SQNR, which stay
    for ``dense`` outputs: the lossy default does, explicit limits do not."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and (not isinstance(value, (int, float)) or math.isnan(value)):
                raise OptionError(f"tolerance {name} must be a number or None, got {value!r}")
        for name in ("max_abs", "max_rel"):
            if (getattr(self, name) or 0.0) < 0:
                raise OptionError(f"tolerance {name} must be >= 0, got {getattr(self, name)}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise OptionError(f"tolerance min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.min_top1 is not None and not 0.0 <= self.min_top1 <= 1.0:
            raise OptionError(f"tolerance min_top1 must be in [0, 1], got {self.min_top1}")


LOSSLESS_TOLERANCE = Tolerance(max_abs=1e-6)
"""For lossless changes: every output within 1e-6 of the original."""
LOSSY_TOLERANCE = Tolerance(min_cosine=0.99, min_sqnr_db=20.0, by_kind=True)
"""For lossy changes: each recognised output kind's own limits (KIND_LIMITS); cosine and SQNR over
the whole output for the rest (``dense``)."""


def with_default_tolerance(
    tolerance: Tolerance | Mapping[str, Tolerance] | None, default: Tolerance
) -> Tolerance | Mapping[str, Tolerance]:
    """``tolerance`` with ``default`` wherever it says nothing: for every output when None, for the
    outputs a mapping does not name when it has no "*" (the caller's default, e.g. lossy)."""
    if tolerance is None:
        return default
    if isinstance(tolerance, Mapping) and DEFAULT_TOLERANCE_KEY not in tolerance:
        return {DEFAULT_TOLERANCE_KEY: default, **tolerance}
    return tolerance


def resolve_tolerances(
    tolerance: Tolerance | Mapping[str, Tolerance], output_names: Sequence[str]
) -> dict[str, Tolerance]:
    """One tolerance per output. In a mapping, "*" is the default for outputs not named;
    without "*", unnamed outputs keep the strict ``Tolerance(max_abs=1e-6)``."""
    if isinstance(tolerance, Tolerance):
        return dict.fromkeys(output_names, tolerance)
    if not isinstance(tolerance, Mapping):
        raise OptionError(f"tolerance must be a Tolerance or a mapping, got {type(tolerance).__name__}")
    unknown = sorted(set(tolerance) - set(output_names) - {DEFAULT_TOLERANCE_KEY})
    if unknown:
        raise OptionError(f"tolerance for unknown output(s) {', '.join(unknown)}; outputs: {', '.join(output_names)}")
    for key, value in tolerance.items():
        if not isinstance(value, Tolerance):
            raise OptionError(f"tolerance for {key!r} must be a Tolerance, got {type(value).__name__}")
    default = tolerance.get(DEFAULT_TOLERANCE_KEY, LOSSLESS_TOLERANCE)
    return {name: tolerance.get(name, default) for name in output_names}
