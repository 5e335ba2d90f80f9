"""Mixed precision on the CPU: is bf16 native here?

bf16 autocast is fast only on CPUs with bf16 instructions (AVX512-BF16 or AMX). Elsewhere PyTorch emulates
it, several times slower than float32 (docs/numerics.md has the measurement). A run asked to use bf16 on such
a CPU still does (the numbers then match other bf16 runs), but says once that float32 would be faster::

    warn_if_emulated("cpu", torch.bfloat16)      # True (and a RuntimeWarning, once) where bf16 is emulated
"""
from __future__ import annotations

import platform
import warnings

import torch

_warned = False


def cpu_has_native_bf16() -> bool:
    """True when this x86 CPU has AVX512-BF16 or AMX tiles (what PyTorch's oneDNN bf16 kernels use).

    On other architectures (ARM, ...) this cannot tell and returns True: no warning is given there.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return True
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [c for c in checks if c is not None]
    return not checks or any(bool(c()) for c in checks)  # a torch without these helpers: cannot tell, no warning


def warn_if_emulated(device_type: str, dtype: torch.dtype | None) -> bool:
    """Warn (once per process) when bf16 autocast is requested on a CPU without native bf16; returns whether it warned."""
    global _warned
    if dtype != torch.bfloat16 or device_type != "cpu" or cpu_has_native_bf16():
        return False
    if not _warned:
        warnings.warn("bf16 autocast on this CPU (no AVX512-BF16/AMX) is emulated and several times slower than "
                      "float32; set bf16=false (bench: --set bf16=false) unless you need bf16 numbers",
                      RuntimeWarning, stacklevel=3)
        _warned = True
    return True
