"""What machine a measurement ran on: every benchmark JSON records it, and advice that picks bf16
checks `native_bf16()` first (the same machine kind comes as an Intel CPU with AVX-512/AMX, where
bf16 runs in hardware, and as an AMD EPYC with AVX2 only, where it is emulated and ~4x slower)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not flags:
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return model, frozenset(flags)


def native_bf16() -> bool:
    """The CPU computes bf16 in hardware (AVX-512 BF16 or AMX)."""
    flags = _cpuinfo()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def describe() -> dict:
    import torch

    model, flags = _cpuinfo()
    return {
        "cpu": model, "cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
        "flags": [f for f in FLAGS if f in flags], "native_bf16": native_bf16(),
        "platform": platform.platform(), "torch": torch.__version__, "gpu": torch.cuda.is_available(),
        "loadavg": os.getloadavg(),
    }
