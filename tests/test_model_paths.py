"""Bad model paths (issue 11.4): a local-looking path never goes to the Hub, every failure is one
:class:`UserError` naming the config key, fast, and never advises ``weights_only=False``.

No test here may reach the network: ``HF_HUB_OFFLINE=1`` is set and sockets refuse to connect.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import OFFLINE_USER_ENV, REPO, SELECTOR, TARGET, run_cli

from quality_gate.errors import DataError, MissingPathError, ModelLoadError, UserError
from quality_gate.model_sources import check_model_source, looks_local, resolve_stage1_checkpoint
from quality_gate.models import apply_stage1_weights, load_selector, load_target

FAST_S = 10.0
HUB_ID = "quality-gate-tests/no-such-model"  # a valid Hub id that no cache holds


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode on, and any socket connection an error: a test that reaches for the Hub fails."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test of model paths tried to open a connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    ("path", "local"),
    [
        ("Qwen/Qwen2.5-1.5B", False),
        ("gpt2", False),
        ("assets/tiny-typo", True),  # run from the repo root, where assets/ is a directory
        ("./tiny", True),
        ("../tiny", True),
        ("/models/tiny", True),
        ("~/models/tiny", True),
        ("models/qwen/tiny", True),  # more than one '/': never a Hub id
        ("my model", True),  # not a valid Hub id
    ],
)
def test_which_paths_count_as_local(monkeypatch: pytest.MonkeyPatch, path: str, local: bool) -> None:
    monkeypatch.chdir(REPO)
    assert looks_local(path) is local


@pytest.mark.parametrize(
    ("path", "message"),
    [
        (
            "assets/tiny-typo",
            "selector_model.path=assets/tiny-typo does not exist (relative to the working dir",
        ),
        ("./tiny-typo", "selector_model.path=./tiny-typo does not exist"),
        ("/nonexistent/tiny-typo", "selector_model.path=/nonexistent/tiny-typo does not exist;"),
        ("~/qg-no-such-model-dir", "selector_model.path=~/qg-no-such-model-dir does not exist"),
        ("README.md", "selector_model.path=README.md is a file, not a model dir"),
    ],
)
def test_a_bad_local_path_fails_at_once_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, path: str, message: str
) -> None:
    monkeypatch.chdir(REPO)
    started = time.perf_counter()
    with pytest.raises(MissingPathError) as err:
        load_selector(path, device="cpu", key="selector_model.path")
    assert time.perf_counter() - started < FAST_S
    assert message in str(err.value)
    assert "huggingface.co" not in str(err.value)


def test_a_dir_that_is_not_a_model_says_what_it_is(tmp_path: Path) -> None:
    adapter = tmp_path / "checkpoint-final"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"training\.model\.name=.*no config\.json.*LoRA adapter"):
        load_target(str(adapter), device="cpu", key="training.model.name")
    stage1 = tmp_path / "warmup_run"
    stage1.mkdir()
    torch.save({"model_state_dict": {}}, stage1 / "full_rank_weights.pt")
    with pytest.raises(ModelLoadError, match=r"Stage 1 run dir: pass it as model_checkpoint_path"):
        check_model_source(str(stage1), "selector_model.path")


def test_a_model_dir_with_broken_files_is_one_user_error(tmp_path: Path) -> None:
    """config.json present but no weights: transformers' OSError becomes a ModelLoadError naming the key."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((TARGET / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=rf"model_path={broken} cannot be loaded: "):
        load_target(str(broken), device="cpu", key="model_path")


def test_a_hub_id_offline_and_not_cached_says_what_to_do() -> None:
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        load_target(HUB_ID, device="cpu", key="training.model.name")
    assert time.perf_counter() - started < FAST_S
    text = str(err.value)
    assert text.startswith(f"training.model.name={HUB_ID} is not a local path")
    assert "HF_HUB_OFFLINE=1" in text and f"hf download {HUB_ID}" in text and "local model dir" in text


