"""What this CPU can do, from its ``/proc/cpuinfo`` flags: the one place the engines' CPU-dependent defaults
(int8 reduce-range, bf16 training) and the benchmarks' printed machine line read them from.

The same 2-core machine type comes with AVX-512 (BF16, VNNI) or with AVX2 only, 3-4x apart in speed: every
figure has to say which one it came from.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: The flags that pick the kernels: AVX2 vs AVX-512 paths, VNNI/AMX int8 dot products, native bf16.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The first processor's flags, or None where there is no ``/proc/cpuinfo`` (not Linux, or not x86)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    line = next((x for x in lines if x.startswith("flags")), None)
    return frozenset(line.split(":", 1)[1].split()) if line else None


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    return next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), "unknown CPU")


def isa_summary() -> str:
    """One line for a benchmark's header, e.g. ``AMD EPYC: avx2 no-avx512f no-avx512_vnni ...``."""
    flags = cpu_flags()
    if flags is None:
        return "unknown CPU (no /proc/cpuinfo flags)"
    return f"{cpu_model()}: " + " ".join(f if f in flags else f"no-{f}" for f in ISA_FLAGS)


def has_int8_dot_product() -> bool:
    """x86 VNNI (or AMX) makes u8*s8 integer dot products exact; plain AVX2's ``vpmaddubsw`` can saturate.
    Unknown platforms (e.g. ARM) count as having it: full int8 range is the usual choice there."""
    flags = cpu_flags()
    if flags is None:
        return True
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) or "avx2" not in flags
