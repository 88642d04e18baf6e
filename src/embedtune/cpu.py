"""What this CPU can do, from ``/proc/cpuinfo``: the one place that reads it, for the int8 reduce-range default,
the sdg manifest's precision line and the benchmarks' printed machine line. (bf16 training asks torch's own
probes, ``train/machine.cpu_has_native_bf16``: what oneDNN will really use.)

The same 2-core machine type comes with AVX-512 (BF16, VNNI) or with AVX2 only, 3-4x apart in speed: every
figure has to say which one it came from.
"""

from __future__ import annotations

import functools
from pathlib import Path

#: The flags that pick the kernels: AVX2 vs AVX-512 paths, VNNI/AMX int8 dot products, native bf16.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@functools.cache
def _cpuinfo() -> tuple[str, ...] | None:
    try:
        return tuple(Path("/proc/cpuinfo").read_text().splitlines())
    except OSError:
        return None


def _field(name: str) -> str | None:
    """The first processor's ``name`` field."""
    return next((x.split(":", 1)[1].strip() for x in _cpuinfo() or () if x.startswith(name)), None)


def cpu_flags() -> frozenset[str] | None:
    """The first processor's flags, or None where there is no ``/proc/cpuinfo`` (not Linux, or not x86)."""
    line = _field("flags")
    return frozenset(line.split()) if line is not None else None


def cpu_model() -> str:
    return _field("model name") or "unknown CPU"


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
