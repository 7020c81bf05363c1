"""The report's token colouring with a real (tiny, offline) tokenizer and the data layer's encoder."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import fake_record, fake_shard, select_config, write_router_dataset

from quality_gate.data import encode
from quality_gate.selection import run_selection

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(path: Path):
    """A byte-level BPE without merges (every byte one token) plus ChatML specials, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def test_report_colours_tokens(tmp_path):
    tok = byte_tokenizer(tmp_path / "tok")
    root = tmp_path / "run"
    records = [fake_record("d", f"d_{i}", {}) for i in range(4)]
    records[0]["messages"][1]["content"] = "<b>bold & risky</b>"
    lengths = []
    for r in records:
        enc = encode.encode_record(r, tok, 512, "right")
        assert enc is not None
        lengths.append(len(enc.input_ids) - 1)
    g = torch.Generator().manual_seed(0)
    # The report finds the tokenizer through the fingerprint Stage 2 stores (absolute selector path).
    fields = {"selector_model_path": str(tmp_path / "tok"), "max_sequence_length": 512, "truncation": "right"}
    write_router_dataset(
        root / "router_data",
        "d",
        [fake_shard([r["id"] for r in records], lengths, 3, g)],
        fingerprint_fields=fields,
        records=records,
    )
    run_selection(select_config(root_dir=str(root), selection_percentage=0.5, report_top_k=2))
    text = (root / "selection_report.html").read_text()
    assert "Token colouring unavailable" not in text
    assert "coloured by gate" in text and 'title="token 1: gate' in text
    # report_top_k=2 of 4 samples shows all of them; d_0's markup is escaped token by token.
    assert "<b>bold" not in text and "&lt;" in text and "&amp;" in text


def test_a_moved_selector_only_downgrades_the_report_at_once(tmp_path, monkeypatch):
    """fingerprint.json names a selector dir that is gone since Stage 2 (``models/selector``: one '/',
    a valid Hub id): the report says why it shows plain text, without asking the Hub."""
    import socket
    import time

    def refuse(*args, **kwargs):
        raise AssertionError(f"the report tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # the parent is still there, the selector dir is not
    root = tmp_path / "run"
    records = [fake_record("d", f"d_{i}", {}) for i in range(4)]
    fields = {"selector_model_path": "models/selector", "max_sequence_length": 512, "truncation": "right"}
    g = torch.Generator().manual_seed(0)
    shard = fake_shard([r["id"] for r in records], [5, 6, 7, 8], 3, g)
    write_router_dataset(root / "router_data", "d", [shard], fingerprint_fields=fields, records=records)
    started = time.perf_counter()
    run_selection(select_config(root_dir=str(root), selection_percentage=0.5, report_top_k=2))
    assert time.perf_counter() - started < 10
    text = (root / "selection_report.html").read_text()
    assert (
        "Token colouring unavailable (MissingPathError: fingerprint.json selector_model_path=models/selector"
        in text
    )
