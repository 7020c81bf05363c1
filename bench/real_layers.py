"""Which layers of the gate score carry signal on real labels: per-layer AUROC of S[:, l].

    .venv/bin/python bench/real_layers.py --run outputs/bench_real --variants seed_gate identity

Reads a finished ``quality-gate benchmark`` run dir and prints, per gate variant, half and pool, the
AUROC of each layer's perplexity-weighted gate average ``S[:, l]`` (method.md) for the pool's labels,
and the same after taking out the response length (rank residual, as the benchmark does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402

from quality_gate.benchmarks.metrics import length_residual  # noqa: E402
from quality_gate.benchmarks.pools import HALVES  # noqa: E402
from quality_gate.benchmarks.real import POOLS  # noqa: E402
from quality_gate.config import make_config  # noqa: E402
from quality_gate.selection.metrics import auroc  # noqa: E402
from quality_gate.selection.pipeline import _params  # noqa: E402
from quality_gate.selection.scoring import collect_sample_stats  # noqa: E402
from quality_gate.stats.store import find_router_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=REPO / "outputs" / "bench_real")
    ap.add_argument("--variants", nargs="+", default=["seed_gate", "identity"])
    args = ap.parse_args()
    labels = json.loads((args.run / "data" / "labels.json").read_text())
    for variant in args.variants:
        for half in HALVES:
            run = args.run / "variants" / variant / half
            stats = collect_sample_stats(
                find_router_data(run), _params(make_config("select", {"root_dir": str(run)}))
            )
            ids = np.array(stats.ids)
            print(f"{variant}, {half} half")
            for pool in POOLS:
                m = np.array([labels[i]["pool"] == pool for i in ids])
                y = np.array([labels[i]["label"] for i in ids[m]])
                S, length = stats.S[m], stats.response_tokens[m]
                plain = [auroc(S[:, layer], y) for layer in range(S.shape[1])]
                beyond = [auroc(length_residual(S[:, layer], length), y) for layer in range(S.shape[1])]
                print(f"  {pool:9s} AUROC per layer:  " + " ".join(f"{x:.2f}" for x in plain))
                print(f"  {pool:9s} beyond length:    " + " ".join(f"{x:.2f}" for x in beyond))


if __name__ == "__main__":
    main()
