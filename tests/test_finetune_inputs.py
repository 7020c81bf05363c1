"""Stage 3 bad inputs: each a clear error naming the config key; non-zero exit from the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, TARGET, USER_ENV, compose

from quality_gate.config import validate
from quality_gate.errors import ConfigError, NonFiniteLossError
from quality_gate.stages.finetune import fine_tune, get_model_and_tokenizer

needs_target = pytest.mark.skipif(not TARGET.exists(), reason="tiny assets missing: run `make assets`")
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def compose_cfg(overrides: list[str]):
    return compose("finetune", [f"training.model.name={TARGET}", "training.report_to=[]", *overrides])


def checked(overrides: list[str]):
    """The finetune config the command line runs, validated as its boundary (``cli.run_stage``) does."""
    return validate(compose_cfg(overrides))


def test_missing_data_path(tmp_path):
    with pytest.raises(ValueError, match=r"dataset\.data_path is not set"):
        fine_tune(checked([f"output_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match=r"dataset\.data_path=.*does not exist"):
        fine_tune(checked([f"output_dir={tmp_path}", f"dataset.data_path={tmp_path / 'nope.jsonl'}"]))


def test_empty_data_path(tmp_path):
    empty = tmp_path / "selected_data.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"dataset\.data_path=.*is empty"):
        fine_tune(compose_cfg([f"output_dir={tmp_path / 'run'}", f"dataset.data_path={empty}"]))


def test_bad_modes(tmp_path):
    with pytest.raises(ConfigError, match=r"training\.peft_mode='qlora'"):
        fine_tune(checked([f"output_dir={tmp_path}", "training.peft_mode=qlora"]))
    with pytest.raises(ConfigError, match=r"dataset\.mode='some'"):
        fine_tune(checked([f"output_dir={tmp_path}", "dataset.mode=some"]))


@needs_target
def test_records_without_messages(tmp_path):
    bad = tmp_path / "selected_data.jsonl"
    bad.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": "no conversation here"}) + "\n" for i in range(3))
    )
    with pytest.raises(ValueError, match=r"dataset\.data_path|messages"):
        fine_tune(compose_cfg([f"output_dir={tmp_path / 'run'}", f"dataset.data_path={bad}"]))


@needs_target
def test_tokenizer_without_chat_template(tmp_path):
    """No template: a clear error naming dataset.chat_template; with it set, that template is used."""
    model_dir = tmp_path / "no-template"
    shutil.copytree(TARGET, model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_file = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(config_file.read_text())
    tok_cfg.pop("chat_template", None)
    config_file.write_text(json.dumps(tok_cfg))
    overrides = [f"training.model.name={model_dir}"]
    with pytest.raises(ValueError, match="chat_template"):
        get_model_and_tokenizer(compose_cfg(overrides))
    cfg = compose_cfg(overrides)
    cfg.dataset.chat_template = CHATML  # set directly: Jinja braces would need escaping on the command line
    _, tokenizer = get_model_and_tokenizer(cfg)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


@needs_target
def test_diverging_run_stops_with_clear_error(tmp_path):
    """A learning rate of 1e7 makes the loss NaN within a few steps: NonFiniteLossError, no final model."""
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Add {i} and 1."},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(16)
    ]
    data = tmp_path / "selected_data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_cfg(
        [
            f"output_dir={tmp_path / 'run'}",
            f"dataset.data_path={data}",
            "training.learning_rate=1e7",
            "training.lr_scheduler_type=constant",
            "training.lora.r=8",
            "training.batch_size=4",
            "training.per_device_batch_size=4",
            "training.max_steps=6",
            "training.logging_steps=1",
        ]
    )
    with pytest.raises(NonFiniteLossError, match=r"at step \d+.*learning_rate"):
        fine_tune(cfg)
    assert not (tmp_path / "run" / "checkpoint-final").exists()


@pytest.mark.slow
def test_command_line_exits_non_zero(tmp_path):
    proc = subprocess.run(
        [sys.executable, "src/main.py", "--config-name", "stage_3_finetune", f"output_dir={tmp_path}"],
        cwd=REPO,
        env=USER_ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "dataset.data_path is not set" in proc.stderr
