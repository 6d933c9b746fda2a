"""bf16 on the CPU (issue #28): what reteq's precision policy buys on a real model, on the same batches.

SmolLM2-135M-Instruct (configs/smol.yaml: LoRA r16 on q/v/o + MLP), batches of the config's stages, torch threads
as a sweep worker has them (--threads). Printed, each a ratio of tokens/s on the same steps:

  reteq bf16/fp32 train     reteq.train.recipes.finetune_stage under dtype bf16 vs fp32 (goal >= 1.5x on AMX)
  reteq bf16/fp32 forward   the evaluator's scoring (forget score + TOFU pairs) under eval.dtype bf16 vs fp32
                            (goal >= 2.0x)
  reteq bf16 / plain bf16 train   reteq's bf16 steps vs the loop a user writes: padded batches, HF's loss, bf16
                            autocast with the frozen base cast to bf16 by hand (goal >= 0.95x)
  denormals                 one saturated backward (subnormal gradients) with flush_denormal off vs on
  leaf split                one unlearning leaf (GA, the config's eval sample) before (fp32, every metric at
                            every eval step) and after (bf16, math/TOFU/re at the ends): seconds in train / reference /
                            forget / tofu / math / re, and evaluation's share of the leaf

    python bench/cpu_precision.py --quick          # <= 10 min on 2 cores
    python bench/cpu_precision.py --threads 2 --steps 4 --rounds 5

The first optimizer step of every side is a warm-up and is not timed. On a CPU without AMX the first line says
so and the ratios are what that CPU gives (AVX512-BF16 units: native bf16 dot products without AMX tiles; no
bf16 units at all: reteq refuses bf16 on CPU workers, and this bench says it measures emulation).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common import machine, peak_memory_gib  # noqa: E402
from real_model_throughput import plain_steps  # noqa: E402

from reteq.config import EvalSchedule, load_config  # noqa: E402
from reteq.data.sources import load_conversations  # noqa: E402
from reteq.data.tokenize import configure_chat, encode_dataset, plan_steps  # noqa: E402
from reteq.eval.scoring import score_pairs  # noqa: E402
from reteq.hardware import cpu_bf16_units, cpu_flags  # noqa: E402
from reteq.models import load_model, load_tokenizer  # noqa: E402
from reteq.pipeline.context import DataCache  # noqa: E402
from reteq.pipeline.leaf import build_evaluator, build_probe  # noqa: E402
from reteq.train.precision import frozen_base_in  # noqa: E402
from reteq.train.recipes import UnlearnJob, finetune_stage, unlearn  # noqa: E402
from reteq.train.worker_context import WorkerContext  # noqa: E402

EVAL_PARTS = ("forget", "tofu", "math", "depth", "re")


def plain_bf16(base, examples, index_steps, micro_batch: int, pad_id: int, lr: float) -> list[float]:
    """A user's bf16 loop: the frozen base's Linear weights cast to bf16 by hand, autocast around HF's loss."""
    model = copy.deepcopy(base)
    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad and id(m.weight) not in tied:
            m.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return plain_steps(model, examples, index_steps, micro_batch, pad_id, lr, 1.0)


