"""GGUF weights -> a plain safetensors model directory, once per file, in a content-addressed cache.

Why convert: transformers dequantises a GGUF file on every `from_pretrained(..., gguf_file=...)` (about 15 s for
SmolLM2-135M on one core), and the dequantised model refuses `save_pretrained` ("quantized with gguf and is not
serializable"). Every Ray worker of a sweep loads its base model, so reteq converts once: the dequantised weights
are copied into a model built `from_config` (the config without its `quantization_config`) and saved as fp32
safetensors with the tokenizer, its chat template and the generation config, under
$RETEQ_CACHE/gguf/<file stem>-<sha256[:16]>. The directory is built in a temp folder under a file lock and
published with one rename, so a killed conversion leaves nothing a later load could take for complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from reteq.errors import ModelError
from reteq.model_files import file_digest, locate_gguf
from reteq.workdir import cache_root

MARKER = "reteq-gguf.json"  # written last inside the temp folder: a published directory always has it


def cache_dir(gguf_path: Path) -> Path:
    return cache_root() / "gguf" / f"{gguf_path.stem}-{file_digest(gguf_path)[:16]}"


def ensure_converted(source: str, gguf_file: str | None = None, revision: str | None = None) -> Path:
    """The safetensors directory of the GGUF weights `source` names (converting them on first use)."""
    path = locate_gguf(source, gguf_file)
    if path is None:  # a GGUF file in a hub repo: downloaded (or found in the hub cache) first
        from huggingface_hub import hf_hub_download  # only for this form; everything else stays offline

        try:
            path = Path(hf_hub_download(source, gguf_file, revision=revision))
        except Exception as e:
            raise ModelError(f"source {source}: cannot fetch {gguf_file} ({str(e).splitlines()[0]})") from None
    target = cache_dir(path)
    if (target / MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / MARKER).exists():  # converted by another process while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-gguf-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the published model is for every user of the cache
        try:
            _convert(path, tmp)
            (tmp / MARKER).write_text(json.dumps({"gguf": str(path), "sha256": file_digest(path)}, indent=1))
            if target.exists():  # a leftover without its marker: never complete, replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(path: Path, out: Path) -> None:
    import torch  # heavy: only a conversion needs it

    # lazy: keeps torch out of the light processes (driver, Tune trials, the CLI)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"GGUF file {path}: cannot load it ({str(e).splitlines()[0]})") from None
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied(plain)]
    if missing or unexpected:
        raise ModelError(f"GGUF file {path}: weights do not match its config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    plain.generation_config = quantised.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _tied(model) -> set[str]:
    """Parameter names that share storage with another (a tied lm_head): absent from the state dict is fine."""
    return set(getattr(model, "_tied_weights_keys", None) or ())  # a list, or (transformers 5) a dict by name
