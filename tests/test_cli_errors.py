"""Wrong-type values on the command line (issue 11.5): the typed schema refuses them naming the key,
the process exits non-zero, and no Python traceback is printed."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, USER_ENV


@pytest.mark.parametrize(
    ("command", "key", "kind"),
    [
        (["-m", "quality_gate", "warmup"], "training.epochs", "Float"),
        (["-m", "quality_gate", "collect"], "dataset.max_sequence_length", "Integer"),
        (["-m", "quality_gate", "select"], "seed", "Integer"),
        (["-m", "quality_gate", "select"], "report_top_k", "Integer"),
        (["src/main.py", "--config-name", "stage_3_finetune"], "training.lora.r", "Integer"),
    ],
)
def test_a_wrong_type_names_the_key_without_a_traceback(command: list[str], key: str, kind: str) -> None:
    proc = subprocess.run(
        [sys.executable, *command, f"{key}=abc"],
        cwd=REPO,
        env=USER_ENV,  # what a user's shell has: no HYDRA_FULL_ERROR (Hydra's traceback)
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"full_key: {key}" in output and f"{key}=abc" in output
    assert f"could not be converted to {kind}" in output
    assert "Traceback" not in output
