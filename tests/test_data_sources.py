"""Local files, Hub-style loading (offline, local files), the dataset config block and bad-row reports."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from quality_gate.data import (
    BadRecord,
    SkippedRow,
    load_hf_dataset,
    load_local_file,
    load_records,
    normalize_record,
    records_fingerprint,
)
from quality_gate.data.sources import SKIPPED_ROWS_FILE


def _msgs(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def _good(i: int) -> dict:
    return {"messages": _msgs(f"question {i}", f"answer {i}")}


@pytest.fixture
def messy_jsonl(tmp_path: Path) -> Path:
    """Eight lines: 3 good, then one of each bad kind, with a blank line in between."""
    lines = [
        json.dumps(_good(0)).encode(),
        b'{"messages": [{"role": "user", "content": "cut',  # broken JSON
        json.dumps(_good(2)).encode(),
        b"",  # blank: not a row
        '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"),  # not UTF-8
        json.dumps({"messages": [{"role": "user", "content": "no answer"}]}).encode(),
        json.dumps(
            {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ).encode(),
        json.dumps(_good(7)).encode(),
    ]
    path = tmp_path / "messy.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_skips_and_reports_every_bad_line(messy_jsonl: Path) -> None:
    records, skipped = load_local_file(messy_jsonl, "messy")
    assert [r["id"] for r in records] == ["messy_0", "messy_2", "messy_7"]  # row = line - 1, stable ids
    assert [(s.line, s.dataset, s.file) for s in skipped] == [(2, "messy", str(messy_jsonl))] + [
        (n, "messy", str(messy_jsonl)) for n in (5, 6, 7)
    ]
    reasons = [s.reason for s in skipped]
    assert reasons[0].startswith("broken JSON")
    assert reasons[1].startswith("not UTF-8")
    assert reasons[2] == "no assistant turn"
    assert "unknown role 'narrator'" in reasons[3]


def test_strict_fails_on_the_first_bad_row_naming_file_and_line(messy_jsonl: Path) -> None:
    with pytest.raises(BadRecord, match=rf"{messy_jsonl.name}:2 .*broken JSON"):
        load_local_file(messy_jsonl, "messy", strict=True)


def test_json_list_and_parquet_give_the_same_records(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Name a colour", "input": "", "output": "Blue"},
        {"instruction": "Add", "input": "2 and 3", "output": ""},
        {"instruction": "Echo", "input": "hi", "output": "hi"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    from_json, skipped_json = load_local_file(tmp_path / "a.json", "alp")
    from_parquet, skipped_parquet = load_local_file(tmp_path / "a.parquet", "alp")
    assert from_json == from_parquet
    assert [r["id"] for r in from_json] == ["alp_0", "alp_2"]
    assert from_json[1]["messages"][0]["content"] == "Echo\n\nhi"
    assert [(s.line, s.reason) for s in skipped_json] == [(None, "row 1: turn 1 (assistant): empty content")]
    assert [s.reason for s in skipped_parquet] == [s.reason for s in skipped_json]


def test_json_that_is_not_a_list_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "d.json").write_text(json.dumps({"messages": []}))
    with pytest.raises(ValueError, match="list of rows"):
        load_local_file(tmp_path / "d.json", "d")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_local_file(tmp_path / "d.json", "d") if False else load_local_file(
            _touch(tmp_path / "d.csv"), "d"
        )
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_local_file(tmp_path / "missing.jsonl", "d")


def _touch(path: Path) -> Path:
    path.write_text("a,b\n")
    return path


def test_load_hf_dataset_reads_local_data_files(tmp_path: Path) -> None:
    path = tmp_path / "hub_like.jsonl"
    sharegpt = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path.write_text("\n".join(json.dumps(r) for r in [_good(0), sharegpt, {"messages": []}, {"x": 1}]))
    records, skipped = load_hf_dataset(str(path), "hub", "train")
    # The json builder gives every row every column (None where absent); None counts as absent.
    assert [(r["id"], r["messages"][-1]["content"], r["meta"]) for r in records] == [
        ("hub_0", "answer 0", {"x": None}),
        ("hub_1", "Hello", {"x": None}),
    ]
    assert skipped[0].reason == "row 2: missing or empty messages"
    assert (
        skipped[1].reason.startswith("row 3: missing or empty messages")
        and "keys: ['x']" in skipped[1].reason
    )
    assert skipped[0] == SkippedRow(file=str(path), line=None, dataset="hub", reason=skipped[0].reason)


def _cfg(tmp_path: Path, datasets: list[dict], **kw) -> dict:
    return {
        "dataset_from": "local",
        "local": {"datasets": datasets},
        "subset_ratio": 1.0,
        "shuffle": False,
        "strict": False,
        **kw,
    }


def test_load_records_writes_skipped_rows_and_logs_them(
    messy_jsonl: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    report = tmp_path / "run"
    report.mkdir()
    with caplog.at_level(logging.WARNING, logger="quality_gate.data.sources"):
        records = load_records(
            _cfg(tmp_path, [{"path": str(messy_jsonl), "dataset_name": "messy"}]), seed=0, report_dir=report
        )
    assert len(records) == 3
    lines = [json.loads(x) for x in (report / SKIPPED_ROWS_FILE).read_text().splitlines()]
    assert [(x["file"], x["line"], x["dataset"]) for x in lines] == [
        (str(messy_jsonl), n, "messy") for n in (2, 5, 6, 7)
    ]
    assert all(x["reason"] for x in lines)
    assert "4 rows skipped" in caplog.text
    assert f"{messy_jsonl}:2 [messy]: broken JSON" in caplog.text


def test_load_records_strict_raises(messy_jsonl: Path, tmp_path: Path) -> None:
    with pytest.raises(BadRecord, match=r"dataset\.strict=true"):
        load_records(_cfg(tmp_path, [{"path": str(messy_jsonl), "dataset_name": "m"}], strict=True), seed=0)


def test_zero_valid_rows_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"messages": []}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match=r"no valid rows .*2 skipped"):
        load_records(
            _cfg(tmp_path, [{"path": str(path), "dataset_name": "bad"}]), seed=0, report_dir=tmp_path
        )
    assert len((tmp_path / SKIPPED_ROWS_FILE).read_text().splitlines()) == 2


def test_a_duplicate_id_costs_that_row_only_and_names_both_places(tmp_path: Path) -> None:
    """Issue 11.8: a repeated id no longer aborts the dataset: the first record is kept, the later row
    is a skipped row naming its file and line and where the id was first seen; strict makes it an error."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(json.dumps({**_good(0), "id": "same"}) + "\n" + json.dumps(_good(1)) + "\n")
    b.write_text(json.dumps(_good(3)) + "\n" + json.dumps({**_good(2), "id": "same"}) + "\n")
    cfg = _cfg(tmp_path, [{"path": str(a), "dataset_name": "a"}, {"path": str(b), "dataset_name": "b"}])
    records = load_records(cfg, seed=0, report_dir=tmp_path)
    assert [r["id"] for r in records] == ["same", "a_1", "b_0"]
    assert records[0]["messages"] == normalize_record(_good(0), "a", 0)["messages"]
    (row,) = [json.loads(line) for line in (tmp_path / SKIPPED_ROWS_FILE).read_text().splitlines()]
    assert row["file"] == str(b) and row["line"] == 2 and row["dataset"] == "b"
    assert f"first seen at {a}:1" in row["reason"]
    with pytest.raises(BadRecord, match=rf"{b.name}:2 .*duplicate id 'same'"):
        load_records({**cfg, "strict": True}, seed=0)


