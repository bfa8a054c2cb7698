"""Atomic writes: all or nothing, normal file permissions, JSON with a final newline."""

from __future__ import annotations

import json
import os
import stat

import pytest

from qae.io.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_text_and_json_land_whole_with_normal_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "hello\n")
    assert path.read_text() == "hello\n"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0o600
    atomic_write_json(tmp_path / "b.json", {"b": 1, "a": [1.5]}, sort_keys=True)
    text = (tmp_path / "b.json").read_text()
    assert text == '{"a": [1.5], "b": 1}\n' and json.loads(text) == {"a": [1.5], "b": 1}


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def boom(fh):
        fh.write("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "nan.json", float("nan"), allow_nan=False)
    assert not (tmp_path / "nan.json").exists()


def test_binary_writes(tmp_path):
    atomic_write(tmp_path / "x.bin", lambda fh: fh.write(b"\x89PNG"), binary=True)
    assert (tmp_path / "x.bin").read_bytes() == b"\x89PNG"
