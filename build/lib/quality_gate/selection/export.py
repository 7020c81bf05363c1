"""Exports of the kept records for other trainers.

* ``llamafactory/``: ``dataset_info.json`` + ``quality_gate_selection.jsonl``, sharegpt formatting
  with OpenAI-style tags (``messages`` of ``{role, content}``); a leading system message becomes
  LLaMA-Factory's system prompt. Use with ``dataset_dir: <dir>/llamafactory`` and
  ``dataset: quality_gate_selection``.
* ``hf_dataset/``: ``data.jsonl`` for ``datasets.load_dataset("json", data_files=...)`` (and TRL's
  SFTTrainer, which reads a ``messages`` column). ``meta`` is stored as a JSON string because its
  keys differ between sources and Arrow needs one schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quality_gate.io import atomic_write_json, atomic_write_jsonl

LLAMAFACTORY_NAME = "quality_gate_selection"


def _messages(record: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in record["messages"]]


def export_llamafactory(records: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """Write a LLaMA-Factory dataset dir; returns the path of ``dataset_info.json``."""
    out_dir = Path(out_dir)
    data_file = f"{LLAMAFACTORY_NAME}.jsonl"
    atomic_write_jsonl(out_dir / data_file, [{"messages": _messages(r), "id": r.get("id")} for r in records])
    info = {
        LLAMAFACTORY_NAME: {
            "file_name": data_file,
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    atomic_write_json(out_dir / "dataset_info.json", info)
    return out_dir / "dataset_info.json"


def export_hf_dataset(records: Sequence[dict[str, Any]], q: np.ndarray, out_dir: Path) -> Path:
    """Write ``data.jsonl`` (id, dataset, rank, q, messages, meta_json); returns its path.

    ``q`` (n_kept,) is the quality score of each kept record (NaN is written as null).
    """
    rows = [
        {
            "id": str(r.get("id")),
            "dataset": str(r.get("dataset")),
            "rank": rank,
            "q": float(score) if np.isfinite(score) else None,
            "messages": _messages(r),
            "meta_json": json.dumps(r.get("meta") or {}, ensure_ascii=False, default=str),
        }
        for rank, (r, score) in enumerate(zip(records, q))
    ]
    path = Path(out_dir) / "data.jsonl"
    atomic_write_jsonl(path, rows)
    return path
