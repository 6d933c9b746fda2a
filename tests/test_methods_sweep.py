"""Every registered unlearning method through the whole system: validated with its knobs, counted by the plan,
run as Ray Tune trials over knob axes on the tiny model, recorded in MLflow and shown in the report; adding a
method to a sweep reruns nothing that finished."""

from __future__ import annotations

import html

import mlflow
import polars as pl
import pytest

from reteq import tracking as T
from reteq.algorithms import ALGORITHMS
from reteq.analysis import tables
from reteq.analysis.page import slug
from reteq.analysis.paper_numbers import algorithm_label
from reteq.commands.sweep import run_sweep
from reteq.config import load_config, parse_config
from reteq.plan import build_plan
from tests.sweep_configs import REPO, tiny_sweep

# a second value for one knob of some methods: their grid is a product, and a knob axis varies
# (and a knob added after keys were recorded, set away from its default: it becomes an axis too)
GRID = {"wga": {"beta": [0.5, 1.0]}, "rmu": {"coeff": [5.0]}, "graddiff": {"retain_weight": [0.0, 1.0]},
        "simnpo": {"length_norm": [1]}}


def test_the_shipped_methods_config_validates_and_plans_every_method_with_its_knobs():
    cfg = load_config(str(REPO / "configs" / "methods.yaml"))
    assert set(cfg.unlearn.algorithms) == set(ALGORITHMS)
    plan = build_plan(cfg)
    per_path = sum(len(cfg.unlearn.knob_grid(a)) for a in cfg.unlearn.algorithms) * len(cfg.unlearn.lrs)
    assert len(plan.leaves) == per_path * len(cfg.stage_orders()) * len(cfg.seeds)
    for leaf in plan.leaves:  # each leaf carries exactly its own method's knobs (a later one only when set)
        knobs = ALGORITHMS[leaf.algorithm].knobs
        assert set(leaf.params) == {k for k, knob in knobs.items() if not knob.later}, leaf.algorithm


def _runs(cfg, kind: str) -> list:
    runs = mlflow.search_runs(experiment_names=[cfg.name], output_format="list", max_results=10_000)
    return [r for r in runs if r.data.tags.get(T.TAG_KIND) == kind]


@pytest.mark.ray
def test_every_method_runs_through_tune_and_appears_in_the_report(ray_cluster, tmp_path):
    """First every method but ME, then the same sweep with ME added: only ME's two leaves run the second time."""
    names = sorted(ALGORITHMS)
    raw = tiny_sweep(tmp_path / "work", name="methods", positions=(3, 4), algorithms=[n for n in names if n != "me"],
                     lrs=(3e-3,), workers=1, deepspeed="zero0_fp32.json")
    raw["unlearn"]["params"] = GRID
    raw["unlearn"]["retain_stage"] = "inst"
    first = run_sweep(parse_config(raw), report=False)
    assert first.code == 0, first
    mlflow.set_tracking_uri(first.tracking_uri)
    before = {r.info.run_id for r in _runs(parse_config(raw), T.KIND_UNLEARN)}
    nodes_before = len(_runs(parse_config(raw), T.KIND_FINETUNE))

    raw["unlearn"]["algorithms"] = names
    cfg = parse_config(raw)
    plan = build_plan(cfg)
    assert len(plan.leaves) == 2 * (len(names) + 2)  # wga and graddiff take two values each
    outcome = run_sweep(cfg)
    assert outcome.code == 0, outcome
    leaves = _runs(cfg, T.KIND_UNLEARN)
    added = [r for r in leaves if r.info.run_id not in before]
    assert sorted(r.data.tags[T.TAG_ALGORITHM] for r in added) == ["me", "me"]  # nothing that finished reran
    assert len(_runs(cfg, T.KIND_FINETUNE)) == nodes_before
    assert len(leaves) == len(plan.leaves) and all(r.info.status == "FINISHED" for r in leaves)
    by_key = {r.data.tags[T.TAG_PLAN_KEY]: r for r in leaves}
    for leaf in plan.leaves:  # every knob is a param and in the params tag
        r = by_key[leaf.key]
        assert r.data.tags[T.TAG_PARAMS] == T.params_tag(leaf.params)
        assert {k: float(r.data.params[k]) for k in leaf.params} == {k: float(v) for k, v in leaf.params.items()}

    # Tune's table (of the first run: every method but ME) has one column per knob axis
    df = first.dag.results.get_dataframe()
    axes = {k for leaf in plan.leaves if leaf.algorithm != "me" for k in leaf.params}
    assert "length_norm" in axes
    for knob in axes:
        assert f"config/{knob}" in df.columns, knob

    # the report's Table 1 has a column per (method, knob setting), a row per p
    out = tmp_path / "work" / "report"
    forget = pl.read_parquet(out / "tables" / f"{slug(tables.TABLE_FORGET)}.parquet")
    columns = " | ".join(forget.columns)
    for name in names:
        assert f"tiny {algorithm_label(name)}" in columns, (name, columns)
    assert forget["p"].to_list() == [3, 4] if "p" in forget.columns else True
    page = html.unescape((out / "report.html").read_text(encoding="utf-8"))
    assert "recency effect" in page
