"""The config reference is generated from the schemas and current; every key and config documents itself."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing

from helpers import REPO

from quality_gate.compat import CONFIG_STAGES
from quality_gate.config import SCHEMAS, help_rows

CONFIG_DIR = REPO / "src" / "quality_gate" / "configs"


def test_the_config_reference_is_current():
    proc = subprocess.run(
        [sys.executable, "scripts/gen_config_docs.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_schema_key_has_a_meaning():
    for stage, schema in SCHEMAS.items():
        missing = [key for key, _, text in help_rows(schema) if not text.strip()]
        assert not missing, f"{stage}: keys without help: {missing}"


def test_every_nested_group_is_documented():
    """Every dataclass field (groups included) carries help metadata."""

    def walk(cls: type, prefix: str) -> list[str]:
        bad = []
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("help"):
                bad.append(prefix + f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                bad += walk(hints[f.name], f"{prefix}{f.name}.")
        return bad

    for stage, schema in SCHEMAS.items():
        assert not walk(schema, ""), f"{stage}: {walk(schema, '')}"


def test_every_config_file_starts_with_its_command_and_is_known():
    names = {p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("_")}
    assert names == set(CONFIG_STAGES)
    for name in names:
        first = (CONFIG_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith(("# quality-gate ", "# The seed's")), (
            f"{name}.yaml: first line must give the command"
        )
