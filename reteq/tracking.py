"""MLflow names in one place: tags, params, metric keys, run names.

Every writer (the one-process command, the Ray sweep, the theory grid) and every reader (the analysis loader,
the report) imports these constants, so a key is spelled exactly once. Changing a value here changes the
on-disk schema of past experiments: add keys; a renamed key keeps its old spelling here, still read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# ---- tags (strings; what identifies a run) -------------------------------------------------------------------
TAG_KIND = "reteq.kind"  # one of KIND_*
TAG_MODEL = "reteq.model"  # the config's model name (not the hub id)
TAG_ORDER = "reteq.order"  # stage order joined by ORDER_SEP, e.g. "inst>tofu>math>U"
TAG_P = "reteq.p"  # 1-based position of the forget stage in the order ("" when absent)
TAG_ALGORITHM = "reteq.algorithm"  # unlearning method name (registry key)
TAG_LR = "reteq.lr"  # unlearning learning rate, as written by format_float
TAG_BETA = "reteq.beta"  # the method's beta knob (NPO, SimNPO, WGA, IdkDPO...; "" for a method without one)
TAG_PARAMS = "reteq.params"  # every knob of the leaf's method, canonical: "beta=0.5" / "coeff=20,layer=2" / ""
TAG_SEED = "reteq.seed"
TAG_SCHEDULE = "reteq.schedule"  # finetuning schedule (wsd | cosine | constant), as the config names it
TAG_SCHEDULE_BEFORE_RENAME = "reteq.scheduler"  # TAG_SCHEDULE as older runs spell it: read, never written
TAG_PLAN_KEY = "reteq.node_key"  # the plan's content-addressed key of the stage node or leaf this run records
TAG_PARENT_KEY = "reteq.parent_key"  # key of the node this one starts from ("" for the base model)
TAG_STAGE = "reteq.stage"  # name of the stage a finetune node trains
TAG_STATUS = "reteq.status"  # one of STATUS_*
TAG_SWEEP = "reteq.sweep"  # sweep name
TAG_CHECKPOINT = "reteq.checkpoint"  # local path of the published checkpoint
TAG_CONFIG_HASH = "reteq.config_hash"
TAG_RETRAIN_KEY = "reteq.retrain_key"  # on an unlearning or retrain run: the node key of its theta_r
TAG_RETRAIN_BASELINE = "reteq.retrain_baseline"  # "true" on a finetune node run that is some path's theta_r
TAG_RETRAIN_ONLY = "reteq.retrain_only"  # "true" on a finetune node run that only retrain paths need
TAG_NODE_RUN = "reteq.node_run_id"  # on a retrain run: the run id of theta_r's finetune node (its checkpoint)
# the experiment's lease (reteq.sweep.lock.ExperimentLease): which live sweep holds it, from which work dir
TAG_LEASE = "reteq.lease"
TAG_ATTEMPT = "reteq.attempt"  # id of the `reteq sweep` process (one attempt of a sweep) that started the run
TAG_TRIAL = "reteq.trial"  # key of the leaf whose trial started the run (nodes are trained inside a leaf's trial)
TAG_ERROR = "reteq.error"  # why a run ended FAILED or KILLED (the exception, or who closed it and why)
TAG_RECORDED_ON_REUSE = "reteq.recorded_on_reuse"  # "1": record written for a checkpoint found in the store
TAG_RESUMED_FROM_STEP = "reteq.resumed_from_step"  # finetune run: steps its Ray Train checkpoint had done
# the sweep's parent run: the sha256 of a mid-stage Ray Train checkpoint's manifest, logged as a param (MLflow
# params cannot be changed once logged) when the checkpoint is saved; a retried worker group loads a checkpoint
# only if its manifest hashes to this (reteq.sweep.stage_resume). {node}: the node key's first 16 digits.
P_STAGE_CHECKPOINT = "reteq.stage_checkpoint.{node}.{step}.{nonce}"
TAG_CHILDREN_FAILED = "reteq.children_failed"  # on the parent run: child runs of this attempt that did not finish
# step 0 evaluated once per start checkpoint (reteq.eval.start_record, execution.share_start_eval): the leaf run
# that evaluated it carries the record as ARTIFACT_START_RECORD with its sha256 and key (the key set last, so a
# reader never finds a half-published record); every leaf run says where its step-0 metrics came from
TAG_START_KEY = "reteq.start_eval.key"
TAG_START_SHA256 = "reteq.start_eval.sha256"
TAG_START_SOURCE = "reteq.start_eval.source"  # "computed" or "run <run id>" (the run whose record it read)
TAG_MLFLOW_PARENT = "mlflow.parentRunId"  # MLflow's own tag: a child run's parent (the UI nests runs by it)

KIND_FINETUNE = "finetune"  # one stage node trained (and its checkpoint published)
KIND_UNLEARN = "unlearn"
# theta_r evaluated: one run per retrain node, step-0 eval metrics, no training, no checkpoint of its own (it
# names the node's run in TAG_NODE_RUN). Sweeps before 2026-11-29 also gave retrain-only nodes this kind.
KIND_RETRAIN = "retrain"
KIND_THEORY = "theory"
KIND_SWEEP = "sweep"  # the parent run

STATUS_DONE = "done"
STATUS_COLLAPSED = "collapsed"  # a non-finite loss stopped unlearning; last finite metrics are kept
STATUS_FAILED = "failed"
STATUS_KILLED = "killed"  # its process died (SIGKILL, preemption); closed by the next attempt or its trial
STATUS_CORRUPT = "corrupt"  # its checkpoint artifact failed sha256; the node was retrained under a new run

# MLflow's own run statuses (RunStatus names): only FINISHED runs are results
RUN_FINISHED, RUN_FAILED, RUN_KILLED, RUN_RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"

ORDER_SEP = ">"

THEORY_EXPERIMENT = "theory"  # the default theory grid's experiment (and sweep) name, configs/theory.yaml

# ---- metrics (logged per step) --------------------------------------------------------------------------------
M_TRAIN_LOSS = "train/loss"
M_TRAIN_LR = "train/lr"
M_TRAIN_TOKENS_PER_S = "train/tokens_per_s"
M_TRAIN_PAD_FRAC = "train/padding_fraction"
M_TRAIN_GRAD_NORM = "train/grad_norm"

M_FORGET_LABEL = "forget/label_logp"  # mean per-token log-prob of the unlearn label on forget questions
M_FORGET_PARAPHRASE = "forget/paraphrase_logp"  # same, averaged over the 19 paraphrases
M_FORGET_ALL = "forget/all_logp"  # mean over label + paraphrases
M_FORGET_SCORE = "forget/score"  # all_logp(step 0) - all_logp(step t); higher = more forgetting
M_TOFU_LOGP = "utility/tofu_logp"  # mean per-token log-prob of knowledge-stage answers
M_TOFU_UTILITY = "utility/tofu"  # 1 - |tofu_logp(t) - tofu_logp(0)|
M_MATH_ACC = "utility/math_acc"  # fraction of sampled answers whose '####' number is right
M_MATH_UTILITY = "utility/math"  # math_acc(t) - math_acc(0)

M_DEPTH_R = "depth/R_logp"  # Section 4.3: mean per-token log-prob of the refusal R
M_DEPTH_C = "depth/C_logp"  # ... of the compliance phrasing C (deep forgetting: C falls with U)
M_DEPTH_U = "depth/U_logp"  # ... of the unlearned compliance phrasing U

# Retrain equivalence (Definition 2.1), against the leaf's retrain node theta_r on the fixed probe set
M_RE_LOGP_MSE = "re/logp_mse"  # mean over probe pairs of (s_u(t) - s_r)^2, s = per-token mean log-prob
M_RE_KL = "re/kl"  # mean over probe target positions of KL(pi_u(t) || pi_r) (next-token distributions)
RE_METRICS = (M_RE_LOGP_MSE, M_RE_KL)
M_TIME = "time/{}_s"  # an unlearning run's wall seconds by part: train, reference, forget, tofu, math, depth, re
M_CHILDREN_FAILED = "sweep/children_failed"  # on the parent run, logged once per attempt (step 0)
M_SWEEP_PHASE = "sweep/phase_s/{}"  # parent run: seconds from the attempt's start to the end of a driver phase

M_THEORY_DIVERGENCE = "theory/divergence"  # d(theta_AB(t), theta_BA(t)) on the test set
M_THEORY_BOUND = "theory/bound"  # the Theorem 3.1 lower bound at t
M_THEORY_RETRAIN_GAP = "theory/retrain_gap"  # d(theta_u(t), theta_r)
# theory summaries: per instance (a child run) and per grid (the parent run)
M_THEORY_BOUND_HOLDS = "theory/bound_holds"  # 1 if the bound held at every checked t >= max(t0, 0), else 0
M_THEORY_BOUND_CHECKED = "theory/bound_checked_steps"  # steps t in [max(t0, 0), steps] checked (0 = vacuous)
M_THEORY_MIN_LOG_MARGIN = "theory/min_log_margin"  # min over checked t of log(divergence / bound); >= 0 holds
M_THEORY_GROWTH_RATE = "theory/growth_rate"  # fitted slope of log divergence over the checked steps
M_THEORY_GROWTH_R2 = "theory/growth_r2"
M_THEORY_LOG1P_RHO = "theory/log1p_rho_star"  # log(1 + rho*); the theorem predicts growth_rate >= 2 * this
M_THEORY_RETRAIN_GAP_MIN = "theory/retrain_gap_min"  # min over t of theory/retrain_gap
M_THEORY_RETRAIN_CLOSEST_P = "theory/retrain_closest_p"  # + 1|2|3: min over t, orders with S_U at position p
M_THEORY_NPO_DIVERGENCE = "theory/npo_divergence_final"  # divergence at the last step, NPO-like rule
M_THEORY_SIMNPO_DIVERGENCE = "theory/simnpo_divergence_final"  # same, SimNPO-like rule
M_THEORY_GRID_INSTANCES = "theory/instances"  # parent run: instances checked
M_THEORY_GRID_BOUND_HOLDS = "theory/bound_holds_count"  # parent run: instances where the bound held
M_THEORY_GRID_NONVACUOUS = "theory/nonvacuous_count"  # parent run: instances with t0 inside the horizon

EVAL_METRICS = (
    M_FORGET_LABEL,
    M_FORGET_PARAPHRASE,
    M_FORGET_ALL,
    M_FORGET_SCORE,
    M_TOFU_LOGP,
    M_TOFU_UTILITY,
    M_MATH_ACC,
    M_MATH_UTILITY,
    M_DEPTH_R,
    M_DEPTH_C,
    M_DEPTH_U,
)

# ---- params ----------------------------------------------------------------------------------------------------
P_STEPS = "steps"
# the sweep's parent run: its config's key settings (the whole resolved config is the ARTIFACT_CONFIG file)
P_SWEEP_PARAMS = ("models", "orders", "algorithms", "lrs", "betas", "seeds", "forget_stage", "workers", "use_gpu",
                  "deepspeed", "schedules")
# the protocol (docs/fidelity.md): params of every node and leaf run, from `protocol_params`
P_CHAT_DATE = "chat.date"  # the fixed date chat templates print
P_SYSTEM_PROMPT = "chat.system_prompt"  # "" = none
P_LABEL_TOKENS = "chat.label_tokens"  # header_body_eot | body_eot
P_CHAT_TEMPLATE = "chat.template"  # hf | torchtune
P_UNLEARN_LABEL = "eval.unlearn_label"  # the forget score's label text
P_MATH_PROMPT = "eval.math_prompt"
P_ADAPTER = "unlearn.adapter"  # fresh | continue
P_NORMALISATION = "unlearn.loss_normalisation"  # this leaf's algorithm's: sequence | token (nodes: all, JSON)
# content hashes of a leaf's eval samples (reteq.eval.samples.sample_hash)
P_FORGET_SAMPLE = "eval.forget_sample_sha"
P_KNOWLEDGE_SAMPLE = "eval.knowledge_sample_sha"
P_MATH_SAMPLE = "eval.math_sample_sha"


def protocol_params(cfg, algorithm: str | None = None) -> dict[str, str]:
    """The protocol choices of a sweep config as MLflow params (a leaf's normalisation is its algorithm's)."""
    norm = (cfg.unlearn.normalisation(algorithm) if algorithm else
            json.dumps({a: cfg.unlearn.normalisation(a) for a in cfg.unlearn.algorithms}, sort_keys=True))
    return {P_CHAT_DATE: cfg.chat.date.isoformat(), P_SYSTEM_PROMPT: cfg.chat.system_prompt or "",
            P_LABEL_TOKENS: cfg.chat.label_tokens, P_CHAT_TEMPLATE: cfg.chat.template,
            P_UNLEARN_LABEL: cfg.eval.unlearn_label,
            P_MATH_PROMPT: cfg.eval.math_prompt, P_ADAPTER: cfg.unlearn.adapter, P_NORMALISATION: norm}


def sample_params(hashes: dict[str, str]) -> dict[str, str]:
    """Evaluator.sample_hashes() as MLflow params."""
    names = {"forget": P_FORGET_SAMPLE, "knowledge": P_KNOWLEDGE_SAMPLE, "math": P_MATH_SAMPLE}
    return {names[k]: v for k, v in hashes.items() if k in names}
P_PROBE_HASH = "re.probe_hash"  # sha256 (16 hex) of the probe set's (source, prompt, target) texts
P_PROBE_SIZE = "re.probe_size"  # probe pairs scored at every eval step
P_VOCAB_SIZE = "vocab_size"  # the tokenizer's vocabulary: chance level is log(1 / vocab_size) per token

# ---- artifacts -------------------------------------------------------------------------------------------------
ARTIFACT_CHECKPOINT = "checkpoint"  # artifact sub-folder holding the safetensors files + manifest.json
ARTIFACT_START_RECORD = "start_eval"  # artifact sub-folder of a leaf run holding its shared step-0 record
ARTIFACT_PREDICTIONS = "predictions"  # artifact sub-folder holding PREDICTIONS_FILE
PREDICTIONS_FILE = "predictions.parquet"  # per eval step x probe pair: score, KL to theta_r, token log-probs
ARTIFACT_CONFIG = "config"  # the parent run's resolved sweep config, as ARTIFACT_CONFIG/CONFIG_FILE
CONFIG_FILE = "sweep.yaml"


# ---- the MLflow UI (3.17): experiment tags it reads, reteq's saved views (reteq/sweep/mlflow_ui.py) ---------------
# MLflow's own: the experiment's kind (its page's layout and landing tab where the UI has no GenAI | Model training switch)
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_TRAINING = "custom_model_development"  # shown as "Machine learning": opens on the runs page
TAG_SAVED_VIEW = "mlflow.sharedViewState.{}"  # MLflow's own: a saved view of the runs page, by view id
VIEW_CURVES = "reteq-curves"  # the unlearning runs, flat, sorted by name, every one drawn in the charts
VIEW_BY_P = "reteq-curves-by-p"  # the same runs grouped by param p: one mean line (min..max band) per p
ARTIFACT_REPORT = "report"  # the parent run's artifact folder holding report.html, tables/ and charts/
RUN_NAME_SEP = " · "  # between the parts of a leaf's and a retrain record's run name


def format_float(x: float | None) -> str:
    """A stable, compact spelling of a hyperparameter for tags and keys (1e-05 -> '1e-05')."""
    return "" if x is None else f"{float(x):.6g}"


def order_tag(order: list[str] | tuple[str, ...]) -> str:
    return ORDER_SEP.join(order)


def run_name(kind: str, *parts: str) -> str:
    return "/".join([kind, *[p for p in parts if p]])


def short_float(x: float) -> str:
    """A learning rate as a legend reads it: 0.001 -> '1e-3', 2.5e-05 -> '2.5e-5'."""
    mantissa, exponent = f"{float(x):.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def params_tag(params: dict[str, float]) -> str:
    """A method's knobs as one canonical string (sorted names, stable floats): the analysis groups cells by it."""
    return ",".join(f"{k}={format_float(v)}" for k, v in sorted(params.items()))


