"""The sweep config: order expansion, the DAG it compiles to, and one `file: field: reason` line per problem."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from helpers import RETAIN, sweep_dict, write_config

from reteq.cli import main
from reteq.config import load_config, parse_config
from reteq.errors import ConfigError
from reteq.plan import build_plan

ROOT = Path(__file__).resolve().parents[1]
PAPER_ORDERS = [
    ("U", "inst", "tofu", "math"),
    ("inst", "U", "tofu", "math"),
    ("inst", "tofu", "U", "math"),
    ("inst", "tofu", "math", "U"),
]


def _cfg(tmp_path, orders, **kw):
    return parse_config(sweep_dict(tmp_path, orders=orders, **kw))


def test_forget_positions_insert_the_forget_stage_into_the_retain_order(tmp_path):
    cfg = _cfg(tmp_path, {"forget_positions": [1, 2, 3, 4], "retain_order": list(RETAIN)})
    assert cfg.stage_orders() == PAPER_ORDERS
    assert cfg.retain_stages() == list(RETAIN)
    # a subset keeps the order asked for
    assert _cfg(tmp_path, {"forget_positions": [4, 2], "retain_order": list(RETAIN)}).stage_orders() == [
        PAPER_ORDERS[3], PAPER_ORDERS[1]]


def test_all_permutations_gives_every_order_of_four_stages_once(tmp_path):
    orders = _cfg(tmp_path, {"all_permutations": True}).stage_orders()
    assert len(orders) == 24 == len(set(orders))
    assert set(orders) == set(itertools.permutations(["inst", "tofu", "math", "U"]))


def test_explicit_orders_are_kept_verbatim(tmp_path):
    explicit = [["math", "U", "tofu", "inst"], ["U", "math", "inst", "tofu"]]
    assert _cfg(tmp_path, {"explicit": explicit}).stage_orders() == [tuple(o) for o in explicit]


def test_build_plan_shares_common_prefixes_for_the_paper_design(tmp_path):
    cfg = _cfg(tmp_path, {"forget_positions": [1, 2, 3, 4], "retain_order": list(RETAIN)})
    plan = build_plan(cfg)
    # U>.. (4 nodes) + inst>U>.. (4) + inst>tofu>U>math (3 new) + inst>tofu>math>U (2 new)
    assert len(plan.nodes) == 13
    assert plan.stage_runs_without_sharing == 16
    assert {leaf.order for leaf in plan.leaves} == set(PAPER_ORDERS)
    assert sorted(leaf.p for leaf in plan.leaves) == [1, 2, 3, 4]  # one algorithm, lr, seed: one leaf per p
    for leaf in plan.leaves:  # each leaf hangs off the full path, whose chain is its order's prefixes
        chain = plan.chain(leaf.parent)
        assert [n.prefix for n in chain] == [leaf.order[: i + 1] for i in range(4)]
        assert chain[0].parent is None
    assert plan.summary()["stage_nodes"] == 13


def test_build_plan_for_all_permutations(tmp_path):
    plan = build_plan(_cfg(tmp_path, {"all_permutations": True}))
    assert len(plan.nodes) == 4 + 12 + 24 + 24 == 64
    assert plan.stage_runs_without_sharing == 96
    assert len(plan.leaves) == 24


def test_plan_grows_with_models_seeds_and_the_unlearning_grid(tmp_path):
    raw = sweep_dict(tmp_path, orders={"forget_positions": [1, 2, 3, 4], "retain_order": list(RETAIN)},
                     seeds=[0, 1])
    raw["models"].append({**raw["models"][0], "name": "tiny-lora", "lora": {"r": 4, "alpha": 8}})
    raw["unlearn"].update(algorithms=["ga", "npo", "simnpo"], lrs=[1e-3, 1e-4], betas={"npo": [0.5, 1.0]})
    plan = build_plan(parse_config(raw))
    assert len(plan.nodes) == 13 * 2 * 2
    # per path: ga x 2 lrs + npo x 2 lrs x 2 betas + simnpo x 2 lrs x default beta
    assert len(plan.leaves) == 4 * 2 * 2 * (2 + 4 + 2)
    assert len({leaf.key for leaf in plan.leaves}) == len(plan.leaves)
    assert {leaf.beta for leaf in plan.leaves if leaf.algorithm == "simnpo"} == {1.0}
    assert {leaf.beta for leaf in plan.leaves if leaf.algorithm == "ga"} == {None}


def test_node_keys_depend_on_stage_hyperparameters_only_along_the_prefix(tmp_path):
    orders = {"forget_positions": [1, 4], "retain_order": list(RETAIN)}
    a = build_plan(_cfg(tmp_path, orders))
    raw = sweep_dict(tmp_path, orders=orders)
    raw["stages"][2]["lr"] = 1e-4  # math: changes only the nodes whose prefix contains math
    b = build_plan(parse_config(raw))
    same = {n.prefix for n in a.nodes.values()} & {n.prefix for n in b.nodes.values()}
    for prefix in same:
        ka = next(k for k, n in a.nodes.items() if n.prefix == prefix)
        kb = next(k for k, n in b.nodes.items() if n.prefix == prefix)
        assert (ka == kb) == ("math" not in prefix), prefix


def test_digest_is_stable_and_tracks_content(tmp_path):
    a, b = parse_config(sweep_dict(tmp_path)), parse_config(sweep_dict(tmp_path))
    assert a.digest() == b.digest()
    assert a.digest() != parse_config(sweep_dict(tmp_path, seeds=[1])).digest()


def test_the_shipped_demo_config_validates(capsys):
    assert main(["validate", str(ROOT / "configs" / "demo.yaml")]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    assert cfg.stage_orders() == PAPER_ORDERS
    assert len(build_plan(cfg).nodes) == 13


# ---- problems: one line each, `file: field: reason` -------------------------------------------------------------

def _errors(tmp_path, raw) -> list[str]:
    path = write_config(tmp_path / "sweep.yaml", raw)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert all(line.startswith(f"{path}: ") for line in e.value.lines), e.value.lines
    return e.value.lines


def test_each_problem_is_one_line_naming_file_and_field(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["stages"][1]["lr"] = "abc"
    raw["models"][0]["dtype"] = "fp16"
    raw["unlearn"]["bogus"] = 1
    lines = _errors(tmp_path, raw)
    assert len(lines) == 3, lines
    assert any("stages[1].lr: not a number ('abc')" in x for x in lines)
    assert any("models[0].dtype:" in x and "fp32" in x for x in lines)
    assert any("unlearn.bogus: unknown field" in x for x in lines)


def test_orders_must_take_exactly_one_form(tmp_path):
    (line,) = _errors(tmp_path, sweep_dict(tmp_path, orders={"all_permutations": True, "explicit": [["U"]]}))
    assert "orders" in line and "exactly one" in line
    (line,) = _errors(tmp_path, sweep_dict(tmp_path, orders={"forget_positions": [1]}))
    assert "orders" in line and "retain_order" in line


def test_forget_position_outside_the_order_is_rejected(tmp_path):
    (line,) = _errors(tmp_path, sweep_dict(tmp_path, orders={"forget_positions": [0, 5], "retain_order": list(RETAIN)}))
    assert "orders.forget_positions" in line and "outside 1..4" in line


def test_global_batch_must_divide_into_micro_batches(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["stages"][0]["micro_batch"] = 3
    (line,) = _errors(tmp_path, raw)
    assert "stages[0]" in line and "multiple of micro_batch" in line


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.yaml")
    assert e.value.lines == [f"{tmp_path / 'missing.yaml'}: file does not exist"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert len(e.value.lines) == 1 and "not valid YAML" in e.value.lines[0]
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert e.value.lines == [f"{bad}: top level must be a mapping"]
