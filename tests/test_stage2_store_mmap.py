"""Router data far larger than its sample count suggests opens memory-mapped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from helpers import ENV

from quality_gate.stats.store import shard_path, write_index, write_shard

LAYERS = 28
LONG = 4_000_000  # positions of one huge sample: 224 MB of float16 gates


def test_large_router_file_opens_memory_mapped(tmp_path: Path) -> None:
    router = tmp_path / "router_data"
    lengths = torch.tensor([3, LONG, 5], dtype=torch.int64)
    total = int(lengths.sum())
    gates = torch.zeros(total, LAYERS, dtype=torch.float16)
    gates[:3] = 0.25  # sample a
    gates[-5:] = torch.linspace(0, 1, 5 * LAYERS, dtype=torch.float16).reshape(5, LAYERS)  # sample c
    shard = {
        "sample_ids": ["a", "big", "c"],
        "lengths": lengths,
        "gates": gates,
        "perplexities": torch.arange(total, dtype=torch.float32),
        "assistant_mask": torch.ones(total, dtype=torch.bool),
        "valid": torch.ones(3, dtype=torch.bool),
        "invalid_reason": ["", "", ""],
    }
    path = shard_path(router, "big", 0)
    write_shard(path, shard, "fp")
    write_index(router, "big", [path], "fp", max_seq_len=LONG + 1)
    del gates, shard
    size_mb = path.stat().st_size / 2**20
    assert size_mb > 200

    # A fresh process: its resident memory must not grow by the file size when opening the data and
    # reading one sample's statistics.
    script = """
import json, sys, torch
from quality_gate.stats.store import get_sample_router_info, load_router_data
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
before = rss_mb()
data = load_router_data(sys.argv[1])
info = get_sample_router_info(data, "c")
after = rss_mb()
print(json.dumps({"grow_mb": after - before, "num_samples": data["num_samples"],
                  "shape": list(info["quality_gates"].shape), "gates": info["quality_gates"].float().tolist(),
                  "ppl": info["perplexities"].tolist(), "length": info["length"]}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script, str(router / "big_router_data.pt")],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["grow_mb"] < size_mb / 4, f"RSS grew {got['grow_mb']:.1f} MB for a {size_mb:.1f} MB file"
    assert got["num_samples"] == 3 and got["length"] == 5
    assert got["shape"] == [LAYERS, 5]  # (L, T_i)
    expected = torch.linspace(0, 1, 5 * LAYERS, dtype=torch.float16).reshape(5, LAYERS).T.float()
    torch.testing.assert_close(torch.tensor(got["gates"]), expected)
    assert got["ppl"] == [float(x) for x in range(total - 5, total)]
