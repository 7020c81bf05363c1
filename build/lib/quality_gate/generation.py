"""Greedy replies through the chat template: the one generation loop (Stage 4, the tiny-asset checks).

Every prompt is the conversation before its last assistant turn, rendered with
``add_generation_prompt=True``, left-padded (and, past ``max_prompt_length``, cut on the left, so the
generation prompt at its end survives). Generation stops at the tokenizer's EOS or at ``<|im_end|>``
(the end of a ChatML turn, which a base model's EOS may not be); special tokens are dropped and a
``<think>...</think>`` block (Qwen3) is removed from the reply.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

END_OF_TURN = "<|im_end|>"
_THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL)


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The turns before the last assistant turn (all turns when there is none)."""
    messages = record["messages"]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return messages[: assistant[-1]] if assistant else list(messages)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """EOS and, when the vocabulary has it, ``<|im_end|>``."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    vocab = tokenizer.get_vocab()
    if END_OF_TURN in vocab and vocab[END_OF_TURN] not in ids:
        ids.append(int(vocab[END_OF_TURN]))
    return ids


def clean_reply(text: str) -> str:
    """The reply without a ``<think>...</think>`` block and surrounding whitespace."""
    return _THINK_BLOCK.sub("", text).strip()


@torch.no_grad()
def greedy_replies(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[dict[str, Any]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 32,
    max_prompt_length: int | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy reply to each record's prompt (:func:`prompt_messages`), one string per record."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    prompts = [
        tokenizer.apply_chat_template(prompt_messages(r), tokenize=False, add_generation_prompt=True)
        for r in records
    ]
    replies: list[str] = []
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc="generate", leave=False, disable=not progress):
            encoded = [
                tokenizer(p, add_special_tokens=False)["input_ids"]
                for p in prompts[start : start + batch_size]
            ]
            if max_prompt_length:
                encoded = [ids[-max_prompt_length:] for ids in encoded]
            width = max(len(ids) for ids in encoded)
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device
            )  # (B, T)
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=pad_id,
            )  # (B, T + new)
            for row in out[:, width:].tolist():
                cut = min((row.index(s) for s in stops if s in row), default=len(row))
                replies.append(clean_reply(tokenizer.decode(row[:cut], skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return replies
