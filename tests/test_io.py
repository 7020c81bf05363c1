"""quality_gate.io: checksums, JSON reads, and a dir swapped in all or nothing."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from quality_gate import io
from quality_gate.io import atomic_dir, default_file_mode, read_json, read_jsonl, sha256_file


def test_sha256_file_is_the_sha256_of_the_bytes_across_chunks(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * (3 * (1 << 22) // 256 + 7)  # three 4 MiB chunks and a partial one
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_read_json_and_jsonl_skip_blank_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"é": [1, 2]}), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n\n  \n{"id": "ü"}\n', encoding="utf-8")
    assert read_json(tmp_path / "a.json") == {"é": [1, 2]}
    assert read_jsonl(tmp_path / "a.jsonl") == [{"id": 1}, {"id": "ü"}]


def _tree(root):
    """``{relative path: text}`` of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def old_dir(tmp_path):
    final = tmp_path / "checkpoint-final"
    (final / "sub").mkdir(parents=True)
    (final / "old.txt").write_text("old")
    (final / "sub" / "w.bin").write_text("old weights")
    return final


def test_atomic_dir_replaces_the_old_dir_and_leaves_no_temporary_dir(old_dir):
    with atomic_dir(old_dir) as tmp:
        assert tmp.is_dir() and not any(tmp.iterdir()) and tmp.parent.parent == old_dir.parent
        (tmp / "new.txt").write_text("new")
        (tmp / "adapter.safetensors").write_text("w")
        os.chmod(tmp / "adapter.safetensors", 0o600)  # as safetensors writes it
        assert _tree(old_dir) == {"old.txt": "old", "sub/w.bin": "old weights"}  # not touched before the end
    assert _tree(old_dir) == {"adapter.safetensors": "w", "new.txt": "new"}
    assert sorted(p.name for p in old_dir.parent.iterdir()) == ["checkpoint-final"]
    assert (old_dir / "adapter.safetensors").stat().st_mode & 0o777 == default_file_mode()
    assert old_dir.stat().st_mode & 0o777 == 0o777 & ~io._umask()  # a plain mkdir's mode, not mkdtemp's 0700


def test_atomic_dir_makes_a_new_dir(tmp_path):
    with atomic_dir(tmp_path / "a" / "out") as tmp:
        (tmp / "x").write_text("1")
    assert _tree(tmp_path) == {"a/out/x": "1"}
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]


def test_a_failure_inside_atomic_dir_keeps_the_old_dir_and_no_temporary_dir(old_dir):
    with pytest.raises(RuntimeError, match="save failed"), atomic_dir(old_dir) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("save failed")
    assert _tree(old_dir) == {"old.txt": "old", "sub/w.bin": "old weights"}
    assert sorted(p.name for p in old_dir.parent.iterdir()) == ["checkpoint-final"]


def test_a_failed_swap_puts_the_old_dir_back(old_dir, monkeypatch):
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".tmp/checkpoint-final"):  # moving the new dir in
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"), atomic_dir(old_dir) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _tree(old_dir) == {"old.txt": "old", "sub/w.bin": "old weights"}
    assert sorted(p.name for p in old_dir.parent.iterdir()) == ["checkpoint-final"]


def test_atomic_dir_without_install_removes_its_dir(old_dir):
    with atomic_dir(old_dir, install=False) as tmp:
        (tmp / "ignored.txt").write_text("x")
    assert _tree(old_dir) == {"old.txt": "old", "sub/w.bin": "old weights"}
    assert sorted(p.name for p in old_dir.parent.iterdir()) == ["checkpoint-final"]
