"""`--cluster FILE`: a sweep whose trials fit no node type of a Ray cluster file is refused in one line (exit 2)
before Ray starts; every shipped config fits cluster.yaml. No Ray here: the check reads two YAML files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from reteq.cli import EXIT_BAD_INPUT, main
from reteq.config import load_config
from reteq.sweep.cluster_fit import NodeType, Request, node_types, placeable, sweep_requests

REPO = Path(__file__).resolve().parent.parent
CLUSTER = str(REPO / "cluster.yaml")
SHIPPED = sorted(str(p) for p in [*REPO.glob("configs/paper/*.yaml"), REPO / "configs/demo.yaml",
                                   REPO / "configs/smol.yaml", REPO / "configs/smol_science.yaml"])


def _paper(tmp_path: Path, **execution) -> str:
    raw = yaml.safe_load((REPO / "configs/paper/llama-3.2-1b.yaml").read_text())
    raw["execution"].update(execution)
    raw["work_dir"] = str(tmp_path / "work")  # never made: every check here ends before a sweep starts
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("config", SHIPPED)
def test_every_shipped_config_fits_cluster_yaml(config, capsys):
    # the paper's hub models and datasets are not pinned to commits yet (docs/security.md): named explicitly
    unpinned = ["--allow-unpinned-hub"] if "/paper/" in config else []
    assert main(["validate", config, "--cluster", CLUSTER, *unpinned]) == 0
    assert capsys.readouterr().out.strip() == f"{config}: ok"


def test_a_trial_no_node_type_holds_is_one_line_exit_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    import reteq.commands.sweep
    import reteq.sweep.ray_session

    def never(*args, **kwargs):
        raise AssertionError("the sweep started")

    monkeypatch.setattr(reteq.commands.sweep, "sweep_command", never)
    monkeypatch.setattr(reteq.sweep.ray_session, "init_ray", never)
    config = _paper(tmp_path, workers=16)  # 16 GPUs under STRICT_PACK: the largest type has 8
    for verb in (["validate"], ["plan"], ["sweep", "--no-report"]):
        started = time.monotonic()
        assert main([verb[0], config, *verb[1:], "--cluster", CLUSTER]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"{config}: execution: a trial's worker group (execution.workers 16 x "), err
        assert f"fits no node type of {CLUSTER}" in err[0] and "PENDING forever" in err[0]
        assert time.monotonic() - started < 30
    assert not (tmp_path / "work").exists()


def test_pack_spreads_over_nodes_but_strict_pack_needs_one(tmp_path):
    types = node_types(CLUSTER)
    # 16 one-GPU workers: PACK may use every GPU node (24 GPUs in all); STRICT_PACK needs one 16-GPU node
    assert not list(_unplaceable(_paper(tmp_path, workers=16, placement="PACK"), types))
    assert list(_unplaceable(_paper(tmp_path, workers=16, placement="STRICT_PACK"), types))
    assert list(_unplaceable(_paper(tmp_path, workers=1, cpus_per_worker=200, placement="PACK"), types))
    # a custom resource no type offers, or more of one than the cluster ever has
    assert list(_unplaceable(_paper(tmp_path, worker_resources={"tpu": 1}), types))
    assert not list(_unplaceable(_paper(tmp_path, workers=1, worker_resources={"spot": 1}), types))
    # (8 workers: more than the 4 spot nodes, and 128-sequence global batches still split into micro-batches of 8)
    assert list(_unplaceable(_paper(tmp_path, workers=8, placement="PACK", worker_resources={"spot": 1}), types))


def test_strict_spread_counts_nodes_not_resources():
    types = [NodeType("head", {"CPU": 4}, 1, head=True), NodeType("w", {"CPU": 8, "GPU": 4}, 2)]
    two = Request("x", ({"GPU": 1},) * 2, "STRICT_SPREAD")
    three = Request("x", ({"GPU": 1},) * 3, "STRICT_SPREAD")
    assert placeable(two, types) and not placeable(three, types)
    assert placeable(Request("x", ({"GPU": 1},) * 8, "PACK"), types)
    assert not placeable(Request("x", ({"GPU": 1},) * 9, "PACK"), types)


def test_a_cpu_demo_on_a_gpu_cluster_fits_and_a_gpu_sweep_on_a_cpu_cluster_does_not(tmp_path):
    cpu_only = tmp_path / "cpu.yaml"
    cpu_only.write_text(yaml.safe_dump({"head_node_type": "h", "max_workers": 2, "available_node_types": {
        "h": {"resources": {"CPU": 2}}, "w": {"resources": {"CPU": 8}, "max_workers": 2}}}))
    assert main(["validate", str(REPO / "configs/demo.yaml"), "--cluster", str(cpu_only)]) == 0
    assert main(["validate", _paper(tmp_path), "--cluster", str(cpu_only)]) == EXIT_BAD_INPUT


@pytest.mark.parametrize("broken, field", [
    ({"head_node_type": "h"}, "available_node_types"),
    ({"head_node_type": "x", "available_node_types": {"h": {"resources": {"CPU": 1}}}}, "head_node_type"),
    ({"head_node_type": "h", "available_node_types": {"h": {"resources": {"CPU": "many"}}}},
     "available_node_types.h.resources"),
])
def test_a_malformed_cluster_file_is_one_line_naming_file_and_field(tmp_path, capsys, broken, field):
    bad = tmp_path / "cluster.yaml"
    bad.write_text(yaml.safe_dump(broken))
    assert main(["validate", str(REPO / "configs/demo.yaml"), "--cluster", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: {field}: " in err[0], err


def _unplaceable(config: str, types):
    return [r.what for r in sweep_requests(load_config(config)) if not placeable(r, types)]


def test_the_launcher_must_fit_the_head(tmp_path):
    """The launcher owns every node task and lives on the head: a head type with no CPU cannot hold it."""
    no_cpu_head = tmp_path / "cluster.yaml"
    no_cpu_head.write_text(yaml.safe_dump({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 0}}, "w": {"resources": {"CPU": 8}, "max_workers": 2}}}))
    assert _unplaceable(str(REPO / "configs/demo.yaml"), node_types(no_cpu_head)) == [
        "the sweep's launcher actor (on the head)"]
