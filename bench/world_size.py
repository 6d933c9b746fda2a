"""Results across worker counts: one config's stage nodes and leaves at 1 worker and at N, and the largest difference.

Every per-step loss and eval metric of every node and leaf is traced (reteq.sweep.worlds) at each worker count,
in its own checkpoint store, and compared with the first count's; the largest |difference| per quantity is
printed, then the largest of all against reteq.sweep.worlds.TOLERANCE. The global batch is the config's, so
fewer workers accumulate more micro-batches (every stage's and unlearn's global_batch must divide by
micro_batch x the largest count).

    # the tiny model, 1 and 2 CPU workers under ZeRO-2 (gloo), about a minute on 2 cores
    python bench/world_size.py configs/ablations/workers_tiny.yaml --workers 1,2 \
        --deepspeed configs/deepspeed/zero2_fp32.json
    # SmolLM2-135M (configs/ablations/smol_workers2.yaml), one order's stage nodes + one GA leaf, cut short
    nice python bench/world_size.py configs/ablations/smol_workers2.yaml --workers 1,2 --launcher ray \
        --order tofu,U --algorithms ga --stage-steps 2 --unlearn-steps 2 --set "seeds=[0]" ...
    # GPUs (bench/gpu_suite.sh): 1 GPU and every GPU of the node, NCCL, no Ray
    python bench/world_size.py configs/ablations/workers_tiny.yaml --gpu --workers 1,all

Launchers: `torch` (default) starts one process per rank in a gloo group (CPU) or NCCL group (GPU: rank r on
cuda:r), with only torch + transformers + peft + pydantic (+ deepspeed); `ray` runs the ranks as Ray Train
workers of a local Ray (as `reteq sweep` runs a multi-worker node or leaf). One CPU worker under ZeRO-0 trains
with plain torch, as the sweep does.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

import yaml  # noqa: E402  (transformers' dependency: on the GPU image too)

from reteq.config import parse_config  # noqa: E402
from reteq.config_files import read_yaml_mapping  # noqa: E402
from reteq.errors import BadInput  # noqa: E402
from reteq.pipeline.context import DataCache  # noqa: E402
from reteq.pipeline.preflight import preflight  # noqa: E402
from reteq.sweep.worlds import TOLERANCE, differences, largest  # noqa: E402  (no Ray at import)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a sweep YAML")
    p.add_argument("--workers", default="1,2", help="comma list of worker counts, the first is the baseline; "
                   "'all' = every GPU of this machine")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON, or 'none' for plain torch (default: the "
                   "config's execution.deepspeed)")
    p.add_argument("--launcher", choices=("torch", "ray"), default="torch")
    p.add_argument("--gpu", action="store_true", help="one GPU per rank (NCCL); sets execution.use_gpu")
    p.add_argument("--order", default=None, help="one stage order, e.g. inst,U (default: the config's orders)")
    p.add_argument("--algorithms", default=None, help="comma list of the config's methods to run (default: all)")
    p.add_argument("--stage-steps", type=int, default=None, help="cut every stage to this many optimizer steps")
    p.add_argument("--unlearn-steps", type=int, default=None, help="unlearning steps (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=YAML",
                   help="override a config field, e.g. eval.math_questions=2 (repeatable)")
    p.add_argument("--work", default=None, help="where stores and traces go (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the traces and differences here")
    return p.parse_args(argv)


def shaped_config(args: argparse.Namespace) -> dict:
    """The config as the comparison runs it: one order, the chosen methods, stages cut to --stage-steps."""
    raw = read_yaml_mapping(args.config)
    if args.order:  # an explicit order is a permutation of the declared stages: keep only its own
        order = args.order.split(",")
        raw["orders"] = {"explicit": [order]}
        raw["stages"] = [s for s in raw["stages"] if s["name"] in order]
    if args.algorithms:
        keep = args.algorithms.split(",")
        raw["unlearn"]["algorithms"] = keep
        for grid in ("betas", "params"):  # the knobs of methods left out would be refused
            if isinstance(raw["unlearn"].get(grid), dict):
                raw["unlearn"][grid] = {m: v for m, v in raw["unlearn"][grid].items() if m in keep}
    if args.unlearn_steps:
        raw["unlearn"]["steps"] = args.unlearn_steps
    if args.stage_steps:  # plan_steps draws round(n x epochs) rows: exactly steps x global_batch of them
        for stage in raw["stages"]:
            stage["epochs"] = args.stage_steps * stage["global_batch"] / stage["source"]["n"]
    for item in args.set:  # a dotted path; a list item by its index (stages.0.max_length=64)
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = yaml.safe_load(value)
        else:
            node[last] = yaml.safe_load(value)
    ex = raw.setdefault("execution", {})
    if args.deepspeed:  # "none": plain torch (several workers then sum their gradients: PlainEngine)
        ex["deepspeed"] = None if args.deepspeed == "none" else args.deepspeed
    if ex.get("deepspeed") and not Path(ex["deepspeed"]).is_absolute():
        ex["deepspeed"] = str(ROOT / ex["deepspeed"])
    ex["use_gpu"] = bool(args.gpu)
    return raw


def worker_counts(spec: str, gpu: bool) -> list[int]:
    import torch

    every = torch.cuda.device_count() if gpu else os.cpu_count() or 1
    return [every if w == "all" else int(w) for w in spec.split(",")]


# ---- torch launcher: one process per rank ---------------------------------------------------------------------

def rank_main(rank: int, world: int, raw: dict, store: str, out: str, port: int, gpu: bool) -> None:
    """One rank (torch.multiprocessing.spawn): join the group, trace, rank 0 writes the trace."""
    import torch
    import torch.distributed as dist

    from reteq.sweep.worlds import engine_config, trace
    from reteq.train.deepspeed_config import load_deepspeed_config
    from reteq.train.worker_context import WorkerContext

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    if gpu:
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    cfg = parse_config(raw)
    ds = load_deepspeed_config(cfg.execution.deepspeed) if cfg.execution.deepspeed else None
    ds = engine_config(ds, world, gpu)
    if ds is not None or world > 1:  # DeepSpeed wants a process group even for one rank
        dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    ctx = WorkerContext(rank=rank, world=world, local_rank=rank, device=device, ds_config=ds,
                        dtype=cfg.models[0].dtype, packing=cfg.execution.packing)
    result = trace(cfg, ctx, store)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def trace_with_processes(raw: dict, world: int, store: Path, out: Path, gpu: bool) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_main, args=(world, raw, str(store), str(out), port, gpu), nprocs=world, join=True)
    return json.loads(out.read_text())


def trace_with_ray(raw: dict, world: int, store: Path, out: Path, work: Path) -> dict:
    import ray

    from reteq.sweep.remote import trace_with_ray_train
    from reteq.train.deepspeed_config import load_deepspeed_config

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", include_dashboard=False,
                 log_to_driver=False)
    raw = {**raw, "execution": {**raw["execution"], "cpus_per_worker": round(0.95 * (os.cpu_count() or 1) / world, 2)}}
    cfg = parse_config(raw)
    ds = load_deepspeed_config(cfg.execution.deepspeed) if cfg.execution.deepspeed else None
    return trace_with_ray_train(cfg, world, [{"ds": ds, "store": str(store), "out": str(out)}], work / "ray",
                                f"w{world}")[0]


def main(argv=None) -> int:
    args = parse_args(argv)
    for k, v in {"TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        os.environ.setdefault(k, v)
    if not args.gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:  # bad input stops here, one line, before any rank starts
        raw = shaped_config(args)
        parse_config(raw, source=args.config)
    except (BadInput, OSError, KeyError, IndexError, ValueError, TypeError) as e:
        print(e if isinstance(e, BadInput) else f"{args.config}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    counts = worker_counts(args.workers, args.gpu)
    if len(set(counts)) == 1:
        print(f"one worker count ({counts[0]}): this compares two runs of it (repeatability only)", flush=True)
    cfg = parse_config(raw, source=args.config)
    for where, part in [(f"stages.{s.name}", s) for s in cfg.stages] + [("unlearn", cfg.unlearn)]:
        if part.global_batch % (part.micro_batch * max(counts)):
            print(f"{args.config}: {where}: global_batch {part.global_batch} does not split into micro-batches of "
                  f"{part.micro_batch} over {max(counts)} workers", file=sys.stderr)
            return 2
    try:  # models built or converted once (the tiny model, a GGUF file), every stage's data readable
        preflight(cfg, DataCache(cfg))
    except BadInput as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 2
    work = Path(args.work or tempfile.mkdtemp(prefix="reteq-worlds-")).resolve()
    raw["work_dir"] = str(work / "work")
    print(f"{args.config}: workers {counts}, launcher {args.launcher}, deepspeed {raw['execution'].get('deepspeed')}, "
          f"{'GPU' if args.gpu else 'CPU'}; work in {work}", flush=True)
    traces = []
    for world in counts:
        where = work / f"workers{world}"
        where.mkdir(parents=True, exist_ok=True)
        started = time.time()
        if args.launcher == "ray":
            t = trace_with_ray(raw, world, where / "store", where / "trace.json", work)
        else:
            t = trace_with_processes(raw, world, where / "store", where / "trace.json", args.gpu)
        traces.append(t)
        print(f"{world} worker(s) ({t['engine']}, ZeRO-{t['zero']}): {len(t['nodes'])} nodes, {len(t['leaves'])} "
              f"leaves in {time.time() - started:.0f} s", flush=True)
    report = {}
    for world, t in zip(counts[1:], traces[1:], strict=True):
        diffs = differences(traces[0], t)
        name, worst = largest(diffs)
        report[f"{counts[0]}-vs-{world}"] = diffs
        for k, v in diffs.items():
            print(f"  {counts[0]} vs {world} workers  {k:28s} max |diff| {v:.2e}")
        verdict = "within" if worst <= TOLERANCE else "ABOVE"
        print(f"LARGEST DIFFERENCE {counts[0]} vs {world} workers: {worst:.2e} ({name}), {verdict} the tolerance "
              f"{TOLERANCE:g}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"workers": counts, "traces": traces, "differences": report}, indent=1))
    return 0 if all(largest(d)[1] <= TOLERANCE for d in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
