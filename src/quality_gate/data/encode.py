"""Records -> token ids with labels on assistant tokens only, for any chat template.

The chat template renders the whole conversation once (``tokenize=False``) and the text is
tokenized once without extra special tokens, so ``input_ids`` are exactly what the model sees at
inference. Assistant tokens are found without ``{% generation %}`` markers (the stock Qwen2.5 and
Qwen3 templates have none): each assistant message's content is located in the rendered text, in
message order, and the tokens whose character offsets fall in that span are labelled, together
with the special end-of-turn token that follows it (``<|im_end|>``), so the model learns to stop.
Template text around the content (``<|im_start|>assistant\\n``, Qwen3's empty
``<think>\\n\\n</think>\\n\\n`` block, Qwen2.5's default system prompt) is never labelled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quality_gate.config import TRUNCATION as TRUNCATION_POLICIES
from quality_gate.data.sources import SkippedRow
from quality_gate.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Records are rendered and tokenized this many at a time (the fast tokenizer batches in Rust).
ENCODE_CHUNK = 512


@dataclass
class EncodedSample:
    """One tokenized record: ``input_ids`` (T,), ``labels`` (T,) with -100 outside assistant tokens."""

    id: str
    dataset: str
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    """Counts over one ``encode_records`` call; ``total`` = records in."""

    total: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_assistant_tokens: int = 0

    @property
    def kept(self) -> int:
        return self.total - self.dropped_too_long - self.dropped_no_assistant_tokens

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "kept": self.kept}


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, fallback_template: str | None = None) -> None:
    """Check that ``tokenizer`` can encode records: fast (offsets) and with a chat template.

    A tokenizer without a template gets ``fallback_template`` when one is given.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; assistant-only labels need character "
            "offsets (return_offsets_mapping). Load the tokenizer with use_fast=True / a tokenizer.json"
        )
    if tokenizer.chat_template:
        return
    if fallback_template:
        tokenizer.chat_template = fallback_template
        log.info("the tokenizer has no chat template; using dataset.chat_template")
        return
    raise ConfigError(
        f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template; "
        "set dataset.chat_template to a Jinja chat template (e.g. the one of the model family)"
    )


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ConfigError(
            f"dataset.truncation={truncation!r}: expected one of {', '.join(TRUNCATION_POLICIES)}"
        )


def _special_strings(tokenizer: PreTrainedTokenizerBase) -> tuple[set[int], list[str]]:
    ids = set(tokenizer.all_special_ids)
    strings = set(tokenizer.all_special_tokens)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special:
            ids.add(token_id)
            strings.add(added.content)
    return ids, sorted(strings, key=len, reverse=True)


def _find_content(text: str, content: str, start: int, special: list[str]) -> tuple[int, int] | None:
    """Character span of ``content`` in ``text`` at or after ``start``.

    Among the occurrences, the first one followed by a special token (the end of the turn) wins:
    a short answer such as "assistant" also occurs in the role header before it. Templates that
    trim the content, or drop the ``<think>`` part of earlier turns (Qwen3), are matched by the
    trimmed content, then by the part after ``</think>``.
    """
    needles = [content, content.strip()]
    if "</think>" in content:
        needles.append(content.split("</think>")[-1].strip())
    for needle in dict.fromkeys(n for n in needles if n):
        first = None
        pos = text.find(needle, start)
        while pos != -1:
            end = pos + len(needle)
            if first is None:
                first = (pos, end)
            after = end
            while after < len(text) and text[after] in " \t\n":
                after += 1
            if any(text.startswith(s, after) for s in special):
                return pos, end
            pos = text.find(needle, pos + 1)
        if first is not None:
            return first
    return None


def _assistant_labels(
    text: str,
    messages: Sequence[dict[str, str]],
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special_ids: set[int],
    special_strings: list[str],
) -> list[int]:
    """``labels`` (T,) for one rendered conversation: the ids of assistant content + end-of-turn tokens."""
    labels = [IGNORE_INDEX] * len(input_ids)
    cursor = 0
    token = 0
    for message in messages:
        span = _find_content(text, message["content"], cursor, special_strings)
        if span is None:
            # The template changed this message's text (e.g. trimmed it); later ones are still searched.
            continue
        cursor = span[1]
        if message["role"] != "assistant":
            continue
        while token < len(offsets) and offsets[token][1] <= span[0]:
            token += 1
        while token < len(offsets) and offsets[token][0] < span[1]:
            if offsets[token][1] > offsets[token][0]:
                labels[token] = input_ids[token]
            token += 1
        # The end-of-turn token: the next token if it is special and only whitespace lies between.
        if (
            token < len(offsets)
            and input_ids[token] in special_ids
            and not text[span[1] : offsets[token][0]].strip()
        ):
            labels[token] = input_ids[token]
            token += 1
    return labels


