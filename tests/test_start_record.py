"""Step 0 evaluated once per start checkpoint (execution.share_start_eval, reteq.eval.start_record): the second
leaf from a checkpoint reads the first one's record instead of evaluating, and logs exactly the numbers it would
have computed itself; a corrupt record is passed over with a warning and step 0 is evaluated again."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import urlparse

import polars as pl
import pytest
from helpers import reteq_cache, sweep_cfg  # noqa: F401

from reteq import mlflow_store
from reteq import tracking as T
from reteq.config import SweepConfig
from reteq.eval.start_record import BadRecord, decode, encode
from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
from reteq.pipeline.leaf import run_leaf
from reteq.plan import build_plan
from reteq.sweep import record
from reteq.train.worker_context import WorkerContext

pytestmark = pytest.mark.usefixtures("reteq_cache")

UNLEARN = {"algorithms": ["ga", "npo"], "lrs": [1e-3], "steps": 2, "global_batch": 8, "micro_batch": 8,
           "max_length": 96, "eval_every": 1}


def _cfg(tmp_path, share: bool) -> SweepConfig:
    cfg = sweep_cfg(tmp_path, unlearn=UNLEARN)
    return cfg.model_copy(update={"execution": cfg.execution.model_copy(update={"share_start_eval": share})})


def _leaves(cfg: SweepConfig, work: Path, store: CheckpointStore, echo) -> dict[str, str]:
    """Every leaf of `cfg` through run_leaf with the sweep's MLflow hooks (what each Ray trial does), in a store
    of its own under `work`: leaf key -> its run id."""
    uri = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    work.mkdir(parents=True, exist_ok=True)
    exp = mlflow_store.ensure_experiment(uri, cfg.name, T.default_artifact_root(work))
    c = mlflow_store.tracking_client(uri)
    parent = record.parent_run(c, exp, cfg.name, cfg.digest())
    plan, data, runs = build_plan(cfg), DataCache(cfg), {}
    for leaf in plan.leaves:
        hooks = record.MlflowHooks(uri, exp, parent, cfg.name, lambda s: "wsd", echo=echo)
        run_leaf(RunContext(cfg, plan, WorkerContext(), store, data, hooks=hooks), leaf)
        runs[leaf.key] = hooks.run_id(leaf.key)
    return runs


def _logged(uri: str, run_id: str, tmp: Path) -> tuple[dict, dict, pl.DataFrame]:
    """A leaf run's tags, its eval metric histories {name: [(step, value)]} and its probe vectors."""
    c = mlflow_store.reader(uri)
    run = c.get_run(run_id)
    names = [k for k in run.data.metrics if not k.startswith(("time/", "system/"))]
    history = {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in names}
    vectors = pl.read_parquet(c.download_artifacts(run_id, f"{T.ARTIFACT_PREDICTIONS}/{T.PREDICTIONS_FILE}",
                                                   str(tmp)))
    return run.data.tags, history, vectors


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def test_the_second_leaf_reads_step_0_and_logs_the_numbers_it_would_compute(tmp_path):
    on, off = _cfg(tmp_path, True), _cfg(tmp_path, False)
    plan = build_plan(on)
    assert [leaf.key for leaf in plan.leaves] == [leaf.key for leaf in build_plan(off).leaves]  # no key changes
    assert list(plan.nodes) == list(build_plan(off).nodes)
    first, second = plan.leaves
    assert first.parent == second.parent and first.algorithm != second.algorithm
    store = CheckpointStore(tmp_path / "checkpoints")  # the nodes are trained once, by the first sweep
    said: list[str] = []
    shared = _leaves(on, tmp_path / "on", store, said.append)
    alone = _leaves(off, tmp_path / "off", store, lambda m: None)

    uri_on, uri_off = (f"sqlite:///{(tmp_path / w).resolve() / 'mlflow.db'}" for w in ("on", "off"))
    tags1, _, _ = _logged(uri_on, shared[first.key], tmp_path / "dl1")
    tags2, hist2, vec2 = _logged(uri_on, shared[second.key], tmp_path / "dl2")
    assert tags1[T.TAG_START_SOURCE] == "computed" and tags1[T.TAG_START_KEY]
    assert tags2[T.TAG_START_SOURCE] == f"run {shared[first.key]}"  # not evaluated again
    assert T.TAG_START_KEY not in tags2  # nothing published twice
    assert any("shared record" in m for m in said)
    own_tags, own_hist, own_vec = _logged(uri_off, alone[second.key], tmp_path / "dl3")
    assert own_tags[T.TAG_START_SOURCE] == "computed" and T.TAG_START_KEY not in own_tags  # off: no record
    # bit for bit: every metric at every step (the relative scores read step 0), and the probe's vectors
    assert set(hist2) == set(own_hist) and T.M_MATH_ACC in hist2 and T.M_RE_KL in hist2
    for name, values in own_hist.items():
        assert [s for s, _ in hist2[name]] == [s for s, _ in values], name
        assert all(_same(a, b) for (_, a), (_, b) in zip(hist2[name], values)), (name, hist2[name], values)
    assert 0 in set(vec2["step"])
    assert vec2.sort("step", "pair").equals(own_vec.sort("step", "pair"))


