"""blob_pyro.precision: bf16 autocast on a CPU without bf16 instructions is emulated; a run says so once."""

import os
import platform
from pathlib import Path

import pytest
import torch

import blob_pyro.precision as precision
from blob_pyro.config import FitConfig
from blob_pyro.guides import make_guide
from blob_pyro.infer import make_step

from .tiny import tiny_model


def test_native_bf16_detection_matches_the_kernel_cpu_flags():
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/cpuinfo"):
        pytest.skip("the check reads x86 CPU flags from /proc/cpuinfo (Linux on x86 only)")
    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert precision.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)


def test_emulated_bf16_warns_once_and_float32_or_native_bf16_do_not(monkeypatch, recwarn):
    model = tiny_model("B")
    guide = make_guide("blob", model)
    cfg = FitConfig(max_steps=2)
    monkeypatch.setattr(precision, "_warned", False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    make_step(model, guide, cfg, autocast_dtype=torch.bfloat16, device="cpu")
    assert not [w for w in recwarn if "emulated" in str(w.message)]
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    make_step(model, guide, cfg, device="cpu")  # float32: nothing to say
    assert not [w for w in recwarn if "emulated" in str(w.message)]
    for _ in range(2):
        make_step(model, guide, cfg, autocast_dtype=torch.bfloat16, device="cpu")
    hits = [w for w in recwarn if "emulated" in str(w.message)]
    assert len(hits) == 1 and hits[0].category is RuntimeWarning
    assert "bf16=false" in str(hits[0].message) and "\n" not in str(hits[0].message)
    assert precision.warn_if_emulated("cuda", torch.bfloat16) is False  # a GPU: never