def test_subset_ratio_is_seeded_per_dataset_and_shuffle_is_seeded(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(_good(i)) + "\n" for i in range(100)))
    b.write_text("".join(json.dumps(_good(i)) + "\n" for i in range(40)))
    only_a = [{"path": str(a), "dataset_name": "a"}]
    both = [*only_a, {"path": str(b), "dataset_name": "b"}]
    first = load_records(_cfg(tmp_path, only_a, subset_ratio=0.1), seed=1)
    assert [r["id"] for r in first] == [
        r["id"] for r in load_records(_cfg(tmp_path, only_a, subset_ratio=0.1), seed=1)
    ]
    assert len(first) == 10
    assert [r["id"] for r in first] == sorted((r["id"] for r in first), key=lambda x: int(x.split("_")[1]))
    assert [r["id"] for r in first] != [
        r["id"] for r in load_records(_cfg(tmp_path, only_a, subset_ratio=0.1), seed=2)
    ]
    # Adding a dataset does not change the subset of the first one.
    with_b = load_records(_cfg(tmp_path, both, subset_ratio=0.1), seed=1)
    assert [r["id"] for r in with_b if r["dataset"] == "a"] == [r["id"] for r in first]
    assert sum(r["dataset"] == "b" for r in with_b) == 4
    shuffled = load_records(_cfg(tmp_path, both, shuffle=True), seed=3)
    assert [r["id"] for r in shuffled] == [
        r["id"] for r in load_records(_cfg(tmp_path, both, shuffle=True), seed=3)
    ]
    assert [r["id"] for r in shuffled] != [r["id"] for r in load_records(_cfg(tmp_path, both), seed=3)]
    assert sorted(r["id"] for r in shuffled) == sorted(
        r["id"] for r in load_records(_cfg(tmp_path, both), seed=3)
    )


