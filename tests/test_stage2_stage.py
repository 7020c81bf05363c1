"""Stage 2 end to end on the tiny assets: seed command, resume after SIGKILL, fingerprint, torchrun."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, SELECTOR, TORCHRUN_TWO, compose, select_config
from helpers import TRAIN as DATA

from quality_gate.errors import RouterDataError
from quality_gate.selection import compute_selection, run_selection
from quality_gate.stats.store import find_router_data, iter_shards, load_index

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SELECTOR.exists() and DATA.exists()), reason="tiny assets missing: run `make assets`"
    ),
]

STAGE2 = [sys.executable, "src/main.py", "--config-name", "stage_2_selection"]
SEED_OVERRIDES = ["data_process.batch_size=4", "dataset.subset_ratio=0.01"]
# 100 samples in 25 shards: enough shards that a SIGKILL lands in the middle of the run.
RESUME_OVERRIDES = [
    "data_process.batch_size=4",
    "dataset.subset_ratio=0.05",
    "data_process.shard_size=4",
    "collect_ifd=true",
]


def stage2(out_dir: Path, overrides: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [*STAGE2, *overrides, f"output_dir={out_dir}"],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def stats_by_id(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every sample's statistics of a run, keyed by ``<dataset>/<id>``; fails on duplicate ids."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for index_path in find_router_data(run_dir / "router_data"):
        name = load_index(index_path)["dataset_name"]
        for shard in iter_shards(index_path):
            for i, sid in enumerate(shard.sample_ids):
                key = f"{name}/{sid}"
                assert key not in out, f"sample {key} appears twice"
                rows = shard.sample_slice(i)
                sample = {
                    "gates": shard.gates[rows].clone(),
                    "perplexities": shard.perplexities[rows].clone(),
                    "assistant_mask": shard.assistant_mask[rows].clone(),
                    "valid": shard.valid[i].clone(),
                }
                if shard.ifd_loss_cond is not None:
                    sample["ifd"] = torch.stack([shard.ifd_loss_cond[i], shard.ifd_loss_uncond[i]])
                out[key] = sample
    return out


def assert_same_stats(a: dict, b: dict, exact: bool) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        for field, value in a[key].items():
            if exact or value.dtype == torch.bool:
                assert torch.equal(value, b[key][field]), f"{key}.{field} differs"
            else:
                torch.testing.assert_close(value.float(), b[key][field].float(), atol=1e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage2_reference")
    run_in_process(out, RESUME_OVERRIDES)
    return out


def test_seed_command_end_to_end(tmp_path: Path) -> None:
    stage2(tmp_path, SEED_OVERRIDES)
    router = tmp_path / "router_data"
    index = load_index(router / "synthetic_router_data.pt")
    records = [json.loads(line) for line in (router / "synthetic_records.jsonl").read_text().splitlines()]
    assert index["num_samples"] == len(records) == 20  # 1 % of 2,000
    assert index["sample_ids"] == [r["id"] for r in records]
    assert all(r["messages"] for r in records)
    config = json.loads((SELECTOR / "config.json").read_text())
    assert index["num_layers"] == config["num_hidden_layers"]
    data = stats_by_id(tmp_path)
    for sample in data.values():
        assert sample["valid"]
        assert sample["gates"].shape[1] == index["num_layers"]
        assert ((sample["gates"] > 0) & (sample["gates"] < 1)).all()
        assert sample["assistant_mask"].any()
    # Each stored perplexity is exp(NLL) of the next token under a plain forward of the same model.
    _check_perplexities_against_plain_forward(records[:3], data)
    metrics = json.loads((tmp_path / "stage2_metrics.json").read_text())
    assert metrics["samples"] == 20 and metrics["invalid_samples"] == 0
    assert metrics["tokens_scored_this_run"] > 0 and metrics["tokens_per_s"] > 0
    assert 0 <= metrics["padding_fraction"] < 1
    # The seed's API (quality_gate.compat) returns the stored statistics.
    from quality_gate.compat import get_sample_router_info, load_router_data

    router_data = load_router_data(router / "synthetic_router_data.pt")
    assert router_data["num_samples"] == 20 and router_data["dataset_name"] == "synthetic"
    info = get_sample_router_info(router_data, records[3]["id"])
    stored = data[f"synthetic/{records[3]['id']}"]
    assert torch.equal(info["quality_gates"], stored["gates"].T)  # (L, T_i)
    assert torch.equal(info["perplexities"], stored["perplexities"])  # (T_i,)
    fingerprint = json.loads((router / "fingerprint.json").read_text())
    assert fingerprint["fields"]["max_sequence_length"] == 512
    assert (tmp_path / "manifest.json").exists() and (tmp_path / "config.yaml").exists()


def _check_perplexities_against_plain_forward(records: list[dict], data: dict) -> None:
    """Stored gates and perplexities == those of a plain full-logits HF forward of the same gated model.

    Stage 2 scored with unwarmed gates attached on load, seeded by ``seed`` (42): the same seed here
    rebuilds the same gates. The reference takes full float32 logits and ``F.cross_entropy``, not the
    chunked NLL of the stage.
    """
    import torch.nn.functional as F

    from quality_gate.data import encode_record
    from quality_gate.gate import record_gates
    from quality_gate.models import load_selector

    torch.manual_seed(42)
    model, tokenizer = load_selector(str(SELECTOR), dtype="float32", device="cpu")
    model.eval()
    for record in records:
        ids = torch.tensor([encode_record(record, tokenizer, 512).input_ids])  # (1, n)
        with torch.no_grad(), record_gates(model) as rec:
            logits = model(input_ids=ids).logits[0, :-1]  # (n-1, V)
            gates = rec.probs()[0, :, :-1].T  # (n-1, L): position t pairs token t's gates ...
        reference = torch.exp(F.cross_entropy(logits, ids[0, 1:], reduction="none"))  # ... with ppl of t+1
        stored = data[f"synthetic/{record['id']}"]
        torch.testing.assert_close(stored["perplexities"], reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stored["gates"].float(), gates, rtol=0, atol=1e-3)  # stored as float16


def test_kill_and_resume_equals_uninterrupted(reference_run: Path, tmp_path: Path) -> None:
    total = len(load_index(reference_run / "router_data" / "synthetic_router_data.pt")["shards"])
    proc = subprocess.Popen(
        [*STAGE2, *RESUME_OVERRIDES, f"output_dir={tmp_path}"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("router_data/synthetic/*.done")):
        assert proc.poll() is None, "stage 2 exited before writing a shard"
        assert time.monotonic() < deadline, "no shard marker within 240 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(tmp_path.glob("router_data/synthetic/*.done")))
    assert 1 <= done < total, f"the kill must land mid-run ({done} of {total} shards done)"
    assert not (tmp_path / "router_data" / "synthetic_router_data.pt").exists()

    stage2(tmp_path, RESUME_OVERRIDES)
    metrics = json.loads((tmp_path / "stage2_metrics.json").read_text())
    assert metrics["shards_resumed"] >= done and metrics["shards_total"] == total
    assert_same_stats(stats_by_id(tmp_path), stats_by_id(reference_run), exact=True)


def test_changed_fingerprint_is_refused(reference_run: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in (reference_run / "router_data").rglob("*")}
    expected = r"refusing to mix(.|\n)*max_sequence_length: stored 512, now 256"
    with pytest.raises(RouterDataError, match=expected):
        run_in_process(reference_run, [*RESUME_OVERRIDES, "dataset.max_sequence_length=256"])
    assert {p: p.stat().st_mtime_ns for p in (reference_run / "router_data").rglob("*")} == before


@pytest.mark.dist
def test_torchrun_two_processes_equals_one(reference_run: Path, tmp_path: Path) -> None:
    cmd = [
        *TORCHRUN_TWO,
        "src/main.py",
        "--config-name",
        "stage_2_selection",
        *RESUME_OVERRIDES,
        f"output_dir={tmp_path}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((tmp_path / "stage2_metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(metrics["peak_rss_gb_per_rank"]) == 2
    two = stats_by_id(tmp_path)  # raises on a duplicate id
    one = stats_by_id(reference_run)
    assert sorted(two) == sorted(one)  # none missing, none extra
    assert_same_stats(two, one, exact=False)


def run_in_process(out_dir: Path, overrides: list[str]) -> dict:
    """Run Stage 2 in this process (cheaper than a subprocess) and return its metrics."""
    from quality_gate.stages.collect import run

    run(compose("collect", [*overrides, f"output_dir={out_dir}"]))
    return json.loads((out_dir / "stage2_metrics.json").read_text())


@pytest.mark.parametrize("truncation", ["right", "drop"])
def test_bad_rows_and_overlong_samples_are_reported(tmp_path: Path, truncation: str) -> None:
    good = DATA.read_text().splitlines()[:6]

    def chat(user: str, assistant: str) -> str:
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return json.dumps({"messages": messages})

    long_prompt, long_answer = chat("word " * 300, "ok"), chat("hi", "yes " * 300)
    rows = [*good, "{broken json", json.dumps({"foo": 1}), long_prompt, long_answer]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows) + "\n")
    metrics = run_in_process(
        tmp_path / "run",
        [
            f"dataset.local.datasets=[{{path: {path}, dataset_name: bad}}]",
            "dataset.max_sequence_length=64",
            f"dataset.truncation={truncation}",
        ],
    )
    assert metrics["skipped_rows"] == 2 and metrics["skipped_rows_by_dataset"] == {"bad": 2}
    encode = metrics["datasets"]["bad"]["encode"]
    if truncation == "right":
        # The long answer is cut and kept; the long prompt loses its whole answer and is dropped.
        assert metrics["samples"] == 7 and metrics["datasets"]["bad"]["truncated"] == 1
        assert encode["dropped_no_assistant_tokens"] == 1
    else:
        assert metrics["samples"] == 6 and encode["dropped_too_long"] == 2
    dropped = [
        json.loads(line) for line in (tmp_path / "run" / "dropped_samples.jsonl").read_text().splitlines()
    ]
    assert (
        metrics["datasets"]["bad"]["dropped_by_encoder"]
        == len(dropped)
        == (1 if truncation == "right" else 2)
    )
    assert all(d["reason"] and d["dataset"] == "bad" for d in dropped)
    records = (tmp_path / "run" / "router_data" / "bad_records.jsonl").read_text().splitlines()
    assert len(records) == metrics["samples"]


def test_stage1_weights_are_applied_and_fingerprinted(tmp_path: Path) -> None:
    from quality_gate.models import load_selector

    model, _ = load_selector(str(SELECTOR), dtype="float32", device="cpu")
    state = {n: torch.zeros_like(p) for n, p in model.named_parameters() if "quality_gate.gate" in n}
    weights = tmp_path / "full_rank_weights.pt"
    torch.save({"model_state_dict": state, "tokenizer_name": str(SELECTOR)}, weights)
    run_in_process(tmp_path / "run", [*SEED_OVERRIDES, f"model_checkpoint_path={weights}"])
    for sample in stats_by_id(tmp_path / "run").values():
        assert torch.all(sample["gates"] == 0.5)  # sigmoid(0): the zero Stage 1 weights were used
    fields = json.loads((tmp_path / "run" / "router_data" / "fingerprint.json").read_text())["fields"]
    assert fields["stage1_weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert fields["stage1_weights_kind"] == "full_rank"


# --------------------------------------------------------------------------------------------- #
# Issue 11: damaged shards, refused reruns, relative selector paths
# --------------------------------------------------------------------------------------------- #
def _copy(run: Path, dst: Path) -> Path:
    shutil.copytree(run, dst)
    return dst


def _selected_ids(root: Path) -> list[str]:
    res = compute_selection(select_config(root_dir=str(root), selection_percentage=0.3))
    return [res.stats.ids[int(i)] for i in res.order]


def test_truncated_shard_is_refused_by_selection_and_rescored_by_a_rerun(
    reference_run: Path, tmp_path: Path
) -> None:
    """A shard cut short after its marker was written (a copy that ran out of space): selection names it,
    a Stage 2 rerun in the same dir rescores that shard alone and the result equals an uninterrupted run."""
    run = _copy(reference_run, tmp_path / "run")
    shard = run / "router_data" / "synthetic" / "shard-00003.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    expected = rf"shard {re.escape(str(shard))} .*damaged: {len(data) // 2} bytes, {len(data)} recorded"
    with pytest.raises(RouterDataError, match=expected):
        run_selection(select_config(root_dir=str(run), selection_percentage=0.3))
    assert not (run / "selected_data.jsonl").exists()

    metrics = run_in_process(run, RESUME_OVERRIDES)
    assert metrics["shards_scored_this_run"] == 1
    assert metrics["shards_resumed"] == metrics["shards_total"] - 1
    assert_same_stats(stats_by_id(run), stats_by_id(reference_run), exact=True)
    assert _selected_ids(run) == _selected_ids(reference_run)


def _flip_bytes_inside_a_tensor(path: Path) -> None:
    """Invert 4 bytes in the middle of the largest tensor record of a ``torch.save`` zip (size unchanged)."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    middle = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for k in range(4):
        raw[middle + k] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_shard_with_flipped_bytes_is_never_read_silently(reference_run: Path, tmp_path: Path) -> None:
    """Same size, other bytes: torch.load reads such a file without complaint (other numbers); the sha256
    of the marker is what refuses it, in selection and in the seed's per-sample API."""
    from quality_gate.stats.store import get_sample_router_info, load_router_data

    run = _copy(reference_run, tmp_path / "run")
    shard = run / "router_data" / "synthetic" / "shard-00001.pt"
    original = torch.load(shard, weights_only=True)
    size = shard.stat().st_size
    _flip_bytes_inside_a_tensor(shard)
    assert shard.stat().st_size == size
    damaged = torch.load(shard, weights_only=True)  # no error from torch ...
    tensors = [k for k, v in original.items() if isinstance(v, torch.Tensor)]
    assert any(not torch.equal(original[k], damaged[k]) for k in tensors)  # ... but other statistics

    with pytest.raises(RouterDataError, match=rf"shard {re.escape(str(shard))} .*sha256 differs"):
        run_selection(select_config(root_dir=str(run), selection_percentage=0.3))
    router = load_router_data(run / "router_data" / "synthetic_router_data.pt")
    intact_id = load_index(run / "router_data" / "synthetic_router_data.pt")["sample_ids"][0]
    assert get_sample_router_info(router, intact_id)["length"] > 0  # shard 0 is intact and readable
    with pytest.raises(RouterDataError, match="sha256 differs"):
        get_sample_router_info(router, original["sample_ids"][0])


