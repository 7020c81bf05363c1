"""Read rows from local files or the Hugging Face Hub and turn them into records.

Every bad row is skipped and reported (file, line, dataset, reason) unless ``strict`` is set, in
which case the first bad row is an error. ``load_records`` reads the ``dataset`` config block of
``docs/design.md`` and writes the report to ``<report_dir>/skipped_rows.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quality_gate.data.records import BadRecord, normalize_record, short_repr
from quality_gate.errors import ConfigError, DataError, MissingPathError
from quality_gate.io import atomic_write_jsonl
from quality_gate.names import check_hf_name, dataset_entries, dataset_names

log = logging.getLogger(__name__)

SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# How many skipped rows (and duplicate ids) are spelled out in the log / error before a summary.
SHOW_FIRST = 5
# Rows nested deeper than this are refused: no real conversation is, and Python's json (and so every
# later dump of the record's meta) fails with RecursionError near depth 1000.
MAX_NESTING = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
# A \ud800..\udfff escape in the raw text: the only way a lone surrogate gets into a parsed row.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB]")


@dataclass
class SkippedRow:
    """One row that did not become a record. ``line`` is 1-based for .jsonl, None where rows have no
    line (.json list, .parquet, Hub splits: the reason then starts with ``row <0-based index>``)."""

    file: str
    line: int | None
    dataset: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where} [{self.dataset}]: {self.reason}"


# (row index used for the default id, line number or None, parsed row, or a reason it could not be parsed)
_RawRow = tuple[int, int | None, Any, str | None]


def _needs_structure_check(text: str) -> bool:
    """Cheap scan of raw JSON text: could the parsed value hold a lone surrogate or be deeply nested?"""
    return bool(_SURROGATE_ESCAPE.search(text)) or text.count("[") + text.count("{") > MAX_NESTING


def structure_problem(value: Any) -> str | None:
    """Why a parsed row cannot be kept whatever its format, or None: nesting deeper than
    :data:`MAX_NESTING`, or a string with an unpaired surrogate (not valid Unicode: writing the record
    as UTF-8 or tokenizing it would fail later, far from the row)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            found = _SURROGATE.search(item)
            if found:
                return f"unpaired UTF-16 surrogate {found.group()!r} (from a \\u escape): not valid Unicode"
        elif isinstance(item, (dict, list)):
            if depth > MAX_NESTING:
                return f"nested deeper than {MAX_NESTING} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def _parse_json(text: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, reason)`` for text that is not usable JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"broken JSON ({err.msg} at column {err.colno})"
    except (ValueError, RecursionError) as err:  # a 5,000-digit number; arrays nested ~1000 deep
        return None, f"broken JSON ({str(err)[:120]})"
    problem = structure_problem(value) if _needs_structure_check(text) else None
    return (None, problem) if problem else (value, None)


def _jsonl_rows(path: Path) -> Iterator[_RawRow]:
    # Bytes, not text: one non-UTF-8 line must cost that line only, not the whole file.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no - 1, line_no, None, f"not UTF-8 ({err.reason} at byte {err.start})"
                continue
            # A byte-order mark: editors on Windows start files with one, and `cat a.jsonl b.jsonl` of
            # two such files puts one at the start of a later line.
            text = text.removeprefix("\ufeff")
            if not text.strip():
                continue
            row, problem = _parse_json(text)
            yield line_no - 1, line_no, row, problem


def _list_rows(rows: Iterable[Any], check_structure: bool = False) -> Iterator[_RawRow]:
    for index, row in enumerate(rows):
        problem = structure_problem(row) if check_structure else None
        yield index, None, (None if problem else row), problem


