"""Write synthetic chat records (checkable answers, labelled corruptions) as JSONL.

    # training set: 2,000 records, 30 % corrupted
    python scripts/make_synthetic_data.py --out assets/data/synthetic_train.jsonl \
        --num-samples 2000 --noise-rate 0.3 --seed 0
    # clean held-out set whose prompts never occur in the training set
    python scripts/make_synthetic_data.py --out assets/data/synthetic_eval.jsonl \
        --num-samples 200 --noise-rate 0 --seed 1 --dataset-name synthetic_eval \
        --exclude assets/data/synthetic_train.jsonl

Prints the number of records per task family and per corruption kind.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from quality_gate.io import atomic_write_jsonl
from quality_gate.synthetic import make_records


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--num-samples", type=int, required=True, help="number of records")
    parser.add_argument("--noise-rate", type=float, default=0.3, help="fraction of corrupted records")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--dataset-name", default="synthetic", help="record 'dataset' and id prefix")
    parser.add_argument("--id-offset", type=int, default=0, help="first record number in the ids")
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        help="JSONL files whose user prompts must not be produced (held-out sets)",
    )
    return parser.parse_args(argv)


def user_prompts(path: Path) -> set[str]:
    """The user-turn contents of every record in the JSONL file ``path``."""
    prompts = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.update(m["content"] for m in json.loads(line)["messages"] if m["role"] == "user")
    return prompts


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    excluded: set[str] = set()
    for path in args.exclude:
        excluded |= user_prompts(Path(path))
    records = make_records(
        args.num_samples,
        args.noise_rate,
        args.seed,
        dataset_name=args.dataset_name,
        id_offset=args.id_offset,
        exclude_prompts=excluded,
    )
    atomic_write_jsonl(args.out, records)
    print(f"wrote {len(records)} records to {args.out}")
    for field in ("task", "corruption"):
        counts = Counter(r["meta"][field] for r in records)
        print(f"per {field}: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
