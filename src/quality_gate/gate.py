"""The quality gate: a per-layer, per-token scalar that scales each decoder layer's FFN output.

For decoder layer ``l`` with FFN input ``x`` (``post_attention_layernorm(h)`` in Qwen/Llama/Mistral)::

    g = scale * sigmoid(w_l · x)  # w_l: Linear(hidden_size, 1, bias=False)
    h = h + g * MLP(x)

``scale`` is the gate's form. 1 (the default) is method.md's gate: it starts at 0.5, which halves every
FFN of a pretrained model (SmolLM2-135M-Instruct: mean loss per answer token 2.08 as released, 5.78
with every gate at 0.5). 2 makes a gate whose weight starts at 0 exactly the identity
(``2 * sigmoid(0) = 1``), so the model starts the warmup as released. On the real-label benchmark
neither form wins on both pools (docs/method.md), so the seed's stays the default. Stage 2 stores
``sigmoid(w_l · x)`` in (0, 1); the score is the same for any common scale (docs/method.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from quality_gate.errors import ConfigError

log = logging.getLogger(__name__)

GATE_PARAM_KEY = "quality_gate.gate"
#: The gate's form ``g = scale * sigmoid(w · x)``: 1 is method.md's gate (g = 0.5 at w = 0), 2 starts as the
#: identity (g = 1 at w = 0). docs/method.md has the figures behind the default.
DEFAULT_GATE_SCALE = 1.0
GATE_SCALES = (1.0, 2.0)
#: Std of the gate weight init. 0: every gate starts at exactly sigmoid(0) = 0.5 and the warmup's
#: gradient alone shapes them, so the score does not depend on a random init (method.md's 0.02 made
#: the selection move with the seed; docs/method.md has the figures).
DEFAULT_GATE_INIT_STD = 0.0


class QualityGate(nn.Module):
    """``Linear(hidden_size, 1, bias=False)`` producing one gate logit per token.

    The weight starts at ``Normal(init_mean, init_std)``; with the defaults (0, 0) every gate is
    exactly ``sigmoid(0) = 0.5`` at the start of warmup.
    """

    def __init__(
        self,
        hidden_size: int,
        init_mean: float = 0.0,
        init_std: float = DEFAULT_GATE_INIT_STD,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.init_mean = init_mean
        self.init_std = init_std
        self.gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)
        nn.init.normal_(self.gate.weight, mean=init_mean, std=init_std)

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, T, H)`` -> gate logits ``(B, T, 1)``."""
        return self.gate(x)


