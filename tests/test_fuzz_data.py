"""Fuzz the data layer (issue 11): thousands of generated rows, valid and broken, in .jsonl, .json and
.parquet, through ``load_local_file`` and ``load_records``; and (issue 22) the names datasets get:
generated names by the thousand (bytes, scripts, reserved names) and sets of files whose names collide.

Invariants: every valid row becomes exactly its record (id, messages, meta); every bad row is one
skipped row with its file, its line (.jsonl) or row index (.json / .parquet) and a short reason; blank
lines are neither; nothing raises except the documented errors (``DataError`` for a file that cannot
be read at all, ``BadRecord`` on the first bad row with ``strict``).

The generator is seeded: the same rows on every run, so the counts asserted in ``EXPECTED`` are stable
and quoted in docs/hardening.md. The oracle does not call the code under test: each generated row
carries the messages it must give (or the reason it must be refused), and duplicate ids are found by
keeping the first valid row of each id, in file order.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from quality_gate.data import BadRecord, load_local_file, load_records
from quality_gate.data.sources import MAX_NESTING, SKIPPED_ROWS_FILE, read_records
from quality_gate.errors import ConfigError, DataError
from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from quality_gate.names import check_name

log = logging.getLogger(__name__)

SEED = 11
SIZES = {"jsonl": 2400, "json": 800, "parquet": 800}
# (records, skipped rows, blank lines) per file, and across the three files read together.
EXPECTED = {
    "jsonl": (1274, 1092, 34),
    "json": (443, 357, 0),
    "parquet": (435, 365, 0),
    "all": (2108, 1858, 34),
}
MAX_REASON = 400  # characters: a reason is one short line whatever the row holds

WORDS = [
    "alpha",
    "beta",
    "gate",
    "token",
    "Schrödinger",
    "naïve",
    "中文",
    "日本語",
    "Ελληνικά",
    "עברית",
    "😀",
    "𝔘𝔫𝔦",
]
ODD = [
    "\x00",
    "\x01",
    "\x07",
    "\x1b",
    "\x7f",
    "\t",
    "\r",
    "\n",
    "\u2028",
    "\u2029",
    "\ufeff",
    "\u200b",
    "\ufffe",
]
OPTIONAL_FORMAT_KEYS = ("messages", "conversations", "instruction", "input", "output", "question", "answer")


@dataclasses.dataclass
class Case:
    """One generated row: the object (or raw .jsonl bytes) and what the data layer must make of it."""

    kind: str
    row: Any = None
    raw: bytes | None = None  # .jsonl only: the exact line, for rows that are not valid JSON objects
    messages: list[dict[str, str]] | None = None  # the record's messages when the row is valid
    reason: str | None = None  # a substring of the skip reason when it is not
    meta: dict[str, Any] | None = None
    blank: bool = False


def words(rng: random.Random, odd: bool = True) -> str:
    """Non-blank text: Unicode of several scripts, sometimes control and invisible characters, rarely huge."""
    parts = [rng.choice(WORDS[:4])] + [rng.choice(WORDS) for _ in range(rng.randint(0, 10))]
    if odd and rng.random() < 0.15:
        parts.insert(rng.randint(1, len(parts)), "".join(rng.choice(ODD) for _ in range(rng.randint(1, 4))))
    if rng.random() < 0.004:
        parts.append("y" * rng.randint(50_000, 150_000))
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- #
# Valid rows in the four accepted forms
# --------------------------------------------------------------------------------------------- #
def valid_messages(rng: random.Random) -> Case:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(["", words(rng)])})
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": words(rng)}, {"role": "assistant", "content": words(rng)}]
    if rng.random() < 0.1:
        messages.append({"role": "user", "content": words(rng)})  # ends with a user turn: still usable
    return Case("valid messages", {"messages": messages}, messages=messages)


def valid_sharegpt(rng: random.Random) -> Case:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    conversations, messages = [], []
    for _ in range(rng.randint(1, 3)):
        for speaker in (rng.choice(["human", "user"]), rng.choice(["gpt", "assistant"])):
            value = words(rng)
            conversations.append({"from": speaker, "value": value})
            messages.append({"role": roles[speaker], "content": value})
    return Case("valid sharegpt", {"conversations": conversations}, messages=messages)


def valid_alpaca(rng: random.Random) -> Case:
    instruction, output = words(rng), words(rng)
    extra = rng.choice(["", "  ", None, words(rng)])
    row = {"instruction": instruction, "output": output}
    if extra is not None or rng.random() < 0.5:
        row["input"] = extra
    user = instruction + "\n\n" + extra if extra and extra.strip() else instruction
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Case("valid alpaca", row, messages=messages)


def valid_question_answer(rng: random.Random) -> Case:
    q, a = words(rng), words(rng)
    messages = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return Case("valid question/answer", {"question": q, "answer": a}, messages=messages)


VALID = [valid_messages, valid_sharegpt, valid_alpaca, valid_question_answer]


# --------------------------------------------------------------------------------------------- #
# Broken rows: what real files hold
# --------------------------------------------------------------------------------------------- #
def _pair(user: Any = "q", assistant: Any = "a") -> list[dict[str, Any]]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def bad_object(rng: random.Random) -> Case:
    """JSON that parses but is not a usable row (any format where the row is an object)."""
    options = [
        ("not an object", rng.choice([[1, 2], 42, "text", None, True, 3.5]), "not an object"),
        ("no known keys", rng.choice([{}, {"foo": 1}, {"text": words(rng)}]), "missing or empty messages"),
        ("empty messages", {"messages": rng.choice([[], {}, "hi", 7])}, "missing or empty messages"),
        ("message not an object", {"messages": ["hi", *_pair()]}, "not an object with role/content"),
        (
            "unknown role",
            {
                "messages": [
                    {"role": rng.choice(["narrator", "", None, 5, "USER", "x" * 5000]), "content": "q"}
                ]
            },
            "unknown role",
        ),
        (
            "content wrong type",
            {"messages": _pair(assistant=rng.choice([5, [1], {"a": 1}, None]))},
            "not a string",
        ),
        ("empty content", {"messages": _pair(user=rng.choice(["", "  ", "\n\t "]))}, "empty content"),
        ("no assistant turn", {"messages": [{"role": "user", "content": words(rng)}]}, "no assistant turn"),
        ("sharegpt unknown speaker", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown role"),
        ("sharegpt empty", {"conversations": []}, "missing or empty conversations"),
        ("alpaca empty output", {"instruction": words(rng), "output": ""}, "empty content"),
        ("alpaca input wrong type", {"instruction": "i", "input": 3, "output": "o"}, "alpaca input is int"),
        ("question without answer", {"question": words(rng), "answer": ""}, "empty content"),
        (
            "nested junk",
            {"messages": [[{"role": "user"}], {"nested": {"deeper": [1, {"x": None}]}}]},
            "not an object with role/content",
        ),
        (
            "nested too deep",
            {**valid_messages(rng).row, "meta": _deep(MAX_NESTING + 5)},
            "nested deeper than",
        ),
    ]
    kind, row, reason = rng.choice(options)
    return Case(kind, row, reason=reason)


def _deep(levels: int) -> Any:
    value: Any = "bottom"
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


def bad_jsonl_line(rng: random.Random) -> Case:
    """Lines only a .jsonl file can hold: not JSON, not UTF-8, too deep to parse, a lone surrogate."""
    good = json.dumps({"messages": _pair(words(rng), words(rng))}, ensure_ascii=False)
    options = [
        ("broken JSON", good[: rng.randint(1, len(good) - 1)].encode(), "broken JSON"),
        (
            "broken JSON",
            rng.choice([b"{'single': 'quotes'}", b'{"a": }', b"NaN]", b"}{", b'{"messages": [1,]}']),
            "broken JSON",
        ),
        (
            "raw control character",
            good.replace('"content": "', '"content": "\x01', 1).encode(),
            "broken JSON",
        ),
        (
            "not UTF-8",
            good.encode()[:-2] + rng.choice([b"\xff", b"\xe9", b"\x80", b"\xed\xa0\x80"]) + b'"}',
            "not UTF-8",
        ),
        ("nested past the parser", b"[" * 5000 + b"]" * 5000, "broken JSON"),
        ("number too long", b'{"id": ' + b"9" * 5000 + b', "messages": []}', "broken JSON"),
        (
            "lone surrogate",
            json.dumps({"messages": _pair("a \ud800 b", "c")}, ensure_ascii=True).encode(),
            "unpaired UTF-16 surrogate",
        ),
    ]
    kind, raw, reason = rng.choice(options)
    return Case(kind, raw=raw, reason=reason)


def make_cases(fmt: str, n: int, rng: random.Random, shared_ids: list[str]) -> list[Case]:
    """``n`` rows for one file: ~58 % valid, the rest broken in every way ``fmt`` can hold.

    Some rows carry an explicit ``id``: unique ones, repeats of an earlier id in the file, and (outside
    the .jsonl) ids of the .jsonl file, which are duplicates only when the files are read together.
    """
    cases: list[Case] = []
    own_ids: list[str] = []
    for i in range(n):
        roll = rng.random()
        if fmt == "jsonl" and roll < 0.02:
            cases.append(Case("blank line", raw=rng.choice([b"", b"   ", b"\t", b"\r"]), blank=True))
            continue
        if roll < 0.58:
            case = rng.choice(VALID)(rng)
        elif fmt == "jsonl" and roll < 0.75:
            case = bad_jsonl_line(rng)
        elif fmt == "parquet":
            case = bad_parquet_row(rng)
        else:
            case = bad_object(rng)
        if case.row is not None and isinstance(case.row, dict):
            case.row = dict(case.row)
            if rng.random() < 0.3:
                if shared_ids and fmt != "jsonl" and rng.random() < 0.2:
                    case.row["id"] = rng.choice(shared_ids)
                elif own_ids and rng.random() < 0.25:
                    case.row["id"] = rng.choice(own_ids)
                else:
                    case.row["id"] = f"u-{fmt}-{i}"
                    own_ids.append(case.row["id"])
            if case.messages is not None and rng.random() < 0.3:
                case.row["source"] = rng.choice(["web", words(rng), 3, None, ["a", "b"]])
            if case.messages is not None and rng.random() < 0.2:
                case.row["meta"] = {"task": rng.choice(["sum", "sort"]), "score": rng.random()}
        cases.append(case)
    if fmt == "jsonl":
        shared_ids[:] = own_ids
    return cases


# --------------------------------------------------------------------------------------------- #
# Parquet: one typed schema, so only the breakage a typed column can hold
# --------------------------------------------------------------------------------------------- #
MSG = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
CONV = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("messages", MSG),
        ("conversations", CONV),
        ("instruction", pa.string()),
        ("input", pa.string()),
        ("output", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("source", pa.string()),
    ]
)


def bad_parquet_row(rng: random.Random) -> Case:
    options = [
        ("no known keys", {}, "missing or empty messages"),
        ("empty messages", {"messages": []}, "missing or empty messages"),
        (
            "unknown role",
            {"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "unknown role",
        ),
        ("null content", {"messages": _pair(assistant=None)}, "content is NoneType"),
        ("empty content", {"messages": _pair(user=" ")}, "empty content"),
        ("no assistant turn", {"messages": [{"role": "user", "content": words(rng)}]}, "no assistant turn"),
        ("sharegpt unknown speaker", {"conversations": [{"from": "bot", "value": "x"}]}, "unknown role"),
        ("alpaca empty output", {"instruction": words(rng), "output": ""}, "empty content"),
    ]
    kind, row, reason = rng.choice(options)
    return Case(kind, row, reason=reason)


def _as_parquet_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as it reads back from the typed file: every column present, None where the row had none."""
    out = {name: row.get(name) for name in PARQUET_SCHEMA.names}
    if out["source"] is not None and not isinstance(out["source"], str):
        out["source"] = json.dumps(out["source"])
    out.pop("meta", None)
    return out


