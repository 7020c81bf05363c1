"""Convert a base causal LM (Qwen2/2.5, Qwen3, Llama, Mistral) into a Quality-Gate selector directory.

    python scripts/convert_qwen_to_quality_gate.py --model Qwen/Qwen3-1.7B \
        --save-path converted_models/quality_gate_Qwen3-1.7B

The directory holds the unchanged base model files plus ``quality_gate.safetensors`` (one
``Linear(hidden, 1)`` per decoder layer, ~Normal(init_mean, init_std)) and ``quality_gate_config.json``.
It loads with ``quality_gate.models.load_selector`` and needs no ``trust_remote_code``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from transformers import AutoConfig

from quality_gate.models import load_selector, save_converted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="base model: HF id or local path")
    parser.add_argument("--save-path", required=True, help="output directory of the converted selector")
    parser.add_argument("--init-mean", type=float, default=0.0, help="mean of the gate weight init")
    parser.add_argument("--init-std", type=float, default=0.02, help="std of the gate weight init")
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


def checkpoint_dtype(model: str, trust_remote_code: bool) -> str:
    """The dtype name stored in the checkpoint's config, float32 when it names none we support."""
    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in ("bfloat16", "float16", "float32") else "float32"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    # Conversion is a copy plus new gate tensors: keep it on the CPU and, with --dtype auto, in the
    # checkpoint's own dtype (resolve_dtype's "auto" would pick float32 on a CPU).
    dtype = args.dtype if args.dtype != "auto" else checkpoint_dtype(args.model, args.trust_remote_code)
    model, tokenizer = load_selector(
        args.model,
        dtype=dtype,
        device="cpu",
        trust_remote_code=args.trust_remote_code,
        gate_init_mean=args.init_mean,
        gate_init_std=args.init_std,
    )
    out = save_converted(model, tokenizer, args.save_path)
    print(f"wrote {out}:")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:32s} {path.stat().st_size:>14,d} bytes")


if __name__ == "__main__":
    main()
