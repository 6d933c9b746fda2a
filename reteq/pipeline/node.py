"""A stage node's work: finetune one stage from its parent's checkpoint and publish the node's checkpoint
(`train_node`); in one process, a chain of them from the deepest published one (`ensure_chain`)."""

from __future__ import annotations

from pathlib import Path

import torch

from reteq import tracking as T
from reteq.data.tokenize import configure_chat
from reteq.models import load_model, load_tokenizer, partitioned_at_load
from reteq.pipeline.context import RunContext
from reteq.plan import StageNode
from reteq.train import collectives
from reteq.train.checkpoint import gathered_state_dict, save_checkpoint
from reteq.train.recipes import finetune_stage
from reteq.train.worker_context import WorkerContext


def _broadcast(obj, ctx: WorkerContext):
    return obj if ctx.world == 1 else collectives.broadcast_object(obj, ctx.device)


def ensure_chain(run: RunContext, key: str) -> Path:
    """One process or one worker group: the checkpoint of node `key`, training its missing ancestors first, in
    order, from the deepest published one (the main rank decides; a rank on another machine fetches it).

    The sweep does not come here: there every node is its own Ray task (reteq.sweep.nodes)."""
    ctx, chain = run.worker, run.plan.chain(key)
    found = None
    if ctx.is_main:
        found = next((i for i in range(len(chain) - 1, -1, -1) if run.store.has(chain[i].key)), -1)
    found = _broadcast(found, ctx)
    parent = None
    if found >= 0:
        if ctx.is_main:
            run.hooks.node_skipped(chain[found], run.store.path(chain[found].key))
        parent = run.store.ensure_local(chain[found].key, ctx)
    for node in chain[found + 1:]:
        parent = train_node(run, node, parent)
    assert parent is not None
    return parent


def train_node(run: RunContext, node: StageNode, parent: Path | None, resume=None) -> Path:
    """Train one stage node from its parent's checkpoint (None: the base model) and publish its checkpoint.
    `resume` (reteq.sweep.stage_resume, Ray Train only): continue from a mid-stage checkpoint, save new ones."""
    cfg, ctx, hooks = run.cfg, run.worker, run.hooks
    mcfg = cfg.model(node.model)
    tokenizer = configure_chat(load_tokenizer(mcfg), cfg.chat)
    torch.manual_seed(node.seed)
    with partitioned_at_load(ctx.ds_config):  # ZeRO-3: each rank builds and loads only its shards
        model = load_model(mcfg, checkpoint=parent, seed=node.seed)
    model = model.to(ctx.device)
    if ctx.is_main:
        hooks.node_started(node)
        hooks.run_params(node.key, T.protocol_params(cfg))
        if resume is not None and resume.step:
            hooks.node_resumed(node, resume.step)
    stage_seed = (int(node.key[:8], 16) + node.seed) % (2**31)  # deterministic across processes
    module, result, stats = finetune_stage(
        model, tokenizer, cfg.stage(node.stage, node.schedule), run.data.stage(node.stage), ctx, stage_seed,
        on_step=(lambda r: hooks.node_step(node, r)) if ctx.is_main else None, resume=resume)
    if result.collapsed:
        raise RuntimeError(f"stage {node.stage} of {node.model}: non-finite loss")
    path = run.store.path(node.key)
    state = gathered_state_dict(module, ctx.is_main)  # every rank takes part under ZeRO-3; None otherwise
    if ctx.is_main:
        meta = {"model": node.model, "prefix": list(node.prefix), "seed": node.seed, "parent": node.parent}
        save_checkpoint(module, path, node.key, meta, state_dict=state)
        stats = {**stats, "final_loss": result.records[-1].loss if result.records else float("nan"),
                 "tokens_per_s": _mean_tps(result.records)}
        hooks.node_done(node, path, stats)
    if ctx.world > 1:  # main has published and recorded the node before any rank (or machine) looks for it
        collectives.barrier(ctx.device)
    return run.store.ensure_local(node.key, ctx)  # ranks on other machines fetch what main published


def _mean_tps(records) -> float:
    tokens = sum(r.tokens for r in records)
    secs = sum(r.seconds for r in records)
    return tokens / secs if secs else float("nan")