# --------------------------------------------------------------------------------------------- #
# Files and the oracle
# --------------------------------------------------------------------------------------------- #
def write_file(fmt: str, cases: list[Case], path: Path, rng: random.Random) -> None:
    if fmt == "jsonl":
        lines = []
        for case in cases:
            if case.raw is None:
                case.raw = json.dumps(case.row, ensure_ascii=rng.random() < 0.5).encode()
            lines.append(case.raw)
        # A byte-order mark on the first line and on one later line (`cat` of two Windows files).
        later = next(i for i, c in enumerate(cases) if i > 100 and c.messages is not None)
        lines[later] = b"\xef\xbb\xbf" + lines[later]
        path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + rng.choice([b"\n", b"\r\n", b""]))
    elif fmt == "json":
        path.write_text(json.dumps([c.row for c in cases], ensure_ascii=True), encoding="utf-8")
    else:
        for case in cases:
            case.row = _as_parquet_row(case.row)
        pq.write_table(pa.Table.from_pylist([c.row for c in cases], schema=PARQUET_SCHEMA), path)


def expected_meta(row: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The documented rule: ``meta`` keeps the row's own ``meta`` and every key no format consumed."""
    consumed = next(
        keys
        for keys in (
            ("messages",),
            ("conversations",),
            ("instruction", "input", "output"),
            ("question", "answer"),
        )
        if row.get(keys[0]) is not None
    )
    meta = dict(row["meta"]) if isinstance(row.get("meta"), dict) else {}
    for key, value in row.items():
        if key in consumed or key in ("id", "meta") or (value is None and key in OPTIONAL_FORMAT_KEYS):
            continue
        meta[key] = value
    return meta


@dataclasses.dataclass
class Expected:
    records: list[dict[str, Any]]
    skipped: list[
        tuple[str, int | None, str, str]
    ]  # file, line, reason prefix ("row <i>: " or ""), substring
    kinds: Counter
    blank: int


def oracle(files: list[tuple[Path, str, list[Case], bool]]) -> Expected:
    """What reading ``files`` in order must give: first valid row of each id kept, later ones skipped."""
    out = Expected([], [], Counter(), 0)
    seen: set[str] = set()
    for path, dataset, cases, lines in files:
        for index, case in enumerate(cases):
            line, prefix = (index + 1, "") if lines else (None, f"row {index}: ")
            if case.blank:
                out.blank += 1
                continue
            if case.messages is None:
                out.skipped.append((str(path), line, prefix, case.reason))
                out.kinds[case.kind] += 1
                continue
            row = case.row
            rid = str(row["id"]) if row.get("id") not in (None, "") else f"{dataset}_{index}"
            if rid in seen:
                out.skipped.append((str(path), line, prefix, "duplicate id"))
                out.kinds["duplicate id"] += 1
                continue
            seen.add(rid)
            meta = expected_meta(row, dataset)
            out.records.append({"messages": case.messages, "dataset": dataset, "id": rid, "meta": meta})
            out.kinds[case.kind] += 1
    return out


@pytest.fixture(scope="module")
def fuzz_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str, list[Case], bool]]:
    root = tmp_path_factory.mktemp("fuzz")
    rng = random.Random(SEED)
    shared: list[str] = []
    out = {}
    for fmt, n in SIZES.items():
        cases = make_cases(fmt, n, rng, shared)
        path = root / f"fuzz.{fmt}"
        write_file(fmt, cases, path, rng)
        out[fmt] = (path, f"fz_{fmt}", cases, fmt == "jsonl")
    return out


