"""What this machine's CPU can do, read without importing torch (the planning process stays light).

Only what a setting depends on: the bf16 matmul units behind `dtype: bf16` on CPU workers (reteq.train.precision).
"""

from __future__ import annotations

from pathlib import Path

from reteq import environment

# what /proc/cpuinfo calls the units oneDNN uses for bf16 matmuls, best first
CPU_BF16_FLAGS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"))


def cpu_flags(cpuinfo: Path | None = None) -> set[str]:
    """The CPU's feature flags (Linux x86) from `cpuinfo`, else $RETEQ_CPUINFO, else /proc/cpuinfo; empty where
    the file is absent or lists none (macOS, Windows, ARM)."""
    cpuinfo = cpuinfo or Path(environment.get(environment.CPUINFO) or "/proc/cpuinfo")
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_bf16_units(flags: set[str] | None = None) -> str | None:
    """The CPU's native bf16 matmul units ("AMX" or "AVX512-BF16"), or None when bf16 would be emulated.
    `flags`: the CPU's flags (read from /proc/cpuinfo when None). Without flags to read, oneDNN's own check
    decides (imported here only then: torch is what answers it)."""
    flags = cpu_flags() if flags is None else flags
    for flag, name in CPU_BF16_FLAGS:
        if flag in flags:
            return name
    if not flags:
        import torch  # only where /proc/cpuinfo says nothing

        if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "oneDNN bf16"
    return None
