"""Stage 4 (evaluate): the fine-tuned target (base + LoRA adapter) or the base model alone.

``quality-gate evaluate model.name=<base> adapter_path=<checkpoint dir>`` (seed: ``python src/main.py
--config-name stage_4_evaluate ...``)

On held-out records (``eval.data_path``):

* mean loss and perplexity on assistant tokens (the training objective), computed with the chunked
  NLL of :mod:`quality_gate.nll` (no full ``(B, T, V)`` float32 logits);
* for records with a checkable answer (``meta.answer``, or GSM8K's ``#### <number>`` at the end of the
  assistant turn): greedy generation through the chat template and exact-match accuracy, overall and
  per ``meta.task``;
* with ``eval.lm_eval_tasks`` set and ``lm_eval`` installed: those tasks through lm-eval's Python API
  on the in-memory model (tasks from local YAML in ``eval.lm_eval_include_path`` work offline).

Before any of that, an adapter must change the outputs: logits with the adapter enabled and disabled
are compared on a few samples, so a zero-initialised or wrongly loaded adapter is an error rather than
a "fine-tuned" row that is really the base model. ``adapter_path: null`` evaluates the base model.
Writes ``eval_results.json`` and ``eval_results.md`` in the run dir.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoConfig, PreTrainedModel, PreTrainedTokenizerBase, set_seed

from quality_gate.data import (
    SFTDataCollator,
    encode_records,
    ensure_chat_template,
    load_local_file,
    to_hf_dataset,
)
from quality_gate.data.encode import IGNORE_INDEX
from quality_gate.errors import AdapterError, ConfigError, DataError, MissingPathError
from quality_gate.eval_metrics import exact_match
from quality_gate.generation import greedy_replies
from quality_gate.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, read_json, sha256_file
from quality_gate.model_sources import check_model_source
from quality_gate.models import load_options, load_target
from quality_gate.nll import next_token_nll
from quality_gate.runs import init_run, update_manifest

log = logging.getLogger(__name__)

RESULTS_JSON = "eval_results.json"
RESULTS_MD = "eval_results.md"
_GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """``adapter_path``'s ``adapter_config.json``; a missing dir or file, or a garbled one, is one
    :class:`AdapterError` naming it (checked before the run dir is made or a model is loaded)."""
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter_path={adapter_dir} does not exist")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise AdapterError(
            f"adapter_path={adapter_dir} has no adapter_config.json; point adapter_path at a Stage 3 "
            "checkpoint-final/ or checkpoint-<step>/ dir (or set adapter_path=null for the base model)"
        )
    advice = "point adapter_path at an intact Stage 3 checkpoint-final/ or checkpoint-<step>/ dir"
    adapter_cfg = read_json(config_file, advice, AdapterError)
    if not isinstance(adapter_cfg, dict):
        raise AdapterError(f"{config_file} is not an adapter config (a JSON object); {advice}")
    return adapter_cfg


def _check_adapter_base(model: PreTrainedModel, adapter_dir: Path) -> dict[str, Any]:
    """Compare the adapter's recorded base model with ``model`` (model_type, hidden size, layers)."""
    adapter_cfg = adapter_config(adapter_dir)
    recorded = adapter_cfg.get("base_model_name_or_path")
    if recorded and Path(recorded).is_dir():
        base_cfg = AutoConfig.from_pretrained(recorded)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size"):
            ours, theirs = getattr(model.config, key, None), getattr(base_cfg, key, None)
            if ours != theirs:
                raise AdapterError(
                    f"adapter_path={adapter_dir} was trained on {recorded} ({key}={theirs}) but model.name "
                    f"loads a model with {key}={ours}; set model.name to the adapter's base model"
                )
    return {"base_model_name_or_path": recorded, "peft_type": adapter_cfg.get("peft_type")}


