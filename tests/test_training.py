"""Training on the real tiny Llama: losses fall, every stage starts a fresh optimizer and schedule, runs are
reproducible from their seed, and `reteq run-path` prints its metric table."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    model_cfg,
    refusal_finetune,
    reteq_cache,  # noqa: F401  (session fixture)
    stage_dict,
    sweep_cfg,
    sweep_dict,
    write_config,
)

from reteq.config import StageConfig
from reteq.train.schedules import lr_multiplier

pytestmark = pytest.mark.usefixtures("reteq_cache")


# ---- schedules ----------------------------------------------------------------------------------------------------

def test_wsd_warms_up_holds_then_decays_to_the_floor():
    m = [lr_multiplier(s, 100, "wsd", 0.02, 0.02, 0.1) for s in range(100)]
    assert m[:2] == pytest.approx([0.0, 0.5])  # 2% of 100 steps of warmup from 0, as the authors' get_wsd
    assert m[2:99] == [1.0] * 97
    assert m[99] == pytest.approx(0.1 + 0.9 * 1 / 2)  # decay after step 100 - 2, towards 0.1 of peak


def test_wsd_matches_the_authors_unlearning_schedule():
    """example_configs/unlearn.yaml: get_wsd, 5 warmup steps, drop_iter 0.8 (decay over the last 80%)."""
    total = 36  # 4,620 S_U rows / batch 128
    m = [lr_multiplier(s, total, "wsd", 0.0, 0.8, 0.1, warmup_steps=5) for s in range(total)]
    assert m[:5] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert m[5:9] == [1.0] * 4  # stable until step 36 - int(0.8 * 36) = 8
    assert m[9:] == pytest.approx([0.1 + 0.9 * (total - s) / 28 for s in range(9, total)])


def test_cosine_is_torchtunes_warmup_then_half_cosine_to_zero():
    """torchtune's get_cosine_schedule_with_warmup (the authors' finetune config; Fig. 8): warmup step / warmup from
    0, then 0.5 (1 + cos(pi progress)) down to 0; the WSD floor (min_ratio) does not apply."""
    m = [lr_multiplier(s, 50, "cosine", 0.1, 0.0, 0.1) for s in range(50)]
    assert m[:5] == pytest.approx([0.0, 1 / 5, 2 / 5, 3 / 5, 4 / 5])  # int(0.1 * 50) = 5 warmup steps
    assert m[5] == 1.0
    assert all(a >= b for a, b in zip(m[5:], m[6:]))
    assert m[5 + 45 // 2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 22 / 45)))
    assert 0 < m[-1] < 0.01 and lr_multiplier(50, 50, "cosine", 0.1) == pytest.approx(0.0)
    assert [lr_multiplier(s, 20, "cosine", warmup_steps=3) for s in range(3)] == pytest.approx([0, 1 / 3, 2 / 3])


def test_constant_is_flat_after_warmup_and_unknown_schedules_fail():
    assert [lr_multiplier(s, 10, "constant", 0.2) for s in range(10)] == pytest.approx([1 / 3, 2 / 3] + [1.0] * 8)
    assert [lr_multiplier(s, 10, "constant") for s in range(10)] == [1.0] * 10
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(3, 10, "linear")


# ---- finetuning -----------------------------------------------------------------------------------------------------

def test_a_stage_loss_falls():
    losses = refusal_finetune().losses
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, losses


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _share_of_updates_equal_to_lr(model, before, lr: float) -> float:
    """Adam's first step from empty state moves every parameter by exactly lr (m_hat / sqrt(v_hat) = sign(g));
    a step with carried-over moments does not. Returns the share of moved entries whose |update| is lr +- 1%."""
    delta = torch.cat([(p.detach() - before[n]).abs().flatten() for n, p in model.named_parameters()])
    moved = delta[delta > 0]
    assert moved.numel() > 0.5 * delta.numel()
    return float(((moved / lr - 1).abs() < 1e-2).float().mean())


def test_every_stage_starts_a_fresh_optimizer_and_schedule():
    """Two consecutive stages on one model: the second starts at the warmup lr again, and its first update has
    Adam's fresh-state signature (|update| = lr everywhere). A carried-over optimizer moves only ~10% of the
    entries by exactly lr after a few steps, so both halves of this check can fail."""
    from reteq.data.synthetic import instruct, knowledge
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import finetune_stage
    from reteq.train.worker_context import WorkerContext

    mcfg = model_cfg()
    tokenizer = load_tokenizer(mcfg)
    model = load_model(mcfg, seed=0)
    # 4 steps; not wsd, whose warmup starts at lr 0 (the authors' get_wsd), so a first step would not move
    sched = dict(epochs=2, schedule="constant", warmup_frac=0.5)
    stages = [(StageConfig.model_validate(stage_dict("inst", 16, lr=3e-3, **sched)), instruct(16)),
              (StageConfig.model_validate(stage_dict("tofu", 16, lr=1e-3, **sched)), knowledge(16))]
    for stage, convs in stages:
        before = _snapshot(model)
        first: dict[str, float] = {}

        def on_step(record, before=before, first=first, model=model):
            if record.step == 1:
                first["lr"] = record.lr
                first["share"] = _share_of_updates_equal_to_lr(model, before, record.lr)

        model, result, stats = finetune_stage(model, tokenizer, stage, convs, WorkerContext(), seed=0,
                                              on_step=on_step)
        assert stats["steps"] == 4
        assert [r.lr for r in result.records] == pytest.approx([stage.lr * f for f in (1 / 3, 2 / 3, 1.0, 1.0)])
        assert first["lr"] == pytest.approx(stage.lr / 3)
        # entries whose gradient is exactly 0 (embedding rows of tokens absent from the batch) do not move: the
        # tiny base leaves ~1.6% of them here; a carried-over optimizer moves only ~10%
        assert first["share"] > 0.95, (stage.name, first)


# ---- reproducibility and the one-process command ------------------------------------------------------------------

def _run(tmp_path, seed: int):
    from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
    from reteq.pipeline.leaf import run_leaf
    from reteq.plan import build_plan
    from reteq.train.worker_context import WorkerContext

    cfg = sweep_cfg(tmp_path, seeds=[seed])
    plan = build_plan(cfg)
    (leaf,) = plan.leaves
    run = RunContext(cfg, plan, WorkerContext(), CheckpointStore(tmp_path / "checkpoints"), DataCache(cfg))
    result = run_leaf(run, leaf)
    return result.evals, [r.loss for r in result.loop.records]


def test_the_same_seed_gives_the_same_metrics_and_another_seed_does_not(tmp_path):
    evals_a, losses_a = _run(tmp_path / "a", seed=0)
    evals_b, losses_b = _run(tmp_path / "b", seed=0)
    assert [s for s, _ in evals_a] == [0, 1, 2]
    assert set(evals_a[0][1]) >= {"forget/label_logp", "forget/score", "utility/tofu_logp", "utility/math_acc"}
    assert evals_a == evals_b  # exact: same floats, every metric, every eval step
    assert losses_a == losses_b
    evals_c, _ = _run(tmp_path / "c", seed=1)
    assert evals_c[0][1]["forget/label_logp"] != evals_a[0][1]["forget/label_logp"]
    assert evals_c != evals_a


@pytest.fixture
def keep_threads():
    """`reteq run-path` sets torch's thread count for the process; put it back for the tests after it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("keep_threads")
