"""Files: atomic writes, checksums, and reading back what the pipeline wrote.

A reader never sees a half-written file: it sees the old one, or the complete new one. Every file
gets the mode a plain ``open()`` would give it (:func:`default_file_mode`), also the files of model
and adapter dirs that libraries write privately (:func:`normalize_modes`). A set of outputs is
installed all or nothing (:func:`install_entries`), and so is a whole dir (:func:`atomic_dir`).

Reading back: :func:`sha256_file` is the one checksum of a file; :func:`read_json` and
:func:`load_tensors` turn a damaged or foreign file into one :class:`~quality_gate.errors.UserError`
naming it and what to do, never a parser's traceback (nor torch's advice to pass
``weights_only=False``, which would run pickled code).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quality_gate.errors import DataError, UserError


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
        _fsync(tmp_path)
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """fsync one file or dir (a dir's entries: the names renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and dir under ``root``, then ``root``: a rename of ``root`` never lands
    on disk before its content."""
    for path in [*root.rglob("*"), root]:
        if not path.is_symlink() and (path.is_file() or path.is_dir()):
            _fsync(path)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, install: bool = True) -> Iterator[Path]:
    """Yield a new, empty temporary dir beside ``final``; swap it in for ``final``, all or nothing.

    On success its files get the mode of :func:`default_file_mode` (:func:`normalize_modes`), everything
    in it is fsynced, and it is renamed onto ``final`` through :func:`install_entries`: a ``final`` that
    exists (a dir, a file or a link) is moved aside first and removed only once the new one is in, so a
    reader, or a crash at any point, sees the old dir or the whole new one. If the body raises (or the
    swap fails), the temporary dir is removed and ``final`` is left as it was.

    ``install=False``: the temporary dir is removed on exit instead of swapped in. For the processes of
    a collective save that take part but do not write (every rank calls ``Trainer.save_model``, rank 0
    writes): each gets a dir of its own, and nothing it made there is left behind.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The staging dir holds the new dir under its final name; install_entries moves it out by rename.
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    tmp = staging / final.name
    try:
        tmp.mkdir()  # the mode a plain mkdir gives (0o777 & ~umask), as the dir it replaces had
        yield tmp
        if install:
            normalize_modes(tmp)
            _fsync_tree(tmp)
            install_entries(staging, final.parent)
            _fsync(final.parent)
    finally:
        # Left: the new dir when it was not installed, nothing else (install_entries removes what it
        # replaced, or puts it back). rmtree never follows a link out of the dir.
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.rmdir()


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


def read_json(
    path: str | os.PathLike,
    advice: str = "rerun the step that wrote it",
    error: type[UserError] = DataError,
) -> Any:
    """The JSON content of ``path``; a file that cannot be read or parsed (truncated, garbled, not
    UTF-8) is one ``error`` naming it, why, and ``advice`` (what to delete or rerun)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise error(f"{path} is damaged or unreadable ({type(err).__name__}: {reason}); {advice}") from None


def load_tensors(
    path: str | os.PathLike, advice: str, error: type[UserError] = DataError, **kwargs: Any
) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu", **kwargs)``; any failure is one ``error``
    naming the file and ``advice``. torch's own message is not shown: for a pickle that is not plain
    tensors it advises ``weights_only=False``, which would run the pickled code."""
    import torch  # deferred: importing torch costs ~1.5 s

    try:
        return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    # UnpicklingError, RuntimeError, EOFError, ValueError, OSError, ... depending on what the bytes are.
    except Exception as err:
        raise error(
            f"{path} cannot be read as plain tensors ({type(err).__name__}: it is damaged, truncated, or "
            f"not a file the pipeline wrote); {advice}"
        ) from None


def install_entries(staging: str | os.PathLike, target_dir: str | os.PathLike) -> list[str]:
    """Move every entry of ``staging`` into ``target_dir``, all or nothing; returns the names moved.

    What an entry replaces (a file, a dir, or a symbolic link, which is replaced itself and never
    written through) is first moved aside into ``staging``; if any move fails, every entry already
    moved is moved back, so ``target_dir`` holds either all the new entries or all the old ones. Both
    dirs must be on one filesystem (each move is a rename).
    """
    staging, target_dir = Path(staging), Path(target_dir)
    names = sorted(p.name for p in staging.iterdir())
    aside = Path(tempfile.mkdtemp(prefix=".replaced-", dir=staging))
    moved_aside: list[str] = []
    installed: list[str] = []
    try:
        for name in names:
            target = target_dir / name
            if target.is_symlink() or target.exists():
                os.replace(target, aside / name)
                moved_aside.append(name)
        for name in names:
            os.replace(staging / name, target_dir / name)
            installed.append(name)
    except OSError:
        for name in reversed(installed):
            with contextlib.suppress(OSError):
                os.replace(target_dir / name, staging / name)
        for name in reversed(moved_aside):
            with contextlib.suppress(OSError):
                os.replace(aside / name, target_dir / name)
        with contextlib.suppress(OSError):
            aside.rmdir()  # only when everything went back (else the old entries stay in it, not lost)
        raise
    # What was replaced goes; rmtree never follows a symbolic link, it removes the link.
    shutil.rmtree(aside, ignore_errors=True)
    return installed
