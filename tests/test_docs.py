"""The README documents every config key with its default (generated; this checks it is current)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_config_key_has_a_meaning():
    sys.path.insert(0, str(ROOT / "scripts"))
    from gen_config_docs import parse_keys

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("# python "), f"{path.name}: first line must be the command that runs it"
        missing = [key for key, _, comment in parse_keys(text) if not comment]
        assert not missing, f"{path.name}: keys without a comment: {missing}"
