"""The seed's names (quality_gate.compat) give exactly the configs of the current ones.

Each config is composed the way the command line does it (``quality-gate <name> <overrides>`` /
``python src/main.py --config-name <name> ...``): the overrides pass ``compat.current_keys``, Hydra composes
the packaged YAML over its registered schema, ``compat.current_stage_name`` maps the seed's ``stage:``
value, and ``validate`` checks the result. No stage runs.
"""

from __future__ import annotations

import json
import logging

import pytest
from helpers import compose
from omegaconf import OmegaConf

from quality_gate.compat import CONFIG_STAGES, KEY_ALIASES, current_keys, current_stage_name
from quality_gate.config import SCHEMAS, validate
from quality_gate.errors import ConfigError
from quality_gate.runs import init_run

#: The project's own config names; every other name in CONFIG_STAGES is one of the seed's.
OWN_CONFIGS = {*SCHEMAS, "experiment_sweep"}
SEED_CONFIGS = sorted(set(CONFIG_STAGES) - OWN_CONFIGS)


def as_cli(config_name: str, overrides: list[str] = ()) -> dict:
    """The validated config the command line runs, as a plain dict without ``run_name`` (the seed's
    configs keep their run dirs under the seed's folder names)."""
    cfg = compose(config_name, current_keys(list(overrides), config_name))
    current_stage_name(cfg)
    validate(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("run_name", None)
    return plain


def test_every_seed_config_name_composes_its_stages_config():
    assert SEED_CONFIGS == [
        "batch_selection",
        "continue_selection",
        "stage_1_warmup",
        "stage_2_selection",
        "stage_3_finetune",
        "stage_4_evaluate",
    ]
    # select and finetune need one input each to validate; the same on both sides.
    needs = {"select": ["root_dir=/runs/collect"], "finetune": ["dataset.data_path=/runs/selected.jsonl"]}
    for name in SEED_CONFIGS:
        stage = CONFIG_STAGES[name]
        overrides = needs.get(stage, [])
        assert as_cli(name, overrides) == as_cli(stage, overrides), name
        assert compose(name, overrides).stage == stage


def test_the_seeds_stage_value_means_collect_and_the_core_knows_only_the_current_name():
    assert as_cli("collect", ["stage=selection"]) == as_cli("collect")
    with pytest.raises(ConfigError, match="`stage` is 'selection'"):
        validate(compose("collect", ["stage=selection"]))  # not through the command line: refused


@pytest.mark.parametrize(
    ("config_name", "base"),
    [("stage_3_finetune", "finetune"), ("finetune", "finetune"), ("stage_1_warmup", "warmup")],
)
def test_the_seeds_lora_alpha_key_is_read_as_alpha(caplog, config_name, base):
    assert KEY_ALIASES[base] == {"training.lora.lora_alpha": "training.lora.alpha"}
    extra = ["dataset.data_path=/runs/selected.jsonl"] if base == "finetune" else []
    with caplog.at_level(logging.WARNING, logger="quality_gate"):
        seed = as_cli(config_name, ["training.lora.lora_alpha=512", *extra])
    assert seed == as_cli(base, ["training.lora.alpha=512", *extra])
    assert seed["training"]["lora"]["alpha"] == 512
    assert (
        "training.lora.lora_alpha is a former key of this config: read as training.lora.alpha" in caplog.text
    )
    # Hydra's prefixes stay; other arguments are left alone.
    args = ["++training.lora.lora_alpha=8", "--config-name", "stage_3_finetune", "training.lora.r=4"]
    assert current_keys(args, "stage_3_finetune") == ["++training.lora.alpha=8", *args[1:]]
    assert current_keys(args, "collect") == args  # a key is renamed only in the stages that had it


def test_stage4s_former_model_path_key_is_read_as_model_name(caplog, tmp_path):
    """Stage 4's base model is the target model group (``model.name``, as ``training.model.name`` in
    Stage 3); the key it had before, ``model_path``, still works from the command line."""
    with caplog.at_level(logging.WARNING, logger="quality_gate"):
        old = as_cli("stage_4_evaluate", [f"model_path={tmp_path}"])
    assert old == as_cli("evaluate", [f"model.name={tmp_path}"])
    assert old["model"]["name"] == str(tmp_path)
    assert "model_path is a former key of this config: read as model.name" in caplog.text


def test_a_run_dir_from_before_the_rename_still_resumes_as_collect(tmp_path):
    """Manifests written while Stage 2 was called ``selection`` keep their run dir usable by collect."""
    (tmp_path / "manifest.json").write_text(json.dumps({"stage": "selection"}))
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "seed": 1})
    init_run(cfg, "collect")
    assert len(json.loads((tmp_path / "manifest.json").read_text())["reruns"]) == 1
    with pytest.raises(ConfigError, match="is a selection run dir; a warmup run cannot write into it"):
        init_run(cfg, "warmup")


def test_the_seeds_stage_functions_validate_their_config(tmp_path):
    """``compat.warmup(cfg)`` / ``compat.select(cfg)`` (the seed's Python entry points) check the config
    as the command line does: a bad value is refused before any model loads or any dir is made, and
    the seed's ``stage: selection`` is read as collect."""
    import quality_gate.compat as compat
    from quality_gate.config import make_config

    cfg = make_config("warmup", {"output_dir": str(tmp_path / "run")})
    cfg.training.learning_rate = -1.0
    with pytest.raises(ConfigError, match=r"training\.learning_rate=-1\.0 must be > 0"):
        compat.warmup(cfg)
    cfg = make_config("collect", {"output_dir": str(tmp_path / "run")})
    cfg.stage = "selection"
    cfg.data_process.shard_size = 0
    with pytest.raises(ConfigError, match=r"data_process\.shard_size=0 must be >= 1"):
        compat.select(cfg)
    assert cfg.stage == "collect"
    assert not (tmp_path / "run").exists()
