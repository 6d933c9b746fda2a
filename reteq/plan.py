"""A validated sweep compiled into a DAG: shared stage nodes and the unlearning leaves hanging off them.

A stage node is one finetuning run: (base model, stage prefix with each stage's data and hyperparameters,
seed). Its key is a content hash of exactly those, so two orders sharing a prefix (inst>tofu in both
inst>tofu>U>math and inst>tofu>math>U) share the node, and a rerun finds it again. A leaf is one unlearning
run: finetuned path x algorithm x lr x the method's knobs (beta, ...) x seed.

Retrain nodes (eval.retrain, on by default): each path's theta_r is the same order with the forget stage
removed, planned through the same `add_order`, so it is content-addressed and shared like any node. When that
order is also a prefix of a finetuned path (the p-design: inst>tofu>math is the p = 4 path's third node) it IS
that node, trained once; a node that only a retrain path needs is `retrain_only`. Either way the node's run is a
finetuning run. A leaf names its theta_r in `retrain`; it starts once both nodes are published.

Retrain records: each theta_r also gets one `RetrainRecord`, the MLflow run of kind "retrain" that evaluates it
once (the eval metrics an unlearning run logs at step 0) and points at the node's run and checkpoint: nothing
is trained or uploaded twice. Its key hashes the node key and what the evaluation depends on.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace

from reteq.algorithms import ALGORITHMS, Need
from reteq.config import SweepConfig
from reteq.data.alternatives import ALTERNATIVES_VERSION
from reteq.digest import spec_hash as _hash
from reteq.model_files import file_digest, locate_gguf

# Node keys, v2 (issue #20): labelled spans end at the turn-end token (ChatML's newline after <|im_end|>, and the
# tiny template's after <|end|>, no longer carry loss) and `cosine` is torchtune's schedule (to 0): every stage
# node trains differently, so none recorded under v1 is reused (and every leaf, whose key names its parent, too).
KEY_VERSION = "node-v2"
RECORD_KEY_VERSION = "retrain-record-v1"
# Leaf keys, v2 (2026-11-29): a leaf hashes its own unlearning settings, not the grid lists it sits in, so
# extending a grid reruns nothing that finished. One-time migration: a sweep recorded with v1 leaf keys reruns
# its unlearning leaves once (stage nodes keep their keys: no finetuning reruns); v1 leaf runs stay in MLflow.
LEAF_KEY_VERSION = "leaf-v2"
# UnlearnConfig fields that list grid values, or one value per algorithm of the grid (a leaf's own
# normalisation is in leaf_protocol), not one leaf's settings
_GRID_FIELDS = {"algorithms", "lrs", "betas", "params", "loss_normalisation", "retain_stage"}
# StageConfig fields that check the input and change no training: not in node keys
_CHECK_FIELDS = {"max_truncated_frac"}


@dataclass(frozen=True)
class StageNode:
    key: str
    model: str
    prefix: tuple[str, ...]  # stages trained so far, in order; the last one is what this node trains
    seed: int
    parent: str | None  # key of the node it continues from (None: the base model)
    examples: int  # training sequences this node processes (epochs included)
    schedule: str | None = None  # the sweep's schedule grid point (None: each stage's own schedule)
    retrain_only: bool = False  # only retrain paths need the node (no finetuned path goes through it)
    retrain_baseline: bool = False  # some leaf's theta_r is this node

    @property
    def stage(self) -> str:
        return self.prefix[-1]


@dataclass(frozen=True)
class UnlearnLeaf:
    key: str
    model: str
    order: tuple[str, ...]
    p: int  # 1-based position of the forget stage
    algorithm: str
    lr: float
    params: dict[str, float]  # the method's knobs by name, e.g. {"beta": 0.5}; {} for GA
    seed: int
    parent: str  # the last stage node of its finished finetuning order
    schedule: str | None = None
    retrain: str | None = None  # key of the retrain node theta_r; must also be published before the leaf starts

    @property
    def trial_id(self) -> str:
        return self.key[:8]

    @property
    def beta(self) -> float | None:
        """The `beta` knob (NPO, SimNPO), as MLflow's beta tag and param and the sweep's beta axis name it."""
        return self.params.get("beta")


@dataclass(frozen=True)
class RetrainRecord:
    """theta_r's evaluation, recorded as one MLflow run of kind "retrain" (see the module docstring)."""

    key: str
    node: str  # the retrain node theta_r
    model: str
    order: tuple[str, ...]  # theta_r's stage order (the node's prefix)
    seed: int
    schedule: str | None = None


