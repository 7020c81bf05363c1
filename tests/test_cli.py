"""The command line: ``quality-gate <stage>`` and the seed's commands give the same outputs; help and
config errors answer fast, on one line, naming the key; user errors print no traceback, bugs do."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import REPO, USER_ENV
from omegaconf import OmegaConf

from quality_gate.stats.store import find_router_data, iter_shards, load_index

QG = [sys.executable, "-m", "quality_gate"]
SEED_MAIN = [sys.executable, str(REPO / "src" / "main.py")]
SMALL = ["dataset.subset_ratio=0.02", "data_process.shard_size=16", "collect_ifd=true"]


def run(
    cmd: list[str], cwd: Path = REPO, check: bool = True, timeout: int = 300
) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=USER_ENV, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def router_contents(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for index_path in find_router_data(run_dir / "router_data"):
        name = load_index(index_path)["dataset_name"]
        for shard in iter_shards(index_path):
            for i, sid in enumerate(shard.sample_ids):
                rows = shard.sample_slice(i)
                out[f"{name}/{sid}"] = {
                    "gates": shard.gates[rows].clone(),
                    "ppl": shard.perplexities[rows].clone(),
                    "emb": shard.embeddings[i].clone(),
                    "ifd": shard.ifd_loss_cond[i].clone(),
                }
    return out


@pytest.fixture(scope="module")
def collect_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Stage 2 twice on the same data: ``quality-gate collect`` and the seed's ``stage_2_selection``."""
    root = tmp_path_factory.mktemp("cli")
    new, seed = root / "collect", root / "seed"
    run([*QG, "collect", *SMALL, f"output_dir={new}"])
    run([*SEED_MAIN, "--config-name", "stage_2_selection", *SMALL, f"output_dir={seed}"])
    return new, seed


@pytest.mark.slow
def test_collect_equals_the_seed_command(collect_runs):
    new, seed = collect_runs
    a, b = router_contents(new), router_contents(seed)
    assert sorted(a) == sorted(b) and len(a) == 40
    for key in a:
        for field in a[key]:
            assert torch.equal(a[key][field], b[key][field]), f"{key}.{field}"
    assert (new / "router_data" / "synthetic_records.jsonl").read_bytes() == (
        seed / "router_data" / "synthetic_records.jsonl"
    ).read_bytes()
    # Same stage, one name: both manifests say collect; the seed's config only changes the run dir folder.
    for d in (new, seed):
        assert json.loads((d / "manifest.json").read_text())["stage"] == "collect"


@pytest.mark.slow
def test_select_equals_batch_and_continue_selection(collect_runs, tmp_path):
    new, seed = collect_runs
    args = ["selection_percentage=0.3", "report=false"]
    run([*QG, "select", f"root_dir={new}", *args])
    run([sys.executable, str(REPO / "scripts" / "batch_selection.py"), f"root_dir={seed}", *args])
    flat = tmp_path / "flat"
    run(
        [
            sys.executable,
            str(REPO / "scripts" / "continue_selection.py"),
            f"router_data_dir={seed / 'router_data'}",
            f"output_dir={flat}",
            *args,
        ]
    )
    kept = [(d / "selected_data.jsonl").read_text() for d in (new, seed, flat)]
    assert kept[0] == kept[1] == kept[2] and len(kept[0].splitlines()) == 12  # ceil(0.3 * 40)
    tables = [pq.read_table(d / "scores.parquet").drop_columns(["id"]).to_pydict() for d in (new, seed, flat)]
    assert tables[0] == tables[1] == tables[2]


@pytest.mark.slow
def test_warmup_equals_the_seed_command(tmp_path):
    overrides = ["dataset.subset_ratio=0.02", "training.max_steps=2", "training.gate_stats_samples=8"]
    run([*QG, "warmup", *overrides, f"output_dir={tmp_path / 'a'}"])
    run([*SEED_MAIN, "--config-name", "stage_1_warmup", *overrides, f"output_dir={tmp_path / 'b'}"])
    a, b = (torch.load(tmp_path / d / "full_rank_weights.pt", weights_only=True) for d in ("a", "b"))
    assert a["model_state_dict"].keys() == b["model_state_dict"].keys()
    for k, v in a["model_state_dict"].items():
        assert torch.equal(v, b["model_state_dict"][k])


