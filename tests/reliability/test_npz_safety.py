"""Feeds folders under hostile conditions: a FIFO or device named *.npz, headers that declare
terabytes, zip bombs, a .npy renamed .npz. Each is one FeedError naming the file (and the key),
raised before anything is allocated; the CLI exits 2 and nothing hangs."""

from __future__ import annotations

import io
import os
import pathlib
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from optimizer.calibration.feeds import load_npz_feeds
from optimizer.cli import main
from optimizer.errors import FeedError
from optimizer.fileio import npz_files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
MLP = REPO_ROOT / "models" / "mlp.onnx"


def _read_all(folder: pathlib.Path) -> list[dict[str, np.ndarray]]:
    return list(load_npz_feeds(folder))


def _npy_bytes(header: dict, data: bytes = b"") -> bytes:
    text = repr(header).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + data


def _zip(path: pathlib.Path, members: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


_FIFO_CHILD = r"""
import sys
from optimizer.cli import main
sys.exit(main(["optimize", sys.argv[1], "-o", sys.argv[2], "--validate", "--data", sys.argv[3]]))
"""


def test_fifo_named_npz_is_refused_without_hanging(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.savez(data / "a.npz", x=np.zeros((1, 64), np.float32))
    os.mkfifo(data / "b.npz")
    with pytest.raises(FeedError, match=r"b\.npz.*FIFO"):
        load_npz_feeds(data)
    run = subprocess.run([sys.executable, "-c", _FIFO_CHILD, str(MLP), str(tmp_path / "o.onnx"), str(data)],
                         check=False, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "b.npz" in run.stderr and "FIFO" in run.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_folder_and_device_named_npz_are_refused(tmp_path):
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(FeedError, match=r"dir\.npz.*folder"):
        _read_all(tmp_path)
    (tmp_path / "dir.npz").rmdir()
    (tmp_path / "null.npz").symlink_to("/dev/null")
    with pytest.raises(FeedError, match=r"null\.npz.*character device"):
        _read_all(tmp_path)


def test_header_declaring_terabytes_is_refused_before_allocating(tmp_path):
    member = _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (2**40,)}, b"\x00" * 16)
    path = _zip(tmp_path / "big.npz", {"x.npy": member})
    assert path.stat().st_size < 400
    with pytest.raises(FeedError, match=r"big\.npz.*'x'.*declares shape \[1099511627776\]"):
        _read_all(tmp_path)


def test_zip_header_declaring_more_than_the_budget_is_refused(tmp_path, monkeypatch):
    """A zip bomb: 3 MB of zeros deflate to a few KB; the declared size is checked, not inflated."""
    monkeypatch.setattr(npz_files, "MAX_NPZ_FILE_BYTES", 2**20)
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros(3 * 2**20 // 4, np.float32))
    assert (tmp_path / "bomb.npz").stat().st_size < 20_000
    with pytest.raises(FeedError, match=r"bomb\.npz.*'x'.*over the limit"):
        _read_all(tmp_path)


def test_zip_header_claiming_an_impossible_deflate_ratio_is_refused(tmp_path):
    np.savez_compressed(tmp_path / "lie.npz", x=np.zeros(1024, np.float32))
    data = bytearray((tmp_path / "lie.npz").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        info = archive.getinfo("x.npy")
    real_size = struct.pack("<I", info.file_size)
    claimed = struct.pack("<I", info.compress_size * 5000)
    (tmp_path / "lie.npz").write_bytes(bytes(data).replace(real_size, claimed))
    with pytest.raises(FeedError, match=r"lie\.npz.*'x'"):
        _read_all(tmp_path)


def test_npy_renamed_npz_is_a_clear_error(tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 64), np.float32))
    os.rename(tmp_path / "x.npy", tmp_path / "x.npz")
    with pytest.raises(FeedError, match=r"x\.npz.*\.npy file, not an \.npz"):
        _read_all(tmp_path)
    assert main(["optimize", str(MLP), "-o", str(tmp_path / "o.onnx"), "--validate", "--data", str(tmp_path)]) == 2
    assert "not an .npz" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ({"x.txt": b"hello"}, "not a .npy array"),
        ({"x.npy": b"garbage"}, "not a valid .npy"),
        ({"x.npy": _npy_bytes({"descr": "|O", "fortran_order": False, "shape": (1,)}, b"\x00" * 8)}, "objects"),
        ({"x.npy": _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (4,)}, b"\x00" * 8)}, "holds 8"),
        ({"x.npy": _npy_bytes({"descr": "<f4", "fortran_order": False, "shape": (-1,)})}, "shape"),
        ({}, "holds no arrays"),
    ],
)
def test_malformed_members_name_the_file_and_key(tmp_path, members, reason):
    _zip(tmp_path / "bad.npz", members)
    with pytest.raises(FeedError, match=reason) as caught:
        _read_all(tmp_path)
    assert "bad.npz" in str(caught.value)


def test_valid_npz_files_read_as_numpy_does(tmp_path):
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "f": np.asfortranarray(np.ones((2, 3))),
              "e": np.zeros((0, 5), np.int64), "s": np.array(3, np.int32), "b": np.array([True, False])}  # fmt: skip
    np.savez(tmp_path / "a.npz", **arrays)
    np.savez_compressed(tmp_path / "b.npz", **arrays)
    for feed in _read_all(tmp_path):
        assert list(feed) == list(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(feed[key], value)
            assert feed[key].dtype == value.dtype and feed[key].shape == value.shape
