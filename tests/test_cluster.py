"""More than one machine, as launchers do it: docs/torchrun_multinode.sh started twice at once on this
machine (NODE_RANK 0 and 1), i.e. two torchrun agents with ``--nnodes=2 --nproc_per_node=1
--rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:<port>`` per stage (gloo, CPU), writing into one shared
dir. Each stage's output is compared with one process at the same global batch: Stage 1's gate
weights, Stage 2's per-sample statistics, Stage 3's loss curve and adapter."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, SELECTOR, TARGET, compose
from helpers import TRAIN as DATA
from safetensors.torch import load_file
from test_stage2_stage import assert_same_stats, run_in_process, stats_by_id

from quality_gate.errors import ConfigError

needs_assets = pytest.mark.skipif(
    not (SELECTOR.exists() and TARGET.exists() and DATA.exists()),
    reason="tiny assets missing: run `make assets`",
)

# Global batch 8 everywhere: 2 nodes x 4 per device x 1 accumulation step, or 1 process x 4 x 2.
WARMUP = [
    "dataset.subset_ratio=0.02",
    "training.batch_size=8",
    "training.per_device_batch_size=4",
    "training.max_steps=2",
    "training.logging_steps=1",
]
COLLECT = ["data_process.batch_size=4", "dataset.subset_ratio=0.05", "data_process.shard_size=4"]
SELECT = ["selection_percentage=0.3", "report=false"]
# LoRA dropout 0: dropout masks are drawn per process, the one thing that may not match one process.
FINETUNE = [
    "training.lora.r=8",
    "training.lora.alpha=16",
    "training.lora.dropout=0",
    "training.learning_rate=2e-3",
    "training.lr_scheduler_type=constant",
    "training.batch_size=8",
    "training.per_device_batch_size=4",
    "training.max_steps=2",
    "training.logging_steps=1",
    "training.save_steps=100000",
    "training.report_to=[]",
    "dataset.max_sequence_length=128",
]


def free_ports(n: int) -> int:
    """A base port such that base .. base + n - 1 are free now (one rendezvous per stage)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports found")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUTPUT_ROOT of docs/torchrun_multinode.sh run on two simulated nodes (Stages 1, 2, select, 3)."""
    root = tmp_path_factory.mktemp("shared")
    logs = tmp_path_factory.mktemp("node_logs")
    env = {
        **ENV,
        "PYTHON": sys.executable,
        "OUTPUT_ROOT": str(root),
        "NNODES": "2",
        "NPROC_PER_NODE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_ports(3)),
        "RDZV_ID": f"test-{uuid.uuid4().hex[:8]}",
        "RDZV_TIMEOUT": "300",
        "WARMUP_ARGS": " ".join(WARMUP),
        "COLLECT_ARGS": " ".join(COLLECT),
        "SELECT_ARGS": " ".join(SELECT),
        "FINETUNE_ARGS": " ".join(FINETUNE),
    }
    procs = []
    for node in (0, 1):
        log = open(logs / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        cmd = ["bash", str(REPO / "docs" / "torchrun_multinode.sh")]
        procs.append(
            (subprocess.Popen(cmd, env={**env, "NODE_RANK": str(node)}, stdout=log, stderr=log), log)
        )
    try:
        codes = [p.wait(timeout=900) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    tails = "\n".join(f"--- node {n}\n{(logs / f'node{n}.log').read_text()[-3000:]}" for n in (0, 1))
    assert codes == [0, 0], tails
    return root


def _world(metrics_file: Path) -> int:
    return json.loads(metrics_file.read_text())["world_size"]


@needs_assets
@pytest.mark.slow
@pytest.mark.dist
def test_warmup_on_two_nodes_equals_one_process(two_nodes: Path, tmp_path: Path) -> None:
    from quality_gate.stages.warmup import run as warmup

    run = two_nodes / "warmup"
    assert _world(run / "warmup_metrics.json") == 2
    warmup(compose("warmup", [*WARMUP, f"output_dir={tmp_path}"]))
    two = torch.load(run / "full_rank_weights.pt", weights_only=True)["model_state_dict"]
    one = torch.load(tmp_path / "full_rank_weights.pt", weights_only=True)["model_state_dict"]
    assert sorted(two) == sorted(one) and one
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-6, msg=name)
    curve = {
        p: [(e["step"], e["lm_loss"]) for e in json.loads((p / "warmup_metrics.json").read_text())["history"]]
        for p in (run, tmp_path)
    }
    assert [s for s, _ in curve[run]] == [s for s, _ in curve[tmp_path]] == [1, 2]
    for (_, a), (_, b) in zip(curve[run], curve[tmp_path]):
        assert a == pytest.approx(b, rel=1e-5)
    # Shared-dir layout: rank 0 wrote config, manifest and .hydra; every rank its own log file.
    assert (run / "warmup.log").is_file() and (run / "warmup.rank1.log").is_file()
    assert (run / ".hydra" / "config.yaml").is_file()
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2


@needs_assets
@pytest.mark.slow
@pytest.mark.dist
def test_collect_on_two_nodes_equals_one_process(two_nodes: Path, tmp_path: Path) -> None:
    run = two_nodes / "collect"
    metrics = json.loads((run / "stage2_metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["peak_rss_gb_per_rank"]) == 2
    # The same Stage 1 gates, scored by one process.
    run_in_process(tmp_path, [*COLLECT, f"model_checkpoint_path={two_nodes / 'warmup'}"])
    fingerprint = json.loads((run / "router_data" / "fingerprint.json").read_text())["fingerprint"]
    assert (
        fingerprint == json.loads((tmp_path / "router_data" / "fingerprint.json").read_text())["fingerprint"]
    )
    two, one = stats_by_id(run), stats_by_id(tmp_path)  # raises on a duplicate id
    assert sorted(two) == sorted(one) and len(one) == 100
    assert_same_stats(two, one, exact=False)
    assert (run / "selected_data.jsonl").is_file()  # the selection ran once, on node 0


@needs_assets
@pytest.mark.slow
@pytest.mark.dist
def test_finetune_on_two_nodes_matches_one_process(two_nodes: Path, tmp_path: Path) -> None:
    from quality_gate.stages.finetune import fine_tune

    run = two_nodes / "finetune"
    metrics = json.loads((run / "train_metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["distributed"] == "ddp" and metrics["global_step"] == 2
    data = two_nodes / "collect" / "selected_data.jsonl"
    fine_tune(compose("finetune", [*FINETUNE, f"dataset.data_path={data}", f"output_dir={tmp_path}"]))
    single = json.loads((tmp_path / "train_metrics.json").read_text())
    assert single["num_samples"] == metrics["num_samples"] == 30
    two_curve, one_curve = metrics["loss"]["curve"], single["loss"]["curve"]
    assert [p["step"] for p in two_curve] == [p["step"] for p in one_curve] == [1, 2]
    for a, b in zip(two_curve, one_curve):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    two = load_file(str(run / "checkpoint-final" / "adapter_model.safetensors"))
    one = load_file(str(tmp_path / "checkpoint-final" / "adapter_model.safetensors"))
    assert sorted(two) == sorted(one)
    assert any(t.abs().max() > 0 for k, t in one.items() if "lora_B" in k)  # the adapter trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.slow
def test_multi_node_launch_without_output_dir_is_refused(tmp_path: Path) -> None:
    """What one rank of a 2-node launch sees (torchrun's variables): an error before any dir is made."""
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    env.update({"RANK": "1", "LOCAL_RANK": "0", "GROUP_RANK": "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "quality_gate", "collect", "dataset.subset_ratio=0.01"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "spans several nodes" in proc.stderr and "output_dir=" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no outputs/<stage>/<date>/<time> of this node's own


def test_check_shared_run_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    from quality_gate.runs import check_shared_run_dir, is_multi_node

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert not is_multi_node()  # one node, 4 processes: the launcher's start time names the dir
    check_shared_run_dir(OmegaConf.create({"output_dir": None}))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert is_multi_node()
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=4, LOCAL_WORLD_SIZE=2\): set output_dir="):
        check_shared_run_dir(OmegaConf.create({"output_dir": None}))
    check_shared_run_dir(OmegaConf.create({"output_dir": "/shared/run"}))