def load_model(cfg: DictConfig) -> tuple[nn.Module, PreTrainedTokenizerBase, dict[str, Any]]:
    """Base model from ``model.name`` plus the adapter at ``adapter_path`` (if any), in eval mode."""
    spec = cfg.model
    model, tokenizer = load_target(str(spec.name), **load_options(spec), key="model.name")
    ensure_chat_template(tokenizer, cfg.chat_template)
    info: dict[str, Any] = {"model_path": str(cfg.model.name), "adapter_path": None}
    if cfg.adapter_path:
        adapter_dir = Path(str(cfg.adapter_path))
        info.update(_check_adapter_base(model, adapter_dir))
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as err:
            raise AdapterError(
                f"adapter_path={adapter_dir} does not fit model.name={cfg.model.name} "
                f"({type(err).__name__}: {str(err).splitlines()[0][:300]}); set model.name to the "
                "base model the adapter was trained on"
            ) from err
        weights = adapter_dir / "adapter_model.safetensors"
        info["adapter_path"] = str(adapter_dir)
        info["adapter_sha256"] = sha256_file(weights) if weights.is_file() else None
    model.eval()
    return model, tokenizer, info


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states ``(B, T, H)`` of the backbone (adapter layers included, when active)."""
    return model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state


@torch.no_grad()
def adapter_output_change(
    model: PeftModel, batch: dict[str, torch.Tensor], chunk_tokens: int = 1024
) -> float:
    """Max |logits(adapter on) - logits(adapter off)| over the valid tokens of ``batch``.

    ``batch``: ``input_ids`` and ``attention_mask`` of shape ``(B, T)``. The LM head runs on
    ``chunk_tokens`` positions at a time in each mode, so no ``(B, T, V)`` logits are held.
    """
    device = _device_of(model)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    valid = mask.bool()
    on = _hidden(model, ids, mask)[valid]  # (N, H)
    with model.disable_adapter():
        off = _hidden(model, ids, mask)[valid]  # (N, H)
    head = model.get_output_embeddings()
    change = 0.0
    for start in range(0, on.shape[0], chunk_tokens):
        logits_on = head(on[start : start + chunk_tokens]).float()  # (C, V)
        with model.disable_adapter():
            logits_off = head(off[start : start + chunk_tokens]).float()  # (C, V)
        # In place: two (C, V) float32 buffers at the peak, not four (a difference and its abs).
        change = max(change, logits_on.sub_(logits_off).abs_().max().item())
        del logits_on, logits_off
    return change


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    dataset: Sequence[dict],
    collator: SFTDataCollator,
    batch_size: int,
    chunk_tokens: int = 1024,
) -> dict:
    """Mean NLL per assistant token over ``dataset`` and its perplexity (token-weighted, not per sample).

    The backbone runs once per batch; the LM head only on the labelled positions, ``chunk_tokens`` at
    a time (:func:`quality_gate.nll.chunked_token_nll`). ``per_sample`` lists each sample's NLL sum and
    token count (in dataset order), for paired comparisons between models.
    """
    device = _device_of(model)
    head = model.get_output_embeddings()
    total_nll, total_tokens = 0.0, 0
    per_sample: list[tuple[float, int]] = []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator)
    for batch in tqdm(loader, desc="held-out loss", leave=False):
        ids = batch["input_ids"].to(device)  # (B, T)
        labels = batch["labels"].to(device)  # (B, T), IGNORE_INDEX outside assistant tokens
        hidden = _hidden(model, ids, batch["attention_mask"].to(device))  # (B, T, H)
        scored = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts the labelled token t+1
        nll = next_token_nll(hidden, head, labels.clamp_min(0), scored, chunk_tokens)  # (B, T-1)
        sums, counts = nll.sum(dim=1).tolist(), scored.sum(dim=1).tolist()  # (B,), (B,)
        per_sample += list(zip(sums, counts))
        total_nll += sum(sums)
        total_tokens += int(sum(counts))
    mean = total_nll / max(total_tokens, 1)
    return {
        "loss": mean,
        "perplexity": math.exp(mean),
        "num_tokens": total_tokens,
        "num_samples": len(dataset),
        "per_sample": per_sample,
    }


def checkable_answer(record: dict) -> tuple[str, str] | None:
    """``(kind, answer)`` for a record whose answer can be checked, else None.

    ``kind`` is ``"exact"`` (``meta.answer``) or ``"number"`` (GSM8K: ``#### <number>`` ending the last
    assistant turn).
    """
    meta = record.get("meta") or {}
    if meta.get("answer") is not None:
        return "exact", str(meta["answer"])
    assistant = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    if assistant:
        match = _GSM8K_ANSWER.search(assistant[-1].strip())
        if match:
            return "number", match.group(1)
    return None


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def is_correct(prediction: str, kind: str, answer: str) -> bool:
    """Exact match for ``meta.answer``; numeric equality of the final number for GSM8K."""
    if kind == "exact":
        return exact_match(prediction, answer)
    tail = prediction.split("####")[-1]
    numbers = _NUMBER.findall(tail)
    predicted = _as_number(numbers[-1]) if numbers else None
    expected = _as_number(answer)
    return predicted is not None and expected is not None and math.isclose(predicted, expected)


def exact_match_accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, records: list[dict], cfg: DictConfig
) -> dict[str, Any] | None:
    """Accuracy over the records with a checkable answer, overall and per ``meta.task``; None if none."""
    checkable = [(r, c) for r in records if (c := checkable_answer(r)) is not None]
    if not checkable:
        return None
    predictions = greedy_replies(
        model,
        tokenizer,
        [r for r, _ in checkable],
        batch_size=int(cfg.eval.batch_size),
        max_new_tokens=int(cfg.eval.max_new_tokens),
        max_prompt_length=int(cfg.eval.max_sequence_length),
        progress=True,
    )
    per_task: dict[str, list[bool]] = defaultdict(list)
    examples = []
    correct: dict[str, bool] = {}
    for (record, (kind, answer)), prediction in zip(checkable, predictions, strict=True):
        ok = is_correct(prediction, kind, answer)
        correct[str(record.get("id"))] = ok
        per_task[str((record.get("meta") or {}).get("task", record.get("dataset", "all")))].append(ok)
        if len(examples) < int(cfg.eval.num_examples):
            examples.append(
                {"id": record.get("id"), "answer": answer, "prediction": prediction, "correct": ok}
            )
    hits = [ok for oks in per_task.values() for ok in oks]
    return {
        "accuracy": sum(hits) / len(hits),
        "num_samples": len(hits),
        "per_task": {
            task: {"accuracy": sum(v) / len(v), "num_samples": len(v)} for task, v in per_task.items()
        },
        "examples": examples,
        "correct": correct,
    }


PER_SAMPLE_FILE = "eval_per_sample.jsonl"


def per_sample_rows(samples: Sequence[Any], heldout: dict[str, Any], em: dict[str, Any] | None) -> list[dict]:
    """One row per held-out sample: id, NLL sum and tokens of its assistant turns, exact match (or None)."""
    correct = (em or {}).get("correct", {})
    return [
        {"id": s.id, "nll_sum": nll, "tokens": n, "correct": correct.get(s.id)}
        for s, (nll, n) in zip(samples, heldout["per_sample"], strict=True)
    ]


def lm_eval_task_manager(cfg: DictConfig) -> Any:
    """lm-eval's ``TaskManager`` for ``eval.lm_eval_tasks``, with every task name checked against the
    tasks it indexes (built-in and ``eval.lm_eval_include_path``): an unknown one is a
    :class:`ConfigError` naming it and the closest known ones. Runs before the run dir is made and
    any model is loaded (indexing lm-eval's built-in tasks takes ~10 s; the manager is reused).
    None when no task is set or lm-eval is not installed.
    """
    tasks = [str(t) for t in cfg.eval.lm_eval_tasks]
    if not tasks or importlib.util.find_spec("lm_eval") is None:
        return None
    include = cfg.eval.lm_eval_include_path
    if include and not Path(str(include)).is_dir():
        raise MissingPathError(f"eval.lm_eval_include_path={include} is not a directory of task YAMLs")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=str(include) if include else None,
        include_defaults=bool(cfg.eval.lm_eval_include_defaults),
    )
    known = list(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not manager.match_tasks([t])]
    if unknown:
        close = {t: difflib.get_close_matches(t, known, n=3, cutoff=0.6) for t in unknown}
        hints = "".join(f"; {t}: did you mean {c}?" for t, c in close.items() if c)
        searched = [f"eval.lm_eval_include_path={include}"] if include else []
        if cfg.eval.lm_eval_include_defaults:
            searched.append("lm-eval's built-in tasks")
        raise ConfigError(
            f"eval.lm_eval_tasks: unknown task(s) {unknown} (searched {' and '.join(searched) or 'nothing'})"
            f"{hints}; `lm-eval ls tasks` lists the built-in ones"
        )
    return manager


def run_lm_eval(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: DictConfig, manager: Any = None
) -> dict[str, Any] | None:
    """``eval.lm_eval_tasks`` through lm-eval's ``simple_evaluate`` on the in-memory model.

    Returns ``{"tasks": {task: {metric: value}}, ...}``, ``{"skipped": reason}`` when lm-eval is not
    installed, or None when no task is configured. ``manager``: from :func:`lm_eval_task_manager`.
    """
    tasks = list(cfg.eval.lm_eval_tasks)
    if not tasks:
        return None
    if importlib.util.find_spec("lm_eval") is None:
        log.warning("eval.lm_eval_tasks=%s set but lm_eval is not installed; skipping them", tasks)
        return {"skipped": "lm_eval is not installed (pip install lm-eval)"}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    include = cfg.eval.lm_eval_include_path
    manager = manager if manager is not None else lm_eval_task_manager(cfg)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=int(cfg.eval.batch_size),
        device=str(_device_of(model)),
    )
    limit = cfg.eval.lm_eval_limit
    fewshot = cfg.eval.lm_eval_num_fewshot
    out = simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=None if fewshot is None else int(fewshot),
        limit=None if limit is None else float(limit) if float(limit) < 1 else int(limit),
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
        random_seed=int(cfg.seed),
        numpy_random_seed=int(cfg.seed),
        torch_random_seed=int(cfg.seed),
        fewshot_random_seed=int(cfg.seed),
    )
    results = {
        task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
        for task, metrics in (out or {}).get("results", {}).items()
    }
    return {"tasks": results, "include_path": str(include) if include else None}


def load_eval_records(cfg: DictConfig) -> list[dict]:
    """The held-out records of ``eval.data_path`` (any data-layer format), the first ``eval.max_samples``."""
    path = Path(str(cfg.eval.data_path))
    if not path.is_file():
        raise MissingPathError(f"eval.data_path={path} does not exist")
    records, skipped = load_local_file(path, str(cfg.eval.dataset_name), strict=bool(cfg.eval.strict))
    if skipped:
        log.warning("eval.data_path=%s: %d rows skipped, first: %s", path, len(skipped), skipped[0])
    if cfg.eval.max_samples is not None:
        records = records[: int(cfg.eval.max_samples)]
    if not records:
        raise DataError(
            f"eval.data_path={path} holds no usable records (conversations with an assistant turn); "
            f"{len(skipped)} rows skipped"
        )
    return records


def results_markdown(results: dict[str, Any]) -> str:
    """A short Markdown table of the headline numbers."""
    adapter = results["model"]["adapter_path"] or "none (base model, no fine-tune)"
    lines = [
        "# Stage 4 evaluation",
        "",
        f"- base model: `{results['model']['model_path']}`",
        f"- adapter: `{adapter}`",
        f"- held-out data: `{results['data']['data_path']}` ({results['data']['num_records']} records)",
        "",
        "| metric | value | n |",
        "|---|---|---|",
    ]
    loss = results["heldout"]
    lines.append(f"| held-out loss (assistant tokens) | {loss['loss']:.4f} | {loss['num_tokens']} tokens |")
    lines.append(f"| held-out perplexity | {loss['perplexity']:.3f} | {loss['num_samples']} samples |")
    em = results.get("exact_match")
    if em:
        lines.append(f"| exact match | {em['accuracy']:.3f} | {em['num_samples']} |")
        for task, row in sorted(em["per_task"].items()):
            lines.append(f"| exact match: {task} | {row['accuracy']:.3f} | {row['num_samples']} |")
    lm = results.get("lm_eval")
    if lm and "tasks" in lm:
        for task, metrics in sorted(lm["tasks"].items()):
            for name, value in sorted(metrics.items()):
                lines.append(f"| lm-eval {task}: {name} | {value:.4f} | |")
    elif lm:
        lines.append(f"| lm-eval | skipped: {lm['skipped']} | |")
    return "\n".join(lines) + "\n"


def check_adapter_matters(
    model: nn.Module, probe: dict[str, torch.Tensor], cfg: DictConfig, info: dict
) -> None:
    """Refuse an adapter that leaves the logits within ``eval.adapter_check_atol`` of the base model.

    ``probe``: a collated batch (``input_ids``, ``attention_mask`` of shape ``(B, T)``). Records the
    largest logit change in ``info["adapter_max_logit_change"]``.
    """
    change = adapter_output_change(model, probe, int(cfg.eval.nll_chunk_tokens))
    info["adapter_max_logit_change"] = change
    if change <= float(cfg.eval.adapter_check_atol):
        raise AdapterError(
            f"adapter does not change the outputs: adapter_path={info['adapter_path']} gives "
            f"logits within {change:.3g} of the base model on {len(probe['input_ids'])} eval samples "
            "(zero-initialised, untrained or wrongly loaded adapter?)"
        )
    log.info("adapter changes the logits by up to %.4g", change)


def write_results(run_dir: Path, results: dict[str, Any], samples: Sequence[Any]) -> None:
    """``eval_per_sample.jsonl`` (per-sample rows), then ``eval_results.json`` / ``.md`` without them."""
    atomic_write_jsonl(
        run_dir / PER_SAMPLE_FILE, per_sample_rows(samples, results["heldout"], results["exact_match"])
    )
    results["heldout"].pop("per_sample")
    if results["exact_match"]:
        results["exact_match"].pop("correct")
    atomic_write_json(run_dir / RESULTS_JSON, results)
    atomic_write_text(run_dir / RESULTS_MD, results_markdown(results))
    update_manifest(run_dir, eval_results=RESULTS_JSON)
    em = results["exact_match"]
    log.info(
        "Stage 4 done in %.1fs: held-out loss %.4f (ppl %.3f)%s",
        results["wall_time_s"],
        results["heldout"]["loss"],
        results["heldout"]["perplexity"],
        f", exact match {em['accuracy']:.3f} on {em['num_samples']}" if em else "",
    )


def run(cfg: DictConfig) -> None:
    """Stage 4: load base (+ adapter), check the adapter matters, compute and write the metrics."""
    # Before the run dir is made and anything expensive runs: the model, the adapter, the lm-eval tasks.
    check_model_source(str(cfg.model.name), "model.name")
    if cfg.adapter_path:
        adapter_config(Path(str(cfg.adapter_path)))
    task_manager = lm_eval_task_manager(cfg)
    run_dir = init_run(cfg, "evaluate", model_path=str(cfg.model.name), adapter_path=cfg.adapter_path)
    started = time.perf_counter()
    set_seed(int(cfg.seed))
    model, tokenizer, model_info = load_model(cfg)
    records = load_eval_records(cfg)
    samples, encode_stats, _skipped = encode_records(
        records, tokenizer, int(cfg.eval.max_sequence_length), str(cfg.eval.truncation)
    )
    if not samples:
        raise DataError("no held-out sample left after encoding; check eval.max_sequence_length")
    dataset = to_hf_dataset(samples)
    collator = SFTDataCollator(tokenizer.pad_token_id)
    if model_info["adapter_path"]:
        probe = collator([dataset[i] for i in range(min(int(cfg.eval.adapter_check_samples), len(dataset)))])
        check_adapter_matters(model, probe, cfg, model_info)
    else:
        log.info("adapter_path is null: evaluating the base model alone (no fine-tune)")
    results: dict[str, Any] = {
        "model": model_info,
        "evaluated": "base + adapter" if model_info["adapter_path"] else "base model (no fine-tune)",
        "data": {
            "data_path": str(cfg.eval.data_path),
            "sha256": sha256_file(cfg.eval.data_path),
            "num_records": len(records),
            "encode_stats": encode_stats.as_dict(),
        },
        "heldout": heldout_loss(
            model, dataset, collator, int(cfg.eval.batch_size), int(cfg.eval.nll_chunk_tokens)
        ),
        "exact_match": exact_match_accuracy(model, tokenizer, records, cfg),
        "lm_eval": run_lm_eval(model, tokenizer, cfg, task_manager),
        "config": OmegaConf.to_container(cfg.eval, resolve=True),
    }
    results["wall_time_s"] = round(time.perf_counter() - started, 3)
    write_results(run_dir, results, samples)
