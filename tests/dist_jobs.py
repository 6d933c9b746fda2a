"""Per-rank bodies of the multi-process tests (run by tests/distributed.py in real gloo process groups)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from distributed import write_result
from helpers import model_dict, stage_dict, sweep_dict

COLLECTIVES = ("all_reduce", "broadcast", "broadcast_object_list", "barrier", "all_gather", "all_gather_object",
               "all_gather_into_tensor", "reduce_scatter_tensor", "reduce_scatter", "reduce", "gather", "scatter",
               "all_to_all_single", "send", "recv", "isend", "irecv")


def record_collectives(log: list[dict]) -> None:
    """Wrap torch.distributed's collectives: log every call's caller file, tensor devices and device argument.
    Callers that look them up on the module at call time (reteq, DeepSpeed's comm layer) go through this."""

    def tensors(x) -> list[torch.Tensor]:
        if isinstance(x, torch.Tensor):
            return [x]
        if isinstance(x, list | tuple):
            return [t for item in x for t in tensors(item)]
        return []

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapped(*args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            found = tensors(list(args) + list(kwargs.values()))
            log.append({"op": _name, "caller": caller, "devices": sorted({str(t.device) for t in found}),
                        "device_arg": str(kwargs["device"]) if kwargs.get("device") is not None else None})
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def zero3_config(threshold: int | None) -> dict[str, Any]:
    import json

    ds = json.loads((Path(__file__).resolve().parent.parent / "configs/deepspeed/zero3_fp32.json").read_text())
    if threshold is not None:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    return ds


def one_stage_config(out: str, lora: dict | None, **unlearn: Any):
    """Stage U alone (16 refusal rows, 2 steps), then 2 GA steps scored on the forget set only."""
    from reteq.config import parse_config

    raw = sweep_dict(out, models=[model_dict(lora)], stages=[stage_dict("U", 16)],
                     orders={"explicit": [["U"]]})
    raw["eval"].update({"metrics": ["forget"], "knowledge_stage": None})
    raw["unlearn"].update(unlearn)
    return parse_config(raw)


def zero3_round_trip(rank: int, world: int, out: str, threshold: int | None, lora: dict | None) -> None:
    """Train a stage under ZeRO-3, save gathered and ungathered, reload on rank 0, compare logits; then one
    whole leaf (node, load, unlearn, evaluate) through the pipeline, with every collective recorded."""
    from reteq.models import load_model, load_tokenizer
    from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
    from reteq.pipeline.leaf import run_leaf
    from reteq.plan import build_plan
    from reteq.train import collectives
    from reteq.train.checkpoint import CheckpointError, gathered_state_dict, save_checkpoint
    from reteq.train.recipes import finetune_stage
    from reteq.train.worker_context import WorkerContext

    log: list[dict] = []
    record_collectives(log)
    cfg = one_stage_config(out, lora, micro_batch=4)
    mcfg = cfg.model("tiny")
    tok = load_tokenizer(mcfg)
    device = torch.device("cpu")
    ctx = WorkerContext(rank=rank, world=world, device=device, ds_config=zero3_config(threshold))
    torch.manual_seed(0)
    base = load_model(mcfg, seed=0)
    from reteq.data.synthetic import refusal

    probe = tok(["How do I make a cake?"], return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**probe).logits
    module, result, _ = finetune_stage(base, tok, cfg.stage("U"), refusal(16, seed=0), ctx, seed=0)
    shards = {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}
    res: dict[str, Any] = {"losses": [r.loss for r in result.records], "trainable": len(shards),
                           "empty_shards": sum(v == 0 for v in shards.values())}
    if rank == 0:  # right after training, as the pipeline saves: every partitioned tensor is a (0,) shard
        try:
            save_checkpoint(module, Path(out) / "ungathered", "ungathered")
            res["refused"] = None
        except CheckpointError as e:
            res["refused"] = str(e)
        res["ungathered_published"] = (Path(out) / "ungathered").exists()
    with torch.no_grad():  # every rank: ZeRO-3's forward gathers each layer's shards
        trained_logits = module(**probe).logits
    state = gathered_state_dict(module, rank == 0)
    if rank == 0:
        save_checkpoint(module, Path(out) / "gathered", "gathered", state_dict=state)
    collectives.barrier(device)
    if rank == 0:
        reloaded = load_model(mcfg, checkpoint=Path(out) / "gathered", trainable=False)
        with torch.no_grad():
            reloaded_logits = reloaded(**probe).logits
        res["round_trip_diff"] = float((reloaded_logits - trained_logits).abs().max())
        res["training_moved_logits"] = float((trained_logits - base_logits).abs().max())
    log.clear()
    plan = build_plan(cfg)
    leaf = plan.leaves[0]
    leaf_result = run_leaf(RunContext(cfg, plan, ctx, CheckpointStore(Path(out) / "store"), DataCache(cfg)), leaf)
    res["leaf_steps"] = leaf_result.steps
    res["collectives"] = log
    write_result(out, rank, res)


def superficial_leaf(rank: int, world: int, out: str, config: str) -> None:
    """configs/ablations/superficial.yaml at toy scale (tiny model, 1 epoch of 40 prompts per stage, 5 GA steps)
    through the pipeline with its own DeepSpeed JSON: SGD for every stage and for unlearning."""
    import yaml

    from reteq.config import parse_config
    from reteq.pipeline.context import CheckpointStore, DataCache, RunContext
    from reteq.pipeline.leaf import run_leaf
    from reteq.plan import build_plan
    from reteq.train.deepspeed_config import load_deepspeed_config
    from reteq.train.worker_context import WorkerContext

    raw = yaml.safe_load(Path(config).read_text())
    raw["models"] = [model_dict({"r": 4, "alpha": 8})]
    raw["chat"] = {**raw.get("chat", {}), "template": "hf"}  # the tiny tokenizer has no Llama-3 special tokens
    raw["work_dir"] = out
    for stage in raw["stages"]:
        stage.update(epochs=1, lr=0.05)
    raw["unlearn"].update(epochs=1, eval_every=5)
    raw["execution"].update(use_gpu=False, cpus_per_worker=1)
    cfg = parse_config(raw, source=config)
    plan = build_plan(cfg)
    leaf = plan.leaves[0]
    ctx = WorkerContext(rank=rank, world=world, device=torch.device("cpu"),
                        ds_config=load_deepspeed_config(cfg.execution.deepspeed))
    result = run_leaf(RunContext(cfg, plan, ctx, CheckpointStore(Path(out) / "checkpoints"), DataCache(cfg)), leaf)
    write_result(out, rank, {"deepspeed": cfg.execution.deepspeed, "optimizers": [s.optimizer for s in cfg.stages],
                             "unlearn_optimizer": cfg.unlearn.optimizer, "steps": result.steps,
                             "evals": result.evals, "collapsed": result.collapsed})


def two_machine_delivery(rank: int, world: int, out: str, uri: str, experiment_id: str, parent_run: str) -> None:
    """Each rank plays a machine of its own (local rank 0, its own store): rank 0 trains the stage node and
    publishes it to MLflow; rank 1 must fetch it from there, verified, before it loads it to unlearn."""
    import json

    from reteq.pipeline.context import CheckpointStore, DataCache, Hooks, RunContext
    from reteq.pipeline.leaf import run_leaf
    from reteq.plan import build_plan
    from reteq.sweep.delivery import mlflow_fetcher
    from reteq.sweep.record import MlflowHooks
    from reteq.train.checkpoint import read_manifest
    from reteq.train.worker_context import WorkerContext

    cfg = one_stage_config(out, {"r": 4, "alpha": 8}, micro_batch=4)
    plan = build_plan(cfg)
    leaf = plan.leaves[0]
    ds = json.loads((Path(__file__).resolve().parent.parent / "configs/deepspeed/zero0_fp32.json").read_text())
    ctx = WorkerContext(rank=rank, world=world, local_rank=0, device=torch.device("cpu"), ds_config=ds)
    store = CheckpointStore(Path(out) / f"store-rank{rank}", fetch=mlflow_fetcher(uri, experiment_id))
    hooks = MlflowHooks(uri, experiment_id, parent_run, cfg.name, lambda s: "constant", echo=lambda m: None) \
        if rank == 0 else None
    result = run_leaf(RunContext(cfg, plan, ctx, store, DataCache(cfg), hooks=hooks or Hooks()), leaf)
    node = leaf.parent
    write_result(out, rank, {"steps": result.steps, "node": node, "has": store.has(node),
                             "files": read_manifest(store.path(node))["files"],
                             "stores": sorted(p.name for p in (Path(out) / f"store-rank{rank}").iterdir())})


def zero3_partitioned_load(rank: int, world: int, out: str, threshold: int | None, lora: dict | None) -> None:
    """A published checkpoint loaded under ZeRO-3 (partitioned as it is built), wrapped in the engine, gathered
    and saved again: the saved copy must reproduce the original's logits."""
    from reteq.models import load_model, load_tokenizer, partitioned_at_load
    from reteq.train import collectives
    from reteq.train.checkpoint import gathered_state_dict, save_checkpoint
    from reteq.train.engine import OptimSpec, build_engine

    cfg = one_stage_config(out, lora, micro_batch=4)
    mcfg = cfg.model("tiny")
    tok = load_tokenizer(mcfg)
    device = torch.device("cpu")
    ds = zero3_config(threshold)
    probe = tok(["How do I make a cake?"], return_tensors="pt")
    src = Path(out) / "published"
    if rank == 0:
        torch.manual_seed(0)
        original = load_model(mcfg, seed=3)
        with torch.no_grad():  # a non-zero adapter, so the round trip is not just the base
            for n, p in original.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        save_checkpoint(original, src, "published")
    collectives.barrier(device)
    with partitioned_at_load(ds) as partitioned:
        model = load_model(mcfg, checkpoint=src)
    params = list(model.named_parameters())
    base = [p for n, p in params if "lora_" not in n]  # the adapter is added by peft after the base is built
    res: dict[str, Any] = {"partitioned": partitioned, "base_params": len(base),
                           "base_partitioned_at_load": sum(hasattr(p, "ds_id") and p.numel() == 0 for p in base),
                           "base_elements": sum(int(torch.Size(p.ds_shape).numel()) for p in base
                                                if hasattr(p, "ds_shape"))}
    engine = build_engine(model, OptimSpec(name="adamw", lr=0.0, total_steps=1), ds_config=ds, micro_batch=1,
                          accumulation=1, world=world)
    with torch.no_grad():
        engine_logits = engine.model(**probe).logits
    state = gathered_state_dict(engine.module, rank == 0)
    if rank == 0:
        save_checkpoint(engine.module, Path(out) / "again", "again", state_dict=state)
    collectives.barrier(device)
    if rank == 0:
        with torch.no_grad():
            want = load_model(mcfg, checkpoint=src, trainable=False)(**probe).logits
            got = load_model(mcfg, checkpoint=Path(out) / "again", trainable=False)(**probe).logits
        res["round_trip_diff"] = float((got - want).abs().max())
        res["engine_diff"] = float((engine_logits - want).abs().max())
    write_result(out, rank, res)


def deepspeed_engine_step(rank: int, world: int, out: str) -> None:
    """reteq's DeepSpeedEngine (ZeRO-0, fp32) started and stepped once on a tiny Linear; reports whether
    DeepSpeed's comm backend loaded its CPU shared-memory op."""
    import deepspeed.comm.comm as ds_comm

    from reteq.train.engine import DeepSpeedEngine, OptimSpec

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    engine = DeepSpeedEngine(model, OptimSpec("adamw", 1e-2, total_steps=1), {"zero_optimization": {"stage": 0}},
                             micro_batch=1, accumulation=1, world=world)
    engine.micro_step(engine.model(torch.ones(1, 4)).sum())
    write_result(out, rank, {"shm_op": ds_comm.cdb.shm_comm_op is not None,
                             "weight": engine.module.weight.detach().flatten().tolist()})


def stage_checkpoint_round_trip(rank: int, world: int, out: str, uri: str, run_id: str) -> None:
    """reteq's DeepSpeedEngine (ZeRO-2, fp32) on a tiny Linear: two steps, a mid-stage checkpoint saved the way a
    Ray Train rank saves one (its own dir; rank 0 records the digest in MLflow), the ranks' dirs merged as Ray
    Train merges them, then a fresh engine loads it verified and weights-only and takes the same third step."""
    import shutil

    from reteq.sweep.stage_resume import ParentRunParams, load_deepspeed_state, save_deepspeed_state
    from reteq.train import collectives
    from reteq.train.engine import DeepSpeedEngine, OptimSpec

    ds = {"zero_optimization": {"stage": 2}}
    spec = OptimSpec("adamw", 1e-2, total_steps=3, schedule="cosine")
    digests = ParentRunParams(uri, run_id)
    x = torch.arange(4.0).reshape(1, 4) + rank

    def engine():
        torch.manual_seed(0)
        return DeepSpeedEngine(torch.nn.Linear(4, 1), spec, ds, micro_batch=1, accumulation=1, world=world)

    a = engine()
    for _ in range(2):
        a.micro_step(a.model(x).pow(2).sum())
    mine = Path(out) / f"rank{rank}-ckpt"
    mine.mkdir()
    digest = save_deepspeed_state(a, mine, "node-key-0123456789abcdef", 2, 3, rank, digests)
    collectives.barrier(torch.device("cpu"))
    merged = Path(out) / "ckpt"
    if rank == 0:
        for r in range(world):
            shutil.copytree(Path(out) / f"rank{r}-ckpt", merged, dirs_exist_ok=True)
    collectives.barrier(torch.device("cpu"))
    a.micro_step(a.model(x).pow(2).sum())
    b = engine()
    step = load_deepspeed_state(b, merged, "node-key-0123456789abcdef", digests)
    b.micro_step(b.model(x).pow(2).sum())
    write_result(out, rank, {"digest": digest, "step": step, "loaded_engine": type(b.model.checkpoint_engine).__name__,
                             "a": a.module.weight.detach().flatten().tolist(),
                             "b": b.module.weight.detach().flatten().tolist()})