def test_a_good_local_model_still_loads() -> None:
    model, tokenizer = load_selector(str(SELECTOR), device="cpu", key="selector_model.path")
    assert model.config.model_type == "qwen3" and tokenizer.pad_token is not None


def test_a_data_file_as_stage1_checkpoint_is_not_unpickled(tmp_path: Path) -> None:
    """model_checkpoint_path=<a .jsonl>: a clear error, not torch's UnpicklingError advice."""
    jsonl = tmp_path / "selected_data.jsonl"
    jsonl.write_text(json.dumps({"messages": []}) + "\n")
    with pytest.raises(
        DataError, match=r"model_checkpoint_path=.*selected_data\.jsonl is not a Stage 1 output"
    ):
        resolve_stage1_checkpoint(str(jsonl))
    # A zip that is not a torch checkpoint passes the layout check and fails when read.
    fake = tmp_path / "full_rank_weights.pt"
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("notes.txt", "not a checkpoint")
    model, _ = load_selector(str(SELECTOR), device="cpu")
    for path in (jsonl, fake, tmp_path):
        with pytest.raises(UserError) as err:
            apply_stage1_weights(model, str(path))
        assert "is not a Stage 1 output" in str(err.value), path
        assert "weights_only" not in str(err.value)
    with pytest.raises(MissingPathError, match=r"model_checkpoint_path=.*missing does not exist"):
        resolve_stage1_checkpoint(str(tmp_path / "missing"))


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(args, cwd, {**OFFLINE_USER_ENV, "QG_NO_FREEZE": "1"}, timeout=180)


@pytest.mark.parametrize(
    ("stage", "overrides", "error", "message"),
    [
        (
            "collect",
            [f"selector_model.path={HUB_ID}"],
            ModelLoadError,
            f"selector_model.path={HUB_ID} is not a ",
        ),
        (
            "finetune",
            ["training.model.name=./nope", "dataset.data_path=README.md"],
            MissingPathError,
            "training.model.name=./nope does not exist",
        ),
        (
            "evaluate",
            ["model.name=README.md"],
            MissingPathError,
            "model.name=README.md is a file, not a model dir",
        ),
    ],
)
def test_every_stage_checks_its_model_key_before_the_run_starts(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    stage: str,
    overrides: list[str],
    error: type,
    message: str,
) -> None:
    from helpers import compose

    from quality_gate.cli import run_stage

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("QG_NO_FREEZE", "1")
    with pytest.raises(error) as err:
        run_stage(compose(stage, [*overrides, f"output_dir={tmp_path / 'run'}"]))
    assert message in str(err.value)
    assert not (tmp_path / "run").exists()  # no run dir, config or manifest for a run that cannot start


@pytest.mark.slow
def test_command_line_bad_model_path_is_one_line(tmp_path: Path) -> None:
    proc = _cli(["warmup", "selector_model.path=assets/tiny-typo", f"output_dir={tmp_path / 'run'}"], REPO)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "selector_model.path=assets/tiny-typo does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()  # checked before the run starts (init_run)


@pytest.mark.slow
def test_command_line_data_file_as_stage1_checkpoint(tmp_path: Path) -> None:
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text("{}\n")
    proc = _cli(["collect", f"model_checkpoint_path={jsonl}", f"output_dir={tmp_path / 'run'}"], cwd=REPO)
    assert proc.returncode == 1
    assert f"model_checkpoint_path={jsonl} is not a Stage 1 output" in proc.stderr
    assert "weights_only" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_a_hub_id_shadowed_by_a_local_dir_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``Qwen/...`` run from a dir holding ``Qwen/``: read as a local path (never sent to the Hub), and
    the message says why and how to reach the Hub model instead."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Qwen").mkdir()
    with pytest.raises(
        MissingPathError, match=r"because \./Qwen is a directory here; for the Hub model Qwen/"
    ):
        check_model_source("Qwen/Qwen2.5-1.5B", "training.model.name")
