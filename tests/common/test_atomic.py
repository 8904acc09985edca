"""Atomic writes: content, overwrite, and no damage when a write fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medfed.common import atomic
from medfed.common.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text


def test_write_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"\x00\x01hello")
    assert path.read_bytes() == b"\x00\x01hello"


def test_write_text_utf8(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "ε ≤ 3, δ = 1e-5\n")
    assert path.read_bytes() == "ε ≤ 3, δ = 1e-5\n".encode()


def test_write_json(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    atomic_write_json(path, obj)
    text = path.read_text()
    assert json.loads(text) == obj
    assert text.endswith("\n")


def test_creates_parent_folders(tmp_path: Path) -> None:
    path = tmp_path / "x" / "y" / "z.txt"
    atomic_write_text(path, "ok")
    assert path.read_text() == "ok"


def test_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "first version, rather long")
    atomic_write_text(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_replace_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    before = path.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write_json(path, {"v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_failed_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def boom(fd: int) -> None:
        raise OSError("fsync failed")

    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failed_serialisation_leaves_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_first_write_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("nope")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "new.bin", b"data")
    assert list(tmp_path.iterdir()) == []
