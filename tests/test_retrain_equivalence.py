"""Retrain equivalence on the tiny model: retrain nodes, RE distances, prediction vectors, pairwise divergence,
the superficial/deep label, and the tiny base's prior on the forget targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch
from helpers import RETAIN, reteq_cache, stage_dict, sweep_cfg, sweep_dict, tiny_base  # noqa: F401

from reteq import tracking as T
from reteq.analysis import retrain as R
from reteq.config import parse_config
from reteq.plan import build_plan

pytestmark = pytest.mark.usefixtures("reteq_cache")
PAPER = {"forget_positions": [1, 2, 3, 4], "retain_order": list(RETAIN)}
PARAPHRASE_MARGIN = 2.0  # nats per token above chance that the pretrained tiny base must give the paraphrases


# ---- plan -----------------------------------------------------------------------------------------------------

def test_the_p_design_retrain_node_is_the_p4_prefix_node(tmp_path):
    plan = build_plan(sweep_cfg(tmp_path, orders=PAPER))
    (key,) = {leaf.retrain for leaf in plan.leaves}
    node = plan.nodes[key]
    assert node.prefix == ("inst", "tofu", "math") and not node.retrain_only and node.retrain_baseline
    p4 = next(leaf for leaf in plan.leaves if leaf.p == 4)
    assert plan.nodes[p4.parent].parent == key  # the same node: zero extra training
    s = plan.summary()
    assert (s["stage_nodes"], s["retrain_nodes"], s["retrain_nodes_shared"], s["retrain_only_nodes"],
            s["retrain_runs"]) == (13, 1, 1, 0, 1)
    (rec,) = plan.records.values()  # theta_r's one record: evaluates the shared node, trains nothing
    assert rec.node == key and rec.order == ("inst", "tofu", "math") and plan.record_of(key) == rec
    assert rec.key not in plan.nodes and rec.key == build_plan(sweep_cfg(tmp_path, orders=PAPER)).record_of(key).key


def test_retrain_only_nodes_are_marked_and_plan_json_counts_them(tmp_path, capsys):
    from helpers import write_config

    from reteq.cli import main

    raw = sweep_dict(tmp_path, orders={"forget_positions": [1, 2], "retain_order": list(RETAIN)})
    plan = build_plan(parse_config(raw))
    only = {n.prefix: n.retrain_only for n in plan.nodes.values()}
    assert not only[("inst",)]  # the p = 2 path starts with inst
    assert only[("inst", "tofu")] and only[("inst", "tofu", "math")]
    assert main(["plan", str(write_config(tmp_path / "c.yaml", raw)), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["retrain_nodes"], got["retrain_nodes_shared"], got["retrain_only_nodes"], got["retrain_runs"]) \
        == (1, 0, 2, 1)

    raw["eval"]["retrain"] = False
    off = build_plan(parse_config(raw))
    assert all(leaf.retrain is None for leaf in off.leaves) and off.summary()["retrain_nodes"] == 0
    assert not off.records and off.summary()["retrain_runs"] == 0
    assert not any(n.retrain_only for n in off.nodes.values()) and len(off.nodes) == len(plan.nodes) - 2


# ---- distances ----------------------------------------------------------------------------------------------

def _probe(tokenizer, size=12):
    from reteq.data.synthetic import generate
    from reteq.eval.probe import Probe, probe_pairs

    stages = {"inst": generate("instruct", 16), "U": generate("refusal", 16)}
    return Probe.build(tokenizer, probe_pairs(size, 0, stages, "U", [("What is 2 + 3?", "5")]), batch_size=5)


def test_distance_of_a_model_to_itself_is_zero_and_kl_is_nonnegative():
    model, tok = tiny_base()
    probe = _probe(tok)
    assert len(probe.triples) == 3 + 3 + 3 + 1 and {s for s, _, _ in probe.triples} == {"inst", "U", "forget_label", "heldout"}
    probe.set_reference(model, torch.device("cpu"))
    same = probe.measure(model, torch.device("cpu"), step=0)
    assert same == {T.M_RE_LOGP_MSE: 0.0, T.M_RE_KL: 0.0}
    other = tiny_base()[0]
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    moved = probe.measure(other, torch.device("cpu"), step=1)
    assert moved[T.M_RE_LOGP_MSE] > 0 and moved[T.M_RE_KL] > 0
    vec = probe.table()
    assert vec.height == 20 and (vec["kl"] >= 0).all() and vec.filter(pl.col("step") == 0)["kl"].max() == 0


def test_the_probe_projects_only_target_positions_and_matches_the_full_logits():
    """probe_forward projects the target-predicting columns only (logits_to_keep): its per-token log-probs and
    kept distributions equal those read off the full logits of the same padded batch, to float rounding."""
    from reteq.eval.probe import probe_forward

    model, tok = tiny_base()
    probe = _probe(tok)
    out = probe_forward(model, probe, device=torch.device("cpu"), keep_dists=True)
    for i, (p, t) in enumerate(probe.encoded):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
        full = torch.log_softmax(logits.float(), -1)[len(p) - 1:len(p) + len(t) - 1]
        assert out.dists[i].shape == full.shape
        assert torch.allclose(out.dists[i], full, atol=1e-4)
        assert torch.allclose(out.token_logps[i], full.gather(-1, torch.tensor(t)[:, None])[:, 0], atol=1e-4)


def _vectors(step_values: dict[str, list[list[float]]]) -> pl.DataFrame:
    """Hand-made vectors: order -> per step, per pair token log-probs (one cell, p = index + 1)."""
    rows = []
    for i, (order, steps) in enumerate(step_values.items()):
        for step, toks in enumerate(steps):
            for pair, t in enumerate(toks):
                rows.append({"model": "m", "algorithm": "ga", "lr": 1e-3, "beta": None, "params": None, "scheduler": "wsd",
                             "seed": 0, "order": order, "p": i + 1, "run_id": order, "step": step, "pair": pair,
                             "logp": t, "token_logp": [t, t / 2]})
    return pl.DataFrame(rows)


def test_pairwise_divergence_is_symmetric_zero_for_equal_orders_and_fits_growth():
    a = [[-1.0, -2.0], [-1.1, -2.2], [-1.3, -2.6], [-1.9, -3.4]]
    b = [[-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0], [-1.0, -2.0]]
    ab = R.prediction_divergence(_vectors({"x>U": a, "y>U": b}))
    ba = R.prediction_divergence(_vectors({"x>U": b, "y>U": a}))
    cols = ["step", "d_logp_mse", "d_kl_sym"]
    assert ab.select(cols).equals(ba.select(cols))
    assert ab["d_logp_mse"][0] == 0 and ab["d_kl_sym"][0] == 0 and (ab["d_kl_sym"][1:] > 0).all()
    assert ab["d_logp_mse"][2] == pytest.approx(((0.3) ** 2 + 0.6 ** 2) / 2)
    growth = R.divergence_growth(ab)
    top = growth.filter((pl.col("order_a") == "max over pairs") & (pl.col("distance") == "d_logp_mse"))
    assert top["rate"][0] > 0 and top["growth_factor"][0] == pytest.approx(math.exp(top["rate"][0]))


def test_re_table_says_towards_or_away():
    rows = [{"run_id": r, "model": "m", "algorithm": "ga", "lr": 1e-3, "beta": None, "params": None, "scheduler": "wsd", "seed": 0,
             "order": o, "p": p, "metric": T.M_RE_KL, "step": s, "value": v}
            for r, o, p, vals in (("a", "U>x", 1, [2.0, 1.0, 1.5]), ("b", "x>U", 2, [1.0, 1.2, 3.0]))
            for s, v in enumerate(vals)]
    t = R.re_table(pl.DataFrame(rows)).sort("p")
    assert t["direction"].to_list() == ["towards θ_r", "away"]
    assert t["min"].to_list() == [1.0, 1.0] and t["min_step"].to_list() == [1, 0]
    assert t["change"].to_list() == pytest.approx([-0.5, 2.0])


def test_superficial_and_deep_labels_on_hand_made_trajectories():
    def run(rid, r, c, u):
        return [{"run_id": rid, "model": "m", "algorithm": "ga", "lr": 1e-3, "beta": None, "params": None, "scheduler": "wsd",
                 "seed": 0, "order": rid, "metric": k, "step": s, "value": v}
                for k, vals in ((T.M_DEPTH_R, r), (T.M_DEPTH_C, c), (T.M_DEPTH_U, u)) for s, v in enumerate(vals)]

    deep = run("R>C>U", r=[-2.0, -2.1], c=[-1.0, -3.0], u=[-1.0, -4.0])  # C falls with U, both end below R
    shallow = run("C>R>U", r=[-2.0, -2.0], c=[-1.0, -1.1], u=[-1.0, -4.0])  # only U falls
    labels = R.depth_labels(pl.DataFrame(deep + shallow), fall=0.5)
    assert dict(zip(labels["order"], labels["label"])) == {"R>C>U": "deep", "C>R>U": "superficial"}
    assert R.depth_labels(pl.DataFrame(deep), fall=5.0)["label"].to_list() == ["no forgetting"]


def test_the_pretrained_tiny_base_puts_the_paraphrases_well_above_chance():
    from reteq.data.forget_targets import PARAPHRASES
    from reteq.data.synthetic import refusal
    from reteq.data.tokenize import encode_prompt_target
    from reteq.eval.scoring import score_pairs

    model, tok = tiny_base()
    questions = [c["messages"][0]["content"] for c in refusal(8, seed=0)]
    pairs = [encode_prompt_target(tok, q, t) for q in questions for t in PARAPHRASES]
    para = sum(score_pairs(model, pairs, pad_id=tok.pad_token_id)) / len(pairs)
    assert para > -math.log(len(tok)) + PARAPHRASE_MARGIN, para


STEP0_MARGIN = 1.5  # nats per token above chance for the paraphrases at unlearning step 0 (demo: 2.08 to 3.77)


def test_the_demo_stages_keep_the_paraphrases_above_chance_at_step_0(tmp_path):
    """configs/demo.yaml's stages, its p = 1 path (U first: the most finetuning after U; at step 0 the demo
    measured paraphrases -4.75 at p = 1, -4.62 / -4.85 / -3.16 at p = 2 / 3 / 4, chance -6.93), trained in
    process (~10 s of training on 2 cores): U is learned, and the model unlearning starts from still puts the
    paraphrases above chance."""
    from reteq.config import load_config
    from reteq.data.tokenize import configure_chat
    from reteq.models import load_model, load_tokenizer
    from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
    from reteq.pipeline.leaf import build_evaluator
    from reteq.pipeline.node import ensure_chain
    from reteq.train.worker_context import WorkerContext
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"metrics": ["forget"]})})
    plan = build_plan(cfg)
    p1 = next(leaf for leaf in plan.leaves if leaf.p == 1)
    run = RunContext(cfg, plan, WorkerContext(), CheckpointStore(tmp_path / "checkpoints"), DataCache(cfg))
    tok = configure_chat(load_tokenizer(cfg.models[0]), cfg.chat)
    evaluator = build_evaluator(cfg, tok, run.data, p1.seed)

    def forget(key):
        model = load_model(cfg.models[0], checkpoint=ensure_chain(run, key), trainable=False)
        return evaluator.raw(model, torch.device("cpu"))

    chance = -math.log(len(tok))
    after_u = forget(plan.chain(p1.parent)[0].key)  # the U node
    step0 = forget(p1.parent)  # U > inst > tofu > math: what unlearning starts from
    assert after_u[T.M_FORGET_LABEL] > -1.0, after_u  # S_U learned (the base gives the label about -1.8)
    assert step0[T.M_FORGET_PARAPHRASE] > chance + STEP0_MARGIN, (step0, chance)


# ---- end to end: nodes, metrics, artifacts, MLflow, report --------------------------------------------------

def _three_stage(tmp_path, retrain: bool):
    stages = [stage_dict("inst", 16), stage_dict("tofu", 16), stage_dict("U", 16)]
    return sweep_cfg(tmp_path, stages=stages, orders={"explicit": [["U", "inst", "tofu"], ["inst", "U", "tofu"]]},
                     unlearn={"algorithms": ["ga"], "lrs": [1e-30], "steps": 2, "global_batch": 8, "micro_batch": 8,
                              "max_length": 96, "eval_every": 1},
                     eval={"metrics": ["forget"], "knowledge_stage": None, "forget_prompts": 2, "probe_size": 9,
                           "retrain": retrain, "batch_size": 64})


def _run_sweep_in_process(cfg, work):
    """Every leaf through pipeline.leaf.run_leaf with the sweep's MLflow hooks (what each Ray trial does), then every
    retrain record through pipeline.leaf.record_retrain (what each record task does)."""
    from reteq import mlflow_store
    from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
    from reteq.pipeline.leaf import record_retrain, run_leaf
    from reteq.sweep import record
    from reteq.train.worker_context import WorkerContext

    uri = f"sqlite:///{work.resolve() / 'mlflow.db'}"  # not default_tracking_uri: set_tracking_uri sets the env
    exp = mlflow_store.ensure_experiment(uri, cfg.name, T.default_artifact_root(work))
    c = mlflow_store.tracking_client(uri)
    parent = record.parent_run(c, exp, cfg.name, cfg.digest())
    plan, data, store = build_plan(cfg), DataCache(cfg), CheckpointStore(work / "checkpoints")
    trained: list[str] = []
    for leaf in plan.leaves:
        hooks = record.MlflowHooks(uri, exp, parent, cfg.name, lambda s: "wsd", echo=lambda m: None)
        hooks.node_started = (lambda f: lambda node: (trained.append(node.key), f(node)))(hooks.node_started)
        run_leaf(RunContext(cfg, plan, WorkerContext(), store, data, hooks=hooks), leaf)
    node_runs = record.finished_nodes(c, exp)
    for rec in plan.records.values():
        hooks = record.MlflowHooks(uri, exp, parent, cfg.name, lambda s: "wsd", echo=lambda m: None)
        record_retrain(RunContext(cfg, plan, WorkerContext(), store, data, hooks=hooks), rec, store.path(rec.node),
                       node_runs[rec.node]["run_id"])
    return uri, plan, trained


def test_sweep_trains_a_shared_retrain_node_once_and_logs_re_metrics(tmp_path):
    from reteq.analysis.report import write_report

    cfg = _three_stage(tmp_path, retrain=True)
    work = tmp_path / "work"
    uri, plan, trained = _run_sweep_in_process(cfg, work)
    (rkey,) = {leaf.retrain for leaf in plan.leaves}  # inst>tofu for both orders
    assert plan.nodes[rkey].prefix == ("inst", "tofu") and plan.nodes[rkey].retrain_only
    assert sorted(trained) == sorted(plan.nodes) and trained.count(rkey) == 1

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[cfg.name], output_format="list")
    client = mlflow.MlflowClient(uri)
    (node_run,) = [r for r in runs if r.data.tags.get(T.TAG_PLAN_KEY) == rkey]  # trained once, recorded once
    assert node_run.data.tags[T.TAG_KIND] == T.KIND_FINETUNE
    assert node_run.data.tags[T.TAG_RETRAIN_BASELINE] == node_run.data.tags[T.TAG_RETRAIN_ONLY] == "true"
    (rec,) = [r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_RETRAIN]  # one record per theta_r
    assert rec.info.status == T.RUN_FINISHED and rec.data.tags[T.TAG_PLAN_KEY] == plan.record_of(rkey).key
    assert rec.data.tags[T.TAG_RETRAIN_KEY] == rkey and rec.data.tags[T.TAG_NODE_RUN] == node_run.info.run_id
    assert rec.data.tags[T.TAG_CHECKPOINT] == node_run.data.tags[T.TAG_CHECKPOINT]
    assert not client.list_artifacts(rec.info.run_id)  # no second checkpoint upload
    assert [m.step for m in client.get_metric_history(rec.info.run_id, T.M_FORGET_PARAPHRASE)] == [0]
    assert rec.data.metrics[T.M_FORGET_SCORE] == 0 and T.M_RE_KL not in rec.data.metrics
    unlearn = [r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_UNLEARN]
    assert len(unlearn) == 2
    for r in unlearn:
        assert r.data.tags[T.TAG_RETRAIN_KEY] == rkey and r.data.params[T.P_PROBE_SIZE] == "9"
        for param in (T.P_FORGET_SAMPLE, T.P_VOCAB_SIZE):  # the same eval sample and tokenizer as theta_r's record
            assert r.data.params[param] == rec.data.params[param]
        for key in T.RE_METRICS:  # lr -> 0: the distance stays where it started
            hist = sorted(client.get_metric_history(r.info.run_id, key), key=lambda m: m.step)
            assert [m.step for m in hist] == [0, 1, 2]
            assert hist[0].value > 0 and all(m.value == pytest.approx(hist[0].value, abs=1e-9) for m in hist)
    assert len({r.data.params[T.P_PROBE_HASH] for r in unlearn}) == 1  # one probe set for the sweep

    from reteq.analysis.load import load_metrics, load_runs

    loaded = load_runs(uri, cfg.name)  # the record is counted as itself: neither a leaf nor a node
    assert loaded.filter(pl.col("kind") == T.KIND_RETRAIN)["run_id"].to_list() == [rec.info.run_id]
    assert set(load_metrics(uri, cfg.name, runs=loaded)["run_id"]) == {r.info.run_id for r in unlearn}
    vectors = R.load_vectors(uri, loaded)
    assert vectors.height == 2 * 3 * 9 and set(vectors["step"]) == {0, 1, 2}
    html = write_report(uri, cfg.name, work / "report").read_text()
    assert "<h2>Retrain equivalence</h2>" in html and "Chance level: log(1/" in html
    assert "What retraining gives (the MLflow runs of kind retrain" in html  # theta_r beside the unlearned runs
    assert (work / "report" / "charts" / "re_distance.png").exists()
    assert (work / "report" / "charts" / "prediction_divergence.png").exists()


def test_a_sweep_with_retrain_off_writes_no_retrain_run_and_no_re_metric(tmp_path):
    cfg = _three_stage(tmp_path, retrain=False)
    uri, plan, trained = _run_sweep_in_process(cfg, tmp_path / "work")
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[cfg.name], output_format="list")
    assert not [r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_RETRAIN]
    assert not [r for r in runs if r.data.tags.get(T.TAG_RETRAIN_BASELINE)]
    assert len(trained) == 6  # the two paths' nodes only
    unlearn = [r for r in runs if r.data.tags.get(T.TAG_KIND) == T.KIND_UNLEARN]
    assert unlearn and not any(k in r.data.metrics for r in unlearn for k in T.RE_METRICS)
