"""Stage 2 forward: chunked NLL, perplexity, position pairing, batching invariance, IFD."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3Config

from quality_gate.gate import attach_quality_gates, record_gates
from quality_gate.nll import chunked_token_nll
from quality_gate.stats.collect import collect_batch, compute_token_perplexity, concat_batch_stats


def tiny_gated_model(vocab: int = 97, tie: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        attn_implementation="sdpa",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    attach_quality_gates(model, init_std=0.5)  # wide init: gates differ visibly between tokens
    return model.eval()


def right_pad(seqs: list[list[int]], labels: list[list[int]]) -> tuple[torch.Tensor, ...]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    am = torch.zeros(len(seqs), width, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        am[i, : len(s)] = 1
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, am, lab


def random_samples(n: int, vocab: int = 97, seed: int = 1) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        s = torch.randint(1, vocab, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        seqs.append(s)
        labels.append([-100] * prompt + s[prompt:])
    return seqs, labels


@pytest.mark.parametrize("chunk", [1, 7, 4096])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_nll_equals_full_cross_entropy(chunk: int, bias: bool) -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden = torch.randn(3, 11, 16)
    targets = torch.randint(0, 50, (3, 11))
    mask = torch.rand(3, 11) > 0.3
    nll = chunked_token_nll(hidden, head, targets, mask, chunk_tokens=chunk)
    ref = F.cross_entropy(head(hidden).float().reshape(-1, 50), targets.reshape(-1), reduction="none")
    ref = ref.reshape(3, 11)
    assert nll.dtype == torch.float32 and nll.shape == (3, 11)
    torch.testing.assert_close(nll[mask], ref[mask], atol=1e-4, rtol=1e-4)
    assert (nll[~mask] == 0).all()
    # A bare weight gives the same result as the module (tied-embedding heads pass the weight).
    if not bias:
        torch.testing.assert_close(chunked_token_nll(hidden, head.weight, targets, mask, chunk), nll)


def test_chunked_nll_bf16_hidden_upcasts_only_the_chunk() -> None:
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    targets = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    nll = chunked_token_nll(hidden, head, targets, mask, chunk_tokens=4)
    ref = F.cross_entropy(head(hidden).float().reshape(-1, 50), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(nll.reshape(-1), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_token_perplexity_matches_model_logits(tie: bool) -> None:
    model = tiny_gated_model(tie=tie)
    seqs, labels = random_samples(4)
    ids, am, _ = right_pad(seqs, labels)
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=ids, attention_mask=am).last_hidden_state
        logits = model(input_ids=ids, attention_mask=am).logits.float()  # (B, S, V)
    ppl = compute_token_perplexity(hidden, model.get_output_embeddings(), ids, am, chunk_tokens=5)
    assert ppl.shape == ids.shape
    for i, s in enumerate(seqs):
        n = len(s)
        ref = F.cross_entropy(logits[i, : n - 1], ids[i, 1:n], reduction="none").exp()
        torch.testing.assert_close(ppl[i, : n - 1], ref, atol=1e-4, rtol=1e-4)
        assert torch.isnan(ppl[i, n - 1 :]).all()  # last real token and padding predict nothing


def test_collect_batch_pairs_gate_at_t_with_token_t_plus_1() -> None:
    model = tiny_gated_model()
    seqs, labels = random_samples(5)
    ids, am, lab = right_pad(seqs, labels)
    stats = collect_batch(model, ids, am, lab, chunk_tokens=3)
    lengths = [len(s) - 1 for s in seqs]
    assert stats.lengths.tolist() == lengths
    assert stats.gates.dtype == torch.float16 and stats.gates.shape == (sum(lengths), 3)
    assert stats.valid.all() and stats.invalid_reason == [""] * 5
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            one = torch.tensor([s])
            with record_gates(model) as rec:
                logits = model(input_ids=one).logits.float()[0]  # (n, V)
                gate = torch.sigmoid(rec.logits()[0])  # (L, n)
            rows = slice(offsets[i], offsets[i + 1])
            ppl = F.cross_entropy(logits[:-1], one[0, 1:], reduction="none").exp()
            torch.testing.assert_close(stats.perplexities[rows], ppl, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(stats.gates[rows].float(), gate[:, :-1].T, atol=1e-3, rtol=1e-3)
            expected_mask = torch.tensor(labels[i][1:]) != -100
            assert torch.equal(stats.assistant_mask[rows], expected_mask)


def test_batch_size_and_order_invariance() -> None:
    model = tiny_gated_model()
    seqs, labels = random_samples(12, seed=3)

    def by_id(batch_rows: list[list[int]]) -> dict:
        parts = []
        for rows in batch_rows:
            ids, am, lab = right_pad([seqs[r] for r in rows], [labels[r] for r in rows])
            parts.append((rows, collect_batch(model, ids, am, lab, chunk_tokens=16)))
        return concat_batch_stats(parts, len(seqs))

    one_by_one = by_id([[i] for i in range(12)])
    shuffled = by_id([[5, 0, 11, 3], [7, 1, 2, 10, 9, 4, 8, 6]])
    all_at_once = by_id([list(range(12))])
    for other in (shuffled, all_at_once):
        assert torch.equal(other["lengths"], one_by_one["lengths"])
        assert torch.equal(other["assistant_mask"], one_by_one["assistant_mask"])
        torch.testing.assert_close(other["perplexities"], one_by_one["perplexities"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(other["gates"].float(), one_by_one["gates"].float(), atol=1e-3, rtol=0)


def test_empty_scored_tokens_are_invalid_with_reason() -> None:
    model = tiny_gated_model()
    seqs = [[5], [5, 6, 7, 8], [9, 10, 11]]
    labels = [[5], [-100, -100, -100, -100], [-100, 10, 11]]
    ids, am, lab = right_pad(seqs, labels)
    stats = collect_batch(model, ids, am, lab)
    assert stats.valid.tolist() == [False, False, True]
    assert "fewer than 2 tokens" in stats.invalid_reason[0]
    assert "no assistant tokens" in stats.invalid_reason[1]
    assert stats.lengths.tolist() == [0, 3, 2]


def test_ifd_losses_match_cherry_llm_definition() -> None:
    """cond: HF loss with labels masked before the response; uncond: HF loss on the response alone."""
    model = tiny_gated_model()
    seqs, labels = random_samples(6, seed=5)
    ids, am, lab = right_pad(seqs, labels)
    stats = collect_batch(model, ids, am, lab, collect_ifd=True)
    with torch.inference_mode():
        for i, (s, lb) in enumerate(zip(seqs, labels)):
            cond = model(input_ids=torch.tensor([s]), labels=torch.tensor([lb])).loss
            response = [t for t, x in zip(s, lb) if x != -100]
            if len(response) < 2:
                assert torch.isnan(stats.ifd_loss_uncond[i])
                continue
            r = torch.tensor([response])
            uncond = model(input_ids=r, labels=r).loss
            torch.testing.assert_close(stats.ifd_loss_cond[i], cond, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(stats.ifd_loss_uncond[i], uncond, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", ["prompt", "response", "all"])
def test_embeddings_average_the_chosen_tokens_of_each_sample_alone(tokens: str) -> None:
    """Each sample's embedding = the mean last hidden state over its ``tokens``, computed one sample at a
    time with no padding (a sample without labels falls back to all its tokens); ``prompt`` embeddings
    do not depend on the response at all (causal attention)."""
    model = tiny_gated_model()
    seqs, labels = random_samples(5)
    seqs.append([5, 6, 7, 8])
    labels.append([-100] * 4)  # no assistant token
    ids, am, lab = right_pad(seqs, labels)
    got = collect_batch(model, ids, am, lab, embed=True, embedding_tokens=tokens).embeddings
    assert got.shape == (6, 32) and got.dtype == torch.float16
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        with torch.no_grad():
            h = model.model(input_ids=torch.tensor([s])).last_hidden_state[0]  # (T, H)
        first = next((t for t, x in enumerate(lb) if x != -100), None)
        if first is None:
            rows = list(range(len(s)))
        else:
            rows = {
                "prompt": list(range(first)),
                "response": [t for t, x in enumerate(lb) if x != -100],
                "all": list(range(len(s))),
            }[tokens]
        want = h[rows].mean(0)
        torch.testing.assert_close(got[i].float(), want, atol=2e-3, rtol=2e-3)
    if tokens == "prompt":  # another response after the same prompt: the same embedding
        s, lb = seqs[0], labels[0]
        first = next(t for t, x in enumerate(lb) if x != -100)
        other = s[:first] + [(x % 90) + 3 for x in s[first:]]
        ids2, am2, lab2 = right_pad([other], [[-100] * first + other[first:]])
        again = collect_batch(model, ids2, am2, lab2, embed=True, embedding_tokens="prompt").embeddings
        torch.testing.assert_close(again[0], got[0], atol=2e-3, rtol=0)
