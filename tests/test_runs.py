"""Run dirs: a rerun into an existing dir keeps the original config and manifest."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from quality_gate.runs import init_run, update_manifest


def test_rerun_keeps_provenance(tmp_path):
    cfg = OmegaConf.create({"output_dir": str(tmp_path), "seed": 1, "x": 1})
    init_run(cfg, "stage")
    update_manifest(tmp_path, weights="abc")
    original = (tmp_path / "config.yaml").read_text()

    init_run(OmegaConf.create({"output_dir": str(tmp_path), "seed": 1, "x": 2}), "stage")
    assert (tmp_path / "config.yaml").read_text() == original
    others = list(tmp_path.glob("config.*.yaml"))
    assert len(others) == 1 and "x: 2" in others[0].read_text()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["weights"] == "abc" and manifest["stage"] == "stage"
    assert len(manifest["reruns"]) == 1

    init_run(cfg, "stage")  # same config again: nothing new beside the manifest entry
    assert len(list(tmp_path.glob("config.*.yaml"))) == 1
    assert len(json.loads((tmp_path / "manifest.json").read_text())["reruns"]) == 2
