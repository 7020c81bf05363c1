"""Real widths on CPU: Stage 2 (collect) and Stage 4's held-out loss on 2-layer models with the width
and the 151,936-entry vocabulary of Qwen3-1.7B (selector) and Qwen2.5-1.5B (target), randomly
initialised (nothing downloaded), on 2 samples of 256 tokens (bench/real_shape.py runs every stage
at 2,048 tokens)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, compose
from test_stage2_stage import run_in_process, stats_by_id

sys.path.insert(0, str(REPO / "bench"))
import real_shape

VOCAB = real_shape.SELECTOR_SHAPE["vocab_size"]
TOKENS = 256
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return real_shape.build_assets(
        tmp_path_factory.mktemp("real_shape"), layers=2, tokens=TOKENS, num_samples=2
    )


def test_assets_have_the_real_shapes(assets: dict[str, Path]) -> None:
    sel = json.loads((assets["selector"] / "config.json").read_text())
    tgt = json.loads((assets["target"] / "config.json").read_text())
    assert (sel["hidden_size"], sel["intermediate_size"], sel["num_attention_heads"]) == (2048, 6144, 16)
    assert (sel["num_key_value_heads"], sel["head_dim"], sel["vocab_size"]) == (8, 128, VOCAB)
    assert (tgt["hidden_size"], tgt["intermediate_size"], tgt["num_attention_heads"]) == (1536, 8960, 12)
    assert (tgt["num_key_value_heads"], tgt["vocab_size"]) == (2, VOCAB)
    assert sel["tie_word_embeddings"] and tgt["tie_word_embeddings"]
    assert sel["num_hidden_layers"] == tgt["num_hidden_layers"] == 2
    lengths = real_shape.encoded_lengths(assets, 10 * TOKENS)
    assert all(abs(n - TOKENS) <= 0.02 * TOKENS for n in lengths["selector"]), lengths


def test_collect_at_real_width(assets: dict[str, Path], tmp_path: Path) -> None:
    metrics = run_in_process(
        tmp_path,
        [
            f"selector_model.path={assets['selector']}",
            f"dataset.local.datasets=[{{path: {assets['train']}, dataset_name: long}}]",
            f"dataset.max_sequence_length={TOKENS}",
            f"data_process.max_tokens_per_batch={2 * TOKENS}",  # both samples in one batch
            "data_process.nll_chunk_tokens=128",  # several LM-head chunks per batch
        ],
    )
    assert metrics["samples"] == 2 and metrics["invalid_samples"] == 0
    stats = stats_by_id(tmp_path)
    assert len(stats) == 2
    nll = []
    for sample in stats.values():
        assert sample["gates"].shape[1] == 2  # (T_i, layers)
        assert sample["gates"].shape[0] >= TOKENS - 8
        assert torch.isfinite(sample["perplexities"]).all()
        nll.append(sample["perplexities"].log())
    mean = torch.cat(nll).mean().item()
    # A random model spreads its mass over all 151,936 entries: NLL ~ log(V) = 11.9. A head cut to the
    # tokenizer's 768 ids would give ~ log(768) = 6.6.
    assert abs(mean - math.log(VOCAB)) < 1.5, mean


def test_evaluate_heldout_loss_at_real_width(assets: dict[str, Path], tmp_path: Path) -> None:
    """Stage 4's chunked held-out loss over the full vocabulary equals transformers' own loss."""
    from quality_gate.data import SFTDataCollator, encode_records, load_local_file
    from quality_gate.models import load_target
    from quality_gate.stages.evaluate import run as evaluate

    evaluate(
        compose(
            "evaluate",
            [
                f"model.name={assets['target']}",
                f"eval.data_path={assets['eval']}",
                f"eval.max_sequence_length={TOKENS}",
                "eval.batch_size=2",
                "eval.nll_chunk_tokens=128",
                f"output_dir={tmp_path}",
            ],
        )
    )
    results = json.loads((tmp_path / "eval_results.json").read_text())
    loss = results["heldout"]["loss"]
    assert results["heldout"]["num_samples"] == 2 and results["exact_match"] is None

    model, tokenizer = load_target(str(assets["target"]), dtype="float32", device="cpu")
    records, _ = load_local_file(assets["eval"], "eval")
    samples, _, _ = encode_records(records, tokenizer, TOKENS)
    batch = SFTDataCollator(tokenizer.pad_token_id)(
        [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[-1] == VOCAB
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100
    ).item()
    assert loss == pytest.approx(reference, rel=1e-5)
    assert abs(loss - math.log(VOCAB)) < 1.5