def test_load_records_hf_source_and_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "hub.jsonl"
    path.write_text(json.dumps(_good(0)) + "\n" + json.dumps(_good(1)) + "\n")
    cfg = {
        "dataset_from": "hf",
        "hf": {"datasets": [{"name": str(path), "dataset_name": "hub", "split": "train"}]},
    }
    assert [r["id"] for r in load_records(cfg, seed=0)] == ["hub_0", "hub_1"]
    # Stages pass the Hydra config block itself.
    assert load_records(OmegaConf.create(cfg), seed=0) == load_records(cfg, seed=0)
    with pytest.raises(ValueError, match=r"dataset\.dataset_from='s3'"):
        load_records({"dataset_from": "s3"}, seed=0)
    with pytest.raises(ValueError, match=r"dataset.local.datasets is empty"):
        load_records({"dataset_from": "local", "local": {"datasets": []}}, seed=0)
    with pytest.raises(ValueError, match=r"dataset.subset_ratio=0.0"):
        load_records({**cfg, "subset_ratio": 0.0}, seed=0)


def test_records_fingerprint_changes_with_content(tiny_records: list[dict]) -> None:
    fp = records_fingerprint(tiny_records)
    assert len(fp) == 16 and fp == records_fingerprint([dict(r) for r in tiny_records])
    changed = [dict(r) for r in tiny_records]
    changed[0] = {**changed[0], "messages": _msgs("What is two plus two?", "Five.")}
    assert records_fingerprint(changed) != fp
    assert records_fingerprint(tiny_records[::-1]) != fp


@pytest.mark.parametrize(
    ("name", "rows", "valid"),
    [
        ("alpaca_cherry_5pct.json", 3111, None),
        ("sharegpt_dummy_conversation.json", 500, None),
        ("gsm8k_test.jsonl", 1319, 1319),
        ("vicuna_test_prompts.jsonl", 80, 0),  # prompts only: every row is reported, none is usable
    ],
)
def test_every_row_of_the_shared_files_loads_or_is_reported(
    shared_data_dir: Path, name: str, rows: int, valid
) -> None:
    records, skipped = load_local_file(shared_data_dir / name, name.split(".")[0])
    assert len(records) + len(skipped) == rows
    if valid is not None:
        assert len(records) == valid
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
        assert r["messages"][-1]["role"] == "assistant" and r["messages"][-1]["content"].strip()
    assert all(s.reason for s in skipped)
    if name.startswith("vicuna"):
        assert all("missing or empty messages" in s.reason for s in skipped)


def test_a_byte_order_mark_loses_no_row(tmp_path: Path) -> None:
    """Issue 11.2: files written by Windows editors start with a UTF-8 BOM; every row is still read."""
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_good(0)) + "\n" + json.dumps(_good(1)) + "\n").encode())
    records, skipped = load_local_file(jsonl, "bom", strict=True)  # strict: a lost row would raise
    assert [r["id"] for r in records] == ["bom_0", "bom_1"] and skipped == []
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps([_good(0), _good(1)]).encode())
    records, skipped = load_local_file(as_json, "bomj", strict=True)
    assert len(records) == 2 and skipped == []


@pytest.mark.parametrize(
    "name", ["../../tmp/escape", "/etc/passwd", "a/b", "..", ".hidden", "tab\tname", "nul\x00", " padded"]
)
def test_dataset_names_that_would_escape_or_hide_are_refused(tmp_path: Path, name: str) -> None:
    """Issue 11.1: a dataset name becomes a file name (shards, index, records); it may not be a path."""
    from quality_gate.config import make_config
    from quality_gate.errors import ConfigError

    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps(_good(0)) + "\n")
    entry = [{"path": str(path), "dataset_name": name}]
    with pytest.raises(ConfigError, match=r"dataset_name=.*cannot be used as a file or directory name"):
        make_config("collect", {"dataset.local.datasets": entry})
    with pytest.raises(ConfigError, match="cannot be used as a file or directory name"):
        load_records(_cfg(tmp_path, entry), seed=0)  # the data layer checks too (library callers)


