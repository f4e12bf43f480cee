"""onnx-compress core: model I/O, pass framework, validation, benchmark, reports.

The core never imports ``passes/``; ``optimizer.api`` and ``optimizer.cli`` are the only
modules that do.
"""

from optimizer.errors import (
    FeedError,
    ModelLoadError,
    ModelSaveError,
    OnnxCompressError,
    OptionError,
    PassError,
    RuntimeSessionError,
)

__all__ = [
    "FeedError",
    "ModelLoadError",
    "ModelSaveError",
    "OnnxCompressError",
    "OptionError",
    "PassError",
    "RuntimeSessionError",
]
