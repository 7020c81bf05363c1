"""Stage 2 as independent jobs (data_process.num_parts / part_index / finalize_only) into one output dir:
sequential and concurrent parts, refusal before the last part, finalisation, reruns, fingerprint, and
docs/slurm_collect.sbatch run with sbatch / srun replaced by local stubs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import ENV, REPO, SELECTOR, select_config
from helpers import TRAIN as DATA
from test_stage2_stage import assert_same_stats, run_in_process, stats_by_id

from quality_gate.errors import RouterDataError, SelectionError
from quality_gate.selection.pipeline import run_selection
from quality_gate.stats.store import load_index

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (SELECTOR.exists() and DATA.exists()), reason="tiny assets missing: run `make assets`"
    ),
]

# 100 samples in 10 shards of 10: parts of 4, 3 and 3 shards.
OVERRIDES = ["data_process.batch_size=4", "dataset.subset_ratio=0.05", "data_process.shard_size=10"]
PARTS = 3


def part(i: int) -> list[str]:
    return [*OVERRIDES, f"data_process.num_parts={PARTS}", f"data_process.part_index={i}"]


FINALIZE = [*OVERRIDES, f"data_process.num_parts={PARTS}", "data_process.finalize_only=true"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parts_reference")
    run_in_process(out, OVERRIDES)
    return out


def index_path(run: Path) -> Path:
    return run / "router_data" / "synthetic_router_data.pt"


def shard_times(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (run / "router_data" / "synthetic").iterdir()}


def assert_same_router_data(run: Path, reference: Path) -> None:
    """Same ids in the same order, same shards, identical per-sample statistics."""
    got, want = load_index(index_path(run)), load_index(index_path(reference))
    for key in ("sample_ids", "shards", "shard_num_samples", "fingerprint", "num_layers"):
        assert got[key] == want[key], key
    assert torch.equal(got["lengths"], want["lengths"]) and torch.equal(got["valid"], want["valid"])
    assert_same_stats(stats_by_id(run), stats_by_id(reference), exact=True)
    records = (run / "router_data" / "synthetic_records.jsonl").read_text()
    assert records == (reference / "router_data" / "synthetic_records.jsonl").read_text()


def test_parts_one_after_another(one_process: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    plan_parts = None
    for i in (0, 1):
        run_in_process_part(run, part(i))
        assert not index_path(run).exists(), f"index written after part {i} of {PARTS}"
        plan = json.loads((run / "router_data" / "plan.json").read_text())
        plan_parts = {s["index"]: s["part"] for s in plan["shards"]}
        assert plan["num_parts"] == PARTS and len(plan_parts) == 10
    left = sorted(k for k, p in plan_parts.items() if p == 2)

    # Selection refuses with the missing part and its shards.
    n_left = len(left)
    assert 0 < n_left < 10
    with pytest.raises(
        SelectionError, match=rf"not finished: {n_left} of 10 shards .* part\(s\) \[2\]"
    ) as err:
        run_selection(select_config(root_dir=str(run), selection_percentage=0.5))
    assert f"synthetic/shard-{left[0]:05d}.pt (part 2)" in str(err.value)
    # So does finalize_only, naming the same shards.
    with pytest.raises(RouterDataError, match=rf"{n_left} of 10 shards are not finished") as err:
        run_in_process_part(run, FINALIZE)
    assert all(f"shard-{k:05d}.pt (part 2)" in str(err.value) for k in left)
    assert not index_path(run).exists()

    # A part run twice scores nothing and touches no shard.
    before = shard_times(run)
    run_in_process_part(run, part(0))
    assert shard_times(run) == before

    # Another setup is refused by the fingerprint before anything is written.
    with pytest.raises(
        RouterDataError, match=r"refusing to mix(.|\n)*max_sequence_length: stored 512, now 256"
    ):
        run_in_process_part(run, [*part(2), "dataset.max_sequence_length=256"])
    assert shard_times(run) == before

    # The last part writes the indexes: the same router data as one process.
    metrics = run_in_process(run, part(2))
    assert metrics["shards_total"] == 10 and metrics["shards_scored_this_run"] == n_left
    assert metrics["num_parts"] == PARTS
    assert_same_router_data(run, one_process)
    # The selection now runs.
    run_selection(select_config(root_dir=str(run), selection_percentage=0.5))
    assert (run / "selected_data.jsonl").is_file()

    # finalize_only on its own (the dependent job of a job array) writes the same indexes again.
    for name in ("synthetic_router_data.pt", "synthetic_records.jsonl"):
        (run / "router_data" / name).unlink()
    metrics = run_in_process(run, FINALIZE)
    assert metrics["shards_scored_this_run"] == 0 and metrics["samples"] == 100
    assert_same_router_data(run, one_process)


def run_in_process_part(run: Path, overrides: list[str]) -> None:
    """Stage 2 in this process for a part that may not finish the run (no metrics file expected)."""
    from helpers import compose

    from quality_gate.stages.collect import run as collect

    collect(compose("collect", [*overrides, f"output_dir={run}"]))


def stage2_process(run: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "quality_gate", "collect", *overrides, f"output_dir={run}"],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_two_parts_concurrently_then_the_last(one_process: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = [stage2_process(run, part(i)) for i in (0, 1)]
    for proc in procs:
        out, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, out[-3000:]
    assert not index_path(run).exists()
    with pytest.raises(SelectionError, match=r"part\(s\) \[2\]"):
        run_selection(select_config(root_dir=str(run), selection_percentage=0.5))
    run_in_process(run, part(2))
    assert_same_router_data(run, one_process)


SBATCH_STUB = '''#!{python}
"""sbatch stand-in: records each submission, runs array tasks at once (concurrently) and --wrap jobs,
honours --dependency=afterok:<id>, prints the job id (--parsable)."""
import json, os, subprocess, sys
from pathlib import Path

state = Path(os.environ["SLURM_STUB_DIR"])
args, opts, rest = sys.argv[1:], {{}}, []
for k, a in enumerate(args):
    if not a.startswith("--"):
        rest = args[k:]
        break
    key, _, value = a[2:].partition("=")
    opts[key] = value or True
counter = state / "next_id"
job_id = int(counter.read_text()) if counter.exists() else 1000
counter.write_text(str(job_id + 1))
status_file = state / "status.json"
status = json.loads(status_file.read_text()) if status_file.exists() else {{}}
with open(state / "submissions.jsonl", "a") as f:
    f.write(json.dumps({{"id": job_id, "opts": opts, "argv": rest}}) + "\\n")
dep = opts.get("dependency")
if dep and status.get(dep.removeprefix("afterok:")) != "COMPLETED":
    status[str(job_id)] = "DependencyNeverSatisfied"
elif "array" in opts:
    low, high = map(int, opts["array"].split("-"))
    procs = []
    for task in range(low, high + 1):
        env = {{**os.environ, "SLURM_JOB_ID": str(job_id + task + 1), "SLURM_ARRAY_JOB_ID": str(job_id),
               "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": str(high - low + 1),
               "SLURM_ARRAY_TASK_MIN": str(low), "SLURM_ARRAY_TASK_MAX": str(high)}}
        log = open(state / f"task-{{job_id}}_{{task}}.out", "w")
        procs.append(subprocess.Popen(["bash", *rest], env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    status[str(job_id)] = "COMPLETED" if not any(codes) else "FAILED"
else:
    with open(state / f"job-{{job_id}}.out", "w") as log:
        code = subprocess.call(["bash", "-c", opts["wrap"]], stdout=log, stderr=subprocess.STDOUT)
    status[str(job_id)] = "COMPLETED" if code == 0 else "FAILED"
status_file.write_text(json.dumps(status))
print(job_id)
'''

SRUN_STUB = """#!/bin/bash
printf '%s\\n' "$*" >> "$SLURM_STUB_DIR/srun.log"
exec "$@"
"""


def test_slurm_job_array_script(one_process: Path, tmp_path: Path) -> None:
    """docs/slurm_collect.sbatch submits an array of 3 parts and an afterok finalize job; with the
    launcher simulated locally the result equals one process."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "sbatch").write_text(textwrap.dedent(SBATCH_STUB.format(python=sys.executable)))
    (stubs / "srun").write_text(SRUN_STUB)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    state = tmp_path / "slurm"
    state.mkdir()
    run = tmp_path / "shared" / "collect"
    env = {
        **ENV,
        "PATH": f"{stubs}{os.pathsep}{ENV['PATH']}",
        "SLURM_STUB_DIR": str(state),
        "OUTPUT_DIR": str(run),
        "NUM_PARTS": str(PARTS),
        "PYTHON": sys.executable,
    }
    proc = subprocess.run(
        ["bash", "docs/slurm_collect.sbatch", *OVERRIDES],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(p.read_text() for p in state.glob("*.out"))
    array, final = (json.loads(line) for line in (state / "submissions.jsonl").read_text().splitlines())
    assert array["opts"]["array"] == f"0-{PARTS - 1}" and array["argv"][1:] == OVERRIDES
    assert final["opts"]["dependency"] == f"afterok:{array['id']}"
    assert "data_process.finalize_only=true" in final["opts"]["wrap"]
    assert json.loads((state / "status.json").read_text()) == {
        str(array["id"]): "COMPLETED",
        str(final["id"]): "COMPLETED",
    }, "".join(p.read_text()[-2000:] for p in state.glob("*.out"))
    # Each task ran its own part of 3 through srun.
    parts = sorted(line for line in (state / "srun.log").read_text().splitlines())
    assert len(parts) == PARTS
    for i, line in enumerate(parts):
        assert f"data_process.num_parts={PARTS} data_process.part_index={i} output_dir={run}" in line
    assert_same_router_data(run, one_process)
    metrics = json.loads((run / "stage2_metrics.json").read_text())
    assert metrics["shards_scored_this_run"] == 0  # written by the finalize job, which scores nothing