def test_run_dirs_follow_the_config_name(tmp_path):
    """New names write under outputs/<stage>/, the seed's config names under the seed's folders."""
    run([*QG, "evaluate", "eval.max_samples=2", "eval.max_new_tokens=2"], cwd=tmp_path)
    run(
        [*SEED_MAIN, "--config-name", "stage_4_evaluate", "eval.max_samples=2", "eval.max_new_tokens=2"],
        cwd=tmp_path,
    )
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["evaluate", "stage_4_evaluate"]
    (run_dir,) = (tmp_path / "outputs" / "evaluate").glob("*/*")
    assert (run_dir / "eval_results.json").is_file() and (run_dir / "evaluate.log").is_file()
    assert "eval.max_samples-2" in run_dir.name  # the overrides, pasteable into the next command


def test_help_and_config_errors_answer_fast_on_one_line(tmp_path):
    t0 = time.perf_counter()
    out = run([*QG, "collect", "--help"], cwd=tmp_path)
    assert time.perf_counter() - t0 < 3.0  # typically 0.2 s; generous for a loaded CI machine
    assert "data_process.max_tokens_per_batch" in out.stdout and "(16384)" in out.stdout
    usage = run([*QG], cwd=tmp_path)
    assert all(stage in usage.stdout for stage in ("warmup", "collect", "select", "finetune", "evaluate"))
    for cmd, key in (
        ([*QG, "warmup", "training.epochs=abc"], "training.epochs"),
        ([*QG, "collect", "dataset.truncation=middle"], "dataset.truncation"),
        ([*QG, "select", "selection_percentage=0.5"], "root_dir"),
        ([*QG, "finetune", "training.peft_mode=qlora"], "training.peft_mode"),
    ):
        t0 = time.perf_counter()
        proc = run(cmd, cwd=tmp_path, check=False)
        assert time.perf_counter() - t0 < 3.0, cmd
        assert proc.returncode != 0 and key in proc.stdout + proc.stderr, cmd
        assert "Traceback" not in proc.stderr, proc.stderr


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, monkeypatch):
    proc = run([*QG, "finetune", f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "dataset.data_path is not set" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The entry point turns a UserError into one line and exit 1, and lets anything else (a bug) through
    # with its traceback, whatever the built-in base class (ValueError used to be swallowed).
    from quality_gate import cli
    from quality_gate.config import make_config
    from quality_gate.errors import DataError

    cfg = make_config("evaluate")
    for error in (KeyError("bug"), ValueError("a bug deep inside a library")):
        monkeypatch.setattr(cli, "run_stage", lambda _cfg, e=error: (_ for _ in ()).throw(e))
        with pytest.raises(type(error)):
            cli._task(cfg)
    monkeypatch.setattr(cli, "run_stage", lambda _cfg: (_ for _ in ()).throw(DataError("fix the data")))
    with pytest.raises(SystemExit, match="error: fix the data"):
        cli._task(cfg)


def _asset_defaults(node: object, key: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, raw value)`` of every config default that names an embedded asset."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _asset_defaults(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _asset_defaults(v, f"{key}[{i}]")
    elif isinstance(node, str) and node.startswith("${qg_asset:"):
        yield key, node


def test_tiny_assets_ship_inside_the_package():
    """Every default that names a tiny asset resolves, through the imported package (not this
    checkout's layout), to an existing file under the package dir, and pyproject's package-data ships
    every file of it, so an installed wheel finds its defaults."""
    import quality_gate
    from quality_gate.config import SCHEMAS, register_resolvers

    register_resolvers()
    package = Path(quality_gate.__file__).resolve().parent
    resolved = {
        f"{stage}.{key}": Path(OmegaConf.create({"v": raw}).v)
        for stage in SCHEMAS
        for key, raw in _asset_defaults(OmegaConf.to_container(OmegaConf.structured(SCHEMAS[stage])))
    }
    assert resolved["experiment.selector_model"] == package / "assets/models/tiny-qwen3-selector"
    assert resolved["finetune.training.model.name"] == package / "assets/models/tiny-qwen2-target"
    assert resolved["warmup.dataset.local.datasets[0].path"] == package / "assets/data/synthetic_train.jsonl"
    assert resolved["evaluate.eval.data_path"] == package / "assets/data/synthetic_eval.jsonl"
    assert {p.relative_to(package).as_posix() for p in resolved.values()} == {
        "assets/models/tiny-qwen3-selector",
        "assets/models/tiny-qwen2-target",
        "assets/data/synthetic_train.jsonl",
        "assets/data/synthetic_eval.jsonl",
    }
    files = [f for p in set(resolved.values()) for f in ([p] if p.is_file() else p.iterdir())]
    assert all(f.is_file() for f in files)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in files}
    # pyproject's [tool.setuptools.package-data] line (a JSON list; tomllib needs Python 3.11).
    line = re.search(r"^quality_gate = (\[.*\])$", (REPO / "pyproject.toml").read_text(), re.M)
    globs = json.loads(line.group(1))
    unshipped = [f for f in files if not any(fnmatch(f.relative_to(package).as_posix(), g) for g in globs)]
    assert unshipped == []
    assert (REPO / "assets").resolve() == package / "assets"  # ./assets in a checkout is the same dir


def test_collector_paused_while_importing_and_running_during_the_stage(tmp_path, monkeypatch):
    """The entry point pauses the garbage collector while hydra/torch/transformers are imported, then
    freezes what was imported; the stage itself runs with the collector on, and it stays on after."""
    import gc

    import quality_gate.stages.evaluate as evaluate
    from quality_gate import cli

    seen: dict[str, object] = {}

    def fake_run(cfg):
        seen["enabled"], seen["frozen"] = gc.isenabled(), gc.get_freeze_count()

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("QG_NO_FREEZE", raising=False)
    monkeypatch.setattr(cli, "_imports_frozen", False, raising=False)
    monkeypatch.setattr(evaluate, "run", fake_run)
    imported = []
    real_import = cli.importlib.import_module

    def import_module(name):
        imported.append((name, gc.isenabled()))
        return real_import(name)

    monkeypatch.setattr(cli.importlib, "import_module", import_module)
    gc.unfreeze()
    try:
        cli.hydra_app("evaluate", [f"output_dir={tmp_path / 'run'}"])
        assert ("quality_gate.stages.evaluate", False) in imported  # the stage module: paused
        assert not any(enabled for _, enabled in imported)  # and every import Hydra made before it
        assert seen["enabled"] is True and seen["frozen"] > 1000
        assert gc.isenabled()
        with pytest.raises(SystemExit):  # a config error ends the run before run_stage
            cli.hydra_app("evaluate", ["batch_size=abc"])
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_stage_run_by_a_stage_does_not_freeze_what_the_one_before_left(monkeypatch):
    """The experiment runs stages in one process: garbage in a reference cycle that an earlier stage
    left (a model, a Trainer) must stay collectable when the next stage starts."""
    import gc
    import weakref

    import quality_gate.stages.evaluate as evaluate
    from quality_gate import cli
    from quality_gate.config import make_config

    class Node:
        pass

    left: list[weakref.ref] = []

    def stage_leaving_a_cycle(cfg):
        a, b = Node(), Node()
        a.other, b.other = b, a
        left.append(weakref.ref(a))

    monkeypatch.delenv("QG_NO_FREEZE", raising=False)
    monkeypatch.setattr(cli, "_imports_frozen", False, raising=False)
    monkeypatch.setattr(evaluate, "run", stage_leaving_a_cycle)
    gc.disable()  # as in a run: no collection may happen to run in between by chance
    try:
        cfg = make_config("evaluate")
        cli.run_stage(cfg)  # the outer stage: freezes the imports
        cli.run_stage(cfg)  # a stage within it (the experiment's next stage)
        gc.collect()
        assert left[0]() is None and left[1]() is None
    finally:
        gc.enable()
        gc.unfreeze()
