"""Shared by bench/packing_throughput.py, scoring_throughput.py and generation_throughput.py.

The paper's model shapes as random-init transformers models (throughput and memory do not depend on weight
values, so nothing is downloaded), realistic chat length mixes, FLOP accounting, peak memory, machine info, and
a guard that the benchmark path imports only torch + transformers + peft (+ deepspeed when asked): no ray,
mlflow, polars or pydantic, none of which the GPU image has.

FLOPs: N = parameters that take part in matmuls (every weight, minus an untied input-embedding table, whose
lookup is not a matmul). Training counts 6 N per token, forward-only 2 N (the usual convention; attention's
T^2 term is left out, and for LoRA the frozen weights get no weight-gradient, so the real count is ~4 N:
model TFLOP/s for LoRA runs overstate the hardware's work by ~1.5x and are for comparison across runs only).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runnable from a checkout without installing

from reteq.data.tokenize import Batch, collate  # noqa: E402  # torch-only: the batches the trainer builds

HEAVY = ("ray", "mlflow", "polars", "pydantic")

# name -> (architecture, dims): the published configs of the paper's models, plus small CPU shapes.
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                   tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                   num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                   tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                   tie_word_embeddings=False, rope_theta=500000.0)),
    "llama-2-13b": ("llama", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                                  num_key_value_heads=40, intermediate_size=13824, vocab_size=32000,
                                  tie_word_embeddings=False, rope_theta=10000.0)),
    "qwen2.5-14b": ("qwen2", dict(hidden_size=5120, num_hidden_layers=48, num_attention_heads=40,
                                  num_key_value_heads=8, intermediate_size=13824, vocab_size=152064,
                                  tie_word_embeddings=False, rope_theta=1000000.0)),
    # reteq's builtin:tiny (reteq/tiny.py) and small CPU shapes with the Llama-3 vocabulary ratio kept sane
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=192, vocab_size=1024, tie_word_embeddings=True)),
    "small": ("llama", dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                            intermediate_size=768, vocab_size=8192, tie_word_embeddings=True)),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAPER_LORA = {"llama-3.2-1b": 64, "qwen2.5-1.5b": 32, "llama-3.1-8b": 8, "llama-2-13b": 8, "qwen2.5-14b": 8}


# ---- models --------------------------------------------------------------------------------------------------------

def build_model(shape: str, *, device: torch.device, lora_rank: int = 0, lora_alpha: int | None = None,
                attn: str = "sdpa", seed: int = 0, frozen_bf16: bool = False, max_positions: int = 4096):
    """Random-init model of `shape` on `device`, fp32 weights (as reteq.models), optional LoRA adapters.

    frozen_bf16: the LoRA base's Linear weights in bf16 (as reteq.train.precision.FrozenBase holds them; same
    numbers under bf16 autocast, half the memory). The model is built in bf16 on the device first then, so a
    14B model never holds a full fp32 copy.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kind, dims = SHAPES[shape]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if kind == "llama" else (Qwen2Config, Qwen2ForCausalLM)
    cfg = config_cls(max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     attn_implementation=attn, **dims)
    torch.manual_seed(seed)
    build_dtype = torch.bfloat16 if frozen_bf16 and lora_rank > 0 else torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(build_dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(old)
    if build_dtype != torch.float32:  # everything but the frozen Linear weights back to fp32
        linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
        embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
        for p in model.parameters():
            if id(p) not in linear or id(p) in embed:
                p.data = p.data.float()
        for b in model.buffers():
            if b.is_floating_point():
                b.data = b.data.float()
    if lora_rank > 0:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_rank, lora_alpha=lora_alpha or 2 * lora_rank,
                                                 lora_dropout=0.0, target_modules=LORA_TARGETS,
                                                 task_type="CAUSAL_LM"))
    return model