class QualityGatedMLP(nn.Module):
    """Wraps a decoder layer's FFN: ``forward(x) = scale * sigmoid(gate(x)) * base_layer(x)``.

    ``layer_idx`` is the position of the wrapped layer in the decoder stack; a recorder set by
    :func:`record_gates` receives this layer's logits ``(B, T)`` on every forward. ``bypass=True``
    (see :func:`gates_bypassed`) returns the FFN's output unscaled: the model as released.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        hidden_size: int,
        layer_idx: int,
        init_mean: float,
        init_std: float,
        scale: float = DEFAULT_GATE_SCALE,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.scale = float(scale)
        self.bypass = False
        reference = next(base_layer.parameters(), None)
        self.quality_gate = QualityGate(
            hidden_size,
            init_mean,
            init_std,
            dtype=reference.dtype if reference is not None else None,
            device=reference.device if reference is not None else None,
        )
        self.layer_idx = layer_idx
        self._recorder: GateRecorder | None = None

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """``x``: ``(B, T, H)`` -> gated FFN output ``(B, T, H)``."""
        logits = self.quality_gate(x)  # (B, T, 1)
        if self._recorder is not None:
            self._recorder.store(self.layer_idx, logits.squeeze(-1))
        out = self.base_layer(x, *args, **kwargs)
        if self.bypass:
            return out
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the wrapped FFN {type(self.base_layer).__name__} returned {type(out).__name__}, "
                "expected a tensor; this architecture is not supported by the quality gate"
            )
        return (self.scale * torch.sigmoid(logits)) * out  # (B, T, H)


class GateRecorder:
    """Collects each layer's gate logits during a forward pass (see :func:`record_gates`).

    Every layer overwrites its own slot, so after any number of forwards the recorder holds the
    latest one. This also makes the recomputation of non-reentrant gradient checkpointing harmless:
    it stores the same values again.
    """

    def __init__(self, num_layers: int, scale: float = DEFAULT_GATE_SCALE) -> None:
        self.num_layers = num_layers
        self.scale = float(scale)
        self._logits: dict[int, Tensor] = {}

    def store(self, layer_idx: int, logits: Tensor) -> None:
        """``logits``: ``(B, T)`` of one layer."""
        self._logits[layer_idx] = logits

    def logits(self) -> Tensor:
        """Pre-sigmoid gate logits of the latest forward, ``(B, L, T)`` float32, gradients kept."""
        missing = [i for i in range(self.num_layers) if i not in self._logits]
        if missing:
            raise RuntimeError(
                f"no gate logits recorded for layers {missing}; run a forward pass of the model "
                "inside `with record_gates(model) as rec:` before calling rec.logits()"
            )
        return torch.stack([self._logits[i].float() for i in range(self.num_layers)], dim=1)

    def probs(self) -> Tensor:
        """``sigmoid(logits())``: the gates' openness in (0, 1), ``(B, L, T)`` float32 (what Stage 2
        stores; the applied gate is ``scale`` times it)."""
        return torch.sigmoid(self.logits())

    def values(self) -> Tensor:
        """The applied gate values ``scale * sigmoid(logits())``, ``(B, L, T)`` float32."""
        return self.scale * self.probs()


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack: the first ``*.layers`` ModuleList whose blocks all have an ``mlp``."""
    for name, module in model.named_modules():
        if (
            name.split(".")[-1] == "layers"
            and isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(isinstance(getattr(block, "mlp", None), nn.Module) for block in module)
        ):
            return module
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ConfigError(
        f"cannot attach quality gates to model_type={model_type!r}: no decoder layers "
        "(`*.layers[i]`) with an `mlp` module were found. Supported: decoder-only models such as "
        "Qwen2/Qwen2.5, Qwen3, Llama and Mistral."
    )


def _hidden_size(model: nn.Module, block: nn.Module) -> int:
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None and config is not None and hasattr(config, "get_text_config"):
        size = getattr(config.get_text_config(), "hidden_size", None)
    if size is None:
        norm = getattr(block, "post_attention_layernorm", None)
        size = getattr(getattr(norm, "weight", None), "shape", [None])[0]
    if size is None:
        raise ConfigError("cannot infer hidden_size: set model.config.hidden_size")
    return int(size)


def attach_quality_gates(
    model: nn.Module,
    init_mean: float = 0.0,
    init_std: float = DEFAULT_GATE_INIT_STD,
    scale: float = DEFAULT_GATE_SCALE,
) -> list[QualityGatedMLP]:
    """Wrap the ``mlp`` of every decoder layer in a :class:`QualityGatedMLP` (in place).

    Gate weights take the dtype and device of the wrapped FFN. Calling this on a model that already
    has gates returns the existing wrappers unchanged (the init arguments are then ignored).
    ``scale``: the gate's form (:data:`DEFAULT_GATE_SCALE`).
    Raises :class:`~quality_gate.errors.ConfigError` naming ``model.config.model_type`` when the
    model has no decoder layers with an ``mlp``.
    """
    check_gate_scale(scale)
    existing = find_quality_gates(model)
    if existing:
        log.info("model already has %d quality gates; leaving them as they are", len(existing))
        return existing
    layers = _decoder_layers(model)
    hidden_size = _hidden_size(model, layers[0])
    wrappers = []
    for idx, block in enumerate(layers):
        wrapper = QualityGatedMLP(block.mlp, hidden_size, idx, init_mean, init_std, scale)
        block.mlp = wrapper
        wrappers.append(wrapper)
    log.info("attached %d quality gates (hidden_size=%d, scale=%g)", len(wrappers), hidden_size, scale)
    return wrappers