def test_rows_that_crashed_the_json_reader_cost_that_row_only(tmp_path: Path) -> None:
    """Found by tests/test_fuzz_data.py: arrays nested past Python's recursion limit (RecursionError), a
    5,000-digit number (ValueError) and a lone surrogate escape (a str no UTF-8 writer or tokenizer takes)
    each crashed or slipped through; a byte-order mark in the middle of a file (`cat` of two) lost a row."""
    lines = [
        b"[" * 5000 + b"]" * 5000,
        b'{"id": ' + b"9" * 5000 + b', "messages": []}',
        json.dumps({"messages": _msgs("a \ud800 b", "c")}).encode(),
        b"\xef\xbb\xbf" + json.dumps(_good(3)).encode(),
        json.dumps(
            {
                **_good(4),
                "meta": {
                    "k": [
                        [
                            [
                                [
                                    [
                                        [
                                            [
                                                [
                                                    [
                                                        [
                                                            [
                                                                [
                                                                    [
                                                                        [
                                                                            [
                                                                                [
                                                                                    [
                                                                                        [
                                                                                            [
                                                                                                [
                                                                                                    [
                                                                                                        [
                                                                                                            [
                                                                                                                [
                                                                                                                    [
                                                                                                                        [
                                                                                                                            [
                                                                                                                                [
                                                                                                                                    [
                                                                                                                                        [
                                                                                                                                            [
                                                                                                                                                [
                                                                                                                                                    [
                                                                                                                                                        [
                                                                                                                                                            [
                                                                                                                                                                [
                                                                                                                                                                    [
                                                                                                                                                                        [
                                                                                                                                                                            [
                                                                                                                                                                                [
                                                                                                                                                                                    [
                                                                                                                                                                                        [
                                                                                                                                                                                            [
                                                                                                                                                                                                [
                                                                                                                                                                                                    [
                                                                                                                                                                                                        [
                                                                                                                                                                                                            [
                                                                                                                                                                                                                [
                                                                                                                                                                                                                    [
                                                                                                                                                                                                                        [
                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                [
                                                                                                                                                                                                                                                                    [
                                                                                                                                                                                                                                                                        [
                                                                                                                                                                                                                                                                            [
                                                                                                                                                                                                                                                                                []
                                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                                ]
                                                                                                                                                                                                                            ]
                                                                                                                                                                                                                        ]
                                                                                                                                                                                                                    ]
                                                                                                                                                                                                                ]
                                                                                                                                                                                                            ]
                                                                                                                                                                                                        ]
                                                                                                                                                                                                    ]
                                                                                                                                                                                                ]
                                                                                                                                                                                            ]
                                                                                                                                                                                        ]
                                                                                                                                                                                    ]
                                                                                                                                                                                ]
                                                                                                                                                                            ]
                                                                                                                                                                        ]
                                                                                                                                                                    ]
                                                                                                                                                                ]
                                                                                                                                                            ]
                                                                                                                                                        ]
                                                                                                                                                    ]
                                                                                                                                                ]
                                                                                                                                            ]
                                                                                                                                        ]
                                                                                                                                    ]
                                                                                                                                ]
                                                                                                                            ]
                                                                                                                        ]
                                                                                                                    ]
                                                                                                                ]
                                                                                                            ]
                                                                                                        ]
                                                                                                    ]
                                                                                                ]
                                                                                            ]
                                                                                        ]
                                                                                    ]
                                                                                ]
                                                                            ]
                                                                        ]
                                                                    ]
                                                                ]
                                                            ]
                                                        ]
                                                    ]
                                                ]
                                            ]
                                        ]
                                    ]
                                ]
                            ]
                        ]
                    ]
                },
            }
        ).encode(),
        json.dumps({"messages": _msgs("emoji \U0001f600 escaped as a pair", "ok")}).encode(),
    ]
    path = tmp_path / "edge.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    records, skipped = load_local_file(path, "edge")
    assert [r["id"] for r in records] == ["edge_3", "edge_5"]
    assert records[1]["messages"][0]["content"] == "emoji \U0001f600 escaped as a pair"
    assert [(s.line, s.reason.split(" (")[0]) for s in skipped] == [
        (1, "broken JSON"),
        (2, "broken JSON"),
        (3, "unpaired UTF-16 surrogate '\\ud800'"),
        (5, "nested deeper than 64 levels"),
    ]