def test_refused_rerun_leaves_the_provenance_files_as_they_were(reference_run: Path, tmp_path: Path) -> None:
    """A rerun into a finished run dir with other data (and 7 bad rows) is refused before it writes its
    skipped rows or metrics over those of the run that is there."""
    run = _copy(reference_run, tmp_path / "run")
    kept = ("skipped_rows.jsonl", "stage2_metrics.json", "dropped_samples.jsonl")
    before = {name: (run / name).read_bytes() for name in kept}
    router_before = {p: p.read_bytes() for p in (run / "router_data").rglob("*") if p.is_file()}
    bad_rows = ["{broken", "[]", '{"messages": []}', '{"foo": 1}', '"text"', "42", '{"messages": [{}]}']
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join([*DATA.read_text().splitlines()[:5], *bad_rows]) + "\n")
    with pytest.raises(RouterDataError, match="refusing to mix"):
        run_in_process(
            run, [*RESUME_OVERRIDES, f"dataset.local.datasets=[{{path: {other}, dataset_name: synthetic}}]"]
        )
    assert {name: (run / name).read_bytes() for name in kept} == before
    assert {p: p.read_bytes() for p in (run / "router_data").rglob("*") if p.is_file()} == router_before


def test_report_colours_tokens_when_selection_runs_from_another_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stage 2 run from the repo root with a relative selector path; selection run from elsewhere still
    finds the tokenizer for the report (fingerprint.json stores the path resolved)."""
    relative = "assets/models/tiny-qwen3-selector"
    monkeypatch.chdir(REPO)
    assert (Path(relative) / "config.json").is_file()
    run = tmp_path / "run"
    run_in_process(run, [*SEED_OVERRIDES, f"selector_model.path={relative}"])
    fields = json.loads((run / "router_data" / "fingerprint.json").read_text())["fields"]
    assert fields["selector_model_path"] == str((REPO / relative).resolve())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_selection(select_config(root_dir=str(run), selection_percentage=0.3))
    html = (run / "selection_report.html").read_text()
    assert "coloured by gate" in html and "Token colouring unavailable" not in html
    assert list(elsewhere.iterdir()) == []