def check(records: list[dict], skipped: list, expected: Expected) -> None:
    assert len(records) == len(expected.records)
    for got, want in zip(records, expected.records, strict=True):
        assert got == want, (got["id"], want["id"])
    assert len(skipped) == len(expected.skipped)
    # Reported per file: the malformed rows while reading, then the repeated ids; compared by position.
    rows = [row if isinstance(row, dict) else dataclasses.asdict(row) for row in skipped]
    order = {name: k for k, name in enumerate(dict.fromkeys(file for file, *_ in expected.skipped))}

    def position(row: dict[str, Any]) -> tuple[int, int]:
        index = (
            row["line"] if row["line"] is not None else int(row["reason"].split(":")[0].removeprefix("row "))
        )
        return order[row["file"]], index

    want_rows = sorted(
        expected.skipped, key=lambda s: (order[s[0]], s[1] if s[1] is not None else int(s[2][4:-2]))
    )
    for got, (file, line, prefix, reason) in zip(sorted(rows, key=position), want_rows, strict=True):
        assert (got["file"], got["line"]) == (file, line)
        assert got["reason"].startswith(prefix) and reason in got["reason"], (got, reason)
        assert len(got["reason"]) < MAX_REASON and "\n" not in got["reason"]


@pytest.mark.parametrize("fmt", list(SIZES))
def test_every_row_is_a_record_or_a_reported_skip(fuzz_files, fmt: str) -> None:
    path, dataset, cases, _lines = fuzz_files[fmt]
    expected = oracle([fuzz_files[fmt]])
    records, skipped = load_local_file(path, dataset)
    check(records, skipped, expected)
    counts = (len(records), len(skipped), expected.blank)
    log.info(
        "fuzz %s: %d rows -> %d records, %d skipped, %d blank; %s",
        fmt,
        len(cases),
        *counts,
        dict(expected.kinds),
    )
    assert counts == EXPECTED[fmt]
    assert sum(counts) == SIZES[fmt]
    # Every kind of row the generator knows occurred, so the counts mean what they say.
    assert len(expected.kinds) >= {"jsonl": 26, "json": 20, "parquet": 13}[fmt], expected.kinds


