"""Finetune and unlearn (NPO) step throughput: packed vs padded batches, per precision, plain torch vs DeepSpeed.

The steps are reteq's own: `reteq.data.packing` (packed micro-batches, same count per worker as padded),
`reteq.train.logprobs` (token / summed-sequence log-probs of padded or packed batches), `reteq.train.engine`
(AdamW + schedule, plain or DeepSpeed), `reteq.train.precision` (fp32 / tf32 / bf16 autocast) and
`reteq.algorithms` (NPO). Padded batches are built as reteq.data.tokenize builds them (length-sorted within each
optimizer step); "unsorted" pads micro-batches in arrival order (what plain DataLoader batching would do).

Only torch + transformers + peft are imported (+ deepspeed with --engines ...,deepspeed). Examples:

    python bench/packing_throughput.py --shape small --steps 2 --global-batch 16 --micro-batch 4 --hi 512
    python bench/packing_throughput.py --shape llama-3.2-1b --precisions fp32,tf32,bf16 --json out.json

Per row: real (non-pad) tokens/s, computed tokens/s (pads included), padding fraction, model TFLOP/s
(6 N real tokens / s; see bench/common.py), seconds per optimizer step, peak memory; rates are those of the
median timed step (a shared machine is noisy). Packed rows also carry check_max_abs_diff: the largest
difference of a sample's summed response log-prob, packed vs padded (8 samples, same precision).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from reteq.algorithms import get_algorithm  # noqa: E402
from reteq.algorithms.base import MethodInputs  # noqa: E402
from reteq.data.packing import layout_for, pack, packed_micro_batches, padding_fraction  # noqa: E402
from reteq.train.deepspeed_config import load_deepspeed_config  # noqa: E402
from reteq.train.engine import OptimSpec, build_engine  # noqa: E402
from reteq.train.logprobs import batch_token_logps, sequence_logps  # noqa: E402
from reteq.train.precision import apply_matmul_policy, autocast  # noqa: E402

MODES = ("padded", "unsorted", "packed")
COLUMNS = ["shape", "engine", "precision", "mode", "phase", "tokens_per_s", "computed_tok_per_s", "padding",
           "model_tflops", "s_per_step", "peak_gib", "check_max_abs_diff"]


def micro_batches_for(mode: str, examples, idx: list[int], micro: int, model) -> list:
    if mode == "packed":
        return packed_micro_batches(examples, idx, micro, 0, 1, pad_id=0, layout=layout_for(model))
    return common.padded_micro_batches(examples, idx, micro, sort=(mode == "padded"))


def reference(model, examples, micro: int, mode: str, precision: str, device) -> dict[int, float]:
    """NPO's pi_ref for every example, through the same batch form as the steps (timed as its own row)."""
    ref: dict[int, float] = {}
    model.eval()
    with torch.no_grad():
        for s in range(0, len(examples), micro):
            chunk = examples[s:s + micro]
            b = pack(chunk, 0, layout=layout_for(model)) if mode == "packed" else common.collate(chunk, 0)
            with autocast(precision, device):
                logp, _ = sequence_logps(model, b.to(device))
            ref.update(zip(b.index.tolist(), logp.double().cpu().tolist()))
    model.train()
    return ref


def packed_vs_padded(model, examples, precision: str, device) -> float:
    """Max |summed log-prob difference| per sample, packed vs padded, on 8 samples (a correctness check)."""
    chunk = examples[:8]
    model.eval()
    with torch.no_grad(), autocast(precision, device):
        a, _ = sequence_logps(model, common.collate(chunk, 0).to(device))
        b, _ = sequence_logps(model, pack(chunk, 0, layout=layout_for(model)).to(device))
    model.train()
    # packing never labels a sample's first token; these samples' first tokens are prompt tokens (unlabelled)
    return float((a.double() - b.double()).abs().max())