def check_gate_scale(scale: float) -> float:
    """``scale`` if it is one of :data:`GATE_SCALES`, else a :class:`ConfigError`."""
    if float(scale) not in GATE_SCALES:
        raise ConfigError(
            f"quality_gate.scale={scale} is not supported; use 1 (method.md's gate, 0.5 at init, the "
            "default) or 2 (starts as the identity)"
        )
    return float(scale)


def gate_scale(model: nn.Module) -> float:
    """The common ``scale`` of the model's gates."""
    scales = {w.scale for w in find_quality_gates(model)}
    if len(scales) != 1:
        raise ValueError(f"the model's gates have scales {sorted(scales)}; expected one")
    return scales.pop()


def set_gate_scale(model: nn.Module, scale: float) -> None:
    """Set every gate's form to ``scale`` (the form that Stage 1 weights were trained with)."""
    check_gate_scale(scale)
    for wrapper in find_quality_gates(model):
        wrapper.scale = float(scale)


@contextlib.contextmanager
def gates_bypassed(model: nn.Module) -> Iterator[None]:
    """Inside the block every gate passes its FFN output through unscaled: the model as released."""
    gates = find_quality_gates(model)
    try:
        for wrapper in gates:
            wrapper.bypass = True
        yield
    finally:
        for wrapper in gates:
            wrapper.bypass = False


def find_quality_gates(model: nn.Module) -> list[QualityGatedMLP]:
    """All gate wrappers of ``model``, in decoder layer order."""
    gates = [m for m in model.modules() if isinstance(m, QualityGatedMLP)]
    return sorted(gates, key=lambda g: g.layer_idx)


def remove_quality_gates(model: nn.Module) -> int:
    """Put every original FFN back in place of its wrapper; returns the number removed."""
    removed = 0
    for block in _decoder_layers(model):
        if isinstance(block.mlp, QualityGatedMLP):
            block.mlp = block.mlp.base_layer
            removed += 1
    return removed


def gate_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The gate parameters only (names containing ``quality_gate.gate``), detached, on CPU."""
    state = {
        name: param.detach().cpu().clone()
        for name, param in model.named_parameters()
        if GATE_PARAM_KEY in name
    }
    if not state:
        raise ValueError("model has no quality gate parameters; call attach_quality_gates(model) first")
    return state


def freeze_backbone(model: nn.Module) -> dict[str, int]:
    """Make only gate parameters trainable. Returns parameter counts ``{"trainable", "frozen"}``."""
    counts = {"trainable": 0, "frozen": 0}
    for name, param in model.named_parameters():
        is_gate = GATE_PARAM_KEY in name
        param.requires_grad_(is_gate)
        counts["trainable" if is_gate else "frozen"] += param.numel()
    if counts["trainable"] == 0:
        raise ValueError("model has no quality gate parameters; call attach_quality_gates(model) first")
    log.info("trainable gate parameters: %d, frozen: %d", counts["trainable"], counts["frozen"])
    return counts


@contextlib.contextmanager
def record_gates(model: nn.Module) -> Iterator[GateRecorder]:
    """Record every layer's gate logits while inside the block.

    Usage::

        with record_gates(model) as rec:
            out = model(input_ids=ids, attention_mask=mask)
            logits = rec.logits()  # (B, L, T) float32, part of the autograd graph
    """
    gates = find_quality_gates(model)
    if not gates:
        raise ValueError("model has no quality gates; call attach_quality_gates(model) first")
    recorder = GateRecorder(len(gates), gates[0].scale)
    try:
        for wrapper in gates:
            wrapper._recorder = recorder
        yield recorder
    finally:
        for wrapper in gates:
            wrapper._recorder = None
