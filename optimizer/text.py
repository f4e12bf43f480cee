"""Text that reaches a terminal or a report: control characters made visible.

Names come from the model file (model, node, tensor and input names, doc strings) or from the
user (paths), so they can hold ESC/OSC sequences that retitle or clear a terminal. Everything the
CLI prints and every text report goes through ``escape_control`` once, here.
"""

from __future__ import annotations

import re
from typing import Any, TextIO

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_EXCEPT_LAYOUT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _visible(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def escape_control(text: str, *, keep_layout: bool = False) -> str:
    r"""C0 controls, DEL and C1 controls as ``\xNN``; with ``keep_layout``, newline and tab stay."""
    pattern = _CONTROL_EXCEPT_LAYOUT if keep_layout else _CONTROL
    return pattern.sub(_visible, text)


def printable(value: Any) -> str:
    """``value`` as one line safe for a terminal: every control character escaped."""
    return escape_control(str(value))


def plot_text(value: Any) -> str:
    r"""A label for matplotlib: control characters escaped and ``$`` as ``\$`` (no mathtext)."""
    return printable(value).replace("$", r"\$")


class ControlEscapingWriter:
    """A text stream that escapes control characters (but newline and tab) before writing."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(escape_control(text, keep_layout=True))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