def test_run_path_prints_the_metric_table_and_reuses_its_checkpoints(tmp_path, capsys):
    from reteq.cli import main

    config = write_config(tmp_path / "tiny.yaml", sweep_dict(tmp_path, n=16))
    work = tmp_path / "work"
    assert main(["run-path", str(config), "--order", "inst,tofu,U,math", "--algorithm", "npo",
                 "--work-dir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "path tiny inst>tofu>U>math (p=3) | npo lr=0.001 beta=0.5 seed=0" in out
    # the path's four stages, then its retrain node inst>tofu>math (inst, inst>tofu are shared prefixes)
    assert [x.split()[-1] for x in out.splitlines() if ": training stage " in x] == ["inst", "tofu", "U", "math",
                                                                                     "math"]
    assert sum(x.startswith("[stage] ") and " done: 2 steps" in x for x in out.splitlines()) == 5
    lines = out.splitlines()
    header = next(i for i, x in enumerate(lines) if x.startswith("step "))
    assert lines[header].split() == ["step", "label_logp", "para_logp", "forget", "tofu_logp", "tofu_util",
                                     "math_acc", "re_logp_mse", "re_kl"]
    table = [x.split() for x in lines[header + 1:header + 4]]
    assert [row[0] for row in table] == ["0", "1", "2"]
    assert all(math.isfinite(float(v)) for row in table for v in row)
    assert table[0][3] == "0.0000" and table[0][5] == "1.0000"  # forget score 0 and tofu utility 1 at step 0
    assert len(list((work / "checkpoints").iterdir())) == 5

    assert main(["run-path", str(config), "--order", "inst,tofu,U,math", "--algorithm", "npo",
                 "--work-dir", str(work)]) == 0
    again = capsys.readouterr().out.splitlines()
    assert sum("reusing" in x for x in again) == 2  # the path's last node and its retrain node; none retrained
    assert not any("training stage" in x for x in again)
    h = next(i for i, x in enumerate(again) if x.startswith("step "))
    assert again[h:h + 4] == lines[header:header + 4]
