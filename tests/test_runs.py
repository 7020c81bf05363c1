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


def test_a_rerun_with_the_same_values_in_another_key_order_is_the_same_config(tmp_path):
    """A config group whose keys moved between versions (the shared training group, issue #20) is
    the same config: resuming a run dir made before writes no second config file and no warning."""
    init_run(OmegaConf.create({"output_dir": str(tmp_path), "seed": 1, "training": {"b": 2, "a": 1}}), "s")
    init_run(OmegaConf.create({"output_dir": str(tmp_path), "seed": 1, "training": {"a": 1, "b": 2}}), "s")
    assert sorted(p.name for p in tmp_path.glob("config*.yaml")) == ["config.yaml"]
    init_run(OmegaConf.create({"output_dir": str(tmp_path), "seed": 1, "training": {"a": 1, "b": 3}}), "s")
    assert len(list(tmp_path.glob("config.*.yaml"))) == 1  # other values: saved beside it
