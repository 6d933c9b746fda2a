"""What each unlearning method costs, relative to GA on the same batches (issue #22's cost target: a method that
needs a reference should cost no more than GA plus one cached lookup per step).

For every registered method: reteq.train.recipes.unlearn on the config's forget set, same seed (so the same
micro-batches), evaluation off, LoRA / full finetuning as the config sets it. Printed per method:
  tok/s      real forget tokens per second of optimizer steps, from the median step time (the first step is a
             warm-up, not timed); methods run interleaved for --rounds rounds and each keeps its best round
  vs GA      its tok/s over GA's (1.00 = GA's cost; < 1 costs more)
  ref s      the one reference pass before step 1 (NPO, IdkDPO, UNDIAL), cached for later leaves from the same
             start checkpoint in the same worker: paid once per checkpoint, not per step
  extra      what it computes beyond GA's single forward
A method with a retain term runs at retain_weight 1 too ("+rt" rows): at 0 (its default) it costs GA's.

    python bench/method_cost.py                                   # the tiny model (configs/demo.yaml)
    python bench/method_cost.py --config configs/smol.yaml        # SmolLM2-135M-Instruct (needs `make install`)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from common import machine, peak_memory_gib  # noqa: E402

from reteq.algorithms import ALGORITHMS, RETAIN_WEIGHT, Need  # noqa: E402
from reteq.config import load_config  # noqa: E402
from reteq.data.alternatives import idk_conversations  # noqa: E402
from reteq.data.sources import load_conversations  # noqa: E402
from reteq.data.tokenize import configure_chat, encode_dataset, plan_steps  # noqa: E402
from reteq.eval.evaluator import Evaluator  # noqa: E402
from reteq.models import load_model, load_tokenizer  # noqa: E402
from reteq.train import reference  # noqa: E402
from reteq.train.recipes import UnlearnJob, unlearn  # noqa: E402
from reteq.train.worker_context import WorkerContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def extra_work(needs: frozenset, retain: bool) -> str:
    parts = []
    if needs & {Need.LOGITS, Need.REF_LOGITS}:
        parts.append("logits kept")
    if Need.REF_LOGITS in needs:
        parts.append("ref logits looked up")
    elif Need.REF_LOGPS in needs:
        parts.append("ref log-probs looked up")
    if Need.HIDDEN in needs:
        parts.append("hidden states")
    if Need.ALTERNATIVE in needs:
        parts.append("alternative forward")
    if retain:
        parts.append("retain forward")
    return ", ".join(parts) or "none"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per method (the first is a warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker: cpus_per_worker)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all methods; each method's best is kept")
    # A small lr on purpose: at the config's lr the base model's forget log-probs saturate NPO after one step, its
    # gradients turn subnormal and every CPU step takes 2x (measured on the tiny model: 51 vs 27 ms): that is
    # float arithmetic, not the method. The work per step does not depend on the lr.
    p.add_argument("--lr", type=float, default=1e-6)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    mcfg = cfg.models[0]
    tok = configure_chat(load_tokenizer(mcfg), cfg.chat)
    base = load_model(mcfg, seed=0)
    u = cfg.unlearn.model_copy(update={"steps": args.steps, "eval_every": 10**6, "params": {}, "betas": {}})
    forget = load_conversations(cfg.stage(cfg.forget_stage).source)
    retain = load_conversations(cfg.stage(cfg.retain_stage).source) if cfg.retain_stage else None
    examples = encode_dataset(tok, forget, u.max_length)
    alt_examples = encode_dataset(tok, idk_conversations(forget), u.max_length)
    index_steps = plan_steps(len(examples), u.epochs, u.global_batch, seed=0, steps=args.steps)
    per_step = [sum(len(examples[i].input_ids) for i in s) for s in index_steps]
    evaluator = Evaluator.build(cfg.eval.model_copy(update={"metrics": []}), tok, forget, None, None)

    runs = [(name, False) for name in sorted(ALGORITHMS, key=lambda n: (n != "ga", n))]
    runs += [(name, True) for name in sorted(ALGORITHMS) if Need.RETAIN in ALGORITHMS[name].needs and retain]
    best: dict[tuple[str, bool], float] = {}
    ref_seconds: dict[tuple[str, bool], float] = {}
    for _ in range(args.rounds):  # methods interleaved, best round kept: a busy machine slows all of them alike
        for name, with_retain in runs:
            alg = ALGORITHMS[name]
            params = dict(alg.defaults) | ({RETAIN_WEIGHT: 1.0} if with_retain else {})
            reference._LAST = None  # every method pays its own reference pass here (a sweep shares it)
            model = copy.deepcopy(base)
            alternatives = alt_examples if Need.ALTERNATIVE in alg.needs else None
            t = time.perf_counter()
            ref = reference.compute_reference(
                model, alg, examples, alternatives,
                reference.Batching(u.micro_batch, tok.pad_token_id, torch.device("cpu"), True, mcfg.dtype))
            ref_s = time.perf_counter() - t if ref is not None else 0.0
            reference._LAST = None  # unlearn computes it again, untimed here (its steps are what is timed)
            torch.manual_seed(0)
            job = UnlearnJob(u, name, args.lr, params, forget, 0, retain=retain if with_retain else None)
            result = unlearn(model, tok, job, evaluator, WorkerContext(dtype=mcfg.dtype))
            seconds = [r.seconds for r in result.loop.records][1:]
            rate = sum(per_step[1:len(seconds) + 1]) / max(statistics.median(seconds) * len(seconds), 1e-9)
            key = (name, with_retain)
            best[key] = max(best.get(key, 0.0), rate)
            ref_seconds[key] = min(ref_seconds.get(key, float("inf")), ref_s)
    rows = [(name + (" +rt" if rt else ""), best[(name, rt)], ref_seconds[(name, rt)],
             extra_work(ALGORITHMS[name].needs, rt)) for name, rt in runs]
    ga = rows[0][1]

    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    print(f"model: {mcfg.source}, threads {args.threads}, {args.steps} steps of {u.global_batch} forget sequences "
          f"(micro-batch {u.micro_batch}, max_length {u.max_length})")
    print(f"{'method':>16}  {'tok/s':>9}  {'vs GA':>6}  {'ref s':>6}  extra")
    for name, rate, ref_s, extra in rows:
        print(f"{name:>16}  {rate:9,.0f}  {rate / ga:6.2f}  {ref_s:6.2f}  {extra}")
    print(f"peak RSS {peak_memory_gib(torch.device('cpu')):.2f} GiB")


if __name__ == "__main__":
    main()
