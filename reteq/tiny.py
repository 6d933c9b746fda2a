"""The built-in tiny Llama: its own BPE tokenizer and a short, cached 'base' pretraining, all offline.

Why a pretrained base: unlearning from random weights measures noise. A few hundred steps on generic synthetic
prose give a model with a real (if tiny) language prior, so finetuning and unlearning behave like they do on
real LLMs at small scale. The result is cached under $RETEQ_CACHE (default ~/.cache/reteq) keyed by a hash of
everything that determines it, built once under a file lock and published atomically.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from reteq.data import synthetic
from reteq.data.forget_targets import PARAPHRASES, UNLEARN_LABEL
from reteq.workdir import cache_root

TINY_SHAPE = dict(  # a ~0.5M-parameter Llama: small enough for CPU tests, big enough to learn the stages
    hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
)
VOCAB_SIZE = 1024
PRETRAIN = dict(steps=300, batch=32, seq_len=64, lr=3e-3, seed=1234, texts=4000)
VERSION = "tiny-v2"  # v2: base pretraining sees refusal-style prose (synthetic.refusal_prose)

SPECIAL = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _fingerprint() -> str:
    blob = json.dumps([VERSION, TINY_SHAPE, VOCAB_SIZE, PRETRAIN, CHAT_TEMPLATE, synthetic.TRANSFORM_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _corpus() -> list[str]:
    texts = synthetic.pretraining_text(PRETRAIN["texts"], seed=0)
    for gen in synthetic.GENERATORS.values():
        for conv in gen(300, seed=10_000):  # vocabulary only: different seed from any stage data
            texts.extend(m["content"] for m in conv["messages"])

    texts.extend([UNLEARN_LABEL, *PARAPHRASES])
    return texts


def build_tokenizer(texts: list[str]):
    # lazy: transformers only when a model or tokenizer is built
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|end|>",
                                   pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _pretrain(model, tokenizer, texts: list[str]) -> None:
    g = torch.Generator().manual_seed(PRETRAIN["seed"])
    ids = []
    for t in texts:
        ids.extend(tokenizer(t + "\n", add_special_tokens=False)["input_ids"])
    data = torch.tensor(ids)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / PRETRAIN["steps"]))
    L, B = PRETRAIN["seq_len"], PRETRAIN["batch"]
    model.train()
    for _ in range(PRETRAIN["steps"]):
        starts = torch.randint(0, len(data) - L - 1, (B,), generator=g)
        x = torch.stack([data[s:s + L] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def ensure_tiny_model() -> Path:
    """Directory of the tiny base model (HF format: config, safetensors weights, tokenizer, chat template)."""
    root = cache_root()
    target = root / f"tiny-llama-{_fingerprint()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists():  # built by another process while we waited
            return target
        # lazy: transformers only when a model or tokenizer is built
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(PRETRAIN["seed"])
        texts = _corpus()
        tokenizer = build_tokenizer(texts)
        cfg = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_SHAPE)
        model = LlamaForCausalLM(cfg)
        threads = torch.get_num_threads()
        try:
            with torch.random.fork_rng():
                torch.set_num_threads(max(1, min(2, len(os.sched_getaffinity(0)))))
                _pretrain(model, tokenizer, synthetic.pretraining_text(PRETRAIN["texts"], seed=0))
        finally:
            torch.set_num_threads(threads)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=root))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    return target