@dataclass
class Plan:
    nodes: dict[str, StageNode] = field(default_factory=dict)
    leaves: list[UnlearnLeaf] = field(default_factory=list)
    stage_runs_without_sharing: int = 0
    finetune_keys: set[str] = field(default_factory=set)  # nodes some finetuned path needs
    retrain_keys: set[str] = field(default_factory=set)  # nodes that are some path's theta_r
    records: dict[str, RetrainRecord] = field(default_factory=dict)  # record key -> theta_r's record

    def chain(self, key: str) -> list[StageNode]:
        """The nodes from the base model to `key`, in training order."""
        out = []
        k: str | None = key
        while k is not None:
            out.append(self.nodes[k])
            k = self.nodes[k].parent
        return out[::-1]

    def add_order(self, cfg: SweepConfig, model: str, order: tuple[str, ...], seed: int,
                  schedule: str | None = None, retrain: bool = False) -> str:
        """Add the stage nodes of one finetuning order (reusing shared prefixes); return its last node's key.

        retrain=True: the order of a theta_r; its nodes are `retrain_only` unless a finetuned order needs them."""
        parent = None
        for i in range(len(order)):
            prefix = tuple(order[: i + 1])
            key = node_key(cfg, model, prefix, seed, schedule)
            self.stage_runs_without_sharing += not retrain  # counts finetuned paths only; see retrain_* in summary
            if key not in self.nodes:
                self.nodes[key] = StageNode(key, model, prefix, seed, parent, _stage_examples(cfg, prefix[-1]),
                                            schedule)
            if not retrain:
                self.finetune_keys.add(key)
            self._mark(key)
            parent = key
        assert parent is not None, "an order has at least one stage"
        if retrain:
            self.retrain_keys.add(parent)
            self._mark(parent)
        return parent

    def add_retrain(self, cfg: SweepConfig, model: str, order: tuple[str, ...], seed: int,
                    schedule: str | None = None) -> str | None:
        """The retrain node of `order` (the order without the forget stage); None when nothing is left."""
        retain = tuple(s for s in order if s != cfg.forget_stage)
        if not retain:
            return None
        key = self.add_order(cfg, model, retain, seed, schedule, retrain=True)
        record = RetrainRecord(record_key(cfg, key), key, model, retain, seed, schedule)
        self.records.setdefault(record.key, record)
        return key

    def record_of(self, node_key: str) -> RetrainRecord | None:
        """The retrain record of theta_r node `node_key` (None when no path has it as theta_r)."""
        return next((r for r in self.records.values() if r.node == node_key), None)

    def _mark(self, key: str) -> None:
        node = self.nodes[key]
        only = key not in self.finetune_keys
        baseline = key in self.retrain_keys
        if (node.retrain_only, node.retrain_baseline) != (only, baseline):
            self.nodes[key] = replace(node, retrain_only=only, retrain_baseline=baseline)

    def summary(self) -> dict:
        return {
            "stage_nodes": len(self.nodes),
            "stage_runs_without_sharing": self.stage_runs_without_sharing,
            "retrain_nodes": len(self.retrain_keys),
            "retrain_nodes_shared": len(self.retrain_keys & self.finetune_keys),
            "retrain_only_nodes": sum(n.retrain_only for n in self.nodes.values()),
            "retrain_runs": len(self.records),  # MLflow runs of kind "retrain": one evaluation record per theta_r
            "unlearn_runs": len(self.leaves),
            "trials": len(self.leaves),
        }


def _stage_examples(cfg: SweepConfig, name: str) -> int:
    s = cfg.stage(name)
    n = s.source.n or 64 if s.source.kind == "synthetic" else s.source.n
    if n is None:  # unknown until data is prepared: assume the paper's sizes for the estimate
        n = {"inst": 4000, "tofu": 4000, "math": 8000, "U": 4620}.get(name, 4000)
    return int(round(n * s.epochs))


def node_protocol(cfg: SweepConfig) -> dict:
    """Protocol choices that change a stage node's training (docs/fidelity.md): how conversations render, and
    the CPU's denormal flushing where it applies (it can change numbers below 1.2e-38, so a checkpoint says which
    setting produced it; keys recorded before the setting existed are those of GPU runs or of flushing off)."""
    out: dict = {"chat": cfg.chat.model_dump(mode="json")}
    if cfg.execution.flushes_denormals:
        out["flush_denormal"] = True
    return out


# EvalConfig fields added after leaf keys v2, in a key only when set away from their default (None / every group
# at every eval step), so every key recorded before them is unchanged
_LATER_EVAL_FIELDS = ("dtype", "schedule")


def eval_identity(cfg: SweepConfig) -> dict:
    """The eval settings in a leaf's or a retrain record's key."""
    e = cfg.eval
    defaults = type(e)()
    later = {f for f in _LATER_EVAL_FIELDS if getattr(e, f) == getattr(defaults, f)}
    return e.model_dump(mode="json", exclude=later)


