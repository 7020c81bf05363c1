"""Run directories and the manifest.

Every stage writes into ``outputs/<run_name>/YYYY-MM-DD/HH-MM-SS-<key overrides>/`` (Hydra's run dir,
see ``configs/_run_dir.yaml``; ``run_name`` is the stage name) and starts with :func:`init_run`, which
saves the resolved config (``config.yaml``) and a ``manifest.json`` (git commit, package versions,
models, dataset fingerprints, seed). All ranks of a ``torchrun`` launch share one run dir (the
``qg_now`` resolver of :mod:`quality_gate.config.resolvers` takes the launcher's start time); a launch over
several nodes must name it (``output_dir``, on a filesystem every node mounts): the nodes' launchers
start at different times. Only global rank 0 (``RANK=0``) writes the shared files; see
docs/cluster.md for who writes what.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from quality_gate.errors import ConfigError, RunLockedError
from quality_gate.io import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger(__name__)

#: Stage names that manifests written by earlier versions of this package carry -> the name now
#: (Stage 2 was called "selection" until the stages got one name each); an old run dir still resumes.
FORMER_STAGE_NAMES: dict[str, str] = {"selection": "collect"}

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "hydra-core",
    "safetensors",
    "tokenizers",
    "quality-gate",
)


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Global rank 0: the one process of a launch (over all nodes) that writes the shared files."""
    return rank() == 0


def local_world_size() -> int:
    """Processes of this launch on this node (``LOCAL_WORLD_SIZE``, set by torchrun / accelerate)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))


def is_multi_node() -> bool:
    """The launch spans several nodes (more processes in all than on this node)."""
    return world_size() > local_world_size()


MULTI_NODE_RUN_DIR_HELP = (
    "this launch spans several nodes (WORLD_SIZE={world}, LOCAL_WORLD_SIZE={local}): set "
    "output_dir=<a dir on a filesystem every node mounts>. Each node composes its own config, and the "
    "default run dir (outputs/<stage>/<date>/<time>) is named after that node's own start time, so "
    "the nodes would write into different dirs. See docs/cluster.md"
)


def check_shared_run_dir(cfg: DictConfig) -> None:
    """Under a multi-node launch, refuse a run dir that is not given explicitly (``output_dir`` or
    ``hydra.run.dir``): the ranks of all nodes must write into one shared dir."""
    if not is_multi_node() or cfg.get("output_dir"):
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        if any(o.startswith("hydra.run.dir=") for o in HydraConfig.get().overrides.hydra):
            return
    except (ImportError, ValueError):
        pass
    raise ConfigError(MULTI_NODE_RUN_DIR_HELP.format(world=world_size(), local=local_world_size()))


def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory: ``cfg.output_dir`` when set, else Hydra's run dir, else the cwd."""
    out = cfg.get("output_dir")
    if out:
        return Path(out)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path.cwd()


