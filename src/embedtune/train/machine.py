"""The machine the fine-tune runs on: CUDA or CPU, bf16 and tf32, the optimizer, free and resident memory, and
glibc's allocator told to give freed tensors back."""

from __future__ import annotations

from dataclasses import dataclass

from embedtune.console import log


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16: bool
    tf32: bool
    optim: str


def hardware(cpu_bf16: bool | None = None) -> Hardware:
    """bf16, tf32 and fused AdamW where CUDA supports them. On a CPU, torch AdamW, with bf16 autocast where the CPU
    multiplies bf16 natively (``cpu_bf16=None``) or where the settings ask for it."""
    import torch

    if not torch.cuda.is_available():
        native = cpu_has_native_bf16()
        bf16 = native if cpu_bf16 is None else cpu_bf16
        if bf16 and not native:
            log.warning("finetune.cpu_bf16: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated, slower")
        log.info("no CUDA device: training on CPU in %s with torch AdamW",
                 "bf16 mixed precision" if bf16 else "fp32")
        return Hardware(False, bf16, False, "adamw_torch")
    bf16 = torch.cuda.is_bf16_supported()
    tf32 = torch.cuda.get_device_capability()[0] >= 8
    log.info("CUDA: bf16=%s tf32=%s, fused AdamW", bf16, tf32)
    return Hardware(True, bf16, tf32, "adamw_torch_fused")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 matmuls natively; MiniLM training steps measured 1.6-1.7x fp32
    (bench/train_throughput.py, 2 cores). Without them bf16 is emulated and slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resident_memory(hw: Hardware) -> int:
    """Bytes the training process holds now: its resident set on CPU, what torch has allocated under CUDA."""
    if hw.cuda:
        import torch

        return int(torch.cuda.memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


def free_memory(hw: Hardware) -> int:
    """Bytes free on the training device: the GPU's free memory under CUDA, else available RAM."""
    if hw.cuda:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


# glibc's mallopt parameter, and the size from which it maps blocks straight from the kernel (its own default start).
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024


def return_freed_tensors_to_the_os() -> bool:
    """Have glibc give freed tensors' memory back to the kernel at once (Linux, CPU training).

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after which a forward pass's
    freed temporaries (projections before reshapes, rotary halves, attention scratch) stay in its heap: on the
    SmolLM2-135M LoRA fine-tune that was ~1.5 GB of peak RSS beyond the live tensors (6.3 GB against 4.8 GB with
    the threshold fixed at glibc's own 128 KiB start, and no slower). Fixing the threshold keeps the measured peak
    close to what the planner counts. A no-op (False) where libc is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
