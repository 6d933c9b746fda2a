"""Generation throughput for the math metric: dynamic vs static KV cache, batch size, optional torch.compile.

reteq.eval.generation.generate_ids (what reteq.eval.math.generate_answers runs): prompts sorted by length and
left-padded, `num_return_sequences` for the samples of a question, a static cache when asked (and a compiled
decode step with --compile). The random-init model never emits EOS (eos = an id it is never asked to stop
on), so every sequence runs the full --new-tokens: tokens/s counts generated tokens only.

Only torch + transformers + peft are imported. Examples:

    python bench/generation_throughput.py --shape small --questions 8 --new-tokens 16 --configs dynamic:8,static:8
    python bench/generation_throughput.py --shape llama-3.2-1b --precision bf16 \\
        --configs dynamic:64,static:64,dynamic:320,static:320,static+compile:320

A config is CACHE:BATCH with CACHE one of dynamic | static | static+compile and BATCH the sequences per
generate call (questions x samples).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from reteq.eval.generation import Decoding, generate_ids  # noqa: E402
from reteq.train.precision import apply_matmul_policy  # noqa: E402

COLUMNS = ["shape", "precision", "cache", "batch", "new_tok_per_s", "sequences", "seconds", "peak_gib",
           "same_as_first"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="small")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the paper's rank for the shape, else 0")
    p.add_argument("--precision", default="bf16", choices=["fp32", "tf32", "bf16"])
    p.add_argument("--configs", default="dynamic:64,static:64")
    p.add_argument("--questions", type=int, default=64, help="math questions (paper eval: 256 x 5 samples)")
    p.add_argument("--samples", type=int, default=5, help="sampled answers per question (paper: 5)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (then 1 answer per question)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-median", type=int, default=120, help="median chat-formatted GSM8K prompt length")
    common.add_run_args(p)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, rank = common.start(args, "generation")
    apply_matmul_policy(args.precision)
    model = common.build_model(args.shape, device=device, lora_rank=rank, attn=args.attn, seed=args.seed,
                               frozen_bf16=args.frozen_bf16).eval()
    vocab = common.SHAPES[args.shape][1]["vocab_size"]
    import random

    rng = random.Random(args.seed)
    lens = common.lognormal_lengths(args.questions, median=args.prompt_median, sigma=0.3, lo=40, hi=400,
                                    seed=args.seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]
    per = 1 if args.greedy else args.samples
    rows, first = [], None
    for cfg in args.configs.split(","):
        cache, batch = cfg.split(":")
        static, compile_ = cache.startswith("static"), cache.endswith("+compile")
        decoding = Decoding(samples=args.samples, greedy=args.greedy, temperature=1.0,
                            max_new_tokens=args.new_tokens, batch_size=int(batch), seed=args.seed,
                            static_cache=static, compile=compile_, dtype=args.precision)
        kw = dict(pad_id=0, eos_id=vocab + 7, device=device)
        # warm-up on one batch (kernels; with compile, the graphs of the common shapes)
        generate_ids(model, prompts[: max(1, int(batch) // per)], decoding=replace(decoding, max_new_tokens=4), **kw)
        common.reset_peak(device)
        with common.Timer(device) as t:
            out = generate_ids(model, prompts, decoding=decoding, **kw)
        new = sum(len(s) for q in out for s in q)
        if first is None:
            first = out
        rows.append({"shape": args.shape, "precision": args.precision, "cache": cache, "batch": int(batch),
                     "new_tok_per_s": new / t.seconds, "sequences": len(prompts) * per, "seconds": t.seconds,
                     "peak_gib": common.peak_memory_gib(device),
                     "same_as_first": out == first if args.greedy else "n/a (sampled)"})
        print(f"  {cache}:{batch}: {new / t.seconds:,.0f} new tok/s", flush=True)
    header = {**common.machine(), "shape": args.shape, "lora_rank": rank, "attn": args.attn,
              "questions": args.questions, "samples": per, "new_tokens": args.new_tokens,
              "prompt_median": args.prompt_median}
    common.emit(rows, header, args.json, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