def check_dir_target(path: str | os.PathLike, key: str) -> Path:
    """``path`` when it is a directory or can become one; a :class:`ConfigError` naming ``key`` when it (or a
    folder above it) is an existing file. Checked before anything is written."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            what = "is an existing file" if p == path else f"is inside {p}, which is an existing file"
            raise ConfigError(f"{key}={path} {what}; a run writes a directory there: choose another path")
    return path


class RunLock:
    """The lock file of a run dir (``<run dir>/collect.lock``): one process at a time writes the run.

    The file says who holds it (pid, host, start time, command), so that a refused run can say so.
    Exclusion is the kernel's ``flock`` on the open file, released when the holder exits however it
    ends (killed, out of memory): a file left by a dead holder is stale and is taken over, with a
    warning naming it. (``flock`` is shared between hosts on NFS with locking, as Linux emulates it
    with byte-range locks; on a filesystem without locks a warning says that nothing stops a second
    run.)
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what = Path(path), what
        self._fd: int | None = None

    @staticmethod
    def _holder(fd: int) -> dict[str, Any]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            data = json.loads(os.read(fd, 1 << 16).decode("utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                who = (
                    f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started_at')} "
                    f"({holder.get('command')})"
                    if holder
                    else "a process that has not written its name yet"
                )
                raise RunLockedError(
                    f"another {self.what} run is writing into {self.path.parent}: {self.path} is held by "
                    f"{who}. "
                    "Wait for it to finish, or stop it; two runs in one dir would score the same shards twice"
                ) from None
            except OSError as err:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
                os.close(fd)
                log.warning(
                    "%s cannot be locked on this filesystem (%s): nothing stops a second run in %s",
                    self.path,
                    err.strerror,
                    self.path.parent,
                )
                return self
            try:
                # Released and removed by its holder between our open and flock: lock the new file.
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = self._holder(fd)
        if previous:
            log.warning(
                "taking over the stale lock %s: pid %s on host %s (since %s) left it and no longer holds it",
                self.path,
                previous.get("pid"),
                previous.get("host"),
                previous.get("started_at"),
            )
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500],
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(me) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                self.path.unlink()  # while still holding it: no one locks a file about to go
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent,
        timeout=10,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def init_run(cfg: DictConfig, stage: str, **manifest_fields: Any) -> Path:
    """Create the run dir; on rank 0 write ``config.yaml`` (resolved) and ``manifest.json``.

    Rerunning into an existing run dir (resume) keeps what is there: a different config is saved as
    ``config.<time>.yaml`` beside the original, and the manifest gains an entry under ``reruns``
    instead of being replaced, so a refused or failed rerun never rewrites the provenance of the
    outputs already in the dir.
    """
    check_shared_run_dir(cfg)
    run_dir = check_dir_target(run_dir_of(cfg), "output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        now = dt.datetime.now()
        entry = {
            "started_at": now.isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "git_commit": git_commit(),
        }
        manifest_path = run_dir / "manifest.json"
        if manifest_path.exists():
            manifest = read_manifest(run_dir)
            if FORMER_STAGE_NAMES.get(manifest.get("stage"), manifest.get("stage")) not in (None, stage):
                raise ConfigError(
                    f"output_dir={run_dir} is a {manifest.get('stage')} run dir; a {stage} run cannot "
                    "write into it. Choose a new output_dir (or leave it unset)."
                )
            manifest.setdefault("reruns", []).append(entry)
        else:
            manifest = {
                "stage": stage,
                **entry,
                "python": platform.python_version(),
                "packages": package_versions(),
                "seed": cfg.get("seed"),
                "world_size": world_size(),
                **manifest_fields,
            }
        text = OmegaConf.to_yaml(cfg, resolve=True)
        config_path = run_dir / "config.yaml"
        if not config_path.exists():
            atomic_write_text(config_path, text)
        elif not _same_config(config_path, text):
            other = run_dir / f"config.{now:%Y-%m-%d_%H-%M-%S}.yaml"
            atomic_write_text(other, text)
            log.warning("%s holds a run with another config; this one is saved as %s", run_dir, other.name)
        atomic_write_json(manifest_path, manifest)
    log.info("run dir: %s", run_dir)
    return run_dir


def _same_config(saved: Path, text: str) -> bool:
    """Whether the run dir's ``config.yaml`` holds the same values as ``text`` (key order aside: a
    config group whose keys moved between versions is still the same config)."""
    try:
        before = OmegaConf.to_container(OmegaConf.create(saved.read_text(encoding="utf-8")))
    except Exception:  # an unreadable or damaged file is another config
        return False
    return before == OmegaConf.to_container(OmegaConf.create(text))


_MANIFEST_ADVICE = (
    "it records how the outputs in {run_dir} were made. Restore it, or start a new run (drop output_dir); "
    "deleting it makes this run the dir's first one"
)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """``manifest.json`` of a run dir ({} when there is none); a damaged one is a :class:`ConfigError`."""
    path = Path(run_dir) / "manifest.json"
    if not path.exists():
        return {}
    manifest = read_json(path, _MANIFEST_ADVICE.format(run_dir=run_dir), ConfigError)
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path} is not a manifest; " + _MANIFEST_ADVICE.format(run_dir=run_dir))
    return manifest


def update_manifest(run_dir: Path, **fields: Any) -> None:
    """Merge ``fields`` into ``manifest.json`` (rank 0 only)."""
    if not is_main_process():
        return
    path = Path(run_dir) / "manifest.json"
    manifest = read_manifest(Path(run_dir))
    manifest.update(fields)
    atomic_write_json(path, manifest)


class PhaseTimer:
    """Wall seconds per named phase of a stage (``with timer("encode"): ...``); ``as_dict()`` for metrics.

    The process start (interpreter, imports) is counted too: ``since_process_start_s`` is the time
    from the interpreter's start to the first phase, the fixed cost a user pays before any work.
    """

    def __init__(self) -> None:
        import time

        self._clock = time.perf_counter
        self.phases: dict[str, float] = {}
        self.before_first_phase_s: float | None = None

    @staticmethod
    def process_age_s() -> float | None:
        """Seconds since this process started (Linux ``/proc``), else None."""
        try:
            ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
            uptime = float(Path("/proc/uptime").read_text().split()[0])
            return uptime - ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def __call__(self, name: str) -> Any:
        import contextlib

        if self.before_first_phase_s is None:
            self.before_first_phase_s = self.process_age_s()

        @contextlib.contextmanager
        def phase() -> Any:
            start = self._clock()
            try:
                yield
            finally:
                self.phases[name] = round(self.phases.get(name, 0.0) + self._clock() - start, 3)

        return phase()

    def as_dict(self) -> dict[str, Any]:
        age = self.before_first_phase_s
        return {**self.phases, "process_start_to_first_phase_s": None if age is None else round(age, 2)}
