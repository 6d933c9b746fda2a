"""Optimizer x ZeRO: DeepSpeed's ZeRO (stage >= 1) refuses SGD at start-up, so validation refuses it first (one
line, exit 2, naming the file and field); the superficial-forgetting ablation uses a combination that runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from distributed import run_ranks
from helpers import reteq_cache, sweep_dict, write_config  # noqa: F401

from reteq.cli import EXIT_BAD_INPUT, main

ROOT = Path(__file__).resolve().parent.parent


def _validate(tmp_path, capsys, raw) -> tuple[int, list[str]]:
    config = write_config(tmp_path / "sweep.yaml", raw)
    rc = main(["validate", str(config)])
    return rc, capsys.readouterr().err.splitlines()


def test_sgd_under_zero2_is_one_line_naming_file_and_field(tmp_path, capsys):
    raw = sweep_dict(tmp_path)
    raw["stages"][1]["optimizer"] = "sgd"
    raw["execution"] = {"deepspeed": str(ROOT / "configs/deepspeed/zero2_fp32.json")}
    rc, lines = _validate(tmp_path, capsys, raw)
    assert rc == EXIT_BAD_INPUT and len(lines) == 1, lines
    assert lines[0].startswith(f"{tmp_path / 'sweep.yaml'}: stages[1].optimizer: sgd is not supported by DeepSpeed "
                               "ZeRO stage 2"), lines
    assert "zero2_fp32.json" in lines[0]


@pytest.mark.parametrize("stage,allow,ok", [(3, False, False), (1, False, False), (0, False, True), (2, True, True)])
def test_unlearn_sgd_is_checked_against_every_zero_stage(tmp_path, capsys, stage, allow, ok):
    ds = {"zero_optimization": {"stage": stage}, **({"zero_allow_untested_optimizer": True} if allow else {})}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    raw = sweep_dict(tmp_path)
    raw["unlearn"]["optimizer"] = "sgd"
    raw["execution"] = {"deepspeed": str(tmp_path / "ds.json")}
    rc, lines = _validate(tmp_path, capsys, raw)
    assert (rc == 0) == ok, lines
    if not ok:
        assert len(lines) == 1 and ": unlearn.optimizer: sgd" in lines[0], lines


@pytest.mark.usefixtures("reteq_cache")
def test_the_superficial_ablation_runs_under_its_own_deepspeed_config(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its DeepSpeed JSON relative to the repository root
    config = ROOT / "configs/ablations/superficial.yaml"
    # its hub model carries no revision yet: validate refuses it in one line unless told to go past (#30 item 7)
    assert main(["validate", str(config)]) == 2
    assert main(["validate", str(config), "--allow-unpinned-hub"]) == 0
    [rank] = run_ranks("dist_jobs:superficial_leaf", 1, tmp_path / "run", config=str(config))
    assert rank["optimizers"] == ["sgd"] * 3 and rank["unlearn_optimizer"] == "sgd"
    assert rank["steps"] == 5 and not rank["collapsed"]
    assert [step for step, _ in rank["evals"]] == [0, 5]
    assert {"depth/R_logp", "depth/C_logp", "depth/U_logp"} <= set(rank["evals"][-1][1])
