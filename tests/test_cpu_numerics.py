"""The CPU precision policy (#28): bf16 where the CPU has bf16 units, an evaluation precision of its own, an
evaluation schedule, denormals flushed on CPU workers, and the keys that say which settings produced a result."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import model_cfg, refusal_finetune, reteq_cache, stage_dict, sweep_dict, write_config  # noqa: F401

from reteq.config import EvalConfig, EvalSchedule, StageConfig, UnlearnConfig, parse_config
from reteq.config_files import ConfigError
from reteq.hardware import cpu_bf16_units
from reteq.plan import build_plan
from reteq.train.worker_context import WorkerContext

SUBNORMAL = torch.finfo(torch.float32).tiny  # 1.18e-38: below it a nonzero fp32 is subnormal


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < SUBNORMAL)).sum())


# ---- which CPUs run bf16 ----------------------------------------------------------------------------------------

def test_bf16_units_are_read_from_the_cpu_flags():
    assert cpu_bf16_units({"avx512f", "amx_bf16", "avx512_bf16"}) == "AMX"
    assert cpu_bf16_units({"avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert cpu_bf16_units({"avx2", "fma"}) is None


def test_bf16_on_a_cpu_without_bf16_units_is_one_line_before_anything_runs(tmp_path):
    """`reteq validate` through the real CLI, with RETEQ_CPUINFO naming a CPU that has AVX2 and nothing newer."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n")
    raw = sweep_dict(tmp_path)
    raw["models"][0]["dtype"] = "bf16"
    config = write_config(tmp_path / "bf16.yaml", raw)
    env = {"RETEQ_CPUINFO": str(cpuinfo), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "reteq", "validate", str(config)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "models[0].dtype" in lines[0] and "AMX or AVX512-BF16" in lines[0], lines
    assert str(config) in lines[0]
    raw["execution"] = {"use_gpu": True}  # GPU workers: the CPU is not asked
    parse_config(raw)


# ---- settings and keys --------------------------------------------------------------------------------------------

def test_eval_schedule_runs_every_group_at_both_ends():
    s = EvalSchedule(math="ends", tofu=4)
    assert [step for step in range(9) if s.due("math", step, 8)] == [0, 8]
    assert [step for step in range(9) if s.due("tofu", step, 8)] == [0, 4, 8]
    assert all(s.due("forget", step, 8) for step in range(9))


def test_an_eval_schedule_off_the_eval_steps_is_refused(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["unlearn"]["eval_every"] = 2
    raw["eval"]["schedule"] = {"math": 3}
    with pytest.raises(ConfigError, match=r"eval\.schedule\.math: 3 is not a multiple of unlearn\.eval_every"):
        parse_config(raw)


def _keys(raw: dict) -> tuple[set[str], set[str]]:
    plan = build_plan(parse_config(raw))
    return set(plan.nodes), {leaf.key for leaf in plan.leaves}


def test_keys_say_which_precision_schedule_and_denormal_setting_produced_a_result(tmp_path):
    raw = sweep_dict(tmp_path)
    nodes, leaves = _keys(raw)
    raw["eval"]["dtype"] = None  # the default written out: same keys
    raw["eval"]["schedule"] = {"forget": "every"}
    assert _keys(raw) == (nodes, leaves)
    raw["eval"]["dtype"] = "bf16"  # evaluation changes leaves, not the nodes they start from
    bf16_nodes, bf16_leaves = _keys(raw)
    assert bf16_nodes == nodes and not bf16_leaves & leaves
    raw["eval"]["dtype"] = None
    raw["eval"]["schedule"] = {"math": "ends"}
    assert _keys(raw)[0] == nodes and not _keys(raw)[1] & leaves
    raw["eval"]["schedule"] = {}
    raw["execution"] = {"flush_denormal": False}  # flushing changes what trains on a CPU: every key
    off_nodes, off_leaves = _keys(raw)
    assert not off_nodes & nodes and not off_leaves & leaves
    raw["execution"] = {"flush_denormal": True, "use_gpu": True}  # on GPU workers it applies to nothing
    assert _keys(raw) == (off_nodes, off_leaves)


def test_worker_context_takes_precisions_from_the_config(tmp_path):
    raw = sweep_dict(tmp_path)
    raw["eval"]["dtype"] = "bf16"
    cfg = parse_config(raw)
    ctx = WorkerContext.for_model(cfg, "tiny")
    assert (ctx.dtype, ctx.scoring_dtype, ctx.flush_denormal, ctx.holds_bf16_base) == ("fp32", "bf16", True, True)
    gpu = WorkerContext.for_model(cfg, "tiny", device=torch.device("meta"))  # not a CPU: no flushing, no swap
    assert not gpu.flush_denormal and not gpu.holds_bf16_base
    zero3 = WorkerContext.for_model(cfg, "tiny", ds_config={"zero_optimization": {"stage": 3}})
    assert not zero3.holds_bf16_base


# ---- denormals ----------------------------------------------------------------------------------------------------

@pytest.fixture
def _denormals_restored():
    yield
    torch.set_flush_denormal(False)


@pytest.mark.usefixtures("_denormals_restored")
def test_a_saturated_npo_margin_gives_subnormal_gradients_unless_flushed():
    """NPO's gradient weight is sigmoid(beta * (log pi - log pi_ref)); far past the margin it is exp(-95):
    subnormal, the values x86 computes on ~25x slower (bench/cpu_precision.py measures it)."""
    def grad(flush: bool) -> torch.Tensor:
        WorkerContext(flush_denormal=flush).apply_numerics()
        margin = torch.full((64,), -95.0, requires_grad=True)
        (-F.logsigmoid(-margin)).sum().backward()  # d/dx = sigmoid(x) = exp(-95)
        return margin.grad

    assert _subnormals(grad(False)) == 64
    flushed = grad(True)
    assert _subnormals(flushed) == 0 and torch.all(flushed == 0)


@pytest.mark.usefixtures("reteq_cache", "_denormals_restored")
def test_flushing_leaves_an_unsaturated_stage_bit_identical():
    """The tiny model's refusal stage with flushing off and on: the same losses and weights, bit for bit (no
    value it computes is subnormal; what flushing changes is the saturated case above)."""
    from reteq.data.synthetic import refusal
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import finetune_stage

    mcfg = model_cfg(lora={"r": 4, "alpha": 8})
    tokenizer = load_tokenizer(mcfg)
    stage = StageConfig.model_validate(stage_dict("U", 16, micro_batch=8))
    runs = []
    for flush in (False, True):
        torch.manual_seed(0)
        module, result, _ = finetune_stage(load_model(mcfg, seed=0), tokenizer, stage, refusal(16, seed=0),
                                           WorkerContext(flush_denormal=flush), seed=0)
        runs.append(([r.loss for r in result.records], [r.grad_norm for r in result.records],
                     {k: v.clone() for k, v in module.state_dict().items() if "lora" in k}))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1]
    assert all(torch.equal(runs[0][2][k], runs[1][2][k]) for k in runs[0][2])


# ---- bf16 evaluation and the schedule through unlearning ----------------------------------------------------------

@pytest.mark.usefixtures("reteq_cache")
@pytest.mark.skipif(cpu_bf16_units() is None, reason="this CPU has no bf16 units (bf16 would be emulated)")
def test_unlearning_evaluates_in_bf16_on_its_schedule_and_times_its_parts():
    """GA on the tiny refusal model, fp32 training, bf16 evaluation, math only at the ends: the metrics of each
    step are those the schedule asks for, bf16 scores sit near fp32's, the base is fp32 again afterwards, and
    the leaf's seconds are split by part."""
    from reteq.eval.evaluator import Evaluator
    from reteq.models import load_model, load_tokenizer
    from reteq.train.recipes import UnlearnJob, unlearn

    ft = refusal_finetune()
    mcfg = model_cfg(lora={"r": 4, "alpha": 8})
    tokenizer = load_tokenizer(mcfg)
    math_items = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8")]
    cfg = UnlearnConfig(algorithms=["ga"], lrs=[1e-3], steps=3, global_batch=8, micro_batch=8, max_length=96,
                        eval_every=1)
    results = {}
    for eval_dtype in ("fp32", "bf16"):
        ecfg = EvalConfig(metrics=["forget", "math"], forget_prompts=4, math_samples=1, greedy=True,
                          max_new_tokens=8, dtype=eval_dtype, schedule={"math": "ends"})
        evaluator = Evaluator.build(ecfg, tokenizer, ft.convs, None, math_items)
        model = load_model(mcfg, seed=0)
        model.load_state_dict(ft.state, strict=False)
        torch.manual_seed(0)
        ctx = WorkerContext(eval_dtype=eval_dtype)
        results[eval_dtype] = unlearn(model, tokenizer, UnlearnJob(cfg, "ga", 1e-3, {}, ft.convs), evaluator, ctx)
        assert all(m.weight.dtype == torch.float32 for m in model.modules() if isinstance(m, torch.nn.Linear))
    bf16 = results["bf16"]
    assert [step for step, _ in bf16.evals] == [0, 1, 2, 3]
    assert [("utility/math_acc" in m) for _, m in bf16.evals] == [True, False, False, True]
    assert all("forget/label_logp" in m for _, m in bf16.evals)
    assert {"train", "reference", "forget", "math"} <= set(bf16.seconds) and bf16.seconds["train"] > 0
    fp32_0, bf16_0 = results["fp32"].evals[0][1], bf16.evals[0][1]
    gap = abs(fp32_0["forget/label_logp"] - bf16_0["forget/label_logp"])
    assert 0 < gap < 0.1, gap  # bf16 rounding moves a per-token log-prob, by little
