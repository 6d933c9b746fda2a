"""Causal LMs by hub id, local path, GGUF file (reteq.model_files lists the forms) or `builtin:tiny`; LoRA through
peft; checkpoints restored onto the base."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from reteq.config import BUILTIN_TINY, ModelConfig
from reteq.errors import ModelError
from reteq.gguf import ensure_converted
from reteq.model_files import is_gguf
from reteq.tiny import ensure_tiny_model
from reteq.train import collectives
from reteq.train.checkpoint import verify_checkpoint


def resolve_source(cfg: ModelConfig) -> str:
    if cfg.source == BUILTIN_TINY:
        return str(ensure_tiny_model())
    if is_gguf(cfg.source, cfg.gguf_file):  # dequantised once into a safetensors directory (reteq.gguf)
        return str(ensure_converted(cfg.source, cfg.gguf_file, cfg.revision))
    path = Path(cfg.source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model {cfg.name}: {path} has no config.json (not a Hugging Face model directory)")
        return str(path)
    if cfg.source.startswith(("/", ".", "~")):
        raise ModelError(f"model {cfg.name}: model path {cfg.source} does not exist")
    return cfg.source  # a hub id


def load_tokenizer(cfg: ModelConfig):
    # lazy: transformers only when a model or tokenizer is built
    from transformers import AutoTokenizer

    src = resolve_source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelError(f"model {cfg.name}: cannot load tokenizer from {src} ({str(e).splitlines()[0]})") from None
    if cfg.chat_template_from:
        try:
            sibling = AutoTokenizer.from_pretrained(cfg.chat_template_from, trust_remote_code=cfg.trust_remote_code)
        except OSError as e:
            raise ModelError(f"model {cfg.name}: chat_template_from: cannot load {cfg.chat_template_from} "
                             f"({str(e).splitlines()[0]})") from None
        tok.chat_template = sibling.chat_template
    if tok.chat_template is None:
        raise ModelError(f"model {cfg.name}: tokenizer has no chat template (set chat_template_from)")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base(cfg: ModelConfig, src: str | None = None):
    # lazy: transformers only when a model or tokenizer is built
    from transformers import AutoModelForCausalLM

    src = src or resolve_source(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, dtype=torch.float32
        )
    except OSError as e:
        raise ModelError(f"model {cfg.name}: cannot load {src} ({str(e).splitlines()[0]})") from None
    return model


def load_model(cfg: ModelConfig, checkpoint: str | Path | None = None, seed: int = 0, trainable: bool = True):
    """The base model with its adapter (fresh from `seed`, or restored from a checkpoint) in fp32 weights.

    Weights stay fp32 under every precision policy (bf16 is autocast): the paper trains LoRA in fp32 and
    keeping master weights in fp32 makes the policies comparable.
    """
    if cfg.lora is None:  # full finetuning: a checkpoint is a whole HF model directory
        if checkpoint is not None:
            verify_checkpoint(checkpoint)
        return load_base(cfg, str(checkpoint) if checkpoint else None).train(trainable)
    model = load_base(cfg)
    # lazy: transformers only when a model or tokenizer is built
    from peft import PeftModel

    if checkpoint is not None:
        verify_checkpoint(checkpoint)
        return PeftModel.from_pretrained(model, str(checkpoint), is_trainable=trainable).train(trainable)
    return _new_adapter(model, cfg, seed).train(trainable)


def _new_adapter(model, cfg: ModelConfig, seed: int):
    # lazy: transformers only when a model or tokenizer is built
    from peft import LoraConfig, get_peft_model

    assert cfg.lora is not None
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=list(cfg.lora.targets), task_type="CAUSAL_LM")
        try:
            return get_peft_model(model, lora)
        except ValueError as e:
            raise ModelError(f"model {cfg.name}: lora.targets: {str(e).splitlines()[0]}") from None


def fresh_adapter(model, cfg: ModelConfig, seed: int):
    """Merge the trained adapter into the weights and put a new LoRA (from `seed`) on top.

    How the authors start unlearning (src/unlearn_trainer.py: a fresh LoRA on the merged finetuned weights).
    The new adapter's B is zero, so the model computes the same function until its first step. Full
    finetuning (no LoRA) is returned as it is.
    """
    if cfg.lora is None:
        return model
    return _new_adapter(model.merge_and_unload(), cfg, seed).train(model.training)




@contextmanager
def partitioned_at_load(ds_config: dict[str, Any] | None) -> Iterator[bool]:
    """Models loaded inside are partitioned as they are built when `ds_config` is ZeRO-3 and this process is in
    a group of several ranks: transformers 5 sees a live HfDeepSpeedConfig, builds the model under
    `deepspeed.zero.Init` and loads each weight straight into its shards, so no rank ever holds the whole
    model (what a 13B base needs on one GPU). Yields whether it applies. Outside ZeRO-3 it does nothing."""
    zero = (ds_config or {}).get("zero_optimization", {})
    if int(zero.get("stage", 0)) != 3 or not collectives.active():
        yield False
        return
    # lazy: the DeepSpeed integration, only on the ZeRO-3 path
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    collectives.import_deepspeed()  # before zero.Init starts DeepSpeed's comm backend
    cfg = {"train_micro_batch_size_per_gpu": 1, **ds_config}  # zero.Init parses a whole config; the engine's
    live = HfDeepSpeedConfig(cfg)  # noqa: F841 - transformers holds only a weakref: it must stay alive here
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
