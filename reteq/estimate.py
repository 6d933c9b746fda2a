"""`reteq plan`: what a sweep will run and what it will cost, without running anything.

Tokens per node are estimated as sequences x an assumed mean sequence length of the stage's max_length / 2
(nothing is read or measured: `reteq plan` must stay instant, even for hub data not yet downloaded). GPU-hours = tokens / throughput / 3600, with the
throughput (tokens/s per GPU) from `execution.tokens_per_gpu_second` (measure it with bench/).
Unlearning cost counts the optimizer steps' tokens plus the evaluations: scored forget / knowledge pairs
(`eval.forget_prompts: all` scores every S_U question x 20 targets at every eval step) and math generation.
"""

from __future__ import annotations

from reteq.config import SweepConfig
from reteq.plan import build_plan
from reteq.tracking import order_tag

UNLEARN_SEQ_LEN = 256  # the forget set's responses are short refusals; prompt + response stays well below this
PAPER_FORGET_ROWS = 4620  # S_U as the authors split it (docs/data.md), when the config does not say
SCORED_PAIR_LEN = 64  # prompt + target tokens of one scored (question, target) pair
FORWARD_SHARE = 0.35  # a forward pass costs about a third of a training step's tokens
MATH_PROMPT_LEN = 256  # a GSM8K question in the eval prompt (Appendix F's adds ~120 tokens)


def _mean_len(cfg: SweepConfig, stage: str) -> float:
    """The assumed mean tokens per sequence: half the stage's max_length, not a measurement."""
    return cfg.stage(stage).max_length / 2


def eval_tokens_per_pass(cfg: SweepConfig, n_forget: int) -> float:
    """Training-token equivalents of one evaluation: every scored forget question x its 20 targets and knowledge
    answer as forwards, plus math generation (questions x samples x (prompt + max_new_tokens)) counted at full
    weight: decoding is a forward per token, but memory-bound, so it runs far below training throughput."""
    e = cfg.eval
    forget = (n_forget if e.forget_prompts == "all" else int(e.forget_prompts)) if "forget" in e.metrics else 0
    know = e.knowledge_prompts
    if know == "all":
        know = (cfg.stage(e.knowledge_stage).source.n or 4000) if e.knowledge_stage else 0
    know = int(know) if "tofu" in e.metrics else 0
    scored = (forget * 20 + know) * SCORED_PAIR_LEN * FORWARD_SHARE
    per = 1 if e.greedy else e.math_samples
    math = e.math_questions * per * (MATH_PROMPT_LEN + e.max_new_tokens) if "math" in e.metrics else 0
    return scored + math


def plan_report(cfg: SweepConfig) -> dict:
    plan = build_plan(cfg)
    tps = cfg.execution.tokens_per_gpu_second
    nodes = []
    finetune_tokens = 0.0
    for node in plan.nodes.values():
        tokens = node.examples * _mean_len(cfg, node.stage)
        finetune_tokens += tokens
        nodes.append({"key": node.key, "model": node.model, "prefix": order_tag(node.prefix), "seed": node.seed,
                      "tokens": int(tokens)})
    u = cfg.unlearn
    n_forget = cfg.stage(cfg.forget_stage).source.n or PAPER_FORGET_ROWS
    steps = u.steps or max(1, int(n_forget * u.epochs) // u.global_batch)
    evals = steps // u.eval_every + 1
    eval_tokens = evals * eval_tokens_per_pass(cfg, n_forget)
    per_leaf = steps * u.global_batch * UNLEARN_SEQ_LEN + eval_tokens
    unlearn_tokens = per_leaf * len(plan.leaves)
    saved = plan.stage_runs_without_sharing - (len(plan.nodes) - plan.summary()["retrain_only_nodes"])
    return {
        **plan.summary(),
        "stage_runs_saved_by_sharing": saved,
        "finetune_tokens": int(finetune_tokens),
        "unlearn_tokens": int(unlearn_tokens),
        "eval_tokens": int(eval_tokens * len(plan.leaves)),  # part of unlearn_tokens
        "tokens_per_gpu_second": tps,
        "gpu_hours_finetune": finetune_tokens / tps / 3600,
        "gpu_hours_unlearn": unlearn_tokens / tps / 3600,
        "gpu_hours_total": (finetune_tokens + unlearn_tokens) / tps / 3600,
        "nodes": nodes,
        "leaves_per_method": {a: sum(1 for leaf in plan.leaves if leaf.algorithm == a) for a in u.algorithms},
    }


def format_plan(cfg: SweepConfig, r: dict) -> str:
    lines = [
        f"sweep {cfg.name}: {len(cfg.models)} model(s) x {len(cfg.stage_orders())} order(s) x "
        f"{len(cfg.seeds)} seed(s)",
        f"stage nodes: {r['stage_nodes']} (without sharing: {r['stage_runs_without_sharing']}; "
        f"saved: {r['stage_runs_saved_by_sharing']})",
        f"retrain nodes (theta_r): {r['retrain_nodes']} ({r['retrain_nodes_shared']} shared with finetuned paths; "
        f"{r['retrain_only_nodes']} node(s) trained only for them; {r['retrain_runs']} retrain run(s): each "
        f"theta_r evaluated once, nothing retrained)",
        f"unlearning runs: {r['unlearn_runs']}   Tune trials: {r['trials']}   per method: "
        + ", ".join(f"{a} {n}" for a, n in r["leaves_per_method"].items()),
        f"tokens: finetune {r['finetune_tokens']:,}  unlearn {r['unlearn_tokens']:,} (of which evaluation "
        f"{r['eval_tokens']:,})",
        f"GPU-hours at {r['tokens_per_gpu_second']:,.0f} tokens/s/GPU: finetune {r['gpu_hours_finetune']:.1f}, "
        f"unlearn {r['gpu_hours_unlearn']:.1f}, total {r['gpu_hours_total']:.1f}",
        "nodes:",
    ]
    lines += [f"  {n['key'][:12]}  {n['model']:<14} {n['prefix']:<24} seed {n['seed']}  ~{n['tokens']:,} tokens"
              for n in r["nodes"]]
    return "\n".join(lines)
