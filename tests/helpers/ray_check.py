"""The Ray tests run where the ray extra is installed; CI sets ONNX_COMPRESS_REQUIRE_RAY=1 so that a
missing Ray fails them instead of skipping them."""

from __future__ import annotations

import importlib.util
import os

import pytest


def ray_or_skip() -> None:
    if importlib.util.find_spec("ray") is not None:
        return
    if os.environ.get("ONNX_COMPRESS_REQUIRE_RAY") == "1":
        pytest.fail("Ray is required here (ONNX_COMPRESS_REQUIRE_RAY=1) but not installed")
    pytest.skip("the ray extra is not installed (pip install -e '.[dev,ray]')")
