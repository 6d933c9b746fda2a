"""Training throughput of reteq's own step: finetune (token-mean cross-entropy) and unlearn (NPO) steps.

A random-init causal LM of a named shape (the paper's Llama-3.2-1B / Qwen2.5-1.5B / Llama-3.1-8B, or small
ones for CPU) is trained on synthetic variable-length sequences through the same code the sweep runs:
`reteq.data.tokenize` (length-sorted micro-batches, labels on the response only), `reteq.train.engine`
(fresh AdamW + schedule, plain torch or DeepSpeed), `reteq.train.loop` (the one training loop),
`reteq.train.logprobs` and `reteq.algorithms` (NPO). None of these imports ray, mlflow or polars (checked).

Only torch + transformers + peft are needed (+ deepspeed with --deepspeed). Examples:

    python bench/train_throughput.py --shape small --steps 6 --global-batch 16 --micro-batch 8 --max-length 256
    python bench/train_throughput.py --shape llama-3.2-1b --lora-rank 64 --precision bf16 --json out.json

Printed per phase: real (non-pad) tokens/s, padded tokens/s, padding fraction, seconds per optimizer step,
peak memory (CUDA max_memory_allocated; on CPU the process's peak RSS, which only ever grows), and the machine.
Random weights: throughput and memory do not depend on the weights' values, so no download is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common import HEAVY, LORA_TARGETS, SHAPES, init_single_process_distributed, machine  # noqa: E402  (bench/common.py: one table of shapes)

from reteq.algorithms import get_algorithm  # noqa: E402
from reteq.algorithms.base import MethodInputs  # noqa: E402
from reteq.data.tokenize import IGNORE, Example, micro_batches, plan_steps  # noqa: E402
from reteq.train.deepspeed_config import load_deepspeed_config  # noqa: E402
from reteq.train.engine import OptimSpec, build_engine  # noqa: E402
from reteq.train.logprobs import sequence_logps, token_logps  # noqa: E402
from reteq.train.loop import Step, train_loop  # noqa: E402
from reteq.train.precision import apply_matmul_policy, autocast  # noqa: E402

# ---- the model --------------------------------------------------------------------------------------------------

def build_model(shape: str, max_length: int, lora_rank: int, lora_alpha: int | None, seed: int,
                device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, dims = SHAPES[shape]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config_cls(max_position_embeddings=max(max_length, 512), bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     **dims)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: an 8B model's random init on the CPU takes minutes
        model = model_cls(cfg).float()  # fp32 master weights under every precision policy, as reteq.models
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                                                 lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    return model


# ---- synthetic data with a realistic length distribution -------------------------------------------------------------

def synthetic_examples(n: int, vocab: int, median_len: int, sigma: float, max_length: int, seed: int
                       ) -> list[Example]:
    """Chat-SFT-like sequences: total length log-normal (median `median_len`, log-sd `sigma`) clipped to
    [16, max_length]; the first 20-60% is the prompt (label IGNORE), the rest the response (labelled)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        length = int(min(max_length, max(16, round(rng.lognormvariate(math.log(median_len), sigma)))))
        prompt = max(1, int(length * rng.uniform(0.2, 0.6)))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        out.append(Example(ids, [IGNORE] * prompt + ids[prompt:], i))
    return out


def build_steps(examples: list[Example], n_steps: int, global_batch: int, micro: int, seed: int) -> list[Step]:
    steps = []
    for idx in plan_steps(len(examples), 1.0, global_batch, seed, steps=n_steps):
        steps.append(Step(micro_batches(examples, idx, micro, rank=0, world=1, pad_id=0),
                          sum(examples[i].n_label_tokens for i in idx), len(idx)))
    return steps


# ---- measurement -------------------------------------------------------------------------------------------------------

