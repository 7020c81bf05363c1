"""Atomic file writes (write to a temporary file beside the target, fsync, rename), JSON reads and
file checksums.

A reader never sees a half-written file: it sees the old one, or the complete new one. Every file
gets the mode a plain ``open()`` would give it (:func:`default_file_mode`), also the files of model
and adapter dirs that libraries write privately (:func:`normalize_modes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it to read it,
    and a file another thread creates in between would get the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain ``open()`` gives a new file: ``0o666 & ~umask`` (0o644 with the usual umask)."""
    return 0o666 & ~_umask()


def normalize_modes(root: str | os.PathLike, pattern: str = "*") -> None:
    """Give every regular file under ``root`` matching ``pattern`` the mode of :func:`default_file_mode`.

    safetensors writes through a private (0600) temporary file, so the ``*.safetensors`` of a model or
    adapter saved with ``save_pretrained`` would be unreadable to the group while everything around it
    is 0644; stages call this on the dirs they save before moving them into place.
    """
    mode = default_file_mode()
    for path in Path(root).rglob(pattern):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            os.chmod(path, mode)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file. Save only tensors and plain containers, so that
    ``torch.load(path, weights_only=True)`` can read it back.

    The same object gives the same bytes: ``torch.save`` to a *path* names the zip's inner folder after
    the (random) temporary file, so the sha256 that fingerprints Stage 1 weights and Stage 2 shards
    would change with every write; through an open file the folder is always ``archive/``.
    """
    import torch  # deferred: importing torch costs ~1.5 s, and most callers write only text

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in ``path`` (UTF-8)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """One JSON object per non-blank line of ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's bytes, read in 4 MiB chunks (the checksum of shards and weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
