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
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quality_gate.data.records import BadRecord, normalize_record
from quality_gate.errors import ConfigError, DataError, MissingPathError
from quality_gate.io import atomic_write_jsonl

log = logging.getLogger(__name__)

SKIPPED_ROWS_FILE = "skipped_rows.jsonl"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# How many skipped rows (and duplicate ids) are spelled out in the log / error before a summary.
SHOW_FIRST = 5


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


def _jsonl_rows(path: Path) -> Iterator[_RawRow]:
    # Bytes, not text: one non-UTF-8 line must cost that line only, not the whole file.
    with path.open("rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield line_no - 1, line_no, None, f"not UTF-8 ({err.reason} at byte {err.start})"
                continue
            if not text.strip():
                continue
            try:
                yield line_no - 1, line_no, json.loads(text), None
            except json.JSONDecodeError as err:
                yield line_no - 1, line_no, None, f"broken JSON ({err.msg} at column {err.colno})"


def _list_rows(rows: Iterable[Any]) -> Iterator[_RawRow]:
    for index, row in enumerate(rows):
        yield index, None, row, None


def _read_json_list(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(
            f"{path}: not a valid UTF-8 JSON file ({err}); a .json dataset must be a list of rows"
        ) from err
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json dataset must be a list of rows, found {type(data).__name__}")
    return data


def _normalize_rows(
    rows: Iterable[_RawRow], file: str, dataset_name: str, strict: bool
) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    records: list[dict[str, Any]] = []
    skipped: list[SkippedRow] = []
    for index, line, row, parse_error in rows:
        reason = parse_error
        if reason is None:
            try:
                records.append(normalize_record(row, dataset_name, index))
                continue
            except BadRecord as err:
                reason = err.reason
        if line is None:
            reason = f"row {index}: {reason}"
        bad = SkippedRow(file=file, line=line, dataset=dataset_name, reason=reason)
        if strict:
            raise BadRecord(f"dataset.strict=true and a bad row was found: {bad}")
        skipped.append(bad)
    return records, skipped


def load_local_file(
    path: str | Path, dataset_name: str, *, strict: bool = False
) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
    """Records of one local ``.jsonl`` / ``.json`` (list of rows) / ``.parquet`` file, and the skipped rows.

    Broken JSON and non-UTF-8 lines of a .jsonl file are skipped and reported, never fatal; with
    ``strict`` the first bad row raises ``BadRecord`` naming file, line and reason.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(
            f"dataset file {path} does not exist (relative paths are relative to {Path.cwd()})"
        )
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[_RawRow] = _jsonl_rows(path)
    elif suffix == ".json":
        rows = _list_rows(_read_json_list(path))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = _list_rows(pq.read_table(path).to_pylist())
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")
    return _normalize_rows(rows, str(path), dataset_name, strict)


def load_hf_dataset(
    name: str, dataset_name: str, split: str, *, strict: bool = False, trust_remote_code: bool = False
) -> tuple[list[dict[str, Any]], list[SkippedRow]]:
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
    local = Path(name)
    if local.is_file():
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(
            local.suffix.lower()
        )
        if builder is None:
            raise DataError(f"{name}: unsupported local file type for load_hf_dataset")
        ds = datasets.load_dataset(builder, data_files=str(local), split=split)
    else:
        ds = datasets.load_dataset(name, split=split)
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


def _entries(dataset_cfg: Mapping[str, Any]) -> tuple[str, list[Mapping[str, Any]]]:
    source = dataset_cfg.get("dataset_from")
    if source not in ("local", "hf"):
        raise ConfigError(f"dataset.dataset_from={source!r}: expected 'local' or 'hf'")
    block = dataset_cfg.get(source) or {}
    entries = list(block.get("datasets") or [])
    if not entries:
        raise ConfigError(f"dataset.{source}.datasets is empty: list at least one dataset to read")
    key = "path" if source == "local" else "name"
    for i, entry in enumerate(entries):
        if not entry.get(key):
            raise ConfigError(f"dataset.{source}.datasets[{i}] has no `{key}`")
    return source, entries


def load_records(
    dataset_cfg: Mapping[str, Any], *, seed: int, report_dir: Path | None = None
) -> list[dict[str, Any]]:
    """All records of the ``dataset`` config block (see docs/design.md), subset, shuffled, checked.

    Skipped rows are logged and written to ``report_dir/skipped_rows.jsonl`` (an empty file when
    none). Raises ``ValueError`` when no valid row is left or when ids repeat, ``BadRecord`` on the
    first bad row with ``dataset.strict=true``.
    """
    source, entries = _entries(dataset_cfg)
    ratio = float(dataset_cfg.get("subset_ratio", 1.0))
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"dataset.subset_ratio={ratio}: expected a fraction in (0, 1]")
    strict = bool(dataset_cfg.get("strict", False))
    records: list[dict[str, Any]] = []
    skipped: list[SkippedRow] = []
    for entry in entries:
        if source == "local":
            name = str(entry.get("dataset_name") or Path(str(entry["path"])).stem)
            rows, bad = load_local_file(str(entry["path"]), name, strict=strict)
        else:
            name = str(entry.get("dataset_name") or str(entry["name"]).rstrip("/").split("/")[-1])
            rows, bad = load_hf_dataset(
                str(entry["name"]),
                name,
                str(entry.get("split") or "train"),
                strict=strict,
                trust_remote_code=bool(entry.get("trust_remote_code", False)),
            )
        kept = _subset(rows, ratio, seed, name)
        log.info(
            "dataset %s: %d valid rows, %d skipped, %d kept (subset_ratio=%g)",
            name,
            len(rows),
            len(bad),
            len(kept),
            ratio,
        )
        records.extend(kept)
        skipped.extend(bad)
    _report_skipped(skipped, report_dir)
    if not records:
        if not skipped:
            detail = "the sources are empty"
        elif report_dir is not None:
            detail = f"first: {skipped[0]}; all in {Path(report_dir) / SKIPPED_ROWS_FILE}"
        else:
            detail = f"first: {skipped[0]}"
        raise DataError(f"no valid rows in dataset.{source}.datasets ({len(skipped)} skipped); {detail}")
    duplicates = [i for i, n in Counter(r["id"] for r in records).items() if n > 1]
    if duplicates:
        raise DataError(
            f"{len(duplicates)} duplicate record ids, e.g. {duplicates[:SHOW_FIRST]}: ids must be unique "
            "across all datasets read together; the same file read twice, or rows sharing an `id` field: "
            "fix or drop those fields (without one, the id becomes <dataset_name>_<row>)"
        )
    if dataset_cfg.get("shuffle", False):
        random.Random(seed).shuffle(records)
    return records


def _report_skipped(skipped: list[SkippedRow], report_dir: Path | None) -> None:
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
