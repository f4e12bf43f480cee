"""The files onnxruntime-genai reads next to a decoder, carried over to the output's folder.

A model that onnxruntime-genai's builder (or Olive) wrote lives in a folder with its
``genai_config.json`` (which names the model file) and the tokenizer's files; a compressed model
written to another folder without them loads in onnxruntime but not in onnxruntime-genai. When the
input's folder holds a config whose decoder is the input file, and only that one model file, the
config (its ``model.decoder.filename`` set to the output's name) and the tokenizer's files are copied
next to the output. A file already there is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from optimizer.fileio.output_files import temp_file

GENAI_CONFIG = "genai_config.json"
TOKENIZER_PATTERNS = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
    "generation_config.json",
)
"""Tokenizer and generation files Hugging Face checkpoints carry and onnxruntime-genai reads."""
_MODEL_SECTIONS = ("encoder", "vision", "speech", "embedding", "decoder")
MAX_CONFIG_BYTES = 1 << 20
"""A genai_config.json is a few kilobytes; a larger one is not read."""


@dataclass
class GenaiFiles:
    """What ``copy_genai_files`` did: copied file names, and why anything was left."""

    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    """Symbolic links among the tokenizer files: not followed, not copied."""
    reason: str | None = None

    def note(self) -> str | None:
        if self.reason is not None:
            return f"onnxruntime-genai files not copied: {self.reason}"
        if not self.copied and not self.kept and not self.skipped:
            return None
        text = f"onnxruntime-genai files copied next to the output: {', '.join(self.copied) or 'none'}"
        text += f"; already there, kept: {', '.join(self.kept)}" if self.kept else ""
        return text + (f"; symbolic links, not copied: {', '.join(self.skipped)}" if self.skipped else "")


def copy_genai_files(source: Path, output: Path) -> GenaiFiles:
    """Copy the config and tokenizer of ``source``'s folder next to ``output`` (see the module)."""
    found = GenaiFiles()
    config_path = source.parent / GENAI_CONFIG
    if not config_path.is_file() or source.parent.resolve() == output.parent.resolve():
        return found
    config = read_genai_config(config_path)
    if config is None:
        found.reason = f"{config_path} is not a readable JSON object of at most {MAX_CONFIG_BYTES:,} bytes"
        return found
    models = _model_files(config)
    if models is None or models[0] != source.name:
        return found
    if len(models) > 1:
        found.reason = f"{config_path} names other model files as well ({', '.join(models[1:])})"
        return found
    config["model"]["decoder"]["filename"] = output.name
    files: dict[str, str | Path] = {GENAI_CONFIG: json.dumps(config, indent=4) + "\n"}
    for pattern in TOKENIZER_PATTERNS:
        for item in sorted(source.parent.glob(pattern)):
            if item.suffix in (".onnx", ".data") or item.name in files or item.name in found.skipped:
                continue
            if item.is_symlink() or not item.is_file():
                found.skipped.append(item.name)  # a link may point anywhere: not followed
                continue
            files[item.name] = item
    for name, content in files.items():
        (found.copied if _write_new(output.parent / name, content) else found.kept).append(name)
    return found


def read_genai_config(path: Path) -> dict | None:
    """An onnxruntime-genai config, or None when it is not a readable JSON object (a regular file
    of at most ``MAX_CONFIG_BYTES``; a byte-order mark allowed)."""
    try:
        if path.is_symlink() or path.stat().st_size > MAX_CONFIG_BYTES:
            return None
        loaded = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


def _model_files(config: dict) -> list[str] | None:
    """The decoder's file first, then any other model file the config names; None without a decoder."""
    model = config.get("model")
    sections = {name: model.get(name) for name in _MODEL_SECTIONS} if isinstance(model, dict) else {}
    decoder = sections.get("decoder")
    if not isinstance(decoder, dict) or not isinstance(decoder.get("filename"), str):
        return None
    others = [
        section["filename"]
        for name, section in sections.items()
        if name != "decoder" and isinstance(section, dict) and isinstance(section.get("filename"), str)
    ]
    return [decoder["filename"], *others]


def _write_new(target: Path, content: str | Path) -> bool:
    """Write ``target`` through a temporary file in its folder, linked into place only when no file
    (or link) of that name exists: False, and nothing written, when one does."""
    if os.path.lexists(target):
        return False
    descriptor, temporary = temp_file(target.parent, target.name)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if isinstance(content, Path):
                with content.open("rb") as source:
                    shutil.copyfileobj(source, handle)
            else:
                handle.write(content.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.link(temporary, target)  # fails if the name appeared meanwhile: never replaces a file
        return True
    except FileExistsError:
        return False
    finally:
        Path(temporary).unlink(missing_ok=True)