def test_the_three_files_read_together_report_every_row(fuzz_files, tmp_path: Path) -> None:
    """load_records over .jsonl + .json + .parquet: ids repeated across files are skipped there too, and
    skipped_rows.jsonl lists every skipped row with file, line or row index, dataset and reason."""
    files = [fuzz_files[fmt] for fmt in SIZES]
    expected = oracle(files)
    cfg = {
        "dataset_from": "local",
        "local": {"datasets": [{"path": str(p), "dataset_name": name} for p, name, _, _ in files]},
    }
    records = load_records(cfg, seed=0, report_dir=tmp_path)
    report = [
        json.loads(line) for line in (tmp_path / SKIPPED_ROWS_FILE).read_text(encoding="utf-8").splitlines()
    ]
    check(records, report, expected)
    assert all(row["dataset"] in ("fz_jsonl", "fz_json", "fz_parquet") for row in report)
    counts = (len(records), len(report), expected.blank)
    log.info("fuzz all: %d rows -> %d records, %d skipped, %d blank", sum(SIZES.values()), *counts)
    assert counts == EXPECTED["all"]
    # Read alone, each file keeps the rows whose ids only repeat another file's: here they are skipped,
    # naming the place in the other file where the id was first seen.
    across = [
        row
        for row in report
        if row["file"] != files[0][0].as_posix() and f"first seen at {files[0][0]}:" in row["reason"]
    ]
    assert across and sum(EXPECTED[fmt][0] for fmt in SIZES) > len(records)


