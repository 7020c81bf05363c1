"""The quality loss against a slow, obviously correct loop."""

from __future__ import annotations

import pytest
import torch

from quality_gate.loss import quality_loss


def reference(gate_probs: torch.Tensor, mask: torch.Tensor, mode: str) -> float:
    B, L, T = gate_probs.shape
    if mode == "token":
        values = [
            gate_probs[b, layer, t].item()
            for b in range(B)
            for layer in range(L)
            for t in range(T)
            if mask[b, t]
        ]
        return sum(values) / len(values) if values else 0.0
    sample_means = []
    for b in range(B):
        values = [gate_probs[b, layer, t].item() for layer in range(L) for t in range(T) if mask[b, t]]
        if values:
            sample_means.append(sum(values) / len(values))
    return sum(sample_means) / len(sample_means) if sample_means else 0.0


def random_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    B, L, T = 5, 4, 11
    probs = torch.rand(B, L, T, generator=gen)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    lengths[2] = 0  # a sample with no valid token must not count in sample mode
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # (B, T) right padding
    mask[3] = mask[3].flip(0)  # and one left-padded sample
    return probs, mask


@pytest.mark.parametrize("mode", ["sample", "token"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(mode, seed):
    probs, mask = random_inputs(seed)
    got = quality_loss(probs, mask, mode)
    assert got.shape == ()
    assert got.item() == pytest.approx(reference(probs, mask, mode), rel=1e-5)


def test_modes_differ_when_lengths_differ():
    probs = torch.zeros(2, 1, 4)
    probs[0, 0, 0] = 1.0  # a short sample that is fully open
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    assert quality_loss(probs, mask, "sample").item() == pytest.approx(0.5)  # (1 + 0) / 2
    assert quality_loss(probs, mask, "token").item() == pytest.approx(0.2)  # 1 / 5 tokens


def test_padding_never_counts_and_gradient_flows():
    probs, mask = random_inputs(3)
    probs.requires_grad_(True)
    loss = quality_loss(probs, mask, "sample")
    loss.backward()
    padded = (mask == 0)[:, None, :].expand_as(probs)
    assert torch.all(probs.grad[padded] == 0)
    assert torch.all(probs.grad[~padded] > 0)
    changed = probs.detach().clone()
    changed[padded] = 123.0
    assert quality_loss(changed, mask, "sample").item() == pytest.approx(loss.item())


def test_all_padding_gives_zero():
    assert quality_loss(torch.rand(2, 3, 4), torch.zeros(2, 4), "sample").item() == 0.0
    assert quality_loss(torch.rand(2, 3, 4), torch.zeros(2, 4), "token").item() == 0.0


def test_unknown_mode_names_config_key():
    with pytest.raises(ValueError, match=r"training\.quality_loss_mode"):
        quality_loss(torch.rand(1, 1, 2), torch.ones(1, 2), "layer")
