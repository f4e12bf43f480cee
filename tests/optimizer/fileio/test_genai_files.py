"""A decoder's onnxruntime-genai config and tokenizer files follow its output to another folder."""

from __future__ import annotations

import json

import pytest

from optimizer.cli import main
from optimizer.fileio.genai_files import copy_genai_files
from tests.helpers.decoder import write_decoder


@pytest.fixture()
def decoder(tmp_path):
    path = write_decoder(tmp_path / "in")
    (path.parent / "tokenizer.json").write_text('{"model": "bpe"}')
    (path.parent / "tokenizer_config.json").write_text("{}")
    (path.parent / "notes.txt").write_text("not for onnxruntime-genai")
    return path


def optimize_to(decoder, output, *flags):
    output.parent.mkdir(exist_ok=True)
    return main(["optimize", str(decoder), "-o", str(output), "--quiet", *flags])


def config(folder):
    return json.loads((folder / "genai_config.json").read_text())


def test_the_config_and_tokenizer_follow_the_output_with_its_file_name(tmp_path, decoder):
    output = tmp_path / "out" / "decoder.small.onnx"
    assert optimize_to(decoder, output) == 0
    assert sorted(p.name for p in output.parent.iterdir()) == [
        "decoder.small.onnx", "genai_config.json", "tokenizer.json", "tokenizer_config.json"
    ]
    copied, original = config(output.parent), config(decoder.parent)
    assert copied["model"]["decoder"]["filename"] == "decoder.small.onnx"
    copied["model"]["decoder"]["filename"] = original["model"]["decoder"]["filename"]
    assert copied == original
    assert (output.parent / "tokenizer.json").read_bytes() == (decoder.parent / "tokenizer.json").read_bytes()
    assert config(decoder.parent)["model"]["decoder"]["filename"] == "model.onnx"  # the input's is untouched


def test_files_already_there_are_kept_and_the_note_says_so(tmp_path, decoder):
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    (output.parent / "tokenizer.json").write_text("mine")
    found = copy_genai_files(decoder, output)
    assert found.copied == ["genai_config.json", "tokenizer_config.json"] and found.kept == ["tokenizer.json"]
    assert (output.parent / "tokenizer.json").read_text() == "mine"
    assert found.note() == (
        "onnxruntime-genai files copied next to the output: genai_config.json, tokenizer_config.json; "
        "already there, kept: tokenizer.json"
    )


def test_nothing_is_copied_when_not_asked_or_not_this_models_config(tmp_path, decoder):
    output = tmp_path / "off" / "model.onnx"
    assert optimize_to(decoder, output, "--no-genai-files") == 0
    assert sorted(p.name for p in output.parent.iterdir()) == ["model.onnx"]
    assert copy_genai_files(decoder, decoder.parent / "beside.onnx").note() is None  # same folder
    other = json.loads((decoder.parent / "genai_config.json").read_text())
    other["model"]["decoder"]["filename"] = "another.onnx"
    (decoder.parent / "genai_config.json").write_text(json.dumps(other))
    assert copy_genai_files(decoder, tmp_path / "another" / "model.onnx").copied == []


def test_a_config_of_several_models_is_not_copied_and_the_note_says_why(tmp_path, decoder):
    both = config(decoder.parent)
    both["model"]["vision"] = {"filename": "vision.onnx"}
    (decoder.parent / "genai_config.json").write_text(json.dumps(both))
    (tmp_path / "out").mkdir()
    found = copy_genai_files(decoder, tmp_path / "out" / "model.onnx")
    assert found.copied == [] and list((tmp_path / "out").iterdir()) == []
    assert "names other model files as well (vision.onnx)" in (found.note() or "")


def test_an_unreadable_config_is_left_alone_and_named(tmp_path, decoder):
    (decoder.parent / "genai_config.json").write_text("{not json")
    (tmp_path / "out").mkdir()
    found = copy_genai_files(decoder, tmp_path / "out" / "model.onnx")
    assert found.copied == [] and list((tmp_path / "out").iterdir()) == []
    assert "is not a readable JSON object" in (found.note() or "")


def test_links_are_not_followed_and_a_dangling_link_at_the_target_is_kept(tmp_path, decoder):
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    (decoder.parent / "tokenizer.model").symlink_to(secret)
    output = tmp_path / "out" / "model.onnx"
    output.parent.mkdir()
    (output.parent / "tokenizer.json").symlink_to(tmp_path / "nowhere")
    found = copy_genai_files(decoder, output)
    assert found.skipped == ["tokenizer.model"] and "tokenizer.json" in found.kept
    assert (output.parent / "tokenizer.json").is_symlink() and not (output.parent / "tokenizer.model").exists()
    assert "symbolic links, not copied: tokenizer.model" in (found.note() or "")


def test_a_config_with_a_byte_order_mark_is_read_and_an_unreadable_one_is_named(tmp_path, decoder):
    text = (decoder.parent / "genai_config.json").read_text()
    (decoder.parent / "genai_config.json").write_text("\ufeff" + text, encoding="utf-8")
    (tmp_path / "a").mkdir()
    assert "genai_config.json" in copy_genai_files(decoder, tmp_path / "a" / "model.onnx").copied
    (decoder.parent / "genai_config.json").write_bytes(b"\xff\xfe not json")
    (tmp_path / "b").mkdir()
    note = copy_genai_files(decoder, tmp_path / "b" / "model.onnx").note() or ""
    assert note.startswith("onnxruntime-genai files not copied:") and "not a readable JSON object" in note
