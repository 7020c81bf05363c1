"""Build the project's tiny offline models: one BPE tokenizer, a Qwen3 selector and a Qwen2 target.

    python scripts/make_tiny_models.py --out-dir assets/models --seed 0

Writes ``<out-dir>/tiny-qwen3-selector`` and ``<out-dir>/tiny-qwen2-target`` (safetensors, float32,
tokenizer, chat template, generation config), each well under 5 MB, reproducibly for a given seed.

- Tokenizer: byte-level BPE trained on synthetic chat text, special tokens ``<|endoftext|>`` (pad),
  ``<|im_start|>``, ``<|im_end|>`` (eos for chat use); ``<think>``/``</think>`` as plain added tokens,
  as in Qwen3. The selector gets Qwen3's stock chat template, the target Qwen2.5's.
- Selector (Qwen3ForCausalLM): pretrained on clean synthetic chats of every task family (seeds
  disjoint from assets/data) plus a prior of assistant chatter (``quality_gate.synthetic.prior_records``:
  task prompts answered with polite filler, a refusal or a quote of the prompt, 1 chat in 6), the
  kind of text every real pretrained selector has seen plenty of. So surprising corruptions (garbage,
  wrong answers) get a high per-token NLL and predictable ones (generic, refusal, echo) a low one,
  as with real models.
- Target (Qwen2ForCausalLM): pretrained on user prompts paired with the answers of other, random
  prompts: it learns the tokens and the chat format but not the tasks, so fine-tuning on clean task
  data raises its exact match, and corrupted data helps less.

Unless ``--skip-bench``, the script then measures this (figures printed at the end): the selector's
mean assistant-token NLL on clean vs corrupted records of assets/data/synthetic_train.jsonl, and the
target's greedy exact match on assets/data/synthetic_eval.jsonl before fine-tuning, after fine-tuning
on ~600 clean records and after fine-tuning on ~600 records of which 30 % are corrupted.
Measured with the defaults (seed 0, 1 CPU thread; 28 min on a 2-core machine shared with other
jobs, building included): selector mean reply NLL 0.21 on clean checkable records and 0.69 on clean
open-ended ones; surprising corruptions garbage 9.5, repetition 9.1, truncated 5.8, other_task 3.3,
wrong_answer 1.2; predictable ones generic 0.32, refusal 0.28, echo 0.66 (as likely as clean answers:
its prior has seen such chatter); selector exact match 0.56 on the checkable held-out records; target
exact match 0.021 before fine-tuning, 0.164 after 15 epochs on 600 clean records, 0.086 after 15
epochs on 600 records of which 30 % are corrupted.
``--bench-only`` re-measures models already in ``--out-dir``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from quality_gate.eval_metrics import evaluate_exact_match
from quality_gate.synthetic import CORRUPTIONS, OPEN_TASKS, make_records, prior_records

logger = logging.getLogger("make_tiny_models")

SELECTOR_DIR = "tiny-qwen3-selector"
TARGET_DIR = "tiny-qwen2-target"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
THINK_TOKENS = ("<think>", "</think>")
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen3's stock chat template (Qwen/Qwen3-* tokenizer_config.json), without generation markers.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501

# Qwen2.5's stock chat template (Qwen/Qwen2.5-*-Instruct tokenizer_config.json).
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""  # noqa: E501


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", default="assets/models", help="folder that receives both model dirs")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, tokenizer and weights")
    parser.add_argument("--vocab-size", type=int, default=768, help="BPE vocabulary size incl. specials")
    parser.add_argument("--hidden-size", type=int, default=96, help="hidden size of both models")
    parser.add_argument("--selector-steps", type=int, default=2500, help="selector pretraining steps")
    parser.add_argument("--target-steps", type=int, default=1500, help="target pretraining steps")
    parser.add_argument("--batch-size", type=int, default=32, help="pretraining batch size")
    parser.add_argument("--data-dir", default="assets/data", help="synthetic_train/eval.jsonl for the bench")
    parser.add_argument("--bench-samples", type=int, default=600, help="fine-tuning set size of the bench")
    parser.add_argument("--bench-epochs", type=int, default=15, help="fine-tuning epochs of the bench")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--skip-bench", action="store_true", help="build the models only")
    parser.add_argument("--bench-only", action="store_true", help="measure the models already in --out-dir")
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def pretraining_records(seed: int, num_samples: int, noise_rate: float = 0.0) -> list[dict]:
    """Synthetic records from seeds that assets/data (seeds 0 and 1) never uses.

    Made in chunks because a single call refuses to repeat a prompt and some families have only a
    few thousand distinct prompts.
    """
    chunk = 2000
    records: list[dict] = []
    for k in range(math.ceil(num_samples / chunk)):
        records += make_records(min(chunk, num_samples - len(records)), noise_rate, 1000 + 100 * seed + k)
    return records


def train_tokenizer(records: list[dict], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the text the chat templates produce, special tokens excluded."""
    texts = []
    for r in records:
        # Headers and Qwen2.5's default system prompt once per chat, so that their merges rank as
        # high as in real chat data and the target's prompts stay short.
        texts += ["system\n" + QWEN25_DEFAULT_SYSTEM, "\n\n"]
        texts += [f"{m['role']}\n{m['content']}" for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Qwen3 keeps <think>/</think> as added but non-special tokens: decoding keeps them visible.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def with_template(tokenizer: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def model_config(cls: type[Qwen2Config] | type[Qwen3Config], tokenizer, hidden: int):
    """A 4-layer, 4-head (2 KV heads) config sized for a few hundred thousand parameters."""
    ids = tokenizer.convert_tokens_to_ids
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(IM_END),
        pad_token_id=ids(ENDOFTEXT),
    )


def encode_chat(tokenizer: PreTrainedTokenizerFast, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat ending in an assistant turn, and a 0/1 mask of that turn's tokens
    (everything the model emits after the generation prompt, up to and including ``<|im_end|>``)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("chat template: the generation prompt is not a prefix of the full chat")
    reply, trailing = full[len(prompt) :].rstrip("\n"), "\n" * (len(full) - len(full.rstrip("\n")))
    parts = [(prompt, 0), (reply, 1), (trailing, 0)]
    ids: list[int] = []
    mask: list[int] = []
    for text, flag in parts:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        mask += [flag] * len(piece)
    return ids, mask


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, attention_mask and reply mask, each (B, T)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    reply = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        reply[row, : len(ids)] = torch.tensor(mask)
    return {"input_ids": input_ids, "attention_mask": attention, "reply_mask": reply}


def token_nll(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token NLL of each next token, (B, T-1); position t scores token t+1."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), batch["input_ids"][:, 1:], reduction="none"
    )  # (B, T-1)


def train_lm(
    model: PreTrainedModel,
    examples: list[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    reply_only: bool,
    desc: str,
) -> None:
    """AdamW with linear warm-up and cosine decay on random batches of ``examples``.

    ``reply_only=False`` adds the mean NLL over all tokens to the mean NLL over reply tokens, so that
    the few reply tokens per chat are not drowned by the prompt tokens.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    gen = torch.Generator().manual_seed(seed)
    for step in (bar := tqdm(range(steps), desc=desc, mininterval=5)):
        idx = torch.randint(len(examples), (batch_size,), generator=gen).tolist()
        batch = collate([examples[i] for i in idx], pad_id)
        nll = token_nll(model, batch)  # (B, T-1)
        reply = batch["reply_mask"][:, 1:].float()
        loss = (nll * reply).sum() / reply.sum()
        if not reply_only:
            valid = batch["attention_mask"][:, 1:].float()
            loss = loss + (nll * valid).sum() / valid.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def mean_reply_nll(model: PreTrainedModel, tokenizer, records: list[dict], pad_id: int) -> float:
    """Mean per-token NLL over the reply tokens of ``records`` (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(records), 64):
        batch = collate([encode_chat(tokenizer, r["messages"]) for r in records[start : start + 64]], pad_id)
        reply = batch["reply_mask"][:, 1:].float()
        total += (token_nll(model, batch) * reply).sum().item()
        count += int(reply.sum().item())
    return total / count


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    ids = tokenizer.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        bos_token_id=ids(ENDOFTEXT),
        eos_token_id=ids(IM_END),
        pad_token_id=ids(ENDOFTEXT),
        do_sample=False,
        max_new_tokens=32,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    logger.info("saved %s (%.2f MB, %d parameters)", path, size / 2**20, model.num_parameters())


def build_selector(tokenizer, args: argparse.Namespace, records: list[dict]) -> Qwen3ForCausalLM:
    tokenizer = with_template(tokenizer, QWEN3_CHAT_TEMPLATE)
    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(model_config(Qwen3Config, tokenizer, args.hidden_size))
    examples = [encode_chat(tokenizer, r["messages"]) for r in records]
    train_lm(
        model, examples, args.selector_steps, args.batch_size, 3e-3, args.seed, tokenizer.pad_token_id,
        reply_only=False, desc="selector pretraining",
    )  # fmt: skip
    save_model(model, tokenizer, Path(args.out_dir) / SELECTOR_DIR)
    return model


def build_target(
    tokenizer, args: argparse.Namespace, records: list[dict], prior: list[dict]
) -> Qwen2ForCausalLM:
    tokenizer = with_template(tokenizer, QWEN25_CHAT_TEMPLATE)
    rng = random.Random(args.seed)
    answers = [r["messages"][-1]["content"] for r in records]
    rng.shuffle(answers)
    # Every prompt gets the answer of a random other prompt: the format is learnable, the task is not.
    mismatched = [[r["messages"][0], {"role": "assistant", "content": a}] for r, a in zip(records, answers)]
    mismatched += [r["messages"] for r in prior]
    torch.manual_seed(args.seed + 1)
    model = Qwen2ForCausalLM(model_config(Qwen2Config, tokenizer, args.hidden_size))
    examples = [encode_chat(tokenizer, m) for m in mismatched]
    train_lm(
        model, examples, args.target_steps, args.batch_size, 3e-3, args.seed + 1, tokenizer.pad_token_id,
        reply_only=False, desc="target pretraining",
    )  # fmt: skip
    save_model(model, tokenizer, Path(args.out_dir) / TARGET_DIR)
    return model


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def bench(args: argparse.Namespace) -> dict[str, float]:
    """Selector NLL clean vs corrupted, and the target's exact match before/after fine-tuning."""
    out_dir, data_dir = Path(args.out_dir), Path(args.data_dir)
    train = read_jsonl(data_dir / "synthetic_train.jsonl")
    evaluation = read_jsonl(data_dir / "synthetic_eval.jsonl")
    clean = [r for r in train if r["meta"]["corruption"] == "none"]
    corrupted = [r for r in train if r["meta"]["corruption"] != "none"]
    checkable = [r for r in clean if r["meta"]["task"] not in OPEN_TASKS]
    open_ended = [r for r in clean if r["meta"]["task"] in OPEN_TASKS]
    figures: dict[str, float] = {}

    selector = Qwen3ForCausalLM.from_pretrained(out_dir / SELECTOR_DIR)
    sel_tok = PreTrainedTokenizerFast.from_pretrained(out_dir / SELECTOR_DIR)
    pad_id = sel_tok.pad_token_id
    figures["selector_nll_clean"] = mean_reply_nll(selector, sel_tok, clean[:200], pad_id)
    figures["selector_nll_clean_checkable"] = mean_reply_nll(selector, sel_tok, checkable[:200], pad_id)
    figures["selector_nll_clean_open"] = mean_reply_nll(selector, sel_tok, open_ended[:200], pad_id)
    figures["selector_nll_corrupted"] = mean_reply_nll(selector, sel_tok, corrupted[:200], pad_id)
    for kind in CORRUPTIONS:
        of_kind = [r for r in corrupted if r["meta"]["corruption"] == kind][:100]
        figures[f"selector_nll_{kind}"] = mean_reply_nll(selector, sel_tok, of_kind, pad_id)
    figures["selector_eval_exact_match"] = evaluate_exact_match(selector, sel_tok, evaluation)

    tgt_tok = PreTrainedTokenizerFast.from_pretrained(out_dir / TARGET_DIR)
    base = Qwen2ForCausalLM.from_pretrained(out_dir / TARGET_DIR)
    figures["target_em_before"] = evaluate_exact_match(base, tgt_tok, evaluation)
    n = args.bench_samples
    n_bad = round(0.3 * n)
    sets = {"clean": clean[:n], "noisy": clean[: n - n_bad] + corrupted[:n_bad]}
    for name, records in sets.items():
        model = copy.deepcopy(base)
        examples = [encode_chat(tgt_tok, r["messages"]) for r in records]
        steps = math.ceil(args.bench_epochs * len(examples) / 16)
        train_lm(
            model, examples, steps, 16, 1e-3, args.seed, tgt_tok.pad_token_id,
            reply_only=True, desc=f"target fine-tuning ({name})",
        )  # fmt: skip
        figures[f"target_em_after_{name}"] = evaluate_exact_match(model, tgt_tok, evaluation)
    return figures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Tiny matmuls gain little from a second thread, and OpenMP spin-waits slow down badly when
    # other processes hold the cores.
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    start = time.time()
    if not args.bench_only:
        records = pretraining_records(args.seed, 20000)
        prior = prior_records(4000, seed=5000 + args.seed)  # 1 chat in 6 of the selector's pretraining
        noisy = pretraining_records(args.seed + 1, 2000, 0.3)
        tokenizer = train_tokenizer(records + prior + noisy, args.vocab_size)
        logger.info("tokenizer: %d tokens", len(tokenizer))
        build_selector(tokenizer, args, records + prior)
        build_target(tokenizer, args, records, prior[:2000])
        logger.info("models built in %.0f s", time.time() - start)
    if not args.skip_bench:
        figures = bench(args)
        print(json.dumps(figures, indent=2))
        logger.info("done in %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
