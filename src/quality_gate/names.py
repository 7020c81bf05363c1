"""Names that become file or directory names (dataset names, run names, experiment names, arms).

Every such name is checked here, once, before anything is written: a name may not escape the
directory it is joined to, hide itself, carry characters a shell or a file system mangles, be longer
than a file name may be, or take a name the pipeline uses for its own files. The datasets of a
``dataset`` config block get their names here too (:func:`dataset_names`: no two the same), and a
Hub dataset id is checked before any request (:func:`check_hf_name`). No torch is imported: the
command line checks names before it makes a run dir.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quality_gate.errors import ConfigError, MissingPathError

#: Longest name in bytes (UTF-8): file systems allow 255 bytes per component and the pipeline adds up
#: to ~30 (``.<dataset>_router_data.pt.<random>.tmp``, the atomic write's temporary file).
MAX_NAME_BYTES = 200
#: Names a dataset cannot take: the files Stage 2 writes in ``router_data/`` beside the per-dataset
#: folders (``stats/store.py``), and the suffixes of its per-dataset files (another dataset's index or
#: records, a marker, a temporary file). Compared case-insensitively (macOS, Windows file systems).
RESERVED_DATASET_NAMES = ("fingerprint.json", "plan.json")
RESERVED_DATASET_SUFFIXES = ("_router_data.pt", "_records.jsonl", ".done", ".tmp", ".lock")


def name_problem(name: str, dataset: bool = False) -> str | None:
    """Why ``name`` cannot be used as one path component, or None when it can (``dataset``: also not one
    of the names Stage 2 uses for its own files beside the datasets' folders)."""
    if not isinstance(name, str) or name == "":
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is a relative directory reference"
    if "/" in name or "\\" in name:
        return "it contains a path separator (/ or \\); use a plain name such as 'openhermes'"
    if name.startswith("."):
        return "it starts with '.' (hidden files and the pipeline's own temporary files do)"
    bad = [c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn")]
    if bad:
        return f"it contains control or invisible characters {[hex(ord(c)) for c in bad[:4]]}"
    if name != name.strip():
        return "it starts or ends with whitespace"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return (
            f"it is {size} bytes long in UTF-8 ({len(name)} characters; at most {MAX_NAME_BYTES} bytes: "
            "a file "
            "name has at most 255 and the pipeline adds suffixes)"
        )
    if dataset:
        folded = name.casefold()
        if folded in RESERVED_DATASET_NAMES:
            return f"{name!r} is the name of a file Stage 2 writes beside the datasets' folders"
        suffix = next((x for x in RESERVED_DATASET_SUFFIXES if folded.endswith(x)), None)
        if suffix is not None:
            return (
                f"it ends with {suffix!r}, the suffix of a file Stage 2 writes beside the datasets' folders"
            )
    return None


def check_name(name: str, key: str, dataset: bool = False) -> str:
    """``name`` when it is safe as a single path component; else :class:`ConfigError` naming ``key``."""
    problem = name_problem(name, dataset)
    if problem is not None:
        raise ConfigError(f"{key}={name!r} cannot be used as a file or directory name: {problem}")
    return name


def dataset_entries(dataset_cfg: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]]]:
    """``(dataset_from, its entries)`` of a ``dataset`` config block; each entry has its ``path`` (local)
    or a usable ``name`` (hf: :func:`check_hf_name`), else a :class:`ConfigError` naming it."""
    source = dataset_cfg.get("dataset_from")
    if source not in ("local", "hf"):
        raise ConfigError(f"dataset.dataset_from={source!r}: expected 'local' or 'hf'")
    block = dataset_cfg.get(source) or {}
    entries = list(block.get("datasets") or [])
    if not entries:
        raise ConfigError(f"dataset.{source}.datasets is empty: list at least one dataset to read")
    key = "path" if source == "local" else "name"
    for i, entry in enumerate(entries):
        value = _value(entry, key)
        if not value or not str(value).strip():
            hint = (
                ": a Hub dataset id (e.g. teknium/OpenHermes-2.5) or a local data file"
                if source == "hf"
                else ""
            )
            raise ConfigError(f"dataset.{source}.datasets[{i}] has no `{key}`{hint}")
        if source == "hf":
            check_hf_name(str(value), f"dataset.hf.datasets[{i}].name")
    return source, entries


def _value(entry: Mapping[str, Any], key: str) -> Any:
    """``entry[key]``, None when absent or unset (OmegaConf's ``???``)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(entry, DictConfig) and (key not in entry or OmegaConf.is_missing(entry, key)):
        return None
    return entry.get(key)


def dataset_names(dataset_cfg: Mapping[str, Any]) -> list[str]:
    """The name of every dataset of a ``dataset`` config block, in order: its ``dataset_name``, else the
    file's stem (local) or the id's last part (hf). Every name is checked as a file name
    (:func:`~quality_gate.names.check_name`: bytes, separators, the names Stage 2 keeps for itself),
    and two datasets may not share one: a name is one folder of router data, and rows without an
    ``id`` get ``<name>_<row>``, so the second file's rows would all be skipped as duplicates.
    Raises :class:`ConfigError` naming the entries; reads no file.
    """
    source, entries = dataset_entries(dataset_cfg)
    key = "path" if source == "local" else "name"
    names: list[str] = []
    first: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"dataset.{source}.datasets[{i}]"
        given = _value(entry, "dataset_name")
        value = str(_value(entry, key))
        if given:
            name, what = str(given), f"{where}.dataset_name={given}"
            check_name(name, f"{where}.dataset_name", dataset=True)
        else:
            name = Path(value).stem if source == "local" else value.rstrip("/").split("/")[-1]
            part = "stem" if source == "local" else "last part"
            what = f"{where}.{key}={value} (no dataset_name, so named after its {part})"
            check_name(name, f"{where}.dataset_name (unset: the {part} of {value!r})", dataset=True)
        other = first.get(name.casefold())
        if other is not None:
            raise ConfigError(
                f"{what} gets the dataset name {names[other]!r} of dataset.{source}.datasets[{other}] too: "
                "give each dataset its own dataset_name (e.g. {path: a/train.jsonl, dataset_name: a}); one "
                "name is one folder of router data, and rows without an `id` would get the same ids "
                "(<name>_<row>) and be skipped as duplicates"
            )
        first[name.casefold()] = i
        names.append(name)
    return names


def check_hf_name(name: Any, key: str) -> str:
    """A ``dataset_from=hf`` name: an existing local data file or folder, or a valid Hub dataset id
    (``name`` or ``namespace/name``); anything else is a :class:`ConfigError` naming ``key``, before any
    request is made."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(
            f"{key} is not set: give a Hub dataset id (e.g. teknium/OpenHermes-2.5) or a local file"
        )
    path = Path(name).expanduser()
    if path.exists():
        return name
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise MissingPathError(
            f"{key}={name!r} looks like a local path but does not exist (relative to {Path.cwd()})"
        )
    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise ConfigError(
            f"{key}={name!r} is neither an existing local file nor a valid Hub dataset id "
            f"({str(err).splitlines()[0][:160]})"
        ) from None
    return name
