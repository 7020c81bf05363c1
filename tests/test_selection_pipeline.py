"""End-to-end selection on synthetic router data: outputs, budgets, baselines, bad inputs, report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import ENV, REPO, fake_record, fake_shard, select_config, write_router_dataset

from quality_gate.errors import ConfigError, SelectionError
from quality_gate.selection import auroc, compute_selection, run_selection
from quality_gate.selection.report import SECTIONS, _coloured_tokens


def make_stage2(root: Path, sizes=(("alpha", 23), ("beta", 17)), ifd: bool = True, seed: int = 0) -> Path:
    """A Stage 2 run dir with router data of several datasets; every third record is 'corrupted'."""
    g = torch.Generator().manual_seed(seed)
    router = root / "router_data"
    for name, n in sizes:
        ids = [f"{name}_{i}" for i in range(n)]
        lengths = torch.randint(2, 12, (n,), generator=g).tolist()
        half = n // 2
        shards = [
            fake_shard(ids[:half], lengths[:half], 4, g, ifd),
            fake_shard(ids[half:], lengths[half:], 4, g, ifd),
        ]
        records = [
            fake_record(name, sid, {"corruption": "shuffle" if i % 3 == 0 else None})
            for i, sid in enumerate(ids)
        ]
        write_router_dataset(router, name, shards, records=records)
    return root


@pytest.fixture(scope="module")
def stage2(tmp_path_factory) -> Path:
    return make_stage2(tmp_path_factory.mktemp("stage2"))


@pytest.fixture(scope="module")
def default_run(stage2):
    return run_selection(select_config(root_dir=str(stage2), selection_percentage=0.3))


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))


def test_outputs_and_budget(stage2, default_run):
    res = default_run
    n_valid = int(res.stats.valid.sum())
    kept = [json.loads(line) for line in (stage2 / "selected_data.jsonl").read_text().splitlines()]
    assert len(kept) == math.ceil(0.3 * n_valid) == 12
    # Rank order: q decreasing, and they are the best q overall.
    q_of = dict(zip(res.stats.ids, res.q))
    qs = [q_of[r["id"]] for r in kept]
    assert qs == sorted(qs, reverse=True)
    assert min(qs) >= np.sort(res.q)[::-1][len(kept) - 1]
    assert set(kept[0]) >= {"messages", "dataset", "id", "meta"}

    table = pq.read_table(stage2 / "scores.parquet").to_pandas()
    assert len(table) == 40
    for col in [
        "id",
        "dataset",
        "q",
        "S_0",
        "S_3",
        "length",
        "rank",
        "selected",
        "valid",
        "ppl_score",
        "ifd",
        "random",
    ]:
        assert col in table.columns
    assert int(table.selected.sum()) == 12
    assert set(table[table.selected].id) == {r["id"] for r in kept}

    summary = json.loads((stage2 / "selection_summary.json").read_text())
    assert summary["num_selected"] == 12 and summary["parameters"]["selector"] == "quality_gate"
    assert set(summary["datasets"]) == {"alpha", "beta"}
    assert sum(d["selected"] for d in summary["datasets"].values()) == 12
    assert "p50" in summary["score_quantiles"]["quality_gate"]
    assert not list(stage2.glob(".selection-staging-*"))
    assert (stage2 / "router_data" / "fingerprint.json").exists()


def test_report_sections_and_images(stage2, default_run):
    parser = _Collect()
    parser.feed((stage2 / "selection_report.html").read_text())
    assert set(SECTIONS) <= parser.ids
    assert len(parser.imgs) >= 5 and all(src.startswith("data:image/png;base64,") for src in parser.imgs)
    text = (stage2 / "selection_report.html").read_text()
    assert "Token colouring unavailable" in text  # no Stage 2 config.yaml / tokenizer here
    assert "Question alpha_" in text


def test_token_colouring_escapes_and_pairs_positions():
    html_text = _coloured_tokens(["<s>", "a&b", "c"], np.array([0.9, 0.1]), np.array([2.0, 50.0]))
    assert "&lt;s&gt;" in html_text and "a&amp;b" in html_text and "<s>" not in html_text
    assert "token 1: gate 0.100, ppl 2" in html_text  # token 1: its gate, and the ppl of predicting it
    assert "token 2: gate nan, ppl 50" in html_text


def test_exports_load(stage2, default_run):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(stage2 / "hf_dataset" / "data.jsonl"), split="train")
    assert len(ds) == 12 and ds[0]["messages"][0]["role"] == "user"
    info = json.loads((stage2 / "llamafactory" / "dataset_info.json").read_text())
    entry = info["quality_gate_selection"]
    assert entry["formatting"] == "sharegpt" and entry["tags"]["role_tag"] == "role"
    rows = (stage2 / "llamafactory" / entry["file_name"]).read_text().splitlines()
    assert len(rows) == 12 and json.loads(rows[0])["messages"][1]["role"] == "assistant"


def test_deterministic_and_selectors_do_not_overwrite(stage2, default_run):
    again = compute_selection(select_config(root_dir=str(stage2), selection_percentage=0.3))
    assert [again.stats.ids[i] for i in again.order] == [default_run.stats.ids[i] for i in default_run.order]
    before = (stage2 / "selected_data.jsonl").read_text()
    for name in ("random", "perplexity", "ifd"):
        res = run_selection(select_config(root_dir=str(stage2), selection_percentage=0.3, selector=name))
        assert res.output_dir == stage2 / f"selection_{name}"
        assert (res.output_dir / "selected_data.jsonl").exists()
    assert (stage2 / "selected_data.jsonl").read_text() == before
    r1 = compute_selection(select_config(root_dir=str(stage2), selector="random", seed=1))
    r2 = compute_selection(select_config(root_dir=str(stage2), selector="random", seed=2))
    assert r1.order.tolist() != r2.order.tolist()


def test_per_dataset_budget(stage2):
    res = compute_selection(select_config(root_dir=str(stage2), selection_percentage=0.3, per_dataset=True))
    names = np.asarray(res.stats.datasets)
    assert int(res.selected[names == "alpha"].sum()) == math.ceil(0.3 * 23)
    assert int(res.selected[names == "beta"].sum()) == math.ceil(0.3 * 17)
    assert set(res.columns) == {"alpha", "beta"}


def _handmade(
    root: Path, ppl_nll: list[float], gate: list[float], cond: list[float], uncond: list[float]
) -> Path:
    n = len(ppl_nll)
    lens = torch.full((n,), 3, dtype=torch.int64)
    shard = {
        "sample_ids": [f"x{i}" for i in range(n)],
        "lengths": lens,
        "gates": torch.tensor(gate).repeat_interleave(3)[:, None].repeat(1, 2).half(),  # (3n, 2)
        "perplexities": torch.exp(torch.tensor(ppl_nll).repeat_interleave(3)).float(),
        "assistant_mask": torch.ones(3 * n, dtype=torch.bool),
        "valid": torch.ones(n, dtype=torch.bool),
        "invalid_reason": [""] * n,
        "ifd_loss_cond": torch.tensor(cond),
        "ifd_loss_uncond": torch.tensor(uncond),
    }
    write_router_dataset(root / "router_data", "h", [shard])
    return root


def test_baselines_on_handmade_statistics(tmp_path):
    root = _handmade(
        tmp_path,
        ppl_nll=[3.0, 0.5, 2.0, 1.0],
        gate=[0.2, 0.9, 0.5, 0.1],
        cond=[0.9, 2.0, 0.5, 0.8],
        uncond=[1.0, 1.0, 1.0, 1.0],
    )

    def kept(selector: str) -> list[str]:
        res = compute_selection(
            select_config(root_dir=str(root), selection_percentage=0.5, selector=selector)
        )
        return [res.stats.ids[i] for i in res.order]

    assert kept("quality_gate") == ["x1", "x2"]  # the most open gates
    assert kept("perplexity") == ["x1", "x3"]  # the lowest NLL
    assert kept("ifd") == ["x0", "x3"]  # x1's IFD 2 > 1 is dropped, then the highest IFD
    assert len(kept("random")) == 2


def test_ties_broken_by_id(tmp_path):
    root = _handmade(tmp_path, [1.0] * 4, [0.5] * 4, [0.5] * 4, [1.0] * 4)
    res = compute_selection(
        select_config(root_dir=str(root), selection_percentage=0.5, selector="perplexity")
    )
    assert [res.stats.ids[i] for i in res.order] == ["x0", "x1"]


def _no_outputs(root: Path) -> bool:
    return not (root / "selected_data.jsonl").exists() and not list(root.glob(".selection-staging-*"))


def test_bad_inputs(tmp_path):
    with pytest.raises(SelectionError, match=r"root_dir=.* is not a directory"):
        compute_selection(select_config(root_dir=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelectionError, match="holds no router data"):
        compute_selection(select_config(root_dir=str(tmp_path / "empty")))
    root = make_stage2(tmp_path / "ok", sizes=(("a", 5),), ifd=False)
    for k in (0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="selection_percentage"):
            run_selection(select_config(root_dir=str(root), selection_percentage=k))
    with pytest.raises(SelectionError, match="collect_ifd=true"):
        run_selection(select_config(root_dir=str(root), selector="ifd"))
    assert _no_outputs(root) and _no_outputs(root / "selection_ifd")

    mixed = make_stage2(tmp_path / "mixed", sizes=(("a", 5),))
    g = torch.Generator().manual_seed(0)
    write_router_dataset(
        mixed / "other", "b", [fake_shard(["b0"], [3], 4, g)], fingerprint_fields={"model": "other"}
    )
    with pytest.raises(SelectionError, match="different Stage 2 setups"):
        run_selection(select_config(root_dir=str(mixed)))
    assert _no_outputs(mixed)

    norec = make_stage2(tmp_path / "norec", sizes=(("a", 5),))
    (norec / "router_data" / "a_records.jsonl").unlink()
    with pytest.raises(SelectionError, match=r"records file .* is missing"):
        run_selection(select_config(root_dir=str(norec)))

    dead = tmp_path / "dead"
    shard = fake_shard(["d0", "d1"], [3, 2], 4, g)
    shard["valid"][:] = False
    shard["invalid_reason"] = ["nan loss", "nan loss"]
    make_stage2(dead, sizes=(("a", 5),))
    write_router_dataset(dead / "router_data", "d", [shard])
    with pytest.raises(SelectionError, match=r"every sample of dataset\(s\) \['d'\] is invalid"):
        run_selection(select_config(root_dir=str(dead)))
    assert _no_outputs(dead)


def test_corruption_auroc_in_report(stage2, default_run):
    text = (stage2 / "selection_report.html").read_text()
    assert "AUROC clean vs corrupted" in text and "corrupted share of kept" in text


def test_auroc_hand_computed():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert auroc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert math.isnan(auroc([1, 2], [1, 1]))


@pytest.mark.slow
def test_cli_writes_into_root_dir_only(tmp_path):
    root = make_stage2(tmp_path / "run", sizes=(("a", 6),))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [
        sys.executable,
        str(REPO / "scripts" / "batch_selection.py"),
        f"root_dir={root}",
        "selection_percentage=0.5",
    ]
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert len((root / "selected_data.jsonl").read_text().splitlines()) == 3
    assert list(cwd.iterdir()) == []
    bad = subprocess.run(
        [*cmd[:-1], "selection_percentage=2"], cwd=cwd, env=ENV, capture_output=True, text=True
    )
    assert bad.returncode != 0 and "selection_percentage=2" in bad.stdout + bad.stderr


@pytest.mark.parametrize(
    ("selector", "stage1", "warns"),
    [
        ("perplexity", {"kind": "full_rank", "path": "w.pt"}, True),
        ("ifd", {"kind": "none", "gate_init": {"scale": 1.0, "std": 0.0}}, True),
        ("perplexity", {"kind": "none", "gate_init": {"scale": 2.0, "std": 0.0}}, False),
        ("quality_gate", {"kind": "full_rank", "path": "w.pt"}, False),
        ("combined", {"kind": "full_rank", "path": "w.pt"}, True),  # default weights include perplexity
    ],
)
def test_baselines_read_from_a_gated_model_are_flagged(tmp_path, selector, stage1, warns):
    from quality_gate.selection.pipeline import baseline_model_note

    (tmp_path / "router_data").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps({"stage1_weights": stage1}))
    cfg = select_config(root_dir=str(tmp_path), selector=selector)
    note = baseline_model_note(cfg, [tmp_path / "router_data" / "d_router_data.pt"])
    assert (note is not None) == warns
    if warns:
        assert "not of the model as released" in note and "model_checkpoint_path" in note
