"""Stage 0: turn a base causal LM (Qwen2/2.5, Qwen3, Llama, Mistral) into a gated selector directory.

    quality-gate convert --model Qwen/Qwen3-1.7B --save-path converted_models/quality_gate_Qwen3-1.7B
    python scripts/convert_qwen_to_quality_gate.py --model ... --save-path ...   # the seed's command

The directory holds the unchanged base model files plus ``quality_gate.safetensors`` (one
``Linear(hidden, 1)`` per decoder layer, ``~Normal(init_mean, init_std)``) and
``quality_gate_config.json``. It loads with :func:`quality_gate.models.load_selector` and needs no
``trust_remote_code``. Stages 1 and 2 also convert a plain base model on load; converting once
fixes the gate init in a file, so every later run starts from the same gates.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from quality_gate.gate import DEFAULT_GATE_INIT_STD, DEFAULT_GATE_SCALE

log = logging.getLogger(__name__)


def checkpoint_dtype(model: str, trust_remote_code: bool) -> str:
    """The dtype name stored in the checkpoint's config, float32 when it names none we support (and for a
    GGUF file, which is dequantised to float32)."""
    from transformers import AutoConfig

    if model.endswith(".gguf"):
        return "float32"
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def convert(
    model: str,
    save_path: str | Path,
    *,
    init_mean: float = 0.0,
    init_std: float = DEFAULT_GATE_INIT_STD,
    scale: float = DEFAULT_GATE_SCALE,
    dtype: str = "auto",
    seed: int = 0,
    trust_remote_code: bool = False,
) -> Path:
    """Load ``model``, attach gates (seeded init), write the converted dir; returns it.

    Conversion is a copy plus new gate tensors: it runs on the CPU and, with ``dtype="auto"``, keeps
    the checkpoint's own dtype (the stages' "auto" would pick float32 on a CPU).
    """
    check_init(init_mean, init_std)
    import torch

    from quality_gate.model_sources import check_model_source
    from quality_gate.models import load_selector, save_converted

    model = check_model_source(model, "--model")
    torch.manual_seed(seed)
    if dtype == "auto":
        dtype = checkpoint_dtype(model, trust_remote_code)
    selector, tokenizer = load_selector(
        model,
        dtype=dtype,
        device="cpu",
        trust_remote_code=trust_remote_code,
        gate_init_mean=init_mean,
        gate_init_std=init_std,
        gate_scale=scale,
        key="--model",
    )
    return save_converted(selector, tokenizer, save_path)


def check_init(init_mean: float, init_std: float) -> None:
    """The gate init must be a number: a finite mean, a finite std >= 0 (``--init-std -1`` or ``nan``
    would give gates of NaN or a silent sign flip); else a :class:`ConfigError` naming the flag."""
    import math

    from quality_gate.errors import ConfigError

    for flag, value in (("--init-mean", init_mean), ("--init-std", init_std)):
        if not math.isfinite(float(value)):
            raise ConfigError(f"{flag}={value} must be a finite number")
    if init_std < 0:
        raise ConfigError(f"--init-std={init_std} must be >= 0 (the standard deviation of the gate init)")


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help="base model: HF id, local dir, a .gguf file, or a bundled name (smollm2-135m-instruct)",
    )
    parser.add_argument("--save-path", required=True, help="output directory of the converted selector")
    parser.add_argument("--init-mean", type=float, default=0.0, help="mean of the gate weight init")
    parser.add_argument(
        "--init-std",
        type=float,
        default=DEFAULT_GATE_INIT_STD,
        help="std of the gate weight init (default 0: every gate starts at exactly scale / 2; method.md's: "
        "0.02)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=DEFAULT_GATE_SCALE,
        choices=[1.0, 2.0],
        help="the gate's form g = scale * sigmoid(w . x): 1 is method.md's (default), 2 starts as the "
        "identity",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "bfloat16", "float16", "float32"],
        help="dtype of the saved weights (auto: the checkpoint's own dtype)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the gate init")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom modelling code of --model"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Command line of Stage 0; user errors print one line and exit 1."""
    from quality_gate.errors import exit_on_user_error

    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exit_on_user_error():
        out = convert(
            args.model,
            args.save_path,
            init_mean=args.init_mean,
            init_std=args.init_std,
            scale=args.scale,
            dtype=args.dtype,
            seed=args.seed,
            trust_remote_code=args.trust_remote_code,
        )
    log.info("wrote %s:", out)
    for path in sorted(out.iterdir()):
        log.info("  %-32s %14s bytes", path.name, f"{path.stat().st_size:,d}")
