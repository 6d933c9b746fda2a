"""Likelihood-scoring throughput: shared-prefix (tree attention) vs padded, on the forget score's workload.

The evaluation run at every unlearning step (reteq.eval.evaluator): for each forget question, log p(target |
question) of the unlearn label and its 19 paraphrases (20 short targets sharing one prompt), plus one answer
per TOFU question. Scored with reteq.eval.scoring (`method="padded"`: one padded row per pair;
`method="shared"`: one tree per prompt, reteq.eval.prefix_scoring; `method="auto"`, the evaluator's default,
is shared under sdpa/eager attention). Random-init model of a paper shape.

Only torch + transformers + peft are imported. Examples:

    python bench/scoring_throughput.py --shape small --questions 16 --knowledge 16
    python bench/scoring_throughput.py --shape llama-3.2-1b --precisions fp32,bf16 --json out.json

Per row: pairs/s; pair tokens/s (the padded path's work, prompt repeated per target, done per second: the
like-for-like rate); computed tokens/s (positions the forward really ran, padding included); model TFLOP/s
(2 N computed tokens / s); peak memory; speed-up over padded; max |difference| from the padded scores.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from reteq.eval.prefix_scoring import plan  # noqa: E402
from reteq.eval.scoring import score_pairs  # noqa: E402
from reteq.train.precision import apply_matmul_policy  # noqa: E402

COLUMNS = ["shape", "precision", "method", "workload", "pairs_per_s", "pair_tok_per_s", "computed_tok_per_s",
           "model_tflops", "seconds", "peak_gib", "speedup", "max_abs_diff"]


def computed_tokens(pairs: list[tuple[list[int], list[int]]], batch_size: int = 32, row_tokens: int = 512,
                    ) -> tuple[int, int]:
    """(token positions the shared path computes, pads included; of them real tree tokens)."""
    if not pairs:
        return 0, 0
    trees, forwards = plan(pairs, batch_size, row_tokens)
    return sum(len(rows) * w for rows, w in forwards), sum(t.size for t in trees)


def padded_computed_tokens(pairs: list[tuple[list[int], list[int]]], batch_size: int = 32) -> int:
    """Token positions (padding included) the padded path computes for these pairs."""
    order = sorted(len(p) + len(t) for p, t in pairs)
    return sum(len(c) * max(c) for c in (order[s:s + batch_size] for s in range(0, len(order), batch_size)))


def workload(args, vocab: int) -> dict[str, list[tuple[list[int], list[int]]]]:
    """forget: questions x 20 targets of 3..12 tokens; knowledge: one 10..120-token answer per question.
    Prompt = chat-formatted question: log-normal length (median args.prompt_median, clipped 24..512)."""
    rng = random.Random(args.seed)
    lens = common.lognormal_lengths(args.questions + args.knowledge, median=args.prompt_median, sigma=0.5, lo=24,
                                    hi=512, seed=args.seed)
    targets = [[rng.randrange(3, vocab) for _ in range(rng.randint(3, 12))] for _ in range(20)]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lens]
    forget = [(prompts[q], t) for q in range(args.questions) for t in targets]
    know = [(prompts[args.questions + k], [rng.randrange(3, vocab) for _ in range(rng.randint(10, 120))])
            for k in range(args.knowledge)]
    out = {}
    if forget:
        out["forget"] = forget
    if know:
        out["knowledge"] = know
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(common.SHAPES), default="small")
    p.add_argument("--lora-rank", type=int, default=None, help="default: the paper's rank for the shape, else 0")
    p.add_argument("--precisions", default="fp32")
    p.add_argument("--methods", default="padded,shared", help="padded | shared | auto (what the evaluator "
                   "runs: shared under sdpa/eager)")
    p.add_argument("--questions", type=int, default=64, help="forget questions (paper eval: 64) x 20 targets")
    p.add_argument("--knowledge", type=int, default=64, help="TOFU-like single-answer pairs")
    p.add_argument("--prompt-median", type=int, default=100, help="median chat-formatted prompt length")
    p.add_argument("--batch-size", type=int, default=64, help="eval.batch_size: pairs per padded forward")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats (the median is reported)")
    common.add_run_args(p)
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device, rank = common.start(args, "scoring")
    model = common.build_model(args.shape, device=device, lora_rank=rank, attn=args.attn, seed=args.seed,
                               frozen_bf16=args.frozen_bf16).eval()
    n_params = common.matmul_params(model)
    work = workload(args, common.SHAPES[args.shape][1]["vocab_size"])
    rows = []
    for precision in args.precisions.split(","):
        apply_matmul_policy(precision)
        for name, pairs in work.items():
            pair_tokens = sum(len(p) + len(t) for p, t in pairs)
            results = {}
            for method in args.methods.split(","):
                if method in ("auto", "shared"):  # auto = shared on sdpa/eager
                    computed = computed_tokens(pairs, args.batch_size)[0]
                else:
                    computed = padded_computed_tokens(pairs, args.batch_size)
                score_pairs(model, pairs[: args.batch_size], pad_id=0, batch_size=args.batch_size,
                            device=device, dtype=precision, method=method)  # warm-up
                common.reset_peak(device)
                times = []
                for _ in range(args.repeats):
                    with common.Timer(device) as t:
                        scores = score_pairs(model, pairs, pad_id=0, batch_size=args.batch_size, device=device,
                                             dtype=precision, method=method)
                    times.append(t.seconds)
                secs = sorted(times)[len(times) // 2]
                results[method] = scores
                rows.append({"shape": args.shape, "precision": precision, "method": method, "workload": name,
                             "pairs": len(pairs), "pairs_per_s": len(pairs) / secs,
                             "pair_tok_per_s": pair_tokens / secs, "computed_tok_per_s": computed / secs,
                             "model_tflops": 2 * n_params * computed / secs / 1e12, "seconds": secs,
                             "peak_gib": common.peak_memory_gib(device)})
                print(f"  {precision} {name} {method}: {len(pairs) / secs:,.1f} pairs/s", flush=True)
            base = next((r for r in rows if r["precision"] == precision and r["workload"] == name
                         and r["method"] == "padded"), None)
            for r in rows:
                if r["precision"] == precision and r["workload"] == name:
                    r["speedup"] = base["seconds"] / r["seconds"] if base else float("nan")
                    if "padded" in results:
                        r["max_abs_diff"] = max(abs(a - b) for a, b in zip(results[r["method"]], results["padded"]))
    header = {**common.machine(), "shape": args.shape, "lora_rank": rank, "attn": args.attn,
              "questions": args.questions, "knowledge": args.knowledge, "prompt_median": args.prompt_median,
              "batch_size": args.batch_size}
    common.emit(rows, header, args.json, COLUMNS)
    return rows


if __name__ == "__main__":
    main()
