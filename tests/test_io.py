"""quality_gate.io: checksums and JSON reads."""

from __future__ import annotations

import hashlib
import json

from quality_gate.io import read_json, read_jsonl, sha256_file


def test_sha256_file_is_the_sha256_of_the_bytes_across_chunks(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * (3 * (1 << 22) // 256 + 7)  # three 4 MiB chunks and a partial one
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_read_json_and_jsonl_skip_blank_lines(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"é": [1, 2]}), encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n\n  \n{"id": "ü"}\n', encoding="utf-8")
    assert read_json(tmp_path / "a.json") == {"é": [1, 2]}
    assert read_jsonl(tmp_path / "a.jsonl") == [{"id": 1}, {"id": "ü"}]