def test_a_corrupt_record_is_ignored_with_a_warning_and_step_0_is_evaluated(tmp_path):
    cfg = _cfg(tmp_path, True)
    plan = build_plan(cfg)
    first, second = plan.leaves
    store = CheckpointStore(tmp_path / "checkpoints")
    work = tmp_path / "w"
    said: list[str] = []
    runs = _leaves(cfg.model_copy(update={"unlearn": cfg.unlearn.model_copy(update={"algorithms": ["ga"]})}), work,
                   store, said.append)
    assert list(runs) == [first.key]
    uri = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    c = mlflow_store.reader(uri)
    artifact = Path(urlparse(c.get_run(runs[first.key]).info.artifact_uri).path) / T.ARTIFACT_START_RECORD
    path = artifact / "start_record.json"
    path.write_bytes(path.read_bytes().replace(b'"raw": {"', b'"raw": {"x', 1))  # a flipped byte, same size
    runs = _leaves(cfg, work, store, said.append)  # the ga leaf again (a new run), then npo
    warned = [m for m in said if m.startswith("warning: the step-0 record")]
    assert warned and "sha256" in warned[0]
    tags = c.get_run(runs[second.key]).data.tags
    assert tags[T.TAG_START_SOURCE] in ("computed", f"run {runs[first.key]}")  # never the corrupt record's
    assert c.get_run(runs[first.key]).data.tags[T.TAG_START_SOURCE] == "computed"  # the rerun computed and published
    assert tags[T.TAG_START_SOURCE] == f"run {runs[first.key]}"  # ... and npo read that one, past the corrupt one


def test_a_record_is_trusted_only_for_its_own_key_and_bytes():
    body, sha = encode("k1", {"forget/all_logp": -1.25, "x": float("nan")}, [{"step": 0, "logp": 0.1}])
    got = decode(body, sha, "k1")
    assert got["raw"]["forget/all_logp"] == -1.25 and math.isnan(got["raw"]["x"])
    for bad in ((body, sha, "k2"), (body[:-1], sha, "k1"), (b"{", "x", "k1")):
        with pytest.raises(BadRecord):
            decode(*bad)


class _Stop(Exception):
    """Ends an unlearning run right after its step-0 evaluation."""


def test_no_method_changes_the_model_the_rng_or_step_0():
    """What a leaf does before step 0 differs by method only in the method's reference pass (and an IdK method's
    alternatives): for each of the registered methods, step 0 evaluates the same numbers, and neither the model's
    weights and mode nor the RNG differ after the evaluation from before it (so skipping it changes no step)."""
    import torch
    from helpers import model_cfg, refusal_finetune

    from reteq.algorithms import ALGORITHMS
    from reteq.config import EvalConfig, UnlearnConfig
    from reteq.eval.evaluator import Evaluator
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import UnlearnJob, unlearn

    ft, mcfg = refusal_finetune(), model_cfg()
    tokenizer = load_tokenizer(mcfg)
    evaluator = Evaluator.build(EvalConfig(metrics=["forget"], forget_prompts=4), tokenizer, ft.convs, None, None)
    cfg = UnlearnConfig(algorithms=["ga"], lrs=[1e-3], steps=1, global_batch=8, micro_batch=8, max_length=96,
                        eval_every=1)
    seen = {}
    assert len(ALGORITHMS) >= 13
    for name in ALGORITHMS:
        model = load_model(mcfg)
        model.load_state_dict(ft.state)
        start = {k: v.clone() for k, v in model.state_dict().items()}

        def share(compute, name=name, model=model, start=start):
            rng, training = torch.get_rng_state(), model.training
            raw = compute()
            assert torch.equal(torch.get_rng_state(), rng) and model.training == training, name
            assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items()), name
            seen[name] = raw
            raise _Stop

        with pytest.raises(_Stop):
            unlearn(model, tokenizer, UnlearnJob(cfg, name, 1e-3, {}, ft.convs, share_start=share), evaluator,
                    WorkerContext())
    assert set(seen) == set(ALGORITHMS)
    assert all(raw == seen["ga"] for raw in seen.values()), seen