def train_rates(base, tok, stage, convs, steps: int, rounds: int) -> dict[str, float]:
    """Tokens/s of reteq fp32, reteq bf16 and plain bf16 on the same `steps` steps (+1 warm-up step each), run in
    `rounds` interleaved rounds whose first is discarded (oneDNN builds its bf16 kernels per shape on first use),
    so load from other processes falls on every side alike."""
    examples = encode_dataset(tok, convs, stage.max_length)
    index_steps = plan_steps(len(examples), 1.0, stage.global_batch, seed=0, steps=steps + 1)
    plain_tokens = [sum(len(examples[i].input_ids) for i in s) for s in index_steps]
    ft_stage = stage.model_copy(update={"epochs": (steps + 1) * stage.global_batch / len(convs)})

    def reteq(dtype: str) -> tuple[list[int], list[float]]:
        _, loop, _ = finetune_stage(copy.deepcopy(base), tok, ft_stage, convs, WorkerContext(dtype=dtype), seed=0)
        return [r.tokens for r in loop.records], [r.seconds for r in loop.records]

    def plain() -> tuple[list[int], list[float]]:
        return plain_tokens, plain_bf16(base, examples, index_steps, stage.micro_batch, tok.pad_token_id, stage.lr)

    sides = {"reteq fp32": lambda: reteq("fp32"), "reteq bf16": lambda: reteq("bf16"), "plain bf16": plain}
    totals = {name: [0, 0.0] for name in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate who goes first
            tokens, seconds = sides[name]()
            if r:
                totals[name][0] += sum(tokens[1:])
                totals[name][1] += sum(seconds[1:])
    return {name: tokens / secs for name, (tokens, secs) in totals.items()}


def scoring_rate(model, evaluator, dtype: str, repeats: int) -> tuple[float, int]:
    """Tokens/s of the evaluator's forget + TOFU scoring (after one warm-up call) under `dtype`."""
    pairs = evaluator._forget_pairs + evaluator._knowledge_pairs
    n_tok = sum(len(a) + len(b) for a, b in pairs)
    with frozen_base_in(model, dtype, enabled=True):
        score_pairs(model, pairs[:20], pad_id=evaluator.tokenizer.pad_token_id, batch_size=32, dtype=dtype)
        start = time.perf_counter()
        for _ in range(repeats):
            score_pairs(model, pairs, pad_id=evaluator.tokenizer.pad_token_id, batch_size=32, dtype=dtype)
    return repeats * n_tok / (time.perf_counter() - start), n_tok


def saturated_step_seconds(flush: bool, params: int = 4_900_000, repeats: int = 5) -> float:
    """The CPU math of one saturated unlearning step, fastest of `repeats`: NPO's gradient weight far past its
    margin (sigmoid(-95) = 5.5e-42, subnormal) times per-token gradients, then AdamW on gradients that small,
    over as many parameters as SmolLM2's LoRA r16 has (4.9M)."""
    WorkerContext(flush_denormal=flush).apply_numerics()
    weights = [torch.zeros(params, requires_grad=True)]
    opt = torch.optim.AdamW(weights, lr=1e-4)
    margin, token_grads = torch.full((params,), -95.0), torch.randn(params)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        weights[0].grad = torch.sigmoid(margin) * token_grads  # subnormal unless flushed
        opt.step()
        best = min(best, time.perf_counter() - start)
    WorkerContext(flush_denormal=False).apply_numerics()
    return best


def leaf_split(cfg, base, tok, data, steps: int, eval_every: int, overrides: dict) -> tuple[dict, float]:
    """Seconds per part of one GA leaf on the config's eval sample, with `overrides` (dtype, eval.dtype, eval
    schedule) applied; returns (seconds by part, wall seconds)."""
    eval_cfg = cfg.eval.model_copy(update={"dtype": overrides.get("eval_dtype"),
                                           "schedule": EvalSchedule(**overrides.get("schedule", {}))})
    run_cfg = cfg.model_copy(update={"eval": eval_cfg})
    evaluator = build_evaluator(run_cfg, tok, data, seed=0)
    evaluator.probe = build_probe(run_cfg, tok, data)
    ctx = WorkerContext(dtype=overrides.get("dtype", "fp32"), eval_dtype=overrides.get("eval_dtype"),
                        flush_denormal=True)
    model = copy.deepcopy(base)
    with frozen_base_in(model, ctx.scoring_dtype, ctx.holds_bf16_base):  # theta_r stand-in: the start model
        evaluator.probe.set_reference(model, ctx.device, ctx.scoring_dtype)
    u = cfg.unlearn.model_copy(update={"steps": steps, "eval_every": eval_every})
    job = UnlearnJob(u, "ga", u.lrs[0], {}, data.stage(cfg.forget_stage), 0)
    start = time.perf_counter()
    result = unlearn(model, tok, job, evaluator, ctx)
    return result.seconds, time.perf_counter() - start


def print_split(name: str, seconds: dict, wall: float) -> None:
    ev = sum(seconds.get(p, 0.0) for p in EVAL_PARTS)
    parts = "  ".join(f"{p} {seconds.get(p, 0.0):6.1f}" for p in ("train", "reference", *EVAL_PARTS))
    print(f"leaf {name:>6}: wall {wall:6.1f} s | {parts} | evaluation {100 * ev / wall:4.1f}% of the leaf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "smol.yaml"))
    p.add_argument("--stage", default="math", help="the stage whose batches the finetuning steps use")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per side and round (+1 warm-up)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the first is a warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker: cpus_per_worker)")
    p.add_argument("--leaf-steps", type=int, default=8, help="unlearning steps of the split leaf")
    p.add_argument("--quick", action="store_true", help="3 timed steps, a 4-step leaf: <= 10 min on 2 cores")
    args = p.parse_args()
    if args.quick:
        args.steps, args.rounds, args.leaf_steps = 2, 3, 4
    torch.set_num_threads(args.threads)
    units = cpu_bf16_units()
    cpu_note = ("AMX tiles present" if units == "AMX" else
                f"no AMX: {units} units only" if units else "no bf16 units: bf16 is emulated here")
    print(f"cpu bf16: {cpu_note} (flags: {', '.join(sorted(f for f in cpu_flags() if 'bf16' in f or 'amx' in f))})",
          flush=True)

    cfg = load_config(args.config)
    mcfg = cfg.models[0]
    tok = configure_chat(load_tokenizer(mcfg), cfg.chat)
    base = load_model(mcfg, seed=0)
    stage = cfg.stage(args.stage)
    convs = load_conversations(stage.source)

    # ---- training: reteq fp32, reteq bf16, plain bf16 on the same steps, interleaved ----------------------------
    rates = train_rates(base, tok, stage, convs, args.steps, args.rounds)
    train_fp32, train_bf16, train_plain = rates["reteq fp32"], rates["reteq bf16"], rates["plain bf16"]

    # ---- scoring: the evaluator's forget + TOFU pairs ----------------------------------------------------------
    data = DataCache(cfg)
    evaluator = build_evaluator(cfg, tok, data, seed=0)
    scorer = copy.deepcopy(base).eval()
    fwd_fp32, n_tok = scoring_rate(scorer, evaluator, "fp32", 1 if args.quick else 2)
    fwd_bf16, _ = scoring_rate(scorer, evaluator, "bf16", 1 if args.quick else 2)

    # ---- denormals ---------------------------------------------------------------------------------------------
    slow, fast = saturated_step_seconds(False), saturated_step_seconds(True)

    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model: {mcfg.source} (LoRA r{mcfg.lora.r} on {', '.join(mcfg.lora.targets)}), threads {args.threads}, "
          f"{args.steps} timed steps x {args.rounds - 1} rounds of {stage.global_batch} x <= {stage.max_length} "
          f"tokens ({args.stage}), interleaved")
    print(f"train tok/s: reteq fp32 {train_fp32:,.0f}, reteq bf16 {train_bf16:,.0f}, plain bf16 {train_plain:,.0f}")
    print(f"scoring tok/s ({n_tok} tokens: forget + TOFU pairs): fp32 {fwd_fp32:,.0f}, bf16 {fwd_bf16:,.0f}")
    print(f"reteq bf16/fp32 train {train_bf16 / train_fp32:.2f}x")
    print(f"reteq bf16/fp32 forward {fwd_bf16 / fwd_fp32:.2f}x")
    print(f"reteq bf16 / plain bf16 train {train_bf16 / train_plain:.2f}x")
    print(f"denormals: saturated step (NPO weight x grads + AdamW, 4.9M params) {1000 * slow:.1f} ms with "
          f"flush_denormal off, {1000 * fast:.1f} ms on "
          f"({slow / fast:.1f}x)", flush=True)

    # ---- one leaf before / after -------------------------------------------------------------------------------
    every = max(1, args.leaf_steps // 2)
    before = {"dtype": "fp32"}
    after = {"dtype": "bf16", "eval_dtype": "bf16", "schedule": {"tofu": "ends", "math": "ends", "re": "ends"}}
    for name, overrides in (("before", before), ("after", after)):
        print_split(name, *leaf_split(cfg, base, tok, data, args.leaf_steps, every, overrides))
    print(f"leaf: GA, {args.leaf_steps} steps, eval every {every}; before = {before}, after = {after}")
    print(f"peak RSS {peak_memory_gib(torch.device('cpu')):.2f} GiB")


if __name__ == "__main__":
    main()
