"""Results as JSON: numpy scalars become Python numbers, non-finite floats the strings "inf",
"-inf" and "nan" (JSON has no such numbers; ``json.dumps`` would write invalid JSON)."""

from __future__ import annotations

import math

import numpy as np


def json_ready(value: object) -> object:
    """``value`` with its dicts, lists and tuples converted all the way down."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else str(number)
    return value
