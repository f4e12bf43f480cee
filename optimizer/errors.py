"""Typed errors. Every message names the file, tensor or node at fault and the reason.

The CLI turns any ``OnnxCompressError`` into one line on stderr and exit code 2.
"""


class OnnxCompressError(Exception):
    """Base of every error the tool raises on bad input or bad usage (exit code 2)."""


class ModelLoadError(OnnxCompressError):
    """The model file, bytes or proto cannot be read safely."""


class ModelSaveError(OnnxCompressError):
    """The model cannot be written where asked (nothing is left behind)."""


class OptionError(OnnxCompressError):
    """A pass or command option is unknown or has the wrong type or value."""


class PassError(OnnxCompressError):
    """A pass met a graph it cannot handle, or broke the graph contract."""


class FeedError(OnnxCompressError):
    """Input feeds (npz folder, iterable, shape overrides) do not fit the model."""


class RuntimeSessionError(OnnxCompressError):
    """onnxruntime refused to load or run a model; the message quotes onnxruntime."""
