"""Real shapes on CPU: every stage on randomly initialised models of the real width and vocabulary.

    python bench/real_shape.py [--layers 2] [--seq 2048] [--samples 3] [--steps 2] \
        [--out outputs/bench/real_shape.json]            # ~10 minutes on 2 cores

* selector: Qwen3-1.7B's shapes (hidden 2048, intermediate 6144, 16 heads, 8 KV heads, head_dim 128,
  vocab 151,936, tied embeddings), target: Qwen2.5-1.5B's (hidden 1536, intermediate 8960, 12 heads,
  2 KV heads, vocab 151,936, tied), each with only ``--layers`` decoder layers, random init, saved into a
  temp dir with the tiny assets' tokenizer and chat template (nothing is downloaded; the model's
  vocabulary is the real 151,936, larger than the tokenizer's, which only uses the first ids);
* samples whose token count after the chat template is about ``--seq`` (long synthetic text);
* each stage (1 warmup, 2 collect, select, 3 finetune LoRA r=128, 4 evaluate) as a fresh subprocess
  ``python -m quality_gate <stage> ...``: its peak RSS (``VmHWM``, read by the child at exit) and
  seconds per sample (inference) or per optimizer step (training), from the stage's own metrics;
* the saved-activation bytes per token and layer of the two training stages, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on the same models;
* a memory model (:func:`memory_model`, formulas in docs/real_shape.md) checked against the measured
  peaks at ``--layers`` and extrapolated to 28 layers on CPU (float32, batch 1) and on a GPU (bf16,
  the seed's batch sizes).

Writes the JSON (``--out``) and a Markdown table beside it (``.md``): measured vs extrapolated.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

ASSETS = REPO / "src" / "quality_gate" / "assets"
GiB = 2**30

# Public config.json values of the two models (written out: nothing is downloaded).
SELECTOR_SHAPE: dict[str, Any] = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)
TARGET_SHAPE: dict[str, Any] = dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=131072,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    hidden_act="silu",
)
FULL_LAYERS = 28  # both Qwen3-1.7B and Qwen2.5-1.5B
STAGE_ORDER = ("warmup", "collect", "select", "finetune", "evaluate")
# The seed's GPU commands (README): Stage 1 and 3 per-device batch 4 x 2,048 tokens with gradient
# checkpointing, Stage 2 a 65,536-token budget, Stage 4 eval batch 8.
GPU_SETTINGS = {
    "warmup": {"batch": 4, "checkpointing": True},
    "collect": {"tokens_per_batch": 65536, "nll_chunk_tokens": 4096},
    "finetune": {"batch": 4, "checkpointing": True},
    "evaluate": {"batch": 8, "nll_chunk_tokens": 1024},
}
LORA_RANK = 128  # Stage 3's default (the seed's)
# Words of the long synthetic samples (any text works; the tiny tokenizer splits these into few tokens).
TEXT = (
    "the model reads every sample once and the gates say how far each layer had to open for each token "
    "while perplexity of next weighs them data selection keeps best share records river house music "
    "mouse number answer question order digits letters sort reverse count words"
)


# --------------------------------------------------------------------------------------------- #
# Assets: random real-width models + tokenizer + long samples
# --------------------------------------------------------------------------------------------- #
def model_config(shape: dict[str, Any], layers: int, tokenizer_dir: Path) -> Any:
    """A transformers config of ``shape`` with ``layers`` decoder layers and the tiny tokenizer's ids."""
    from transformers import AutoConfig

    special = json.loads((tokenizer_dir / "config.json").read_text())
    kwargs = {k: v for k, v in shape.items() if k != "model_type"}
    return AutoConfig.for_model(
        shape["model_type"],
        num_hidden_layers=layers,
        pad_token_id=special.get("pad_token_id"),
        bos_token_id=special.get("bos_token_id"),
        eos_token_id=special.get("eos_token_id"),
        **kwargs,
    )