def matmul_params(model) -> int:
    """N for the FLOP count: unique parameters minus an untied input embedding, LoRA adapters excluded."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or "lora_" in name:
            continue
        seen.add(id(p))
        total += p.numel()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        total -= emb.weight.numel()
    return total


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- data ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ex:
    """Same fields as reteq.data.tokenize.Example (not imported: tokenize pulls pydantic in)."""

    input_ids: list[int]
    labels: list[int]
    index: int

    @property
    def n_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def lognormal_lengths(n: int, *, median: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), sigma))))) for _ in range(n)]


def chat_examples(n: int, vocab: int, *, median: float = 256, sigma: float = 0.7, lo: int = 64, hi: int = 1024,
                  prompt_frac: tuple[float, float] = (0.2, 0.6), seed: int = 0) -> list[Ex]:
    """Chat-SFT-like samples: total length log-normal (median, log-sd sigma) clipped to [lo, hi]; the first
    20-60% is the prompt (labels -100), the rest the labelled response. Random token ids >= 3."""
    rng = random.Random(seed + 1)
    out = []
    for i, length in enumerate(lognormal_lengths(n, median=median, sigma=sigma, lo=lo, hi=hi, seed=seed)):
        cut = max(1, int(length * rng.uniform(*prompt_frac)))
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        out.append(Ex(ids, [-100] * cut + ids[cut:], i))
    return out


def padded_micro_batches(examples, step_indices: list[int], micro_batch: int, rank: int = 0, world: int = 1,
                         pad_id: int = 0, sort: bool = True) -> list[Batch]:
    """As reteq.data.tokenize.micro_batches (length-sorted within the step); sort=False: arrival order."""
    chosen = [examples[i] for i in step_indices]
    if sort:
        chosen.sort(key=lambda e: len(e.input_ids))
    chunks = [chosen[i:i + micro_batch] for i in range(0, len(chosen), micro_batch)]
    return [collate(c, pad_id) for c in chunks[rank::world]]


def step_indices(n_examples: int, n_steps: int, global_batch: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    perm = list(range(n_examples))
    rng.shuffle(perm)
    while len(perm) < n_steps * global_batch:
        perm += perm
    return [perm[s * global_batch:(s + 1) * global_batch] for s in range(n_steps)]


# ---- measurement ---------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (only ever grows)


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.start


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "cpu": cpu,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        info["peft"] = None
    return info


def heavy_modules() -> list[str]:
    return sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in HEAVY})


def default_device(arg: str | None) -> torch.device:
    if arg:
        return torch.device(arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_run_args(p, attn_help: str | None = None, frozen_help: str | None = None) -> None:
    """The options every model benchmark takes, in one place (attention, frozen bf16 base, device, threads,
    seed, JSON output)."""
    p.add_argument("--attn", default="sdpa", help=attn_help)
    p.add_argument("--frozen-bf16", action="store_true", help=frozen_help)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)


def start(args, path: str):
    """Refuse to measure when reteq's `path` pulled in a heavy module (HEAVY), set the thread count ->
    (device, LoRA rank: --lora-rank, else the paper's rank for the shape, else 0)."""
    if heavy_modules():
        raise SystemExit(f"reteq's {path} path imported {heavy_modules()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rank = args.lora_rank if args.lora_rank is not None else PAPER_LORA.get(args.shape, 0)
    return default_device(args.device), rank


def emit(rows: list[dict], header: dict, json_path: str | None, columns: list[str]) -> None:
    """Print a fixed-width table (and a JSON line per row, prefixed 'JSON ') and optionally write a JSON file."""
    print("machine: " + ", ".join(f"{k}={v}" for k, v in header.items()))
    widths = [max(len(c), 10) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        cells = []
        for c, w in zip(columns, widths):
            v = r.get(c, "")
            if isinstance(v, float):
                v = f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
            cells.append(str(v).rjust(w))
        print("  ".join(cells))
    for r in rows:
        print("JSON " + json.dumps(r))
    heavy = heavy_modules()
    by_ds = "deepspeed" in sys.modules  # DeepSpeed itself imports pydantic (and tries mlflow, polars)
    print(f"heavy modules imported: {heavy or 'none'}{' (by deepspeed; reteq checked clean before it)' if heavy and by_ds else ''}")
    if json_path:
        Path(json_path).write_text(json.dumps({"machine": header, "rows": rows, "heavy_modules": heavy}, indent=1))
    if heavy and not by_ds:
        raise SystemExit(f"benchmark path imported {heavy}: it must run with torch + transformers + peft only")


def init_single_process_distributed(device: torch.device) -> None:
    """DeepSpeed wants a process group even for one process: a local one-rank group (gloo on CPU)."""
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