def _read_json_list(path: Path) -> tuple[list[Any], bool]:
    """The rows of a .json file, and whether they need :func:`structure_problem` checked."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a leading byte-order mark is allowed
        data = json.loads(text)
    # A list cannot be read row by row: one broken byte costs the file, and the error says where.
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(
            f"{path}: not a valid UTF-8 JSON file ({str(err)[:200]}); a .json dataset must be a list of rows"
        ) from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must be a list of rows, found {type(data).__name__}")
    return data, _needs_structure_check(text)


def _read_parquet(path: Path) -> list[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({str(err)[:200]})") from None


@dataclass
class _Loaded:
    """Records of one source, the rows skipped, and where each record came from (file, line, row)."""

    records: list[dict[str, Any]]
    skipped: list[SkippedRow]
    where: list[tuple[str, int | None, int]]


def _where(file: str, line: int | None, index: int) -> str:
    return f"{file}:{line}" if line is not None else f"{file} row {index}"


def _bad(file: str, line: int | None, index: int, dataset: str, reason: str, strict: bool) -> SkippedRow:
    if line is None:
        reason = f"row {index}: {reason}"
    bad = SkippedRow(file=file, line=line, dataset=dataset, reason=reason)
    if strict:
        raise BadRecord(f"dataset.strict=true and a bad row was found: {bad}")
    return bad


def _normalize_rows(rows: Iterable[_RawRow], file: str, dataset_name: str, strict: bool) -> _Loaded:
    out = _Loaded([], [], [])
    for index, line, row, parse_error in rows:
        reason = parse_error
        if reason is None:
            try:
                out.records.append(normalize_record(row, dataset_name, index))
                out.where.append((file, line, index))
                continue
            except BadRecord as err:
                reason = err.reason
        out.skipped.append(_bad(file, line, index, dataset_name, reason, strict))
    return out


def load_local_file(
    path: str | Path, dataset_name: str, *, strict: bool = False
) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    """Records of one local ``.jsonl`` / ``.json`` (list of rows) / ``.parquet`` file, and the skipped rows.

    Broken JSON and non-UTF-8 lines of a .jsonl file are skipped and reported, never fatal; a repeated
    ``id`` is skipped and reported with the line where it was first seen; with ``strict`` the first bad
    row raises ``BadRecord`` naming file, line and reason.
    """
    loaded = _dedupe([_load_local(Path(path), dataset_name, strict)], strict)
    return loaded.records, loaded.skipped


def _load_local(path: Path, dataset_name: str, strict: bool) -> _Loaded:
    if not path.is_file():
        raise MissingPathError(
            f"dataset file {path} does not exist (relative paths are relative to {Path.cwd()})"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[_RawRow] = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _list_rows(*_read_json_list(path))
    elif suffix == ".parquet":
        # Arrow strings are valid UTF-8 and nesting is bounded by the schema: no structure check needed.
        rows = _list_rows(_read_parquet(path))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    return _normalize_rows(rows, str(path), dataset_name, strict)


def _dedupe(sources: list[_Loaded], strict: bool) -> _Loaded:
    """Keep the first record of every id (across all sources); later ones become reported skips."""
    out = _Loaded([], [], [])
    first: dict[str, tuple[str, int | None, int]] = {}
    for src in sources:
        out.skipped.extend(src.skipped)
        for record, where in zip(src.records, src.where, strict=True):
            rid = record["id"]
            if rid in first:
                reason = (
                    f"duplicate id {short_repr(rid)}, first seen at {_where(*first[rid])}; ids must be "
                    "unique across all datasets read together (the same file read twice, or rows sharing "
                    "an `id` field)"
                )
                out.skipped.append(_bad(*where, record["dataset"], reason, strict))
                continue
            first[rid] = where
            out.records.append(record)
            out.where.append(where)
    return out


def load_hf_dataset(
    name: str, dataset_name: str, split: str, *, strict: bool = False, trust_remote_code: bool = False
) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    """Records of one ``datasets.load_dataset`` split, and the skipped rows (repeated ids included)."""
    loaded = _dedupe([_load_hf(name, dataset_name, split, strict, trust_remote_code)], strict)
    return loaded.records, loaded.skipped


def _load_hf(name: str, dataset_name: str, split: str, strict: bool, trust_remote_code: bool) -> _Loaded:
    """Records of one ``datasets.load_dataset`` split, and the skipped rows.

    ``name`` is a Hub id, or a local data file (.json/.jsonl/.parquet/.csv) or folder, which is read
    with the matching packaged builder (no network).
    """
    import datasets  # deferred: importing it costs about a second

    if trust_remote_code:
        # datasets >= 4 no longer runs loading scripts, so there is no remote code to trust.
        log.warning(
            "trust_remote_code is ignored: datasets %s does not run dataset loading scripts",
            datasets.__version__,
        )
    check_hf_name(name, "name")
    local = Path(name)
    try:
        if local.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
                local.suffix.lower()
            )
            if builder is None:
                raise DataError(f"{name}: unsupported local file type for load_hf_dataset")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split)
        else:
            ds = datasets.load_dataset(name, split=split)
    # Not found, offline, no such split, a file the builder cannot parse: the input, not a bug.
    except (datasets.exceptions.DatasetsError, OSError, ValueError, ConnectionError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise DataError(
            f"dataset.hf.datasets: {name!r} (split {split!r}) cannot be loaded "
            f"({type(err).__name__}: {first}); "
            "check the id and split (and the network, or HF_DATASETS_OFFLINE=1 with a cached copy)"
        ) from None
    return _normalize_rows(_list_rows(iter(ds)), name, dataset_name, strict)


def _subset(
    records: list[dict[str, Any]], ratio: float, seed: int, dataset_name: str
) -> list[dict[str, Any]]:
    """A seeded ``ratio`` fraction of ``records`` (at least one), in source order.

    The generator is seeded with (seed, dataset_name), so one dataset's subset does not change when
    another dataset is added to the config.
    """
    if ratio >= 1.0 or not records:
        return records
    keep = max(1, round(ratio * len(records)))
    rng = random.Random(seed * 1_000_003 + zlib.crc32(dataset_name.encode()))
    chosen = sorted(rng.sample(range(len(records)), keep))
    return [records[i] for i in chosen]


def read_records(
    dataset_cfg: Mapping[str, Any], *, seed: int
) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    """All records of the ``dataset`` config block, subset and shuffled, and every skipped row.

    Nothing is written (see :func:`load_records`). Bad rows and repeated ids are skipped rows (the
    first record of an id is kept); raises :class:`DataError` when no valid row is left, ``BadRecord``
    on the first bad row with ``dataset.strict=true``.
    """
    records, skipped = _read(dataset_cfg, seed)
    if not records:
        _no_records(dataset_cfg, skipped, None)
    return records, skipped


def _no_records(dataset_cfg: Mapping[str, Any], skipped: list[SkippedRow], report_dir: Path | None) -> None:
    source = dataset_cfg.get("dataset_from")
    if not skipped:
        detail = "the sources are empty"
    elif report_dir is not None:
        detail = f"first: {skipped[0]}; all in {Path(report_dir) / SKIPPED_ROWS_FILE}"
    else:
        detail = f"first: {skipped[0]}"
    raise DataError(f"no valid rows in dataset.{source}.datasets ({len(skipped)} skipped); {detail}")


def _read(dataset_cfg: Mapping[str, Any], seed: int) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    source, entries = dataset_entries(dataset_cfg)
    names = dataset_names(dataset_cfg)
    ratio = float(dataset_cfg.get("subset_ratio", 1.0))
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"dataset.subset_ratio={ratio}: expected a fraction in (0, 1]")
    strict = bool(dataset_cfg.get("strict", False))
    loaded: list[_Loaded] = []
    for entry, name in zip(entries, names, strict=True):
        if source == "local":
            loaded.append(_load_local(Path(str(entry["path"])), name, strict))
        else:
            loaded.append(
                _load_hf(str(entry["name"]), name, str(entry.get("split") or "train"), strict, False)
            )
    unique = _dedupe(loaded, strict)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for record in unique.records:
        by_name.setdefault(record["dataset"], []).append(record)
    records: list[dict[str, Any]] = []
    for name in dict.fromkeys(names):
        rows = by_name.get(name, [])
        kept = _subset(rows, ratio, seed, name)
        bad = sum(row.dataset == name for row in unique.skipped)
        log.info(
            "dataset %s: %d valid rows, %d skipped, %d kept (subset_ratio=%g)",
            name,
            len(rows),
            bad,
            len(kept),
            ratio,
        )
        records.extend(kept)
    if dataset_cfg.get("shuffle", False):
        random.Random(seed).shuffle(records)
    return records, unique.skipped


def load_records(
    dataset_cfg: Mapping[str, Any], *, seed: int, report_dir: Path | None = None
) -> list[dict[str, Any]]:
    """:func:`read_records`, with the skipped rows logged and written to ``report_dir/skipped_rows.jsonl``
    (an empty file when none)."""
    records, skipped = _read(dataset_cfg, seed)
    report_skipped(skipped, report_dir)
    if not records:
        _no_records(dataset_cfg, skipped, report_dir)
    return records


def report_skipped(skipped: list[SkippedRow], report_dir: Path | None) -> None:
    """Log a per-dataset count and the first rows; write every skipped row to ``skipped_rows.jsonl``."""
    if skipped:
        per_dataset = Counter(s.dataset for s in skipped)
        log.warning(
            "%d rows skipped (%s); the first %d:",
            len(skipped),
            ", ".join(f"{name}: {n}" for name, n in per_dataset.items()),
            min(len(skipped), SHOW_FIRST),
        )
        for row in skipped[:SHOW_FIRST]:
            log.warning("skipped %s", row)
    if report_dir is not None:
        atomic_write_jsonl(Path(report_dir) / SKIPPED_ROWS_FILE, [s.as_dict() for s in skipped])


def records_fingerprint(records: Iterable[Mapping[str, Any]]) -> str:
    """Short sha256 hex of the records' ids and messages, in order (for manifests)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(
            json.dumps([record["id"], record["messages"]], ensure_ascii=False, sort_keys=True).encode()
        )
        digest.update(b"\n")
    return digest.hexdigest()[:16]