def run_phase(phase: str, model, examples, plan: list[list[int]], args, mode: str, precision: str, device,
              ds_config, n_params: int) -> dict:
    steps = [micro_batches_for(mode, examples, idx, args.micro_batch, model) for idx in plan]
    label_tokens = [sum(examples[i].n_label_tokens for i in idx) for idx in plan]
    npo = get_algorithm("npo")
    ref = None
    row_extra = {}
    if phase == "unlearn":
        with common.Timer(device) as t:
            ref = reference(model, examples, args.micro_batch, mode, precision, device)
        n = sum(len(e.input_ids) for e in examples)
        row_extra = {"reference_tok_per_s": n / t.seconds}
    accumulation = args.global_batch // args.micro_batch
    engine = build_engine(model, OptimSpec("adamw", 1e-5, len(plan), "constant"), ds_config=ds_config,
                          micro_batch=args.micro_batch, accumulation=accumulation, world=1)
    engine.model.train()
    common.reset_peak(device)
    timed = []  # (seconds, real tokens, computed tokens) per timed step
    for k, (mbs, n_labels) in enumerate(zip(steps, label_tokens)):
        with common.Timer(device) as t:
            for b in mbs:
                b = b.to(device)
                with autocast(precision, device):
                    if phase == "finetune":
                        logp, _ = batch_token_logps(engine.model, b)
                        loss = -logp.sum() / n_labels
                    else:
                        logp, _ = sequence_logps(engine.model, b)
                        r = torch.tensor([ref[int(i)] for i in b.index], device=logp.device).to(logp)
                        loss = npo.loss(MethodInputs.of_sequences(logp, r), {"beta": args.beta}) / args.global_batch
                engine.micro_step(loss)
            engine.optimizer_step()
        if k >= args.warmup_steps:
            timed.append((t.seconds, sum(b.n_tokens for b in mbs), sum(b.input_ids.numel() for b in mbs)))
    flat = [b for mbs in steps for b in mbs]
    # the median step's rate: robust to a noisy shared machine
    secs, real, computed = sorted(timed, key=lambda x: x[1] / x[0])[len(timed) // 2]
    return {"phase": phase, "mode": mode, "precision": precision,
            "tokens_per_s": real / secs, "computed_tok_per_s": computed / secs,
            "padding": padding_fraction(flat), "model_tflops": 6 * n_params * real / secs / 1e12,
            "s_per_step": secs, "peak_gib": common.peak_memory_gib(device),
            "micro_batches_per_step": len(steps[0]), **row_extra}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="small")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the paper's rank for the shape, else 0 "
                   "(full finetuning)")
    p.add_argument("--precisions", default="fp32", help="comma list of fp32,tf32,bf16")
    p.add_argument("--modes", default="padded,packed", help=f"comma list of {','.join(MODES)}")
    p.add_argument("--phases", default="finetune,unlearn")
    p.add_argument("--engines", default="plain", help="comma list of plain,deepspeed")
    p.add_argument("--deepspeed-config", default="configs/deepspeed/zero2_fp32.json")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per row")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--median", type=float, default=256, help="median sample length (log-normal)")
    p.add_argument("--sigma", type=float, default=0.7)
    p.add_argument("--lo", type=int, default=64)
    p.add_argument("--hi", type=int, default=1024)
    p.add_argument("--beta", type=float, default=0.5)
    common.add_run_args(p, attn_help="sdpa | eager | flash_attention_2 (packed: varlen, one row)",
                        frozen_help="LoRA base Linear weights in bf16 (bf16 only)")
    args = p.parse_args(argv)
    if args.global_batch % args.micro_batch:
        p.error("--global-batch must be a multiple of --micro-batch")
    if args.frozen_bf16 and args.precisions != "bf16":
        p.error("--frozen-bf16 needs --precisions bf16")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, rank = common.start(args, "training")
    vocab = common.SHAPES[args.shape][1]["vocab_size"]
    n_steps = args.warmup_steps + args.steps
    examples = common.chat_examples(n_steps * args.global_batch, vocab, median=args.median, sigma=args.sigma,
                                    lo=args.lo, hi=args.hi, seed=args.seed)
    plan = common.step_indices(len(examples), n_steps, args.global_batch, args.seed)
    rows = []
    model = None
    for engine in args.engines.split(","):
        ds_config = None
        if engine == "deepspeed":
            ds_config = load_deepspeed_config(args.deepspeed_config)
            common.init_single_process_distributed(device)
        for precision in args.precisions.split(","):
            apply_matmul_policy(precision)
            for mode in args.modes.split(","):
                for phase in args.phases.split(","):
                    if model is None or engine == "deepspeed":  # DeepSpeed takes the model over: a fresh one
                        model = common.build_model(args.shape, device=device, lora_rank=rank, attn=args.attn,
                                                   seed=args.seed, frozen_bf16=args.frozen_bf16,
                                                   max_positions=max(4096, args.hi))
                        n_params = common.matmul_params(model)
                    row = run_phase(phase, model, examples, plan, args, mode, precision, device, ds_config,
                                    n_params)
                    if mode == "packed" and engine == "plain":
                        row["check_max_abs_diff"] = packed_vs_padded(model, examples, precision, device)
                    row.update(shape=args.shape, engine=engine if engine == "plain" else
                               f"deepspeed {Path(args.deepspeed_config).stem}")
                    rows.append(row)
                    print(f"  {row['engine']} {precision} {mode} {phase}: {row['tokens_per_s']:,.0f} tok/s",
                          flush=True)
                    if engine == "deepspeed":
                        model = None
    lens = [len(e.input_ids) for e in examples]
    header = {**common.machine(), "shape": args.shape, "lora_rank": rank, "attn": args.attn,
              "frozen_bf16": args.frozen_bf16, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
              "lengths": f"lognormal median {args.median} sigma {args.sigma} in [{args.lo},{args.hi}], "
                         f"mean {sum(lens) / len(lens):.0f}", "timed_steps": args.steps}
    common.emit(rows, header, args.json, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
