"""Does each finetuning stage measurably change the model? The base model and every published stage node of one
learning order, scored with the sweep's own evaluator (forget targets, knowledge answers, math accuracy).

What it checks for a real-model config (configs/smol.yaml): the unlearn label's log-prob rises after S_U, the
knowledge stage's answers rise after it, math answers keep the '####' format after the math stage, and the forget
score's targets sit above chance (log 1/vocab) where unlearning starts.

    python bench/stage_effects.py configs/smol.yaml --order inst,tofu,math,U --seed 0

Reads the checkpoints a finished `reteq sweep` (or `reteq run-path`) left in the config's work dir; a node that
is not there is reported as missing, nothing is trained.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing

from reteq import tracking as T  # noqa: E402
from reteq.config import load_config  # noqa: E402
from reteq.data.tokenize import configure_chat  # noqa: E402
from reteq.models import load_model, load_tokenizer  # noqa: E402
from reteq.pipeline.context import DataCache  # noqa: E402
from reteq.pipeline.leaf import build_evaluator  # noqa: E402
from reteq.plan import node_key  # noqa: E402
from reteq.train.checkpoint import is_complete  # noqa: E402
from reteq.workdir import resolve_work_dir  # noqa: E402

COLUMNS = ((T.M_FORGET_LABEL, "label_logp"), (T.M_FORGET_PARAPHRASE, "para_logp"), (T.M_TOFU_LOGP, "tofu_logp"),
           (T.M_MATH_ACC, "math_acc"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--order", default=None, help="comma-separated stage order (default: the config's first)")
    p.add_argument("--seed", type=int, default=None, help="default: the config's first seed")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    order = tuple(args.order.split(",")) if args.order else cfg.stage_orders()[0]
    seed = cfg.seeds[0] if args.seed is None else args.seed
    mcfg = cfg.models[0]
    tok = configure_chat(load_tokenizer(mcfg), cfg.chat)
    data = DataCache(cfg)
    evaluator = build_evaluator(cfg, tok, data, seed)  # the sweep's own eval sample
    root = resolve_work_dir(cfg.work_dir) / "checkpoints"
    chance = -math.log(len(tok))
    print(f"model {mcfg.name} ({mcfg.source}), order {'>'.join(order)}, seed {seed}; chance = {chance:.2f} "
          f"nats/token; {len(evaluator.forget_questions)} forget questions x {len(evaluator.forget_targets)} "
          f"targets, {len(evaluator.knowledge_pairs)} knowledge answers, {len(evaluator.math_items)} math questions")
    print(f"{'after':>24}  " + "  ".join(f"{name:>10}" for _, name in COLUMNS) + "   seconds")
    for i in range(len(order) + 1):
        prefix = order[:i]
        if prefix:
            key = node_key(cfg, mcfg.name, prefix, seed)
            if not is_complete(root / key, key):
                print(f"{'>'.join(prefix):>24}  missing ({root / key})")
                continue
            model = load_model(mcfg, root / key, trainable=False)
        else:
            model = load_model(mcfg, seed=seed, trainable=False)  # the base (a zero-initialised LoRA is a no-op)
        t = time.perf_counter()
        raw = evaluator.raw(model, torch.device("cpu"))
        cells = "  ".join(f"{raw.get(metric, float('nan')):10.3f}" for metric, _ in COLUMNS)
        print(f"{'>'.join(prefix) or 'base':>24}  {cells}   {time.perf_counter() - t:6.1f}")


if __name__ == "__main__":
    main()
