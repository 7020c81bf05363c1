"""Real labelled pools for the benchmark: CoachLM expert revisions and AlpaGasus judge ratings.

The files are read from a directory the user gives (``../shared/data`` here); they are never shipped
with the package (their Alpaca content is CC BY-NC 4.0).

* ``coachlm``: ``coachlm_expert_revision.json``, 2,301 Alpaca samples as published (label 0) and after
  revision by human experts (label 1). Pairs whose response did not change carry no label and are left
  out. Each side keeps its own instruction (520 revisions also changed it).
* ``alpagasus``: ``alpagasus_random_9k.json`` (a uniform sample of Alpaca), label 1 when the sample is
  also in ``alpagasus_claude_t45.json`` (an LLM judge scored it >= 4.5 of 5; exact match of
  instruction, input and output), else 0.

Each pool is split into a ``tuning`` and a ``heldout`` half (whole pairs for CoachLM) over all its
usable rows with a fixed seed, then each half is subsampled: a run of any size, or of one half
only, never moves a row from one half to the other, so settings chosen on the tuning half can be
checked on the held-out one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from quality_gate.errors import DataError, MissingPathError

COACHLM_FILE = "coachlm_expert_revision.json"
ALPAGASUS_RANDOM_FILE = "alpagasus_random_9k.json"
ALPAGASUS_TOP_FILE = "alpagasus_claude_t45.json"
HALVES = ("tuning", "heldout")


@dataclasses.dataclass
class Pool:
    """Records in the project's Alpaca input format (with ``id``) and their labels, by id.

    ``labels[id] = {"label": 0 | 1, "half": "tuning" | "heldout", "pair": int | None}``.
    """

    name: str
    records: list[dict[str, Any]]
    labels: dict[str, dict[str, Any]]


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise MissingPathError(
            f"{path} does not exist: pass --data-dir, the folder with the benchmark's files "
            f"({COACHLM_FILE}, {ALPAGASUS_RANDOM_FILE}, {ALPAGASUS_TOP_FILE})"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path} is not a JSON file: {err}") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise DataError(f"{path} must hold a JSON list of objects")
    return data


def split_and_sample(
    usable: list[int], size: int, seed: int, halves: tuple[str, ...] = HALVES
) -> list[tuple[int, str]]:
    """``(row, half)`` for ``size`` rows (0: all), half of them from each half of ``usable``.

    The halves are a seeded split of all of ``usable`` (the first ``len // 2`` of a permutation are
    ``tuning``); each half is then subsampled with its own seeded draw, in row order. ``halves``
    limits the output to those halves (a tuning run reads the tuning half only).
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(usable))
    parts = {HALVES[0]: order[: len(usable) // 2], HALVES[1]: order[len(usable) // 2 :]}
    out = []
    for h, (name, members) in enumerate(parts.items()):
        want = len(members) if size <= 0 else min(len(members), size // 2 + (size % 2) * h)
        draw = np.random.default_rng([seed, h]).choice(members, size=want, replace=False)
        if name in halves:
            out += [(usable[int(i)], name) for i in draw]
    return sorted(out)


def _alpaca(instruction: Any, inp: Any, output: Any, record_id: str) -> dict[str, Any]:
    return {"id": record_id, "instruction": str(instruction), "input": str(inp or ""), "output": str(output)}


def coachlm_pool(data_dir: Path, pairs: int, seed: int, halves: tuple[str, ...] = HALVES) -> Pool:
    """``pairs`` random CoachLM pairs (0: all) with a changed response: two records each."""
    rows = _read_json_list(Path(data_dir) / COACHLM_FILE)
    keys = ("Raw Instruction", "Raw Input", "Raw Response", "Revised Instruction", "Revised Input")
    usable = [
        i
        for i, r in enumerate(rows)
        if all(k in r for k in (*keys, "Revised Response"))
        and str(r["Raw Response"]).strip()
        and str(r["Revised Response"]).strip()
        and str(r["Raw Response"]).strip() != str(r["Revised Response"]).strip()
    ]
    records, labels = [], {}
    for i, half in split_and_sample(usable, pairs, seed, halves):
        r = rows[i]
        for label, side in ((0, "Raw"), (1, "Revised")):
            rid = f"coachlm_{i}_{side.lower()}"
            records.append(_alpaca(r[f"{side} Instruction"], r[f"{side} Input"], r[f"{side} Response"], rid))
            labels[rid] = {"label": label, "half": half, "pair": int(i)}
    return Pool("coachlm", records, labels)


def alpagasus_pool(data_dir: Path, samples: int, seed: int, halves: tuple[str, ...] = HALVES) -> Pool:
    """``samples`` random records of AlpaGasus' random 9k (0: all), top-rated ones labelled 1."""
    rows = _read_json_list(Path(data_dir) / ALPAGASUS_RANDOM_FILE)
    top = _read_json_list(Path(data_dir) / ALPAGASUS_TOP_FILE)

    def key(r: dict[str, Any]) -> tuple[str, str, str]:
        return (str(r.get("instruction", "")), str(r.get("input", "")), str(r.get("output", "")))

    top_keys = {key(r) for r in top}
    usable = [
        i
        for i, r in enumerate(rows)
        if str(r.get("instruction", "")).strip() and str(r.get("output", "")).strip()
    ]
    records, labels = [], {}
    for i, half in split_and_sample(usable, samples, seed + 1, halves):
        r = rows[i]
        rid = f"alpagasus_{i}"
        records.append(_alpaca(r["instruction"], r.get("input"), r["output"], rid))
        labels[rid] = {"label": int(key(r) in top_keys), "half": half, "pair": None}
    return Pool("alpagasus", records, labels)