def leaf_protocol(cfg: SweepConfig, algorithm: str) -> dict:
    """Protocol choices that change an unlearning leaf beyond its parent node (docs/fidelity.md)."""
    e, u = cfg.eval, cfg.unlearn
    return {**node_protocol(cfg), "normalisation": u.normalisation(algorithm), "adapter": u.adapter,
            "unlearn_label": e.unlearn_label, "math_prompt": e.math_prompt, "forget_prompts": e.forget_prompts,
            "knowledge_prompts": e.knowledge_prompts, "sample_seed": e.sample_seed}


def model_identity(cfg: SweepConfig, model: str) -> dict:
    """What names a base model in a node key: its config without its display name; for a local GGUF file also
    its sha256, so another file at the same path (or package version) never reuses a checkpoint. `gguf_file`
    joins only when set."""
    mcfg = cfg.model(model)
    m = mcfg.model_dump(mode="json", exclude={"name"})
    if m.get("gguf_file") is None:
        m.pop("gguf_file", None)
    path = locate_gguf(mcfg.source, mcfg.gguf_file)
    if path is not None:
        m["weights_sha256"] = file_digest(path)
    return m


def node_key(cfg: SweepConfig, model: str, prefix: tuple[str, ...], seed: int, schedule: str | None = None) -> str:
    m = model_identity(cfg, model)
    stages = [cfg.stage(s, schedule).model_dump(mode="json", exclude=_CHECK_FIELDS) for s in prefix]
    return _hash([KEY_VERSION, m, stages, seed, node_protocol(cfg)])


def leaf_key(cfg: SweepConfig, parent: str, algorithm: str, lr: float, params: dict[str, float], seed: int,
             ) -> str:
    """What changes a leaf's result: its parent node (model, data, stages, seed), its own algorithm, lr, params
    and seed, the shared unlearning settings (steps, batch, schedule, max_length...), the eval settings and its
    protocol choices; not the grid lists (`_GRID_FIELDS`), so a wider grid keeps every finished leaf's key."""
    settings = cfg.unlearn.model_dump(mode="json", exclude=_GRID_FIELDS)
    parts = [LEAF_KEY_VERSION, parent, algorithm, lr, dict(sorted(params.items())), seed, cfg.forget_stage,
             settings, eval_identity(cfg), leaf_protocol(cfg, algorithm)]
    extra = method_inputs(cfg, algorithm, params)
    return _hash(parts + [extra] if extra else parts)


def method_inputs(cfg: SweepConfig, algorithm: str, params: dict[str, float]) -> dict:
    """Data a method reads beyond the forget set, for the leaf key: the retain stage's data when its retain term
    is on, the alternative answers' version when it reads them. Empty for GA/NPO/SimNPO, so their keys are the
    ones recorded before methods could read more."""
    alg = ALGORITHMS[algorithm]
    extra: dict = {}
    if alg.reads_retain_at(params):  # the one rule (reteq.algorithms.method.Method)
        extra["retain"] = {"stage": cfg.retain_stage,
                           "source": cfg.stage(cfg.retain_stage).source.model_dump(mode="json")}
    if Need.ALTERNATIVE in alg.needs:
        extra["alternatives"] = ALTERNATIVES_VERSION
    return extra


def record_key(cfg: SweepConfig, node: str) -> str:
    """theta_r's record: its node (model, stages, seed) and what its evaluation reads beyond the node (the forget
    and knowledge stages' data, the eval settings, how chats render), as a leaf's key does."""
    data = {s: cfg.stage(s).source.model_dump(mode="json") for s in (cfg.forget_stage, cfg.eval.knowledge_stage)
            if s}
    return _hash([RECORD_KEY_VERSION, node, cfg.forget_stage, data, eval_identity(cfg),
                  node_protocol(cfg)])


def build_plan(cfg: SweepConfig) -> Plan:
    plan = Plan()
    orders = cfg.stage_orders()
    grid = itertools.product(cfg.models, cfg.seeds, cfg.schedule_grid(), orders)
    for model, seed, schedule, order in grid:
        parent = plan.add_order(cfg, model.name, order, seed, schedule)
        retrain = plan.add_retrain(cfg, model.name, order, seed, schedule) if cfg.eval.retrain else None
        p = order.index(cfg.forget_stage) + 1
        for alg in cfg.unlearn.algorithms:
            for lr in cfg.unlearn.lrs:
                for params in cfg.unlearn.knob_grid(alg):
                    plan.leaves.append(UnlearnLeaf(leaf_key(cfg, parent, alg, lr, params, seed), model.name,
                                                   tuple(order), p, alg, lr, params, seed, parent, schedule,
                                                   retrain))
    return plan


def leaf_to_dict(leaf: UnlearnLeaf) -> dict:
    d = asdict(leaf)
    d["order"] = list(leaf.order)
    return d


def leaf_from_dict(d: dict) -> UnlearnLeaf:
    return UnlearnLeaf(**{**d, "order": tuple(d["order"])})
