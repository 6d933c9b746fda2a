"""CPU cost of one evaluation step with prediction vectors (probe set + distances to theta_r) vs without.

The evaluator (reteq.eval.evaluator) runs at step 0 and every `eval_every` unlearning steps. With retrain
equivalence on, each eval step also scores the probe set (reteq.eval.probe): one teacher-forced pass over
`probe_size` pairs, the target-token log-probs kept and a token KL against theta_r's in-memory distributions.
This times `Evaluator.raw` on the built-in tiny model at the demo's eval settings (forget + TOFU scoring; math
generation left out, it costs the same either way), both ways, and prints the machine.

    python bench/re_eval_cost.py [--probe-size 64] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from reteq.config import EvalConfig  # noqa: E402
from reteq.data.synthetic import generate  # noqa: E402
from reteq.eval.evaluator import Evaluator  # noqa: E402
from reteq.eval.probe import Probe, probe_pairs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--probe-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reteq.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = EvalConfig(metrics=["forget", "tofu"], forget_prompts=12, knowledge_prompts=32, batch_size=64)
    stages = {"inst": generate("instruct", 128), "tofu": generate("knowledge", 128), "math": generate("math", 128),
              "U": generate("refusal", 128)}
    heldout = [(q, "5") for q, _ in ((c["messages"][0]["content"], None) for c in generate("math", 16, seed=9))]
    ev = Evaluator.build(cfg, tok, stages["U"], stages["tofu"], [])
    probe = Probe.build(tok, probe_pairs(args.probe_size, 0, stages, "U", heldout), cfg.batch_size)
    t0 = time.perf_counter()
    probe.set_reference(model, torch.device("cpu"))
    reference_s = time.perf_counter() - t0

    def timed(with_probe: bool) -> list[float]:
        ev.probe = probe if with_probe else None
        out = []
        for step in range(args.repeats + 1):
            t = time.perf_counter()
            ev.raw(model, torch.device("cpu"), step=step)
            out.append(time.perf_counter() - t)
        return out[1:]  # the first call warms up

    without, with_ = timed(False), timed(True)
    res = {"machine": common.machine(), "probe_pairs": len(probe.triples), "repeats": args.repeats,
           "eval_without_s": statistics.median(without), "eval_with_s": statistics.median(with_),
           "reference_once_s": reference_s,
           "vector_bytes_per_step": probe.table().filter(probe.table()["step"] == 1).estimated_size()}
    res["overhead"] = res["eval_with_s"] / res["eval_without_s"] - 1
    print(json.dumps(res["machine"]))
    print(f"probe pairs {res['probe_pairs']}: eval step without vectors {res['eval_without_s'] * 1e3:.0f} ms, "
          f"with {res['eval_with_s'] * 1e3:.0f} ms (+{res['overhead']:.0%}); theta_r reference once per leaf "
          f"{reference_s * 1e3:.0f} ms; vectors in memory ~{res['vector_bytes_per_step']} bytes per eval step")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
