"""Cost of fingerprinting a selector's weights at real size (docs/hardening.md, issue 22.1).

    .venv/bin/python bench/bench_fingerprint.py [--dir /tmp/qg_fp_model] [--keep]

Writes a model dir of Qwen3-1.7B's shapes (28 layers, hidden 2048, MLP 6144, vocab 151,936, tied
embeddings; 1.72 B parameters in bfloat16 = 3.44 GB in two safetensors shards, as ``save_pretrained``
splits it) and times, each three times:

(a) ``models.model_weights_fingerprint`` (what Stage 2 stores in ``fingerprint.json``: the sha256 of
    every weight and config file) with the files in the page cache (just written, or just loaded);
(b) the same after ``posix_fadvise(DONTNEED)`` evicted the files from the page cache (a cold read);
(c) the cheaper alternative the issue names, size + mtime + a sampled hash (16 blocks of 1 MiB per
    file), which misses a change that keeps size and mtime;
(d) for scale: reading every byte of the files without hashing them (the floor any load of the model
    pays), from the page cache.

Prints one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

LAYERS, HIDDEN, MLP, VOCAB, KV = 28, 2048, 6144, 151_936, 1024


def layer_shapes() -> dict[str, tuple[int, ...]]:
    return {
        "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        "self_attn.k_proj.weight": (KV, HIDDEN),
        "self_attn.v_proj.weight": (KV, HIDDEN),
        "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "mlp.gate_proj.weight": (MLP, HIDDEN),
        "mlp.up_proj.weight": (MLP, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, MLP),
        "input_layernorm.weight": (HIDDEN,),
        "post_attention_layernorm.weight": (HIDDEN,),
    }


def write_model(out: Path) -> int:
    """Two shards of random bfloat16 weights; returns the total bytes."""
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    split = LAYERS // 2 - 4  # the embedding and the first layers in shard 1, the rest in shard 2
    total = 0
    for k, layers in enumerate((range(split), range(split, LAYERS))):
        shard: dict[str, torch.Tensor] = {}  # one shard in memory at a time
        if k == 0:
            shard["model.embed_tokens.weight"] = torch.randn(VOCAB, HIDDEN, generator=gen).to(torch.bfloat16)
        for layer in layers:
            for name, shape in layer_shapes().items():
                shard[f"model.layers.{layer}.{name}"] = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        if k == 1:
            shard["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        path = out / f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        total += path.stat().st_size
        del shard
    (out / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": HIDDEN}))
    return total


def evict(out: Path) -> None:
    for path in out.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sampled(out: Path, blocks: int = 16, size: int = 1 << 20) -> dict[str, str]:
    result = {}
    for path in sorted(out.iterdir()):
        st = path.stat()
        digest = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
        with open(path, "rb") as f:
            for k in range(blocks):
                f.seek(max(0, st.st_size - size) * k // max(blocks - 1, 1))
                digest.update(f.read(size))
        result[path.name] = digest.hexdigest()
    return result


def timed(fn, repeats: int, before=None) -> list[float]:
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        out.append(round(time.perf_counter() - start, 3))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", default="/tmp/qg_fp_model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench" / "fingerprint.json"))
    parser.add_argument("--keep", action="store_true", help="keep the model dir")
    args = parser.parse_args()

    from quality_gate.models import model_weights_fingerprint

    out = Path(args.dir)
    start = time.perf_counter()
    total = write_model(out)
    write_s = time.perf_counter() - start

    def read_all() -> None:
        for path in sorted(out.iterdir()):
            with open(path, "rb") as f:
                while f.read(1 << 22):
                    pass

    def fingerprint() -> None:
        model_weights_fingerprint(str(out))

    result = {
        "bytes": total,
        "files": sorted(p.name for p in out.iterdir()),
        "write_s": round(write_s, 1),
        "full_sha256_warm_s": timed(fingerprint, args.repeats),
        "full_sha256_cold_s": timed(fingerprint, args.repeats, before=lambda: evict(out)),
        "size_mtime_sampled_s": timed(lambda: sampled(out), args.repeats),
        "read_every_byte_warm_s": timed(read_all, args.repeats),
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version()},
    }
    warm = statistics.median(result["full_sha256_warm_s"])
    result["full_sha256_warm_gb_per_s"] = round(total / warm / 1e9, 2)
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