def leaf_run_name(p: int, algorithm: str, lr: float, seed: int, model: str, params: dict[str, float] | None = None,
                  schedule: str | None = None) -> str:
    """An unlearning run's name: p first, so the MLflow legend sorts p = 1..4 ('p4 · ga · lr1e-3 · s0 · tiny');
    knobs as 'b0.5' for beta (as before knobs were general), else 'name=value'."""
    knobs = [f"b{format_float(v)}" if k == "beta" else f"{k}={format_float(v)}"
             for k, v in sorted((params or {}).items())]
    parts = [f"p{p}", algorithm, *knobs, f"lr{short_float(lr)}", schedule or "", f"s{seed}", model]
    return RUN_NAME_SEP.join(x for x in parts if x)


def retrain_run_name(order: list[str] | tuple[str, ...], seed: int, model: str) -> str:
    """theta_r's record: 'θ_r · inst>tofu>math · s0 · tiny' (the order without the forget stage)."""
    return RUN_NAME_SEP.join(["θ_r", order_tag(order), f"s{seed}", model])


def default_tracking_uri(work_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI wins; otherwise a SQLite store inside the sweep's work directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(work_dir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def default_artifact_root(work_dir: str | Path) -> str:
    return (Path(work_dir).resolve() / "mlartifacts").as_uri()
