"""configs/smol_science.yaml is the design issue 29 asks for, its schedules act, and its departures from the
authors' protocol are written down in docs/fidelity.md; the Section 4.3 configs warm up for at least one step."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reteq.algorithms import ALGORITHMS
from reteq.config import load_config
from reteq.data.sources import load_conversations
from reteq.data.tokenize import plan_steps
from reteq.plan import build_plan
from reteq.train.schedules import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
SCIENCE = ROOT / "configs" / "smol_science.yaml"


def test_the_design_has_five_seeds_four_positions_every_method_at_its_defaults_and_three_lrs(capsys):
    from reteq.cli import main

    cfg = load_config(SCIENCE)
    assert len(cfg.seeds) >= 5 and cfg.orders.forget_positions == [1, 2, 3, 4]
    assert sorted(cfg.unlearn.algorithms) == sorted(ALGORITHMS) and len(ALGORITHMS) == 13
    assert cfg.unlearn.params == {} and cfg.unlearn.betas == {}  # every knob at its documented default
    lrs = sorted(cfg.unlearn.lrs)
    assert len(lrs) >= 3 and all(b / a >= 3 - 1e-9 for a, b in zip(lrs, lrs[1:]))
    assert cfg.unlearn.steps is None and cfg.unlearn.epochs == 1  # one epoch of the forget set
    assert max(s.lr for s in cfg.stages) < 5e-4  # below smol.yaml's degenerate 5e-4
    plan = build_plan(cfg)
    assert len(plan.leaves) == 13 * len(lrs) * 4 * len(cfg.seeds) == 780
    assert main(["validate", str(SCIENCE)]) == 0 and main(["plan", str(SCIENCE)]) == 0
    assert "unlearning runs: 780" in capsys.readouterr().out


def _multipliers(total: int, schedule: str, warmup_frac: float, decay_frac: float, min_ratio: float,
                 warmup_steps: int | None = None) -> list[float]:
    return [lr_multiplier(t, total, schedule, warmup_frac, decay_frac, min_ratio, warmup_steps) for t in range(total)]


def test_every_schedule_of_the_design_warms_up_and_decays_for_at_least_one_step():
    cfg = load_config(SCIENCE)
    for stage in cfg.stages:
        n = len(load_conversations(stage.source))
        total = len(plan_steps(n, stage.epochs, stage.global_batch, 0))
        m = _multipliers(total, stage.schedule, stage.warmup_frac, stage.decay_frac, stage.min_lr_ratio)
        assert m[0] < 1 and max(m) == 1.0 and m[-1] < 1, (stage.name, total, m)
    u = cfg.unlearn
    forget_rows = len(load_conversations(cfg.stage(cfg.forget_stage).source))
    total = len(plan_steps(forget_rows, u.epochs, u.global_batch, 0, u.steps))
    assert total == forget_rows // u.global_batch  # one epoch
    m = _multipliers(total, u.schedule, u.warmup_frac, u.decay_frac, u.min_lr_ratio, u.warmup_steps)
    assert u.schedule == "wsd" and u.decay_frac == 0.8 and m[0] < 1 and max(m) == 1.0 and m[-1] < 1, m


@pytest.mark.parametrize("name", ["superficial", "superficial_3b"])
def test_section_4_3_configs_warm_up_for_a_step_and_render_as_torchtune(name):
    cfg = load_config(ROOT / "configs" / "ablations" / f"{name}.yaml")
    assert cfg.chat.template == "torchtune"  # the authors' tokenizer: no date lines
    for stage in cfg.stages:
        total = len(plan_steps(len(load_conversations(stage.source)), stage.epochs, stage.global_batch, 0))
        m = _multipliers(total, stage.schedule, stage.warmup_frac, stage.decay_frac, stage.min_lr_ratio)
        assert m[0] < 1 <= max(m) + 1e-12, (stage.name, total, m)  # at least one warmup step, then the peak


def test_every_departure_in_the_config_header_is_in_fidelity_md():
    header = [line for line in SCIENCE.read_text().splitlines() if line.startswith("#")]
    start = header.index(next(line for line in header if line.startswith("# Departures")))
    topics = [m.group(1) for line in header[start:] if (m := re.match(r"# - ([A-Za-z0-9 ]+?):", line))]
    assert len(topics) >= 8, topics
    doc = (ROOT / "docs" / "fidelity.md").read_text()
    section = doc[doc.index("## Departures of configs/smol_science.yaml"):]
    section = section[:section.find("\n## ", 5)] if "\n## " in section[5:] else section
    for topic in topics:
        assert f"| {topic} |" in section, topic


def test_fidelity_md_points_only_to_files_of_this_repository():
    """Every reteq path docs/fidelity.md names exists here (a glob matches something); the authors' and
    torchtune's files are named as theirs, never as paths of this repository."""
    doc = (ROOT / "docs" / "fidelity.md").read_text()
    paths = set(re.findall(r"(?<![\w/])((?:reteq|configs|docs|tests|bench|rayjobs|paper)/[\w./*-]*\w)", doc))
    assert {"reteq/config_protocol.py", "configs/smol_science.yaml"} <= paths
    missing = sorted(p for p in paths if not list(ROOT.glob(p)))
    assert not missing, missing
    assert "PAPER.md" not in doc  # a file outside the repository