def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def summarise(name: str, records, warmup: int, device: torch.device) -> dict:
    timed = records[warmup:] or records
    secs = sum(r.seconds for r in timed)
    tokens = sum(r.tokens for r in timed)
    padded = sum(r.padded_tokens for r in timed)
    return {
        "phase": name,
        "timed_steps": len(timed),
        "tokens_per_s": tokens / secs if secs else float("nan"),
        "padded_tokens_per_s": padded / secs if secs else float("nan"),
        "padding_fraction": 1 - tokens / padded if padded else float("nan"),
        "seconds_per_step": secs / len(timed) if timed else float("nan"),
        "peak_memory_gib": peak_memory_gib(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
        "final_loss": records[-1].loss if records else float("nan"),
    }


def run_phase(kind: str, model, steps: list[Step], args, device: torch.device, ds_config) -> dict:
    spec = OptimSpec("adamw", args.lr, len(steps), "constant")
    accumulation = args.global_batch // args.micro_batch
    reset_peak(device)
    if kind == "finetune":
        def loss_fn(m, batch, step):
            logp, _ = token_logps(m, batch.input_ids, batch.attention_mask, batch.labels)
            return -logp.sum() / step.label_tokens
    else:  # NPO: reference log-probs first (not timed, as in reteq.train.recipes.unlearn), then the loss
        npo = get_algorithm("npo")
        ref: dict[int, float] = {}
        model.eval()
        with torch.no_grad():
            for step in steps:
                for b in step.micro_batches:
                    bb = b.to(device)
                    with autocast(args.precision, device):
                        logp, _ = sequence_logps(model, bb)
                    ref.update(zip(b.index.tolist(), logp.double().cpu().tolist()))

        def loss_fn(m, batch, step):
            logp, _ = sequence_logps(m, batch)
            r = torch.tensor([ref[int(i)] for i in batch.index], device=logp.device).to(logp)
            return npo.loss(MethodInputs.of_sequences(logp, r), {"beta": args.beta}) / step.sequences

    engine = build_engine(model, spec, ds_config=ds_config, micro_batch=args.micro_batch,
                          accumulation=accumulation, world=1)
    result = train_loop(engine, steps, loss_fn, device=device, dtype=args.precision)
    if result.collapsed:
        raise SystemExit(f"{kind}: non-finite loss")
    return summarise(kind, result.records, args.warmup_steps, device)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--lora-rank", type=int, default=0, help="0 = full finetuning (default); paper: 8-64")
    p.add_argument("--lora-alpha", type=int, default=None, help="default 2 x rank (the paper's ratio)")
    p.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per phase")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first (allocator, kernels)")
    p.add_argument("--repeats", type=int, default=1, help="run each phase N times; report the best and median")
    p.add_argument("--global-batch", type=int, default=128, help="sequences per optimizer step (paper: 128)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--median-len", type=int, default=256, help="median sequence length (tokens)")
    p.add_argument("--len-sigma", type=float, default=0.6, help="log-sd of the length distribution")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.5, help="NPO beta")
    p.add_argument("--phases", default="finetune,unlearn")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--deepspeed", default=None, help="a DeepSpeed JSON, e.g. configs/deepspeed/zero2_bf16.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.global_batch % args.micro_batch:
        p.error("--global-batch must be a multiple of --micro-batch")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    heavy = [m for m in HEAVY if m in sys.modules]
    if heavy:
        raise SystemExit(f"reteq's training path imported {heavy}: it must not need them")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    apply_matmul_policy(args.precision)
    ds_config = None
    if args.deepspeed:
        ds_config = load_deepspeed_config(args.deepspeed)
        init_single_process_distributed(device)

    model = build_model(args.shape, args.max_length, args.lora_rank, args.lora_alpha, args.seed, device)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    n_steps = args.warmup_steps + args.steps
    examples = synthetic_examples(n_steps * args.global_batch, vocab, args.median_len, args.len_sigma,
                                  args.max_length, args.seed)
    report = {
        "machine": machine(),
        "setup": {"shape": args.shape, "parameters": params, "trainable": trainable,
                  "mode": f"lora r={args.lora_rank}" if args.lora_rank else "full", "precision": args.precision,
                  "device": str(device), "engine": f"deepspeed {args.deepspeed}" if args.deepspeed else "plain",
                  "global_batch": args.global_batch, "micro_batch": args.micro_batch, "max_length": args.max_length,
                  "median_len": args.median_len, "len_sigma": args.len_sigma,
                  "mean_len": sum(len(e.input_ids) for e in examples) / len(examples),
                  "steps": args.steps, "warmup_steps": args.warmup_steps},
        "phases": [],
    }
    for i, phase in enumerate(p for p in args.phases.split(",") if p):
        if phase not in ("finetune", "unlearn"):
            raise SystemExit(f"--phases: unknown phase {phase!r}")
        steps = build_steps(examples, n_steps, args.global_batch, args.micro_batch, args.seed + i)
        runs = []
        for _ in range(args.repeats):  # a fresh engine each time, as every stage gets
            start = time.perf_counter()
            runs.append(run_phase(phase, model, steps, args, device, ds_config))
            runs[-1]["wall_s"] = time.perf_counter() - start
        row = max(runs, key=lambda r: r["tokens_per_s"])  # best of N: the least disturbed by other load
        row["repeats"] = len(runs)
        row["median_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
        row["peak_memory_gib"] = max(r["peak_memory_gib"] for r in runs)
        report["phases"].append(row)
    # reteq's path imports none of them (checked at start); DeepSpeed's autotuner tries `import mlflow` itself
    report["heavy_modules_imported"] = [m for m in HEAVY if m in sys.modules]
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def print_report(r: dict) -> None:
    m, s = r["machine"], r["setup"]
    print(f"machine: {m['cpu']} ({m['cpu_cores']} cores, {m['torch_threads']} torch threads), "
          f"GPU: {m['gpu'] or 'none'} | torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}"
          f"{', deepspeed ' + m['deepspeed'] if m.get('deepspeed') else ''} | {m['date_utc']} UTC")
    print(f"model: {s['shape']} {_count(s['parameters'])} params ({_count(s['trainable'])} trainable, "
          f"{s['mode']}) | {s['precision']} on {s['device']}, engine {s['engine']}")
    print(f"data: global batch {s['global_batch']}, micro batch {s['micro_batch']}, lengths log-normal median "
          f"{s['median_len']} sd {s['len_sigma']} (mean {s['mean_len']:.0f}) clipped to {s['max_length']}; "
          f"{s['steps']} timed steps after {s['warmup_steps']} warmup")
    print(f"{'phase':<9} {'tokens/s':>10} {'median':>8} {'padded tok/s':>13} {'padding':>8} {'s/step':>8} "
          f"{'peak GiB':>9}  memory")
    for p in r["phases"]:
        print(f"{p['phase']:<9} {p['tokens_per_s']:10.0f} {p['median_tokens_per_s']:8.0f} "
              f"{p['padded_tokens_per_s']:13.0f} {p['padding_fraction']:8.1%} {p['seconds_per_step']:8.2f} "
              f"{p['peak_memory_gib']:9.2f}  {p['peak_memory_kind']}")
    print(f"(tokens/s, padded tok/s, s/step: best of {r['phases'][0]['repeats'] if r['phases'] else 0} runs; "
          "median: median tokens/s; tokens = non-pad tokens)")
    heavy = ", ".join(r["heavy_modules_imported"]) or "none"
    by = " (by deepspeed: its autotuner tries `import mlflow`)" if r["heavy_modules_imported"] and \
        r["machine"].get("deepspeed") else ""
    print(f"ray/mlflow/polars imported: by reteq's training path none; at the end {heavy}{by}")


if __name__ == "__main__":
    main()