def save_random_model(shape: dict[str, Any], layers: int, tokenizer_dir: Path, out: Path, seed: int) -> Path:
    """Random-init a causal LM of ``shape`` (float32) and save it with the tokenizer of ``tokenizer_dir``.

    Weights ~ Normal(0, initializer_range) (norm weights 1, biases 0), drawn here: transformers' own
    init of a 151,936 x 2,048 embedding takes twice as long on one CPU thread.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = model_config(shape, layers, tokenizer_dir)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight is listed once
            if param.ndim > 1:
                param.normal_(0.0, float(config.initializer_range), generator=gen)
            else:
                param.fill_(1.0 if "norm" in name else 0.0)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)
    del model
    return out


def long_records(tokenizer: Any, n: int, tokens: int, seed: int, dataset: str) -> list[dict[str, Any]]:
    """``n`` two-turn records whose encoding (chat template included) has about ``tokens`` tokens
    (a quarter prompt, the rest answer); lengths are calibrated with the stage's own encoder."""
    from quality_gate.data import encode_record

    rng = random.Random(seed)
    words_list = TEXT.split()

    def text(words: int) -> str:
        return " ".join(rng.choice(words_list) for _ in range(words))

    out = []
    for i in range(n):
        words = max(tokens // 2, 8)
        record: dict[str, Any] = {}
        for _ in range(8):  # rescale the word count until the token count is within 2 %
            prompt, answer = words // 4, words - words // 4
            record = {
                "id": f"{dataset}_{i}",
                "dataset": dataset,
                "messages": [
                    {"role": "user", "content": text(prompt)},
                    {"role": "assistant", "content": text(answer)},
                ],
                "meta": {},
            }
            sample = encode_record(record, tokenizer, 10 * tokens + 64)
            got = len(sample.input_ids)
            if abs(got - tokens) <= 0.02 * tokens:
                break
            words = max(8, int(words * tokens / got))
        out.append(record)
    return out


def build_assets(
    out_dir: Path, layers: int, tokens: int, num_samples: int, seed: int = 0, which: tuple[str, ...] = ()
) -> dict[str, Path]:
    """Random real-width selector and target (``layers`` layers) + train / eval jsonl into ``out_dir``.

    ``which`` limits the models built (``"selector"``, ``"target"``); empty: both.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    which = which or ("selector", "target")
    paths: dict[str, Path] = {}
    if "selector" in which:
        paths["selector"] = save_random_model(
            SELECTOR_SHAPE, layers, ASSETS / "models" / "tiny-qwen3-selector", out_dir / "selector", seed
        )
    if "target" in which:
        paths["target"] = save_random_model(
            TARGET_SHAPE, layers, ASSETS / "models" / "tiny-qwen2-target", out_dir / "target", seed + 1
        )
    # Lengths are calibrated with the selector's template; the target's adds a default system turn
    # (a few tokens more), which the stages cut at max_sequence_length.
    tok_dir = paths.get("selector", paths.get("target"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    for split, n, s in (("train", num_samples, seed), ("eval", num_samples, seed + 100)):
        rows = long_records(tokenizer, n, tokens, s, f"long_{split}")
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = path
    return paths


# --------------------------------------------------------------------------------------------- #
# Stage runs: one fresh subprocess each, peak RSS from wait4
# --------------------------------------------------------------------------------------------- #
# The child reads its own high-water mark at exit. Not ru_maxrss from wait4: Linux carries the
# parent's RSS at fork into the child's maxrss, so a child of a big parent reports the parent's size.
_HWM_PRELUDE = """
import atexit, json, os, sys
def _write_hwm():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    with open(os.environ["QG_HWM_FILE"], "w") as out:
        json.dump(fields, out)
atexit.register(_write_hwm)
"""
_STAGE_MAIN = (
    _HWM_PRELUDE
    + """
import runpy
sys.argv = ["quality-gate", *sys.argv[1:]]
runpy.run_module("quality_gate", run_name="__main__", alter_sys=True)
"""
)
_IMPORTS_ONLY = (
    _HWM_PRELUDE
    + """
import quality_gate.stages.warmup, quality_gate.stages.finetune, quality_gate.stages.collect
"""
)


def _child_env(threads: int, hwm_file: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HYDRA_FULL_ERROR": "1",
        "QG_HWM_FILE": str(hwm_file),
    }


def run_stage(stage: str, overrides: list[str], log_dir: Path, threads: int) -> dict[str, Any]:
    """``python -m quality_gate <stage> <overrides>`` in a fresh process; wall seconds and peak RSS
    (``VmHWM`` of the child, read by itself at exit)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file, hwm_file = log_dir / f"{stage}.log", log_dir / f"{stage}.hwm.json"
    start = time.perf_counter()
    with open(log_file, "w") as log:
        code = subprocess.call(
            [sys.executable, "-c", _STAGE_MAIN, stage, *overrides],
            cwd=REPO,
            env=_child_env(threads, hwm_file),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    wall = time.perf_counter() - start
    if code != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"{stage} failed (exit {code}); log {log_file}:\n{tail}")
    hwm = json.loads(hwm_file.read_text())
    return {
        "command": " ".join(["python -m quality_gate", stage, *overrides]),
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(hwm["VmHWM"] / GiB, 3),
        "log": str(log_file),
    }


def runtime_floor_gb(threads: int, work: Path) -> float:
    """Peak RSS of a process that only imports what the stages import (torch, transformers, peft)."""
    hwm_file = work / "imports.hwm.json"
    if subprocess.call([sys.executable, "-c", _IMPORTS_ONLY], env=_child_env(threads, hwm_file)) != 0:
        raise SystemExit("import of the stages failed")
    return round(json.loads(hwm_file.read_text())["VmHWM"] / GiB, 3)


# --------------------------------------------------------------------------------------------- #
# Saved activations of the training stages (bytes per token per layer)
# --------------------------------------------------------------------------------------------- #
def saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Bytes autograd saves for backward in one forward with ``labels``, split by decoder layer.

    Tensors that share storage with a parameter (frozen weights saved by a matmul) are not
    activations and are skipped; a storage saved twice counts once (in the first place it was seen).
    Returns ``{"per_layer": [bytes, ...], "embed": bytes, "head_and_loss": bytes}``.
    """
    from quality_gate.gate import _decoder_layers

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    layers = list(_decoder_layers(model))
    buckets: dict[str, int] = {"embed": 0, **{f"layer{i}": 0 for i in range(len(layers))}, "head_and_loss": 0}
    current = ["embed"]

    def enter(name: str) -> Any:
        def hook(*_: Any) -> None:
            current[0] = name

        return hook

    handles = [layer.register_forward_pre_hook(enter(f"layer{i}")) for i, layer in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(lambda *_: current.__setitem__(0, "head_and_loss")))

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            buckets[current[0]] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=labels).loss
        del loss
    finally:
        for h in handles:
            h.remove()
    return {
        "per_layer": [buckets[f"layer{i}"] for i in range(len(layers))],
        "embed": buckets["embed"],
        "head_and_loss": buckets["head_and_loss"],
    }


def activation_probe(paths: dict[str, Path], tokens: int) -> dict[str, Any]:
    """Saved-activation bytes per token of Stage 1 (gates only) and Stage 3 (LoRA r=128) at ``tokens``."""
    from peft import LoraConfig, TaskType, get_peft_model

    from quality_gate.gate import freeze_backbone
    from quality_gate.models import load_selector, load_target

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 700, (1, tokens), generator=gen)
    labels = ids.clone()
    labels[:, : tokens // 4] = -100
    out: dict[str, Any] = {"tokens": tokens}

    model, _ = load_selector(str(paths["selector"]), dtype="float32", device="cpu")
    freeze_backbone(model)
    model.train()
    out["warmup"] = saved_activation_bytes(model, ids, labels)
    del model

    model, _ = load_target(str(paths["target"]), dtype="float32", device="cpu")
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    model.train()
    out["finetune"] = saved_activation_bytes(model, ids, labels)
    out["finetune_lora_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model
    return out


# --------------------------------------------------------------------------------------------- #
# Memory and time model
# --------------------------------------------------------------------------------------------- #
def param_counts(shape: dict[str, Any], layers: int) -> dict[str, int]:
    """Parameters of a Qwen2/Qwen3 decoder: tied embedding, ``layers`` x per-layer, final norm."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape.get("head_dim") or h // heads
    attn = h * heads * d + 2 * h * kv * d + heads * d * h
    if shape["model_type"] == "qwen2":
        attn += heads * d + 2 * kv * d  # q, k, v biases
    else:
        attn += 2 * d  # q_norm, k_norm
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    return {
        "embedding": v * h,
        "per_layer": per_layer,
        "per_layer_linear": attn + mlp,
        "layers": layers,
        "total": v * h + layers * per_layer + h,
    }


def lora_params(shape: dict[str, Any], layers: int, rank: int) -> int:
    """LoRA parameters on q/k/v/o/gate/up/down: ``r x (in + out)`` per module."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    d = shape.get("head_dim") or h // heads
    dims = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, i), (h, i), (i, h)]
    return layers * rank * sum(a + b for a, b in dims)


def forward_flop_per_sample(shape: dict[str, Any], layers: int, tokens: int, scored: int) -> float:
    """FLOPs of one forward of a ``tokens``-long sample: 2 x linear params x tokens (every decoder
    linear), attention scores and values (4 x heads x head_dim x tokens^2 per layer, the dense square),
    and the LM head on ``scored`` positions (2 x V x H each)."""
    pc = param_counts(shape, layers)
    h, heads = shape["hidden_size"], shape["num_attention_heads"]
    d = shape.get("head_dim") or h // heads
    linear = 2 * pc["per_layer_linear"] * layers * tokens
    attention = 4 * heads * d * tokens * tokens * layers
    head = 2 * shape["vocab_size"] * h * scored
    return float(linear + attention + head)


def memory_model(
    stage: str,
    shape: dict[str, Any],
    layers: int,
    *,
    bytes_per_weight: int,
    batch: int,
    tokens: int,
    act_first: float = 0.0,
    act_layer: float = 0.0,
    checkpointing: bool = False,
    trained_params: int = 0,
    nll_chunk_tokens: int = 1024,
    floor_gb: float = 0.0,
) -> dict[str, float]:
    """Peak memory of one process of ``stage`` (GiB), by term; see docs/real_shape.md for the formulas.

    ``act_first`` / ``act_layer``: saved-activation bytes per token of the first and of every further
    decoder layer, measured in float32 (scaled by ``bytes_per_weight / 4``).
    """
    pc = param_counts(shape, layers)
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    b = bytes_per_weight
    bt = batch * tokens
    terms: dict[str, float] = {"runtime": floor_gb, "weights": pc["total"] * b / GiB}
    if stage in ("warmup", "finetune"):
        scale = b / 4
        if checkpointing:
            # Layer inputs are kept; one layer's activations are rebuilt at a time in backward.
            acts = bt * (layers * h * b + act_layer * scale)
        else:
            acts = bt * (act_first + (layers - 1) * act_layer) * scale
        terms["activations"] = acts / GiB
        # transformers' causal-LM loss runs the head on every position: (B, T, V) logits in the model
        # dtype, upcast to float32 for the log-softmax, which is saved for backward. The peak is in
        # backward: the saved float32 log-probs, their gradient and the logits' gradient (3 x 4 bytes),
        # plus the gradient cast back to bf16 when the model is bf16.
        terms["logits_and_loss"] = bt * v * (12 + (b if b < 4 else 0)) / GiB
        # Trained parameters in float32 (peft keeps adapters in float32): value, grad, Adam m and v.
        terms["optimizer"] = trained_params * 16 / GiB
    elif stage in ("collect", "evaluate"):
        # Inference: the hidden stream (residual + normed, B x T x H) and the widest transient of a
        # layer, the MLP's gate, up and their product (3 x B x T x I); the LM head runs on
        # nll_chunk_tokens positions at a time: a (C, V) float32 chunk, plus the head's own output in
        # the model dtype when that is narrower.
        terms["activations"] = bt * (2 * h * b + 3 * i * b) / GiB
        chunk = min(nll_chunk_tokens, bt) * v * (4 + (b if b < 4 else 0))
        # Stage 4 first checks the adapter: one chunk with the adapter on and one with it off.
        terms["logits_and_loss"] = chunk * (2 if stage == "evaluate" else 1) / GiB
        terms["optimizer"] = 0.0
    terms["total"] = sum(terms.values())
    return {k: round(val, 3) for k, val in terms.items()}


# --------------------------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------------------------- #
def stage_overrides(paths: dict[str, Path], work: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    seq = args.seq
    train = f"dataset.local.datasets=[{{path: {paths['train']}, dataset_name: long_train}}]"
    return {
        "warmup": [
            f"selector_model.path={paths['selector']}",
            train,
            f"dataset.max_sequence_length={seq}",
            "training.batch_size=1",
            "training.per_device_batch_size=1",
            f"training.max_steps={args.steps}",
            "training.logging_steps=1",
            "training.gate_stats_samples=1",
            f"output_dir={work / 'warmup'}",
        ],
        "collect": [
            f"selector_model.path={paths['selector']}",
            f"model_checkpoint_path={work / 'warmup'}",
            train,
            f"dataset.max_sequence_length={seq}",
            f"data_process.max_tokens_per_batch={seq}",  # batch 1 at full length
            "data_process.nll_chunk_tokens=1024",
            f"output_dir={work / 'collect'}",
        ],
        "select": [f"root_dir={work / 'collect'}", "selection_percentage=0.5"],
        "finetune": [
            f"training.model.name={paths['target']}",
            f"dataset.data_path={paths['train']}",
            f"dataset.max_sequence_length={seq}",
            "training.batch_size=1",
            "training.per_device_batch_size=1",
            f"training.max_steps={args.steps}",
            "training.logging_steps=1",
            "training.save_steps=100000",
            "training.report_to=[]",
            f"output_dir={work / 'finetune'}",
        ],
        "evaluate": [
            f"model.name={paths['target']}",
            f"adapter_path={work / 'finetune' / 'checkpoint-final'}",
            f"eval.data_path={paths['eval']}",
            f"eval.max_sequence_length={seq}",
            "eval.batch_size=1",
            "eval.nll_chunk_tokens=1024",
            "eval.adapter_check_samples=1",
            f"output_dir={work / 'evaluate'}",
        ],
    }


def stage_timing(stage: str, work: Path, samples: int) -> dict[str, Any]:
    """Seconds per optimizer step (training) or per sample (inference), from the stage's own metrics."""
    if stage == "warmup":
        m = json.loads((work / "warmup" / "warmup_metrics.json").read_text())
        return {"unit": "s/step", "value": m["train_runtime_s"] / max(m["global_step"], 1)}
    if stage == "finetune":
        m = json.loads((work / "finetune" / "train_metrics.json").read_text())
        return {"unit": "s/step", "value": m["train_runtime_s"] / max(m["global_step"], 1)}
    if stage == "collect":
        m = json.loads((work / "collect" / "stage2_metrics.json").read_text())
        # From tokens/s (samples_per_s is rounded to 0.01, too coarse at ~0.06 samples/s).
        seconds = m["tokens_scored_this_run"] / m["tokens_per_s"]
        return {
            "unit": "s/sample",
            "value": seconds / m["samples_scored_this_run"],
            "tokens_per_s": m["tokens_per_s"],
        }
    if stage == "evaluate":
        m = json.loads((work / "evaluate" / "eval_results.json").read_text())
        # wall_time_s covers the adapter check (2 forwards of 1 sample) and the held-out loss.
        return {"unit": "s/sample", "value": m["wall_time_s"] / (samples + 2)}
    return {"unit": "s (whole run)", "value": None}


def encoded_lengths(paths: dict[str, Path], seq: int) -> dict[str, list[int]]:
    from transformers import AutoTokenizer

    from quality_gate.data import encode_record

    out = {}
    for model in ("selector", "target"):
        tok = AutoTokenizer.from_pretrained(paths[model])
        rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
        out[model] = [len(encode_record(r, tok, seq).input_ids) for r in rows]
    return out


def trained_params(stage: str, layers: int) -> int:
    """Parameters a training stage updates: Stage 1 the gates (one H-vector per layer), Stage 3 LoRA."""
    if stage == "warmup":
        return layers * SELECTOR_SHAPE["hidden_size"]
    if stage == "finetune":
        return lora_params(TARGET_SHAPE, layers, LORA_RANK)
    return 0


def _stage_model(
    stage: str,
    shape: dict[str, Any],
    act: dict[str, float],
    layers: int,
    b: int,
    batch: int,
    tokens: int,
    checkpointing: bool,
    chunk: int,
    floor_gb: float,
) -> dict[str, float]:
    """:func:`memory_model` of ``stage`` with its trained parameters at ``layers`` layers."""
    return memory_model(
        stage,
        shape,
        layers,
        bytes_per_weight=b,
        batch=batch,
        tokens=tokens,
        checkpointing=checkpointing,
        trained_params=trained_params(stage, layers),
        nll_chunk_tokens=chunk,
        floor_gb=floor_gb,
        **act,
    )


def build_report(
    args: argparse.Namespace,
    stages: dict[str, dict[str, Any]],
    probe: dict[str, Any],
    floor_gb: float,
    lengths: dict[str, list[int]],
) -> dict[str, Any]:
    """Per stage: the measured peak and time, the model at the measured setting, and its
    extrapolations to 28 layers (CPU float32 batch 1, with and without checkpointing; GPU bf16)."""
    seq, n = args.seq, args.layers
    model_of = {"warmup": "selector", "collect": "selector", "finetune": "target", "evaluate": "target"}
    rows: dict[str, Any] = {}
    for stage, which in model_of.items():
        shape = SELECTOR_SHAPE if which == "selector" else TARGET_SHAPE
        tokens = max(lengths[which])
        act: dict[str, float] = {}
        if stage in probe:
            per = [x / probe["tokens"] for x in probe[stage]["per_layer"]]
            act = {"act_first": per[0], "act_layer": per[-1]}
        gpu = GPU_SETTINGS[stage]

        model = functools.partial(_stage_model, stage, shape, act)
        gpu_batch, gpu_tokens = (1, gpu["tokens_per_batch"]) if stage == "collect" else (gpu["batch"], seq)
        gpu_ckpt, gpu_chunk = bool(gpu.get("checkpointing")), int(gpu.get("nll_chunk_tokens", 1024))
        # Every position reaches the LM head: HF's training loss and Stage 2 (all positions are scored).
        flops_here = forward_flop_per_sample(shape, n, tokens, tokens)
        flops_28 = forward_flop_per_sample(shape, FULL_LAYERS, seq, seq)
        timing = stages[stage]["timing"]
        rows[stage] = {
            "tokens_per_sample": tokens,
            "measured_peak_rss_gb": stages[stage]["peak_rss_gb"],
            "model_here_gb": model(n, 4, 1, tokens, False, 1024, floor_gb),
            "model_28_layers_cpu_fp32_batch1_gb": model(FULL_LAYERS, 4, 1, seq, False, 1024, floor_gb),
            "model_28_layers_cpu_fp32_batch1_checkpointing_gb": model(
                FULL_LAYERS, 4, 1, seq, True, 1024, floor_gb
            ),
            # 1 GB for the CUDA context and the allocator's slack.
            "model_28_layers_gpu_bf16_gb": model(
                FULL_LAYERS, 2, gpu_batch, gpu_tokens, gpu_ckpt, gpu_chunk, 1.0
            ),
            "gpu_setting": {"batch": gpu_batch, "tokens": gpu_tokens, **gpu},
            "forward_gflop_per_sample_here": round(flops_here / 1e9, 1),
            "forward_gflop_per_sample_28_layers": round(flops_28 / 1e9, 1),
            "timing_here": timing,
            # Same FLOP rate assumed: time scales with the forward FLOPs.
            "timing_28_layers_cpu_extrapolated": round(timing["value"] * flops_28 / flops_here, 1),
        }
    rows["select"] = {
        "measured_peak_rss_gb": stages["select"]["peak_rss_gb"],
        "timing_here": {"unit": "s (whole run)", "value": stages["select"]["wall_s"]},
    }
    return rows


def markdown(report: dict[str, Any]) -> str:
    rows = report["stages"]
    lines = [
        f"Measured: {report['layers']} decoder layers at the real width and vocabulary, "
        f"{report['seq']} tokens per sample, batch 1, float32, {report['threads']} threads, "
        f"{report['machine']['cpus']} CPUs ({report['date']}). Runtime floor (imports only): "
        f"{report['runtime_floor_gb']} GB.",
        "",
        "| stage | measured peak RSS (2 layers) | model (2 layers) | extrapolated 28 layers, CPU fp32, "
        "batch 1 | extrapolated 28 layers, GPU bf16 (setting) | measured time (2 layers) | "
        "extrapolated time, 28 layers, this CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "warmup": "1 warmup",
        "collect": "2 collect",
        "select": "selection",
        "finetune": "3 finetune (LoRA r=128)",
        "evaluate": "4 evaluate",
    }
    for stage in ("warmup", "collect", "select", "finetune", "evaluate"):
        r = rows[stage]
        t = r["timing_here"]
        if stage == "select":
            lines.append(
                f"| {names[stage]} | {r['measured_peak_rss_gb']:.2f} GB | – | – | – "
                f"| {t['value']:.1f} s | – |"
            )
            continue
        g = r["gpu_setting"]
        ckpt = (
            f" ({r['model_28_layers_cpu_fp32_batch1_checkpointing_gb']['total']:.2f} GB with grad. ckpt)"
            if stage in ("warmup", "finetune")
            else ""
        )
        setting = (
            f"{g['tokens']} tokens/batch"
            if stage == "collect"
            else f"batch {g['batch']} x {g['tokens']}" + (", grad. ckpt" if g.get("checkpointing") else "")
        )
        lines.append(
            f"| {names[stage]} | {r['measured_peak_rss_gb']:.2f} GB | {r['model_here_gb']['total']:.2f} GB | "
            f"{r['model_28_layers_cpu_fp32_batch1_gb']['total']:.2f} GB{ckpt} | "
            f"{r['model_28_layers_gpu_bf16_gb']['total']:.2f} GB ({setting}) | "
            f"{t['value']:.1f} {t['unit']} | {r['timing_28_layers_cpu_extrapolated']:.0f} {t['unit']} |"
        )
    eff = report.get("stage2_cpu_efficiency")
    if eff:
        lines += [
            "",
            f"Stage 2 at this width: {eff['achieved_gflop_per_s']} GFLOP/s vs float32 matmul "
            f"{eff['matmul']['shape']} {eff['matmul']['gflop_per_s']} GFLOP/s on {eff['matmul']['threads']} "
            f"threads: ratio {eff['ratio_to_matmul']}.",
        ]
    return "\n".join(lines) + "\n"


def finish_report(report: dict[str, Any], out: Path) -> None:
    """Add the model (params, memory terms, extrapolations, CPU efficiency) to the measured ``report``
    and write ``out`` (JSON) and ``out.md`` (the table). ``--report-only`` reruns just this."""
    ns = argparse.Namespace(layers=report["layers"], seq=report["seq"])
    report["params"] = {
        "selector_here": param_counts(SELECTOR_SHAPE, ns.layers),
        "selector_28": param_counts(SELECTOR_SHAPE, FULL_LAYERS),
        "target_here": param_counts(TARGET_SHAPE, ns.layers),
        "target_28": param_counts(TARGET_SHAPE, FULL_LAYERS),
        "lora_r128_28": lora_params(TARGET_SHAPE, FULL_LAYERS, LORA_RANK),
    }
    report["stages"] = build_report(
        ns, report["runs"], report["activation_probe"], report["runtime_floor_gb"], report["encoded_lengths"]
    )
    collect, matmul = report["stages"]["collect"], report["matmul"]
    achieved = collect["forward_gflop_per_sample_here"] / collect["timing_here"]["value"]
    report["stage2_cpu_efficiency"] = {
        "achieved_gflop_per_s": round(achieved, 2),
        "matmul": matmul,
        "ratio_to_matmul": round(achieved / matmul["gflop_per_s"], 3),
        "note": "Stage 2's s/sample includes encoding and writing the shard (bench_stage2.py (d) times "
        "the forward alone)",
    }
    report["table_md"] = markdown(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(report["table_md"])
    print(report["table_md"])
    print(f"written: {out} and {out.with_suffix('.md')}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sample after the chat template")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of Stages 1 and 3")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir, removed at the end")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "real_shape.json")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGE_ORDER),
        choices=STAGE_ORDER,
        help="run only these (each needs the ones before it); a subset writes its measurements, no model",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="STAGE:KEY=VALUE",
        help="one more override of one stage, e.g. warmup:training.lm_loss_chunk_tokens=1024 (repeatable)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        help="recompute the model and the table from the measurements in this JSON (no runs)",
    )
    args = parser.parse_args()
    if args.report_only:
        finish_report(json.loads(args.report_only.read_text()), args.out)
        return

    torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="real_shape_"))
    try:
        t0 = time.perf_counter()
        paths = build_assets(work / "assets", args.layers, args.seq, args.samples)
        print(f"assets built in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
        lengths = encoded_lengths(paths, args.seq)
        overrides = stage_overrides(paths, work / "runs", args)
        for item in args.override:
            stage, _, key_value = item.partition(":")
            if stage not in overrides or "=" not in key_value:
                parser.error(f"--override {item!r}: expected STAGE:KEY=VALUE with STAGE in {STAGE_ORDER}")
            overrides[stage].append(key_value)
        stages: dict[str, dict[str, Any]] = {}
        for stage in args.stages:
            stages[stage] = run_stage(stage, overrides[stage], work / "logs", args.threads)
            stages[stage]["timing"] = stage_timing(stage, work / "runs", args.samples)
            print(f"{stage}: {json.dumps(stages[stage])}", flush=True)
        if list(args.stages) != list(STAGE_ORDER):
            partial = {
                "date": dt.date.today().isoformat(),
                "command": " ".join(["python", *sys.argv]),
                "layers": args.layers,
                "seq": args.seq,
                "overrides": args.override,
                "runs": stages,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(partial, indent=2) + "\n")
            print(f"written: {args.out} (measurements of {', '.join(args.stages)} only)")
            return
        floor = runtime_floor_gb(args.threads, work)
        from flops import matmul_flops_per_s

        matmul = matmul_flops_per_s(
            args.seq, SELECTOR_SHAPE["hidden_size"], SELECTOR_SHAPE["intermediate_size"]
        )
        probe = activation_probe(paths, max(lengths["selector"]))
        report = {
            "date": dt.date.today().isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "command": " ".join(["python", *sys.argv]),
            "layers": args.layers,
            "seq": args.seq,
            "samples": args.samples,
            "threads": args.threads,
            "encoded_lengths": lengths,
            "runtime_floor_gb": floor,
            "activation_probe": probe,
            "matmul": matmul,
            "runs": stages,
        }
        finish_report(report, args.out)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
