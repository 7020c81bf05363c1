"""Peak memory of Stage 4's held-out loss at a real vocabulary (151,936 entries, Qwen2.5 / Qwen3).

    .venv/bin/python bench/bench_evaluate_memory.py [--batch 8 --tokens 1024]

Each path runs in a fresh subprocess on a randomly initialised 2-layer Qwen2 model (hidden 256, vocab
151,936, tied embeddings, float32), batch x tokens all labelled:

* ``chunked``: :func:`quality_gate.stages.evaluate.heldout_loss`, the LM head on ``nll_chunk_tokens``
  positions at a time (the path Stage 4 uses);
* ``full_logits``: the previous path, ``model(...).logits`` (B, T, V) upcast to float32 and
  ``F.cross_entropy`` over it.

Peak RSS is the child's VmHWM minus its RSS just before the loss (model loaded, batch built), so the
figure is the loss path's own cost. Both must give the same loss.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, math
sys.path.insert(0, sys.argv[4])
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen2Config
torch.manual_seed(0)
torch.set_num_threads(2)
mode, batch, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
model = AutoModelForCausalLM.from_config(cfg).eval()
ids = torch.randint(0, 151936, (batch, tokens))
rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 2**20
before = rss("VmRSS:")
if mode == "chunked":
    from quality_gate.data import SFTDataCollator
    from quality_gate.stages.evaluate import heldout_loss
    out = heldout_loss(model, rows, SFTDataCollator(0), batch_size=batch, chunk_tokens=1024)
    loss = out["loss"]
else:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()  # (B, T-1, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
print(json.dumps({"mode": mode, "loss": loss, "extra_peak_gb": round(rss("VmHWM:") - before, 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "evaluate_memory.json")
    args = ap.parse_args()
    results = {}
    for mode in ("chunked", "full_logits"):
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, mode, str(args.batch), str(args.tokens), str(REPO / "src")],
            capture_output=True,
            text=True,
            check=True,
        )
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    dense_gb = args.batch * (args.tokens - 1) * 151936 * 4 / 2**30
    figures = {
        "batch": args.batch,
        "tokens": args.tokens,
        "vocab": 151936,
        "dense_fp32_logits_gb": round(dense_gb, 2),
        **{f"{m}_extra_peak_gb": r["extra_peak_gb"] for m, r in results.items()},
        "same_loss": abs(results["chunked"]["loss"] - results["full_logits"]["loss"]) < 1e-3,
        "loss": results["chunked"]["loss"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