def _encode_rendered(
    record: dict[str, Any],
    text: str,
    input_ids: list[int],
    offsets: Sequence[tuple[int, int]],
    max_length: int,
    truncation: str,
    special: tuple[set[int], list[str]],
) -> tuple[EncodedSample | None, str, str]:
    """(sample, "", "") or (None, stats field, reason) for one record whose text is already tokenized."""
    labels = _assistant_labels(text, record["messages"], input_ids, offsets, *special)
    if all(label == IGNORE_INDEX for label in labels):
        return (
            None,
            "dropped_no_assistant_tokens",
            "no assistant content found in the chat-template rendering",
        )
    length = len(input_ids)
    truncated = length > max_length
    if truncated:
        if truncation == "drop":
            reason = (
                f"{length} tokens, longer than dataset.max_sequence_length={max_length} "
                "(dataset.truncation=drop)"
            )
            return None, "dropped_too_long", reason
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            reason = f"no assistant token within the first {max_length} of {length} tokens"
            return None, "dropped_no_assistant_tokens", reason
    sample = EncodedSample(str(record["id"]), str(record["dataset"]), list(input_ids), labels, truncated)
    return sample, "", ""


def _render_and_tokenize(
    records: Sequence[dict[str, Any]], tokenizer: PreTrainedTokenizerBase
) -> Iterable[tuple[str, list[int], list[tuple[int, int]]]]:
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in records]
    # The template already wrote every special token (BOS included where the family uses one). The
    # Rust tokenizer is called directly: the same ids and offsets as tokenizer(texts, ...), without the
    # Python-side BatchEncoding conversion, which costs as much as the tokenization itself.
    backend = tokenizer.backend_tokenizer
    # As tokenizer(...) does without truncation / padding: a tokenizer.json may carry defaults for both.
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return ((text, e.ids, e.offsets) for text, e in zip(texts, encodings, strict=True))


def encode_record(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, max_length: int, truncation: str = "right"
) -> EncodedSample | None:
    """Tokenize one record; None when it is dropped (over-long with ``drop``, or no assistant token left)."""
    _check_truncation(truncation)
    ensure_chat_template(tokenizer)
    ((text, ids, offsets),) = _render_and_tokenize([record], tokenizer)
    sample, _, _ = _encode_rendered(
        record, text, ids, offsets, max_length, truncation, _special_strings(tokenizer)
    )
    return sample


def encode_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str = "right",
    *,
    desc: str = "encode",
) -> tuple[list[EncodedSample], EncodeStats, list[SkippedRow]]:
    """Tokenize ``records`` in order -> (kept samples, counts, dropped records as skipped rows)."""
    _check_truncation(truncation)
    ensure_chat_template(tokenizer)
    if max_length < 1:
        raise ConfigError(f"dataset.max_sequence_length={max_length}: expected a positive number of tokens")
    special = _special_strings(tokenizer)
    samples: list[EncodedSample] = []
    skipped: list[SkippedRow] = []
    stats = EncodeStats(total=len(records))
    bar = tqdm(
        total=len(records), desc=desc, unit="rec", mininterval=5.0, disable=len(records) < ENCODE_CHUNK
    )
    for start in range(0, len(records), ENCODE_CHUNK):
        chunk = records[start : start + ENCODE_CHUNK]
        for record, (text, ids, offsets) in zip(chunk, _render_and_tokenize(chunk, tokenizer), strict=True):
            sample, counter, why = _encode_rendered(
                record, text, ids, offsets, max_length, truncation, special
            )
            if sample is not None:
                samples.append(sample)
                stats.truncated += sample.truncated
                continue
            setattr(stats, counter, getattr(stats, counter) + 1)
            skipped.append(
                SkippedRow(file=f"id={record['id']}", line=None, dataset=str(record["dataset"]), reason=why)
            )
        bar.update(len(chunk))
    bar.close()
    log.info("%s: %s", desc, stats.as_dict())
    return samples, stats, skipped


def encode_with_config(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    dataset_cfg: Mapping[str, Any],
    *,
    desc: str = "encode",
) -> tuple[list[EncodedSample], EncodeStats, list[SkippedRow]]:
    """:func:`encode_records` under a Stage 3 ``dataset`` config block: its ``chat_template`` (the
    fallback for a tokenizer without one), ``max_sequence_length`` and ``truncation``.

    What Stage 3 trains on and what the experiment's token matching counts (one renderer, one place).
    """
    ensure_chat_template(tokenizer, dataset_cfg.get("chat_template"))
    max_length, truncation = int(dataset_cfg["max_sequence_length"]), str(dataset_cfg["truncation"])
    return encode_records(records, tokenizer, max_length, truncation, desc=desc)
