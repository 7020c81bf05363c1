"""The OmegaConf resolvers the packaged configs use (``qg_*``), and the schemas' registration with Hydra.

``qg_now`` is the run dir's time (the launcher's start time under torchrun, identical on every rank),
``qg_suffix`` the run dir's readable override suffix, ``qg_or`` the first value set, ``qg_asset`` a path
inside the embedded tiny assets, ``qg_rank_suffix`` / ``qg_hydra_subdir`` what each rank writes.
"""

import datetime as dt
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from quality_gate.config.fields import ASSETS_DIR
from quality_gate.config.stages import SCHEMAS
from quality_gate.errors import ConfigError


def _launcher_start_time() -> dt.datetime | None:
    """Start time of the parent process (torchrun's agent), identical for all local ranks."""
    try:
        ticks = int(Path(f"/proc/{os.getppid()}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return dt.datetime.fromtimestamp(btime + ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _now(fmt: str) -> str:
    """Now, formatted; under torchrun every rank composes its own config, so ranks take the launcher's
    start time instead (``${now:...}`` could differ by a second between ranks)."""
    when = None
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        when = _launcher_start_time()
    return (when or dt.datetime.now()).strftime(fmt)


def _suffix(override_dirname: str) -> str:
    """``-key-value_key2-value2`` for the run dir name, length capped.

    ``=`` and ``,`` become ``-`` and ``_`` (and any other unsafe character ``-``) so that the run dir
    can be pasted unquoted into the next stage's override (Hydra's grammar rejects ``=`` and ``,``).
    """
    import re

    if not override_dirname:
        return ""
    safe = override_dirname.replace("=", "-").replace(",", "_")
    safe = re.sub(r"[^A-Za-z0-9._+-]", "-", safe)
    return "-" + safe[:120]


def _first_set(value: Any, default: str) -> str:
    """``value`` unless it is null or empty, else ``default`` (``hydra.run.dir`` follows ``output_dir``)."""
    return default if value in (None, "") else str(value)


def _asset(relative: str) -> str:
    path = ASSETS_DIR / relative
    if not path.exists():
        raise ConfigError(f"embedded asset {relative!r} not found in {ASSETS_DIR}")
    return str(path)


def _rank_suffix() -> str:
    """``""`` on global rank 0, ``.rank<N>`` on the others: every rank of a launch writes its own log
    file into the shared run dir (``<stage>.log``, ``<stage>.rank1.log``, ...) instead of all of them
    appending to one file, which a shared (network) filesystem does not keep intact across nodes."""
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f".rank{rank}"


def _hydra_subdir() -> str | None:
    """Hydra's ``.hydra/`` record of the composed config: written by global rank 0 only."""
    return ".hydra" if os.environ.get("RANK", "0") == "0" else None


def register_resolvers() -> None:
    """Register the OmegaConf resolvers the configs use (idempotent)."""
    for name, fn in (
        ("qg_or", _first_set),
        ("qg_now", _now),
        ("qg_suffix", _suffix),
        ("qg_asset", _asset),
        ("qg_rank_suffix", _rank_suffix),
        ("qg_hydra_subdir", _hydra_subdir),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def register_configs() -> None:
    """Register every stage schema with Hydra's ConfigStore as ``schema_<stage>`` (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    store = ConfigStore.instance()
    for stage, schema in SCHEMAS.items():
        store.store(name=f"schema_{stage}", node=schema)
