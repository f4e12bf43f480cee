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


@dataclass
class GenaiFiles:
    """What ``copy_genai_files`` did: copied file names, and why anything was left."""

    copied: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    reason: str | None = None

    def note(self) -> str | None:
        if self.reason is not None:
            return f"onnxruntime-genai files not copied: {self.reason}"
        if not self.copied and not self.kept:
            return None
        text = f"onnxruntime-genai files copied next to the output: {', '.join(self.copied) or 'none'}"
        return text + (f"; already there, kept: {', '.join(self.kept)}" if self.kept else "")


def copy_genai_files(source: Path, output: Path) -> GenaiFiles:
    """Copy the config and tokenizer of ``source``'s folder next to ``output`` (see the module)."""
    found = GenaiFiles()
    config_path = source.parent / GENAI_CONFIG
    if not config_path.is_file() or source.parent.resolve() == output.parent.resolve():
        return found
    config = _config(config_path)
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
            if item.is_file() and item.suffix not in (".onnx", ".data") and item.name not in files:
                files[item.name] = item
    for name, content in files.items():
        target = output.parent / name
        if target.exists():
            found.kept.append(name)
            continue
        _write(target, content)
        found.copied.append(name)
    return found


def _config(path: Path) -> dict:
    """The config, or an empty dict when it is not readable JSON (then nothing is copied)."""
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


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


def _write(target: Path, content: str | Path) -> None:
    """Through a temporary file in the same folder, so a failure leaves nothing partial."""
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
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
