"""Typed, documented configuration of a sweep (one YAML file).

A sweep names base models, the finetuning stages, the stage orders to compare, the forget stage, the unlearning
grid, what to evaluate and how to execute. The protocol of training and unlearning (chat rendering, the unlearning
settings) has its own module, reteq.config_protocol. Every problem is reported as one line naming the file, the field and
the reason (`ConfigError`), before anything trains.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PositiveInt, ValidationInfo, field_validator, model_validator

from reteq.algorithms import ALGORITHMS, RETAIN_WEIGHT
from reteq.config_files import (
    MAX_BATCH,
    MAX_CPUS,
    MAX_EPOCHS,
    MAX_LEAVES,
    MAX_LENGTH,
    MAX_ROWS,
    MAX_SAMPLES,
    MAX_STEPS,
    MAX_WORKERS,
    Name,
    PositiveFloat,
    apply_overrides,
    read_yaml_mapping,
    validated,
)
from reteq.config_files import Strict as _Strict
from reteq.config_protocol import (  # noqa: F401 - the protocol's models and constants, importable from here too
    APPENDIX_F,
    APPENDIX_F_MATH_PROMPT,
    AUTHORS_SYSTEM_PROMPT,
    AUTHORS_UNLEARN_LABEL,
    TEMPLATE_DEFAULT_DATE,
    ChatConfig,
    UnlearnConfig,
)
from reteq.digest import spec_hash
from reteq.errors import ModelError
from reteq.hardware import cpu_bf16_units
from reteq.model_files import locate_gguf
from reteq.redact import has_secret, redact

BUILTIN_TINY = "builtin:tiny"
DTYPES = ("fp32", "tf32", "bf16")
ZERO_OPTIMIZERS = ("adamw",)  # reteq optimizers DeepSpeed ZeRO >= 1 accepts (torch AdamW is on its list)



class LoraConfig(_Strict):
    """LoRA adapter (peft). The paper trains LoRA in fp32 (Table 2 gives r and alpha per model)."""

    r: int = Field(64, gt=0, description="adapter rank")
    alpha: int = Field(128, gt=0, description="scaling numerator; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="module names that get adapters",
    )


class ModelConfig(_Strict):
    name: Name = Field(description="short name used in tags, tables and figures, e.g. llama-3.2-1b "
                       "(config_files.NAME_PATTERN)")
    source: str = Field(description="hub id, local directory, GGUF file, package:<module>/<file> (a file an "
                        "installed Python package ships), or 'builtin:tiny' (the offline tiny Llama); "
                        "reteq.model_files lists the forms")
    gguf_file: str | None = Field(None, description="a GGUF file inside the `source` directory or hub repo; "
                                  "dequantised once into a cached safetensors directory (reteq.gguf)")
    chat_template_from: str | None = Field(
        None, description="hub id or path whose tokenizer chat template to use (the instruct sibling)"
    )
    trust_remote_code: bool = False
    revision: str | None = None
    dtype: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="training precision (reteq.train.precision). fp32 = paper fidelity; tf32 = fp32 "
        "weights with TF32 matmuls (GPU); bf16 = bf16 autocast with fp32 master weights, a LoRA base held in bf16 "
        "while it runs: on a GPU, or a CPU with AMX / AVX512-BF16 units (1.5-1.9x fp32 there; refused on a CPU "
        "without them)")
    lora: LoraConfig | None = Field(default_factory=LoraConfig, description="null = full finetuning")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("builtin:") and v != BUILTIN_TINY:
            raise ValueError(f"unknown built-in model {v!r} (known: {BUILTIN_TINY})")
        looks_local = v.startswith(("/", "./", "../", "~"))
        if looks_local and not Path(v).expanduser().exists():
            raise ValueError(f"model path {v} does not exist")
        return v

    @model_validator(mode="after")
    def _weights_found(self) -> ModelConfig:
        """A GGUF file or packaged model that is missing is named here, before anything loads."""
        try:
            locate_gguf(self.source, self.gguf_file)
        except ModelError as e:
            raise ValueError(str(e)) from None
        return self


class DataSource(_Strict):
    """Where a stage's conversations come from.

    kind=synthetic: generated offline from a seed (task: instruct | knowledge | math | refusal).
    kind=local: a json/jsonl/parquet file of rows with `messages` (role/content dicts).
    kind=hub: a `datasets.load_dataset` id converted by the named converter (see reteq.data.hub).
    """

    kind: Literal["synthetic", "local", "hub"]
    task: Literal["instruct", "knowledge", "math", "refusal", "rcu_R", "rcu_C", "rcu_U"] | None = Field(
        None, description="synthetic generator; rcu_* are the Section 4.3 single-response sets (reteq.data.rcu)")
    path: str | None = None
    id: str | None = None
    converter: str | None = Field(None, description="hub converter name; defaults to one chosen by id")
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    n: int | None = Field(None, gt=0, le=MAX_ROWS, description="number of rows to keep (synthetic: to generate)")
    seed: int = 0

    @model_validator(mode="after")
    def _fields_for_kind(self) -> DataSource:
        if self.kind == "synthetic" and self.task is None:
            raise ValueError("synthetic source needs `task`")
        if self.kind == "local":
            if not self.path:
                raise ValueError("local source needs `path`")
            if not Path(self.path).expanduser().exists():
                raise ValueError(f"data file {self.path} does not exist")
        if self.kind == "hub" and not self.id:
            raise ValueError("hub source needs `id`")
        return self


class StageConfig(_Strict):
    name: Name = Field(description="stage name used in orders, e.g. inst, tofu, math, U (config_files.NAME_PATTERN)")
    source: DataSource
    epochs: float = Field(1.0, gt=0, le=MAX_EPOCHS)
    lr: PositiveFloat = 1e-5
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_frac: float = Field(0.02, ge=0, lt=1, description="paper: 2% warmup")
    decay_frac: float = Field(0.02, ge=0, lt=1, description="paper: 2% decay (WSD)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="WSD decays to this fraction of peak (authors' code)")
    global_batch: int = Field(128, gt=0, le=MAX_BATCH, description="sequences per optimizer step, across all workers")
    micro_batch: int = Field(8, gt=0, le=MAX_BATCH, description="sequences per forward pass on one worker")
    max_length: int = Field(1024, gt=8, le=MAX_LENGTH, description="longer conversations are truncated")
    max_truncated_frac: float = Field(
        0.0, ge=0, le=1, description="share of this stage's rows allowed to exceed max_length (and, for the forget "
        "stage, unlearn.max_length); above it the preflight and `reteq data prepare` stop with one line. A check, "
        "not a training setting: not part of the node key")
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="AdamW (0.9, 0.999), no weight decay; or SGD")

    @model_validator(mode="after")
    def _batches(self) -> StageConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError("global_batch must be a multiple of micro_batch")
        return self


class OrdersConfig(_Strict):
    """Which stage orders to compare. Exactly one of the three forms."""

    explicit: list[list[str]] | None = Field(None, min_length=1, description="a list of orders, each a list of stage names")
    all_permutations: bool = False
    forget_positions: list[int] | None = Field(
        None, min_length=1, description="insert the forget stage at these 1-based positions into retain_order (the paper's design)"
    )
    retain_order: list[str] | None = Field(None, description="fixed order of the retain stages")

    @model_validator(mode="after")
    def _one_form(self) -> OrdersConfig:
        forms = [self.explicit is not None, self.all_permutations, self.forget_positions is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of explicit, all_permutations, forget_positions")
        if self.forget_positions is not None and not self.retain_order:
            raise ValueError("forget_positions needs retain_order")
        return self


EVAL_GROUPS = ("forget", "tofu", "math", "depth", "re")


class EvalSchedule(_Strict):
    """When each metric group runs along unlearning. Every group always runs at step 0 and at the last step (the
    start and end values every table reads); between them: `every` = at every eval step (every
    unlearn.eval_every steps, the default and the paper's), `ends` = only there, or n = every n unlearning steps
    (a multiple of unlearn.eval_every). Math generation is most of a real-model leaf's evaluation, so
    `{math: ends}` is what a CPU run wants (open-unlearning users asked for the same, its issue 187)."""

    forget: Literal["every", "ends"] | PositiveInt = "every"
    tofu: Literal["every", "ends"] | PositiveInt = "every"
    math: Literal["every", "ends"] | PositiveInt = "every"
    depth: Literal["every", "ends"] | PositiveInt = "every"
    re: Literal["every", "ends"] | PositiveInt = Field("every", description="the probe's re/* distances")

    def due(self, group: str, step: int, last: int) -> bool:
        """Whether `group` runs at eval step `step` of `last` (steps 0 and `last` always)."""
        when = getattr(self, group)
        if step == 0 or step == last or when == "every":
            return True
        return when != "ends" and step % when == 0


class EvalConfig(_Strict):
    metrics: list[Literal["forget", "tofu", "math", "depth"]] = Field(
        default_factory=lambda: ["forget", "tofu", "math"],
        description="depth = R/C/U log-probs of the superficial-forgetting experiment (Section 4.3)",
    )
    knowledge_stage: str | None = Field("tofu", description="stage whose answers measure TOFU utility")
    forget_prompts: int | str = Field(
        64, description="forget-set questions scored for the forget score: a seeded sample stratified across "
        "categories, or all")
    knowledge_prompts: int | str = Field(
        "all", description="knowledge-stage answers scored for TOFU utility: a seeded sample stratified across "
        "authors, or all (the authors score all of TOFU)")
    sample_seed: int = Field(0, description="seed of the eval samples (the same sample for every run)")
    unlearn_label: str = Field(
        AUTHORS_UNLEARN_LABEL, min_length=1, description="the target whose log-prob is forget/label_logp "
        "(authors' code: 'Sorry, I can not assist'; the paper prints 'Sorry, I can not assist you')")
    math_prompt: str = Field(
        "{question}", description="user message of a math eval question; {question} is replaced by the "
        "question (default: the bare question, as the math stage trains it); `appendix_f` = the paper's "
        "Appendix F prompt (reteq.config_protocol.APPENDIX_F_MATH_PROMPT), stored as its full text")
    math_source: DataSource | None = Field(None, description="held-out math questions (GSM8K test split)")
    math_questions: int = Field(32, gt=0, le=MAX_SAMPLES)
    math_samples: int = Field(5, gt=0, le=MAX_SAMPLES, description="sampled answers per question (paper: 5)")
    greedy: bool = Field(False, description="greedy decoding instead of sampling (then 1 sample suffices)")
    temperature: float = Field(1.0, gt=0, le=100, allow_inf_nan=False)
    max_new_tokens: int = Field(256, gt=0, le=MAX_LENGTH)
    batch_size: int = Field(32, gt=0, le=MAX_BATCH, description="sequences per scoring / generation batch")
    dtype: Literal["fp32", "tf32", "bf16"] | None = Field(
        None, description="evaluation precision (scoring, generation, the probe); null = the model's dtype. "
        "bf16 scores 2.3-2.8x faster than fp32 on a CPU with bf16 units and moves the paper's metrics by the "
        "amounts in docs/performance.md ('fp32 vs bf16 evaluation'); compare runs only within one setting")
    schedule: EvalSchedule = Field(default_factory=EvalSchedule, description="when each metric group runs: "
                                   "every eval step (default), only at the start and end, or every n steps")
    # ---- retrain equivalence (docs/retrain_equivalence.md) ----
    retrain: bool = Field(True, description="plan each path's retrain node theta_r (the order without the forget "
                          "stage) and log re/logp_mse and re/kl against it at every eval step; false = neither")
    probe_size: int = Field(64, gt=0, le=MAX_SAMPLES, description="probe pairs scored at every eval step for the prediction "
                            "vectors (split evenly over each stage's data, the forget questions and held-out "
                            "prompts); the per-pair vectors are stored as a Parquet artifact per unlearning run")
    probe_seed: int = Field(0, description="seed of the probe sample; the same probe set for every run of a sweep")
    depth_fall: float = Field(0.5, ge=0, description="Section 4.3 label: a response 'falls' when its per-token "
                              "log-prob drops by at least this much (nats) from step 0 to the last step")
    depth_margin: float = Field(0.0, ge=0, description="Section 4.3 label: 'below R' means at least this far "
                                "below the refusal R's final log-prob (nats per token)")

    @field_validator("forget_prompts", "knowledge_prompts", mode="before")
    @classmethod
    def _sample_size(cls, v: Any) -> int | str:
        if v == "all" or (isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_SAMPLES):
            return v
        raise ValueError(f"must be a number in 1..{MAX_SAMPLES} or 'all' (got {str(v)[:40]!r})")

    @field_validator("math_prompt", mode="before")
    @classmethod
    def _named_prompt(cls, v: Any) -> Any:
        return APPENDIX_F_MATH_PROMPT if v == APPENDIX_F else v

    @field_validator("math_prompt")
    @classmethod
    def _has_question(cls, v: str) -> str:
        if "{question}" not in v:
            raise ValueError("must contain {question}")
        return v


class ExecutionConfig(_Strict):
    """How the sweep runs: Ray Train workers, DeepSpeed, concurrency, tracking."""

    workers: int = Field(1, gt=0, le=MAX_WORKERS, description="Ray Train workers per trial (data parallel)")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_CPUS, allow_inf_nan=False)
    gpus_per_worker: float = Field(1.0, ge=0, le=MAX_CPUS, allow_inf_nan=False)
    max_concurrent_trials: int = Field(1, gt=0, le=MAX_WORKERS)
    worker_resources: dict[str, PositiveFloat] = Field(
        default_factory=dict, description="extra Ray resources per worker, e.g. {'accelerator_type:H100': 0.001} "
        "to pin a GPU type, or a custom node resource to force placement")
    max_failures: int = Field(
        2, ge=0, le=1000, description="retries of a stage node or unlearning trial whose worker died or whose machine was "
        "preempted (Ray task max_retries, Ray Train and Ray Tune FailureConfig); after that its branch fails, "
        "named, and the rest of the sweep finishes")
    checkpoint_every: int = Field(
        0, ge=0, le=MAX_STEPS, description="optimizer steps between mid-stage checkpoints of a stage node trained by Ray Train "
        "(DeepSpeed): a retried worker group resumes from the last one instead of the node's start; 0 = off")
    deepspeed: str | None = Field(None, description="DeepSpeed JSON (ZeRO stage, precision); null = plain torch")
    tracking_uri: str | None = Field(None, description="MLflow URI; default MLFLOW_TRACKING_URI or SQLite in work_dir")
    storage_path: str | None = Field(None, description="Ray storage (local dir or s3://...); default work_dir/ray. "
                                     "No credentials in it: Ray copies it into its run state and trial envs")
    tokens_per_gpu_second: float = Field(
        40_000, gt=0, allow_inf_nan=False, description="throughput used by `reteq plan` to estimate GPU-hours (measure with bench/)"
    )
    placement: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "STRICT_PACK", description="Ray placement of a trial's workers. STRICT_PACK: all on one node (NVLink, one "
        "checkpoint fetch; the autoscaler launches a node with enough GPUs). PACK lets Ray's autoscaler spread a "
        "4-worker trial over four 1-GPU nodes; SPREAD asks for that. Ranks on other nodes fetch checkpoints from "
        "MLflow (docs/cluster.md, 'Placement')")
    @field_validator("storage_path")
    @classmethod
    def _no_credentials(cls, v: str | None) -> str | None:
        """Ray pickles its storage settings into the run's state (tuner.pkl) and Tune hands AWS_* variables to
        every trial's runtime env, which Ray logs: storage credentials come from the machine's own credential
        chain (an instance profile, or the service user's env file), never from the config."""
        if v and has_secret(v):
            raise ValueError(f"{redact(v)} carries a credential; give storage credentials through the machine's "
                             "credential chain (instance profile, AWS_* in the service's env file), not the "
                             "config (docs/security.md)")
        return v

    packing: bool = Field(
        True, description="pack variable-length samples into rows (no cross-sample attention) instead of padding "
        "them: same losses to float rounding, fewer wasted tokens (docs/performance.md); false = padded batches")
    flush_denormal: bool = Field(
        True, description="CPU workers (use_gpu false) flush subnormal floats to zero: a saturated loss otherwise "
        "makes steps ~25x slower. Changes only numbers below 1.2e-38; recorded in node and leaf keys when it "
        "applies. Ignored on GPU workers (reteq.train.precision)")

    share_start_eval: bool = Field(
        True, description="evaluate unlearning step 0 once per start checkpoint: the first single-worker leaf "
        "publishes its step-0 metrics in the MLflow store and every leaf from the same checkpoint, seed and "
        "evaluation settings reads them (the same numbers, bit for bit; reteq.eval.start_record); false = every "
        "leaf evaluates its own step 0. Changes no key")

    @property
    def flushes_denormals(self) -> bool:
        """Whether the setting applies: on, and the workers compute on CPUs."""
        return self.flush_denormal and not self.use_gpu


class SweepConfig(_Strict):
    name: Name = Field(description="the sweep's name: its MLflow experiment and Tune run (config_files.NAME_PATTERN)")
    work_dir: str = Field("runs/default", description="checkpoints, MLflow store and report live here")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    models: list[ModelConfig] = Field(min_length=1)
    stages: list[StageConfig] = Field(min_length=1)
    forget_stage: str = "U"
    orders: OrdersConfig
    chat: ChatConfig = Field(default_factory=ChatConfig)
    unlearn: UnlearnConfig = Field(default_factory=UnlearnConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    schedules: list[Literal["wsd", "cosine", "constant"]] | None = Field(
        None, description="finetune every order once per schedule, overriding stages[*].schedule (Fig. 8)")

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> SweepConfig:
        self._grid_within(info.context.get("max_leaves", MAX_LEAVES) if info.context else MAX_LEAVES)
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stages: duplicate stage names {names}")
        if len({m.name for m in self.models}) != len(self.models):
            raise ValueError("models: duplicate model names")
        if self.forget_stage not in names:
            raise ValueError(f"forget_stage: {self.forget_stage!r} is not a declared stage ({', '.join(names)})")
        for order in self.stage_orders():
            if sorted(order) != sorted(names):
                raise ValueError(f"orders: {order} is not a permutation of the declared stages {names}")
        if self.eval.knowledge_stage is not None and self.eval.knowledge_stage not in names:
            raise ValueError(f"eval.knowledge_stage: {self.eval.knowledge_stage!r} is not a declared stage")
        self._retain_set_declared(names)
        self._optimizers_run_under_zero()
        self._eval_schedule_on_eval_steps()
        self._bf16_runs_on_this_cpu()
        self._batches_split_over_workers()
        return self

    def _eval_schedule_on_eval_steps(self) -> None:
        every = self.unlearn.eval_every
        for group in EVAL_GROUPS:
            n = getattr(self.eval.schedule, group)
            if isinstance(n, int) and n % every:
                raise ValueError(f"eval.schedule.{group}: {n} is not a multiple of unlearn.eval_every ({every}): "
                                 "a group can only run at an eval step")

    def _bf16_runs_on_this_cpu(self) -> None:
        """bf16 on a CPU without bf16 units is emulated, several times slower than fp32: refuse it in one line
        rather than run a sweep far slower than asked for. Checked against this machine's CPU (the CPU workers of
        a laptop sweep; a CPU cluster's workers are assumed alike)."""
        if self.execution.use_gpu:
            return
        wants = [f"models[{i}].dtype" for i, m in enumerate(self.models) if m.dtype == "bf16"]
        wants += ["eval.dtype"] if self.eval.dtype == "bf16" else []
        if wants and cpu_bf16_units() is None:
            raise ValueError(f"{wants[0]}: bf16 on CPU workers needs AMX or AVX512-BF16 units and this CPU has "
                             "neither (bf16 would be emulated, slower than fp32); use fp32 or GPU workers")

    def leaf_count(self) -> int:
        """Unlearning runs the grid makes, counted from the grids' lengths without expanding any of them."""
        o, u = self.orders, self.unlearn
        orders = (len(o.explicit) if o.explicit is not None else
                  math.factorial(len(self.stages)) if o.all_permutations else len(o.forget_positions or []))
        knobs = sum(math.prod(len(u.betas_for(a)) if k == "beta" else len(u.params.get(a, {}).get(k) or [0])
                              for k in _defaults(a)) for a in u.algorithms)
        return len(self.models) * len(self.seeds) * len(self.schedule_grid()) * orders * len(u.lrs) * knobs

    def _grid_within(self, limit: int | None) -> None:
        """Refuse a grid over `limit` unlearning runs before anything expands it (all_permutations over 11
        stages is 40 million orders); None: no limit (a worker re-reading a config its driver checked)."""
        if limit is None:
            return
        n = self.leaf_count()
        if n > limit:
            raise ValueError(f"orders/unlearn: the grid has {n} unlearning runs, over the limit of {limit} "
                             f"(models x seeds x schedules x orders x lrs x knobs); pass --max-leaves {n} to "
                             "go past it")

    def _batches_split_over_workers(self) -> None:
        """Every global batch splits into whole micro-batches over `execution.workers` (one worker accumulates
        them all, N workers take an equal share): the same global batch at any worker count, and a config that
        cannot split fails here rather than in a worker once the sweep has started."""
        workers = self.execution.workers
        parts = [(f"stages[{i}]", s) for i, s in enumerate(self.stages)] + [("unlearn", self.unlearn)]
        for where, part in parts:
            if part.global_batch % (part.micro_batch * workers):
                raise ValueError(f"{where}.global_batch: {part.global_batch} does not split into micro-batches of "
                                 f"{part.micro_batch} over execution.workers {workers} (make it a multiple of "
                                 f"{part.micro_batch * workers}, or lower micro_batch)")

    def _retain_set_declared(self, names: list[str]) -> None:
        """A method with a retain term reads `retain_stage` (else the knowledge stage): a declared stage other
        than the forget set, whenever some swept retain_weight is above 0."""
        u = self.unlearn
        if u.retain_stage is not None and u.retain_stage not in names:
            raise ValueError(f"unlearn.retain_stage: {u.retain_stage!r} is not a declared stage ({', '.join(names)})")
        if self.retain_stage is not None and self.retain_stage == self.forget_stage:
            raise ValueError(f"unlearn.retain_stage: {self.retain_stage!r} is the forget stage")
        weighted = [a for a in u.algorithms for k in u.knob_grid(a) if k.get(RETAIN_WEIGHT, 0) > 0]
        if weighted and self.retain_stage is None:
            raise ValueError(f"unlearn.retain_stage: {weighted[0]} has retain_weight > 0 but no retain set "
                             f"(set unlearn.retain_stage or eval.knowledge_stage)")

    @property
    def retain_stage(self) -> str | None:
        """The stage whose conversations are the retain set (unlearn.retain_stage, else eval.knowledge_stage)."""
        return self.unlearn.retain_stage or self.eval.knowledge_stage

    def _optimizers_run_under_zero(self) -> None:
        """DeepSpeed's ZeRO (stage >= 1) asserts at start ("untested ZeRO Optimizer") for any torch optimizer but
        Adam/AdamW/Adagrad unless the JSON sets zero_allow_untested_optimizer: catch it before anything trains."""
        path = self.execution.deepspeed
        if not path or not Path(path).is_file():
            return  # a missing file is reported by the commands that read it
        try:
            ds = json.loads(Path(path).read_text())
        except json.JSONDecodeError:
            return
        stage = int((ds.get("zero_optimization") or {}).get("stage", 0) or 0)
        if stage < 1 or ds.get("zero_allow_untested_optimizer"):
            return
        fields = [f"stages[{i}].optimizer" for i, s in enumerate(self.stages) if s.optimizer not in ZERO_OPTIMIZERS]
        if self.unlearn.optimizer not in ZERO_OPTIMIZERS:
            fields.append("unlearn.optimizer")
        if fields:
            raise ValueError(f"{fields[0]}: sgd is not supported by DeepSpeed ZeRO stage {stage} "
                             f"(execution.deepspeed: {path}; also {', '.join(fields[1:]) or 'no other field'}); use "
                             "adamw, a ZeRO stage 0 config, or set zero_allow_untested_optimizer in the JSON")

    # ---- derived views --------------------------------------------------------------------------------------
    def stage(self, name: str, schedule: str | None = None) -> StageConfig:
        """A stage's config, with its schedule replaced when a schedule grid point is given."""
        stage = next(s for s in self.stages if s.name == name)
        return stage.model_copy(update={"schedule": schedule}) if schedule else stage

    def unlearn_for(self, schedule: str | None = None) -> UnlearnConfig:
        """The unlearning settings of a leaf on a schedule grid point (its schedule when schedule_from_grid)."""
        u = self.unlearn
        return u.model_copy(update={"schedule": schedule}) if schedule and u.schedule_from_grid else u

    def schedule_grid(self) -> list[str | None]:
        return list(self.schedules) if self.schedules else [None]

    def model(self, name: str) -> ModelConfig:
        return next(m for m in self.models if m.name == name)

    def stage_orders(self) -> list[tuple[str, ...]]:
        o = self.orders
        if o.explicit is not None:
            return [tuple(x) for x in o.explicit]
        names = [s.name for s in self.stages]
        if o.all_permutations:
            return list(itertools.permutations(names))
        retain = list(o.retain_order or [])
        out = []
        for p in o.forget_positions or []:
            if not 1 <= p <= len(retain) + 1:
                raise ValueError(f"orders.forget_positions: {p} is outside 1..{len(retain) + 1}")
            out.append(tuple(retain[: p - 1] + [self.forget_stage] + retain[p - 1 :]))
        return out

    def retain_stages(self) -> list[str]:
        return [s.name for s in self.stages if s.name != self.forget_stage]

    def digest(self) -> str:
        return spec_hash(self.model_dump(mode="json"), length=12)


def _defaults(algorithm: str) -> dict[str, float]:
    return ALGORITHMS[algorithm].defaults


def load_config(path: str | Path, max_leaves: int | None = MAX_LEAVES, overrides: tuple[str, ...] = ()) -> SweepConfig:
    """Read and validate a sweep YAML; raise ConfigError with one line per problem. `max_leaves`: the most
    unlearning runs the grid may have (None: any); `overrides`: `--set FIELD=VALUE` flags (apply_overrides),
    named in the source of every problem line so a bad value is traced to the flag, not the file."""
    raw = apply_overrides(read_yaml_mapping(path), overrides, str(path))
    source = f"{path} (with --set {', '.join(o.partition('=')[0] for o in overrides)})" if overrides else str(path)
    return parse_config(raw, source=source, max_leaves=max_leaves)


def parse_config(raw: dict[str, Any], source: str = "<config>", max_leaves: int | None = MAX_LEAVES) -> SweepConfig:
    return validated(SweepConfig, raw, source, context={"max_leaves": max_leaves})
