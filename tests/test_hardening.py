"""Issue 22, hardening second round: every probe that gave a wrong result with exit 0, wrote outside the
run dir, or answered a user error with a traceback, run again on the real stages and the tiny assets.

One test (or parametrised group) per point of the issue, in its order; docs/hardening.md lists them.
The stages run in this process where that is the same code path (cheaper), and as a command line
where the promise is about the command line itself (one line, exit 1, nothing left behind).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import OFFLINE_USER_ENV, REPO, SELECTOR, TARGET, TRAIN, compose, run_cli, select_config
from safetensors.torch import load_file, save_file

from quality_gate.errors import (
    ConfigError,
    DataError,
    RouterDataError,
    RunLockedError,
    SelectionError,
)
from quality_gate.io import install_entries, sha256_file
from quality_gate.selection import compute_selection, run_selection
from quality_gate.stats.store import marker_path

pytestmark = pytest.mark.skipif(
    not (SELECTOR.exists() and TARGET.exists() and TRAIN.exists()), reason="tiny assets missing"
)

# What a user's shell has: no HYDRA_FULL_ERROR / QG_TRACEBACK (they print tracebacks on purpose), no network.
ENV = OFFLINE_USER_ENV
# 20 samples in 4 shards of 5.
STAGE2 = ["dataset.subset_ratio=0.01", "data_process.shard_size=5", "data_process.batch_size=5"]
FT = [
    f"training.model.name={TARGET}",
    "training.lora.r=4",
    "training.lora.alpha=8",
    "training.learning_rate=2e-3",
    "training.lr_scheduler_type=constant",
    "training.batch_size=4",
    "training.per_device_batch_size=4",
    "training.logging_steps=1",
    "training.report_to=[]",
    "dataset.max_sequence_length=96",
    "training.max_steps=4",
    "training.save_steps=2",
]


def cli(*args: str, cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    """``quality-gate <args>`` as a user runs it (this checkout's code)."""
    return run_cli(args, cwd, ENV, timeout)


def one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The process failed with exit 1 and one ``error: ...`` line holding ``expected``, no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def collect(out_dir: Path, *overrides: str) -> dict:
    """Stage 2 in this process; its metrics."""
    from quality_gate.stages.collect import run

    run(compose("collect", [*STAGE2, *overrides, f"output_dir={out_dir}"]))
    return json.loads((out_dir / "stage2_metrics.json").read_text())


def tree(root: Path) -> dict[str, bytes | str]:
    """Every file under ``root`` (links as their target) and its bytes: to show nothing changed."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished Stage 2 run on the tiny selector (20 samples, 4 shards); copy it before changing it."""
    out = tmp_path_factory.mktemp("hardening") / "collect"
    collect(out)
    return out


def copy_run(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------- #
# 1. The selector's weights are in Stage 2's fingerprint
# --------------------------------------------------------------------------------------------- #
def test_a_changed_selector_weight_is_refused_on_resume(tmp_path: Path) -> None:
    """Killed midway, one tensor of the selector multiplied by 3, the same command again: refused, naming
    the file whose content changed; no shard is scored with the other model."""
    selector = Path(shutil.copytree(SELECTOR, tmp_path / "selector"))
    run = tmp_path / "run"
    collect(run, f"selector_model.path={selector}")
    router = run / "router_data"
    # What a kill after the first two shards leaves: no index, no records, two shards unfinished.
    for name in ("synthetic_router_data.pt", "synthetic_records.jsonl"):
        (router / name).unlink()
    for k in (2, 3):
        marker_path(router / "synthetic" / f"shard-{k:05d}.pt").unlink()
    weights = selector / "model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if k.endswith("layers.0.mlp.down_proj.weight"))
    state[key] = state[key] * 3
    save_file(state, str(weights), metadata={"format": "pt"})
    before = tree(router)

    with pytest.raises(RouterDataError, match=r"selector_weights\.model\.safetensors: stored '[0-9a-f]{64}'"):
        collect(run, f"selector_model.path={selector}")
    assert tree(router) == before
    fields = json.loads((router / "fingerprint.json").read_text())["fields"]
    assert set(fields["selector_weights"]) == {"config.json", "model.safetensors"}


def test_a_hub_ids_weights_are_fingerprinted_by_the_cache_blob_names(tmp_path: Path) -> None:
    """A Hub id is fingerprinted from the Hugging Face cache without reading the weights: the snapshot's
    files are links to blobs named by their content hash (a real cache layout, read by huggingface_hub)."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--qg--tiny-selector"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / commit).mkdir(parents=True)
    for f in SELECTOR.iterdir():
        blob = sha256_file(f)
        shutil.copy(f, repo / "blobs" / blob)
        (repo / "snapshots" / commit / f.name).symlink_to(Path("../../blobs") / blob)
    code = (
        "import json; from quality_gate.models import model_weights_fingerprint; "
        "print(json.dumps(model_weights_fingerprint('qg/tiny-selector', 'selector_model.path')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**ENV, "HF_HUB_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {
        "config.json": "blob:" + sha256_file(SELECTOR / "config.json"),
        "model.safetensors": "blob:" + sha256_file(SELECTOR / "model.safetensors"),
    }


# --------------------------------------------------------------------------------------------- #
# 2, 3 (and 12: trainer_state.json, adapter_config.json, a pickle): Stage 3 resumes
# --------------------------------------------------------------------------------------------- #
def selected(path: Path, n: int, skip: int = 0) -> Path:
    rows = [json.loads(line) for line in TRAIN.read_text().splitlines()[skip : skip + n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An uninterrupted LoRA run of 4 steps with checkpoints at 2 and 4: ``(run dir, data file)``."""
    from quality_gate.stages.finetune import fine_tune

    root = tmp_path_factory.mktemp("ft")
    data = selected(root / "selected_data.jsonl", 16)
    fine_tune(compose("finetune", [*FT, f"dataset.data_path={data}", f"output_dir={root / 'run'}"]))
    return root / "run", data


def killed_after_step_4(run: Path, dst: Path) -> Path:
    """What a kill after the save at step 4 (before the final export) leaves."""
    shutil.copytree(run, dst)
    shutil.rmtree(dst / "checkpoint-final")
    (dst / "train_metrics.json").unlink()
    return dst


def test_resume_on_a_rewritten_selection_is_refused(ft_run, tmp_path: Path, monkeypatch) -> None:
    """The same data_path rewritten by another selection: refused before any model is loaded, naming the
    file, both sha256 and how to start anew."""
    from quality_gate.stages.finetune import fine_tune

    run, data = ft_run
    interrupted = killed_after_step_4(run, tmp_path / "run")
    new_data = selected(tmp_path / "selected_data.jsonl", 24, skip=100)
    started_on = json.loads((run / "manifest.json").read_text())["dataset_source"]["sha256"]

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the resume must be refused first")

    monkeypatch.setattr("quality_gate.stages.finetune.load_target", no_load)
    before = tree(interrupted)
    with pytest.raises(ConfigError) as err:
        fine_tune(compose("finetune", [*FT, f"dataset.data_path={new_data}", f"output_dir={interrupted}"]))
    message = str(err.value)
    assert str(new_data) in message and sha256_file(new_data) in message and started_on in message
    assert "checkpoint-4" in message and "new run" in message
    assert tree(interrupted) == before
    assert sha256_file(data) == started_on


def _overwrite_values(path: Path, name_part: str, value: float) -> None:
    """Write ``value`` into the first 4 elements of the first tensor whose name holds ``name_part``, in
    place: same size, same header, as a bit flip or a bad copy would."""
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    key = next(k for k in header if name_part in k and k != "__metadata__")
    assert header[key]["dtype"] == "F32"
    start = 8 + header_len + header[key]["data_offsets"][0]
    patched = bytearray(raw)
    patched[start : start + 16] = struct.pack("<4f", *([value] * 4))
    path.write_bytes(bytes(patched))


class _Payload:
    """A pickle that would create ``marker`` if it were ever unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _damage(checkpoint: Path, kind: str, tmp_path: Path) -> str:
    """Damage one file of ``checkpoint``; returns the file's name."""
    adapter = checkpoint / "adapter_model.safetensors"
    if kind == "absurd_lora_A":
        _overwrite_values(adapter, "lora_A", 1e30)
        return adapter.name
    if kind == "nan_lora_B":
        _overwrite_values(adapter, "lora_B", float("nan"))
        return adapter.name
    if kind == "truncated_adapter":
        adapter.write_bytes(adapter.read_bytes()[: adapter.stat().st_size // 2])
        return adapter.name
    if kind == "truncated_trainer_state":
        state = checkpoint / "trainer_state.json"
        state.write_bytes(state.read_bytes()[:40])
        return state.name
    if kind == "garbled_adapter_config":
        config = checkpoint / "adapter_config.json"
        config.write_bytes(b"\x00\xff{garbled" + config.read_bytes()[10:])
        return config.name
    if kind == "pickle_optimizer":
        torch.save({"state": _Payload(tmp_path / "PICKLE_RAN")}, checkpoint / "optimizer.pt")
        return "optimizer.pt"
    raise ValueError(kind)


DAMAGE = [
    "absurd_lora_A",
    "nan_lora_B",
    "truncated_adapter",
    "truncated_trainer_state",
    "garbled_adapter_config",
    "pickle_optimizer",
]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_checkpoint_falls_back_to_the_one_before(ft_run, tmp_path: Path, caplog, kind: str) -> None:
    """1e30 or NaN written into the adapter, a truncated adapter or trainer_state.json, a garbled
    adapter_config.json, a pickle of other objects as optimizer.pt: the resume names the file in a
    warning, moves the checkpoint aside, resumes from the one before and ends where the uninterrupted run
    ended (not at 5.86 against 3.35 as before); the pickle is never unpickled."""
    from quality_gate.stages.finetune import fine_tune

    run, data = ft_run
    interrupted = killed_after_step_4(run, tmp_path / "run")
    name = _damage(interrupted / "checkpoint-4", kind, tmp_path)
    with caplog.at_level(logging.WARNING, logger="quality_gate.training"):
        fine_tune(compose("finetune", [*FT, f"dataset.data_path={data}", f"output_dir={interrupted}"]))
    assert f"checkpoint-4 cannot be resumed from: {name}" in caplog.text
    assert (interrupted / "damaged-checkpoint-4").is_dir() and (interrupted / "checkpoint-4").is_dir()
    metrics = json.loads((interrupted / "train_metrics.json").read_text())
    uninterrupted = json.loads((run / "train_metrics.json").read_text())
    assert metrics["resumed_from"] == str(interrupted / "checkpoint-2")
    assert metrics["global_step"] == 4
    assert metrics["train_loss"] == pytest.approx(uninterrupted["train_loss"], abs=1e-4)
    assert not (tmp_path / "PICKLE_RAN").exists()


def test_when_every_checkpoint_is_damaged_the_resume_is_refused_naming_them(ft_run, tmp_path: Path) -> None:
    from quality_gate.stages.finetune import fine_tune

    run, data = ft_run
    interrupted = killed_after_step_4(run, tmp_path / "run")
    _damage(interrupted / "checkpoint-4", "truncated_adapter", tmp_path)
    _damage(interrupted / "checkpoint-2", "truncated_trainer_state", tmp_path)
    with pytest.raises(DataError, match=r"every checkpoint of .* is damaged") as err:
        fine_tune(compose("finetune", [*FT, f"dataset.data_path={data}", f"output_dir={interrupted}"]))
    assert "adapter_model.safetensors" in str(err.value) and "trainer_state.json" in str(err.value)
    assert not (interrupted / "checkpoint-final").exists()


# --------------------------------------------------------------------------------------------- #
# 4. An edited records file
# --------------------------------------------------------------------------------------------- #
def test_an_edited_records_file_is_refused_by_select(stage2_run: Path, tmp_path: Path) -> None:
    run = copy_run(stage2_run, tmp_path / "run")
    records = run / "router_data" / "synthetic_records.jsonl"
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    rows[3]["messages"][-1]["content"] = "an edited reply the sample was never scored on"
    records.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    before = tree(run)
    with pytest.raises(SelectionError, match="was changed after Stage 2 wrote it") as err:
        run_selection(select_config(root_dir=str(run), selection_percentage=1.0))
    assert str(records) in str(err.value) and "new run dir" in str(err.value)
    assert tree(run) == before


# --------------------------------------------------------------------------------------------- #
# 5. Two files with one stem
# --------------------------------------------------------------------------------------------- #
def test_two_files_with_one_stem_are_refused_not_silently_merged(tmp_path: Path) -> None:
    """a/train.jsonl and b/train.jsonl (rows without `id`): refused up front, naming both entries; with
    a dataset_name each, every row of both files is read."""
    from quality_gate.config import validate
    from quality_gate.data.sources import read_records

    lines = TRAIN.read_text().splitlines()
    for sub, part in (("a", lines[:10]), ("b", lines[10:25])):
        (tmp_path / sub).mkdir()
        rows = [json.loads(line) for line in part]
        for row in rows:
            row.pop("id", None)
        (tmp_path / sub / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "train.jsonl"
    same = compose("collect", [f"dataset.local.datasets=[{{path: {a}}},{{path: {b}}}]"])
    for check in (validate, lambda cfg: read_records(cfg.dataset, seed=0)):
        with pytest.raises(
            ConfigError, match=r"datasets\[1\]\.path=.*gets the dataset name 'train' of .*\[0\]"
        ):
            check(same)
    named = compose(
        "collect", [f"dataset.local.datasets=[{{path: {a}, dataset_name: a}},{{path: {b}, dataset_name: b}}]"]
    )
    records, skipped = read_records(validate(named).dataset, seed=0)
    assert len(records) == 25 and not skipped


# --------------------------------------------------------------------------------------------- #
# 6. A typo'd key added with +
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("stage", "typo", "meant"),
    [
        ("select", "+selection_percentag=0.9", "selection_percentage"),
        ("collect", "+data_process.shard_sise=3", "data_process.shard_size"),
        ("warmup", "+training.epoch=1", "training.epochs"),
        ("finetune", "+training.learning_rat=1e-3", "training.learning_rate"),
        ("evaluate", "+eval.max_sample=3", "eval.max_samples"),
        ("experiment", "+selection_percentag=0.5", "selection_percentage"),
    ],
)
def test_a_key_added_with_plus_is_refused_with_the_closest_key(
    stage2_run: Path, tmp_path: Path, stage: str, typo: str, meant: str
) -> None:
    args = [stage, typo]
    args += [f"root_dir={stage2_run}"] if stage == "select" else [f"output_dir={tmp_path / 'out'}"]
    if stage == "finetune":
        args.append(f"dataset.data_path={TRAIN}")
    before = tree(stage2_run)
    proc = cli(*args, cwd=tmp_path)
    one_line_error(proc, typo.lstrip("+").split("=")[0], f"did you mean {meant}?")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert tree(stage2_run) == before


# --------------------------------------------------------------------------------------------- #
# 7. Names are checked before Hydra makes a dir
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["collect", "run_name=../../../../../escaped/x"], "run_name"),
        (["warmup", "run_name=../../../../../escaped/x"], "run_name"),
        (["experiment", "name=../../../../../escaped/x"], "name"),
    ],
)
def test_names_are_checked_before_hydra_makes_a_dir(tmp_path: Path, args: list[str], key: str) -> None:
    """outputs/<run_name>/<date>/<time> from <tmp>/a/b/c/work would be <tmp>/escaped/x/...: refused before
    Hydra creates that dir, its .hydra/*.yaml and its log file; nothing at all is created."""
    work = tmp_path / "a" / "b" / "c" / "work"
    work.mkdir(parents=True)
    before = sorted(tmp_path.rglob("*"))
    proc = cli(*args, cwd=work)
    one_line_error(proc, f"{key}=", "path separator")
    assert sorted(tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------------------------- #
# 8. Hydra's own files in a run dir are not written through links
# --------------------------------------------------------------------------------------------- #
def test_a_planted_log_or_hydra_link_is_replaced_not_written_through(tmp_path: Path) -> None:
    run, outside = tmp_path / "run", tmp_path / "outside"
    (outside / "hydra").mkdir(parents=True)
    (outside / "victim.txt").write_text("keep me\n")
    run.mkdir()
    (run / "collect.log").symlink_to(outside / "victim.txt")
    (run / ".hydra").symlink_to(outside / "hydra", target_is_directory=True)
    before = tree(outside)
    # Fails in the stage (after Hydra set up its log and .hydra/): cheap, and Hydra's files are written.
    proc = cli("collect", f"output_dir={run}", "selector_model.path=no/such/selector", cwd=tmp_path)
    one_line_error(proc, "selector_model.path=no/such/selector")
    assert tree(outside) == before
    assert (
        not (run / "collect.log").is_symlink() and "selector_model.path" in (run / "collect.log").read_text()
    )
    assert not (run / ".hydra").is_symlink() and (run / ".hydra" / "config.yaml").is_file()
    assert "was a symbolic link" in proc.stderr


# --------------------------------------------------------------------------------------------- #
# 9. A selection's outputs are installed all or nothing
# --------------------------------------------------------------------------------------------- #
def _ids(path: Path, key: str = "id") -> list[str]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def test_a_symlinked_export_dir_is_replaced_and_every_output_is_the_new_selection(
    stage2_run: Path, tmp_path: Path
) -> None:
    run = copy_run(stage2_run, tmp_path / "run")
    run_selection(select_config(root_dir=str(run), selection_percentage=0.1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dataset_info.json").write_text("{}")
    shutil.rmtree(run / "llamafactory")
    (run / "llamafactory").symlink_to(outside, target_is_directory=True)

    res = run_selection(select_config(root_dir=str(run), selection_percentage=0.5))
    kept = [res.stats.ids[int(i)] for i in res.order]
    assert len(kept) == 10
    assert _ids(run / "selected_data.jsonl") == kept
    assert _ids(run / "hf_dataset" / "data.jsonl") == kept
    assert not (run / "llamafactory").is_symlink()
    assert _ids(run / "llamafactory" / "quality_gate_selection.jsonl") == kept
    assert json.loads((run / "selection_summary.json").read_text())["num_selected"] == 10
    assert sorted(p.name for p in outside.iterdir()) == ["dataset_info.json"]
    assert (outside / "dataset_info.json").read_text() == "{}"
    assert not list(run.glob(".selection-staging-*"))


def test_install_entries_puts_the_previous_outputs_back_when_a_move_fails(
    tmp_path: Path, monkeypatch
) -> None:
    """The rollback path: the third rename fails (a full disk, a vanished dir); the target dir holds
    exactly its previous entries, the new ones stay staged."""
    target, staging = tmp_path / "out", tmp_path / "out" / ".staging"
    target.mkdir()
    (target / "a.jsonl").write_text("old a")
    (target / "b").mkdir()
    (target / "b" / "x").write_text("old b")
    staging.mkdir()
    for name in ("a.jsonl", "c.json"):
        (staging / name).write_text(f"new {name}")
    (staging / "b").mkdir()
    (staging / "b" / "x").write_text("new b")
    before = tree(target)
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 4:  # a.jsonl and b moved aside, a.jsonl installed, then b fails
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr("quality_gate.io.os.replace", failing)
    with pytest.raises(OSError, match="No space"):
        install_entries(staging, target)
    monkeypatch.undo()
    assert {k: v for k, v in tree(target).items() if not k.startswith(".staging")} == {
        k: v for k, v in before.items() if not k.startswith(".staging")
    }
    assert (staging / "a.jsonl").read_text() == "new a.jsonl"


# --------------------------------------------------------------------------------------------- #
# 10. Bad numbers are one line naming the key
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["warmup", "seed=-1"], "seed=-1 must be >= 0"),
        (["collect", "seed=99999999999"], "seed=99999999999 must be <= 4294967295"),
        (
            ["finetune", f"dataset.data_path={TRAIN}", "training.epochs=inf"],
            "training.epochs=inf must be a finite",
        ),
        (["select", "root_dir=.", "alpha=nan"], "alpha=nan must be a finite number"),
        (["experiment", "seeds=[0,-3]"], "seeds[1]=-3 must be >= 0"),
        (
            ["convert", "--model", str(SELECTOR), "--save-path", "{out}", "--init-std", "-1"],
            "--init-std=-1.0 must be",
        ),
        (
            ["convert", "--model", str(SELECTOR), "--save-path", "{out}", "--init-std", "nan"],
            "--init-std=nan must be",
        ),
    ],
)
def test_bad_numbers_are_one_line_naming_the_key_and_leave_no_run_dir(
    tmp_path: Path, args: list[str], text: str
) -> None:
    out = tmp_path / "out"
    args = [a.format(out=out) for a in args]
    if args[0] != "convert":
        args.append(f"output_dir={out}")
    proc = cli(*args, cwd=tmp_path)
    one_line_error(proc, text)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- #
# 11. Dataset names: bytes and reserved names, up front
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("'" + "数" * 82 + "'", "246 bytes long in UTF-8 (82 characters"),
        ("fingerprint.json", "'fingerprint.json' is the name of a file Stage 2 writes"),
        ("Plan.json", "'Plan.json' is the name of a file Stage 2 writes"),
        ("other_records.jsonl", "ends with '_records.jsonl'"),
    ],
)
def test_dataset_names_are_checked_by_bytes_and_reserved_names_up_front(
    tmp_path: Path, name: str, text: str
) -> None:
    datasets = f"dataset.local.datasets=[{{path: {TRAIN}, dataset_name: {name}}}]"
    proc = cli("collect", *STAGE2, datasets, f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    one_line_error(proc, "dataset.local.datasets[0].dataset_name=", text)
    assert not (tmp_path / "out").exists()


def test_a_name_of_200_bytes_still_runs_stage2(tmp_path: Path) -> None:
    """The limit leaves room for what the pipeline adds: 66 CJK characters + 2 = 200 bytes works end to
    end (shards, markers, the index and its temporary file, the records)."""
    name = "数" * 66 + "ab"
    assert len(name.encode()) == 200
    metrics = collect(tmp_path / "run", f"dataset.local.datasets=[{{path: {TRAIN}, dataset_name: '{name}'}}]")
    assert (
        metrics["samples"] == 20 and (tmp_path / "run" / "router_data" / f"{name}_router_data.pt").is_file()
    )


# --------------------------------------------------------------------------------------------- #
# 12. Damaged files are one line saying what to do, and repairable
# --------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("name", ["fingerprint.json", "plan.json"])
def test_a_truncated_fingerprint_or_plan_is_one_line_and_a_rerun_repairs_it(
    stage2_run: Path, tmp_path: Path, name: str
) -> None:
    run = copy_run(stage2_run, tmp_path / "run")
    expected = compute_selection(select_config(root_dir=str(run), selection_percentage=0.3)).order.tolist()
    damaged = run / "router_data" / name
    damaged.write_bytes(damaged.read_bytes()[:50])
    proc = cli("select", f"root_dir={run}", cwd=tmp_path)
    one_line_error(proc, str(damaged), "is damaged or unreadable", f"rerun Stage 2 with output_dir={run}")
    metrics = collect(run)  # the rerun the message asks for: repairs, rescoring nothing
    assert metrics["shards_scored_this_run"] == 0 and metrics["shards_resumed"] == 4
    json.loads(damaged.read_text())
    assert (
        compute_selection(select_config(root_dir=str(run), selection_percentage=0.3)).order.tolist()
        == expected
    )


def test_a_damaged_fingerprint_of_another_setup_is_refused_naming_what_to_delete(
    stage2_run: Path, tmp_path: Path
) -> None:
    run = copy_run(stage2_run, tmp_path / "run")
    fp = run / "router_data" / "fingerprint.json"
    fp.write_text(fp.read_text()[:30])
    before = tree(run / "router_data")
    with pytest.raises(RouterDataError, match=r"is damaged .* not this setup.s .* delete .*router_data"):
        collect(run, "dataset.max_sequence_length=256")
    assert tree(run / "router_data") == before


@pytest.mark.parametrize("where", ["index", "shard"])
def test_a_pickle_in_place_of_router_data_is_never_unpickled_nor_advised(
    stage2_run: Path, tmp_path: Path, where: str
) -> None:
    """A torch.save'd pickle of other objects as the index, or as a shard whose marker was forged to
    match: one line naming the file, the payload does not run, torch's weights_only=False advice is not
    shown."""
    run = copy_run(stage2_run, tmp_path / "run")
    sentinel = tmp_path / "PICKLE_RAN"
    if where == "index":
        target = run / "router_data" / "synthetic_router_data.pt"
        torch.save({"format": _Payload(sentinel)}, target)
    else:
        target = run / "router_data" / "synthetic" / "shard-00001.pt"
        torch.save({"gates": _Payload(sentinel)}, target)
        marker = json.loads(marker_path(target).read_text())
        marker.update(bytes=target.stat().st_size, sha256=sha256_file(target))
        marker_path(target).write_text(json.dumps(marker))
    proc = cli("select", f"root_dir={run}", cwd=tmp_path)
    line = one_line_error(proc, str(target), "cannot be read as plain tensors")
    assert "weights_only" not in proc.stdout + proc.stderr and "weights_only" not in line
    assert not sentinel.exists()


def test_a_garbled_adapter_config_is_one_line_in_evaluate(ft_run, tmp_path: Path) -> None:
    run, _ = ft_run
    adapter = Path(shutil.copytree(run / "checkpoint-final", tmp_path / "adapter"))
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    proc = cli("evaluate", f"adapter_path={adapter}", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    one_line_error(proc, "adapter_config.json is damaged or unreadable")
    # Before the stage's run dir files and the model (Hydra itself made the dir and its log).
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    ("datasets", "text"),
    [
        ("[{split: train}]", "dataset.hf.datasets[0].name is not set"),
        ("[{name: 'not a valid id!'}]", "is neither an existing local file nor a valid Hub dataset id"),
        ("[{name: ../no/such/file.jsonl}]", "looks like a local path but does not exist"),
    ],
)
def test_a_missing_or_malformed_hf_dataset_name_is_one_line(tmp_path: Path, datasets: str, text: str) -> None:
    proc = cli(
        "collect",
        "dataset.dataset_from=hf",
        f"dataset.hf.datasets={datasets}",
        f"output_dir={tmp_path / 'out'}",
    )
    one_line_error(proc, text)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage", ["collect", "warmup", "select"])
def test_output_dir_on_an_existing_file_is_one_line(stage2_run: Path, tmp_path: Path, stage: str) -> None:
    file = tmp_path / "a_file"
    file.write_text("x")
    args = [stage, f"output_dir={file}"] + ([f"root_dir={stage2_run}"] if stage == "select" else [])
    one_line_error(cli(*args, cwd=tmp_path), f"output_dir={file} is an existing file")
    assert file.read_text() == "x"


def test_a_damaged_manifest_is_one_line(stage2_run: Path, tmp_path: Path) -> None:
    run = copy_run(stage2_run, tmp_path / "run")
    (run / "manifest.json").write_text('{"stage": "collect", ')
    proc = cli("collect", f"output_dir={run}", *STAGE2, cwd=tmp_path)
    one_line_error(proc, "manifest.json is damaged or unreadable", "start a new run")


# --------------------------------------------------------------------------------------------- #
# 13. Unknown lm-eval tasks before any work
# --------------------------------------------------------------------------------------------- #
@pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("lm_eval") is None, reason="lm_eval not installed"
)
def test_an_unknown_lm_eval_task_fails_before_any_work(tmp_path: Path) -> None:
    from quality_gate.stages.evaluate import run as evaluate_run

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "qg_arith.yaml").write_text(
        "task: qg_arith\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: none.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: 0\n"
    )
    cfg = compose(
        "evaluate",
        [
            "eval.lm_eval_tasks=[qg_arith,qg_arithh]",
            f"eval.lm_eval_include_path={tasks}",
            "eval.lm_eval_include_defaults=false",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['qg_arithh'\].*did you mean \['qg_arith'\]"):
        evaluate_run(cfg)
    assert not (tmp_path / "out").exists()  # before the run dir, so before the model and its metrics


# --------------------------------------------------------------------------------------------- #
# 14. One collect at a time in a run dir
# --------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_a_second_collect_in_the_same_dir_is_refused_and_a_dead_ones_lock_taken_over(
    tmp_path: Path, caplog
) -> None:
    """A collect process holds the run dir; a second one at the same time is refused naming its pid, host
    and start; once the first is killed, its stale lock is taken over and the run completes."""
    run = tmp_path / "run"
    slow = ["dataset.subset_ratio=0.1", "data_process.shard_size=4"]
    first = subprocess.Popen(
        [sys.executable, "-m", "quality_gate", "collect", *STAGE2, *slow, f"output_dir={run}"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    lock = run / "collect.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, "the first run never took its lock"
        time.sleep(0.01)
    try:
        with pytest.raises(RunLockedError) as err:
            collect(run, *slow)
        message = str(err.value)
        assert f"pid {first.pid} on host {socket.gethostname()}" in message and "collect" in message
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with caplog.at_level(logging.WARNING, logger="quality_gate.runs"):
        metrics = collect(run, *slow)
    assert f"taking over the stale lock {lock}: pid {first.pid}" in caplog.text
    assert metrics["samples"] == 200 and not lock.exists()


# --------------------------------------------------------------------------------------------- #
# docs/hardening.md names only tests that exist
# --------------------------------------------------------------------------------------------- #
def test_the_hardening_doc_names_only_tests_that_exist() -> None:
    import re

    doc = (REPO / "docs" / "hardening.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?:::|`)(test_\w+)(?=[`\[ (,])", doc)) - {
        p.stem for p in (REPO / "tests").glob("test_*.py")
    }
    defined = set()
    for path in (REPO / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(encoding="utf-8"), re.MULTILINE))
    assert named and not named - defined, sorted(named - defined)
