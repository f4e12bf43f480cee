"""Fixtures only; shared helper functions live in tests/helpers/."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers.samples import MODELS_DIR


@pytest.fixture
def sample_copy(tmp_path: Path) -> Callable[[str], Path]:
    """Copy a bundled sample into tmp_path so tests never touch models/."""
    def copy(stem: str) -> Path:
        target = tmp_path / f"{stem}.onnx"
        target.write_bytes((MODELS_DIR / f"{stem}.onnx").read_bytes())
        return target
    return copy
