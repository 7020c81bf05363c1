"""Helpers shared by the test modules (import with ``from helpers import ...``): paths of the tiny
assets, the environment of a stage run in a subprocess, configs, tiny random models, and synthetic
router data in Stage 2's format."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from quality_gate.io import atomic_write_jsonl
from quality_gate.stats.store import check_or_write_fingerprint, shard_path, write_index, write_shard

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "src" / "quality_gate" / "assets"
SELECTOR = ASSETS / "models" / "tiny-qwen3-selector"
TARGET = ASSETS / "models" / "tiny-qwen2-target"
TRAIN = ASSETS / "data" / "synthetic_train.jsonl"
EVAL = ASSETS / "data" / "synthetic_eval.jsonl"
#: torchrun with two local processes, no rendezvous server; append the script and its arguments.
TORCHRUN_TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

#: The environment of a stage run in a subprocess: this checkout's src/ first (a git worktree runs its
#: own code, not the editable install's), one thread, quiet tokenizers, Hydra's full traceback when a
#: run fails.
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO / "src"),
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HYDRA_FULL_ERROR": "1",
}
#: What a user's shell has: ENV without HYDRA_FULL_ERROR and QG_TRACEBACK, which print tracebacks on
#: purpose; for the tests of what a user sees.
USER_ENV = {k: v for k, v in ENV.items() if k not in ("HYDRA_FULL_ERROR", "QG_TRACEBACK")}
#: USER_ENV without network, as the command-line tests run.
OFFLINE_USER_ENV = {**USER_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_cli(
    args: Sequence[str], cwd: Path = REPO, env: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
    """``quality-gate <args>`` as a user runs it (this checkout's code; ``env``: OFFLINE_USER_ENV), its
    output captured."""
    return subprocess.run(
        [sys.executable, "-m", "quality_gate", *args],
        cwd=cwd,
        env=OFFLINE_USER_ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``quality-gate <config_name> <overrides>`` runs: Hydra's composition of the packaged
    YAML and its schema (without the ``hydra`` node)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from quality_gate.config import register_configs

    register_configs()
    with initialize_config_module("quality_gate.configs", version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def select_config(**values) -> DictConfig:
    """A ``select`` config: the schema's defaults with ``values`` (validated like the command line)."""
    from quality_gate.config import make_config

    return make_config("select", values)


def tiny_causal_lm(
    model_type: str = "qwen3", vocab_size: int = 64, num_layers: int = 3, seed: int = 0, **config: Any
) -> torch.nn.Module:
    """A random tiny HF causal LM built offline (no download), seeded: hidden size 16, FFN 32, two
    attention heads of 8 dims, one KV head, 64 positions; ``config`` overrides any of these."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    shape = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "max_position_embeddings": 64,
    }
    model_config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, num_hidden_layers=num_layers, **{**shape, **config}
    )
    return AutoModelForCausalLM.from_config(model_config)


# --------------------------------------------------------------------------------------------- #
# Synthetic router data in Stage 2's on-disk format (the selection tests and bench_selection.py).
# The statistics are random (no model involved); the format, the fingerprint checks and the records
# file are the real ones of quality_gate.stats.store and quality_gate.selection.pipeline.
# --------------------------------------------------------------------------------------------- #
def fake_shard(
    ids: Sequence[str],
    lengths: Sequence[int],
    num_layers: int,
    generator: torch.Generator,
    ifd: bool = False,
    embedding_dim: int = 0,
    embeddings: Any = None,
) -> dict[str, Any]:
    """Random statistics of one shard: gates in (0, 1), NLL ~ Exp(mean 2), the last 60 % of each
    sample's positions marked as assistant positions.

    Embeddings (Stage 2's ``embeddings`` (n, D) float16): ``embeddings`` (n, D) as given, else
    ``embedding_dim > 0`` standard normal ones, else none."""
    lens = torch.as_tensor(list(lengths), dtype=torch.int64)
    total = int(lens.sum())
    gates = torch.rand(total, num_layers, generator=generator).to(torch.float16)  # (P, L)
    nll = torch.empty(total).exponential_(0.5, generator=generator)  # (P,)
    offsets = torch.cumsum(lens, 0) - lens  # (n,)
    within = torch.arange(total) - torch.repeat_interleave(offsets, lens)  # position inside its sample
    assistant = within >= (0.4 * torch.repeat_interleave(lens, lens)).to(torch.int64)
    shard: dict[str, Any] = {
        "sample_ids": list(ids),
        "lengths": lens,
        "gates": gates,
        "perplexities": torch.exp(nll),
        "assistant_mask": assistant,
        "valid": lens > 0,
        "invalid_reason": ["" if n > 0 else "empty" for n in lens.tolist()],
    }
    if ifd:
        shard["ifd_loss_cond"] = torch.rand(len(lens), generator=generator) + 0.5
        shard["ifd_loss_uncond"] = torch.rand(len(lens), generator=generator) + 0.7
    if embeddings is not None:
        shard["embeddings"] = torch.as_tensor(embeddings).to(torch.float16).reshape(len(lens), -1)
    elif embedding_dim > 0:
        shard["embeddings"] = torch.randn(len(lens), embedding_dim, generator=generator).to(torch.float16)
    return shard


def fake_record(dataset: str, sample_id: str, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Question {sample_id}?"},
            {"role": "assistant", "content": f"Answer to {sample_id}."},
        ],
        "dataset": dataset,
        "id": sample_id,
        "meta": meta or {},
    }


def write_router_dataset(
    router_dir: Path,
    dataset: str,
    shards: Sequence[dict[str, Any]],
    fingerprint_fields: dict[str, Any] | None = None,
    records: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write ``shards`` (dicts of :func:`quality_gate.stats.store.write_shard`) as one dataset, its
    index and ``<dataset>_records.jsonl`` (fake records when ``records`` is None). Returns the index."""
    router_dir = Path(router_dir)
    fp = check_or_write_fingerprint(
        router_dir, fingerprint_fields or {"model": "fake", "max_sequence_length": 64}
    )
    paths = []
    for k, shard in enumerate(shards):
        path = shard_path(router_dir, dataset, k)
        write_shard(path, shard, fp)
        paths.append(path)
    ids = [sid for s in shards for sid in s["sample_ids"]]
    if records is None:
        records = [fake_record(dataset, sid) for sid in ids]
    atomic_write_jsonl(router_dir / f"{dataset}_records.jsonl", list(records))
    max_len = max((int(s["lengths"].max()) for s in shards if len(s["lengths"])), default=0) + 1
    return write_index(router_dir, dataset, paths, fp, max_seq_len=max_len)