@pytest.mark.parametrize("fmt", list(SIZES))
def test_strict_stops_at_the_first_bad_row_naming_it(fuzz_files, fmt: str) -> None:
    path, dataset, _cases, lines = fuzz_files[fmt]
    # Malformed rows are found while reading, repeated ids only after: strict stops at the first malformed.
    first = next(s for s in oracle([fuzz_files[fmt]]).skipped if s[3] != "duplicate id")
    where = f"{path.name}:{first[1]}" if lines else f"{path.name} [{dataset}]: {first[2]}"
    with pytest.raises(BadRecord) as err:
        load_local_file(path, dataset, strict=True)
    assert where in str(err.value) and first[3] in str(err.value)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("truncated.json", b'[{"messages": [', "not a valid UTF-8 JSON file"),
        (
            "latin1.json",
            '[{"question": "caf\u00e9", "answer": "x"}]'.encode("latin-1"),
            "not a valid UTF-8 JSON",
        ),
        ("deep.json", b"[" * 5000 + b"]" * 5000, "not a valid UTF-8 JSON file"),
        ("object.json", b'{"messages": []}', "must be a list of rows"),
        ("empty.json", b"", "not a valid UTF-8 JSON file"),
        ("random.parquet", bytes(random.Random(SEED).randbytes(2048)), "not a readable Parquet file"),
        ("text.parquet", b"id,messages\n1,hi\n", "not a readable Parquet file"),
    ],
)
def test_a_file_that_cannot_be_read_at_all_is_one_data_error(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_local_file(path, "bad")
    assert name in str(err.value)


def test_a_truncated_parquet_file_is_one_data_error(fuzz_files, tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    data = fuzz_files["parquet"][0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable Parquet file"):
        load_local_file(path, "cut")


def test_empty_and_blank_jsonl_files_give_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "blank.jsonl"
    for content in (b"", b"\n\n  \n", b"\xef\xbb\xbf\n"):
        path.write_bytes(content)
        assert load_local_file(path, "blank") == ([], [])


# --------------------------------------------------------------------------------------------- #
# Names (issue 22): bytes, reserved names, collisions between files
# --------------------------------------------------------------------------------------------- #
NAME_PARTS = [
    *WORDS,
    "a",
    "train",
    "data",
    "x" * 40,
    "数据集",
    "🙂🙃",
    "e\u0301",
    "ｆｕｌｌ",
    "ß",
    "İ",
    "-",
    "_",
    "v1.2",
]
# The spec, restated (the oracle does not call names.py): what Stage 2 writes beside the datasets.
SPEC_RESERVED = {"fingerprint.json", "plan.json"}
SPEC_SUFFIXES = ("_router_data.pt", "_records.jsonl", ".done", ".tmp", ".lock")
SPEC_MAX_BYTES = 200
NAME_SEED, NAME_COUNT = 22, 1000


def random_name(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:  # ordinary and long names in several scripts, up to ~600 bytes
        name = rng.choice("_-").join(rng.choice(NAME_PARTS) for _ in range(rng.randint(1, 16)))
    elif kind < 0.6:  # a reserved name or suffix, in any case
        base = rng.choice([*SPEC_RESERVED, "x" + rng.choice(SPEC_SUFFIXES), "plan.json.bak", "fingerprint"])
        name = "".join(c.upper() if rng.random() < 0.3 else c for c in base)
    elif kind < 0.75:  # around the byte limit with 3- and 4-byte characters
        char = rng.choice(["数", "🙂", "é", "a"])
        target = SPEC_MAX_BYTES + rng.choice([-4, -2, -1, 0, 1, 2, 3, 56])
        name = char * (target // len(char.encode()))
        name += "a" * (target - len(name.encode()))
    elif kind < 0.85:  # separators, dots, whitespace
        name = rng.choice(["../x", "a/b", "a\\b", ".", "..", ".hidden", " x", "x ", "x\u3000", "/etc"])
    elif kind < 0.95:  # control and invisible characters inside a fine name
        name = "ab" + rng.choice(ODD) + "cd"
    else:
        name = rng.choice(["", " ", "ok", "A" * 201])
    return name


def spec_refusal(name: str) -> str | None:
    """The part of the refusal reason the spec predicts, or None for a name that must be accepted."""
    import unicodedata

    if name == "":
        return "empty"
    if name in (".", ".."):
        return "relative directory"
    if "/" in name or "\\" in name:
        return "path separator"
    if name.startswith("."):
        return "starts with '.'"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") for c in name):
        return "control or invisible"
    if name != name.strip():
        return "whitespace"
    if len(name.encode("utf-8")) > SPEC_MAX_BYTES:
        return "bytes long in UTF-8"
    if name.casefold() in SPEC_RESERVED:
        return "the name of a file Stage 2 writes"
    if name.casefold().endswith(SPEC_SUFFIXES):
        return "the suffix of a file Stage 2 writes"
    return None


def test_dataset_names_fuzz_accepted_ones_work_as_files_refused_ones_say_why(tmp_path: Path) -> None:
    """1,000 generated names: each refused one is one ConfigError line naming the key and the reason the
    spec predicts; each accepted one becomes every file Stage 2 makes of a dataset name (its shard
    folder and a marker, its index and its records, through the atomic writes and their temporary
    files) without an OSError and without leaving the router dir."""
    rng = random.Random(NAME_SEED)
    router = tmp_path / "router_data"
    router.mkdir()
    accepted, refused = 0, Counter()
    for name in (random_name(rng) for _ in range(NAME_COUNT)):
        want = spec_refusal(name)
        if want is not None:
            with pytest.raises(ConfigError) as err:
                check_name(name, "dataset.local.datasets[0].dataset_name", dataset=True)
            message = str(err.value)
            assert want in message and "\n" not in message.replace(name, "") and "dataset_name=" in message
            refused[want] += 1
            continue
        assert check_name(name, "k", dataset=True) == name
        atomic_write_json(router / name / "shard-00000.pt.done", {"bytes": 0})
        atomic_write_text(router / f"{name}_router_data.pt", "index")
        atomic_write_jsonl(router / f"{name}_records.jsonl", [{"id": name}])
        for made in (router / name, router / f"{name}_router_data.pt", router / f"{name}_records.jsonl"):
            assert made.resolve().parent == router.resolve()
        accepted += 1
    log.info("fuzz names: %d accepted, refused %s", accepted, dict(refused))
    assert accepted > 300 and len(refused) == 9, refused  # every kind of refusal occurred
    assert not [p for p in router.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_dataset_files_fuzz_colliding_names_are_refused_and_no_row_is_lost(tmp_path: Path) -> None:
    """60 random configs of 2-4 local files (shared stems across dirs and formats, with and without
    dataset_name, rows without `id`): a config in which two datasets get one name (case-insensitively)
    is one ConfigError naming both entries; in every other one each row of each file is a record."""
    rng = random.Random(NAME_SEED)
    collisions = 0
    for trial in range(60):
        root = tmp_path / f"t{trial}"
        entries, names, files = [], [], {}
        for _ in range(rng.randint(2, 4)):
            stem = rng.choice(["train", "Train", "data", "eval"])
            path = root / rng.choice("abc") / f"{stem}{rng.choice(['.jsonl', '.json'])}"
            files[path] = [
                {
                    "messages": [
                        {"role": "user", "content": f"q{trial}-{k}"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
                for k in range(rng.randint(1, 4))
            ]
            entry: dict[str, Any] = {"path": str(path)}
            if rng.random() < 0.4:
                entry["dataset_name"] = rng.choice(["x", "X", "y", "train"])
            entries.append(entry)
            names.append(entry.get("dataset_name") or path.stem)
        for path, rows in files.items():  # a path drawn twice holds its last rows, read once per entry
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
            path.write_text(text)
        rows_per_entry = [len(files[Path(e["path"])]) for e in entries]
        folded = [n.casefold() for n in names]
        clash = next(((i, j) for j in range(len(names)) for i in range(j) if folded[i] == folded[j]), None)
        cfg = {"dataset_from": "local", "local": {"datasets": entries}}
        if clash is not None:
            collisions += 1
            with pytest.raises(ConfigError) as err:
                read_records(cfg, seed=0)
            i, j = clash
            assert f"datasets[{j}]" in str(err.value) and f"datasets[{i}]" in str(err.value)
            continue
        records, skipped = read_records(cfg, seed=0)
        assert not skipped
        assert Counter(r["dataset"] for r in records) == Counter(
            {name: sum(n for m, n in zip(names, rows_per_entry) if m == name) for name in names}
        )
    assert 10 < collisions < 60
