"""Priors over LoRA factors: callables ``prior(site) -> Distribution`` with event shape = factor shape.

BLoB's prior is an i.i.d. ``Normal(0, prior_scale)`` on every entry, ``prior_scale = 0.2`` (a std)::

    prior = NormalPrior(0.2)               # the paper
    prior = make_prior("laplace", 0.1)     # an ablation, one argument
    d = prior(site)                         # Normal(0, 0.2).expand(site.shape).to_event(2)
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

__all__ = ["NormalPrior", "LaplacePrior", "StudentTPrior", "make_prior", "PRIORS"]


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"prior_scale must be a finite number > 0, got {scale}")
    return scale


class _IIDPrior:
    family = ""

    def __init__(self, scale: float = 0.2):
        self.scale = _check_scale(scale)
        self._built: dict[tuple, dist.Distribution] = {}

    def _base(self, zero: torch.Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, site) -> dist.Distribution:
        # A constant distribution, built once per shape and device: the model asks for it at every step.
        device = getattr(site, "device", None)
        key = (tuple(site.shape), None if device is None else torch.device(device), self.scale, getattr(self, "df", None))
        d = self._built.get(key)
        if d is None:
            zero = torch.zeros((), device=device)
            d = self._built[key] = self._base(zero).expand(key[0]).to_event(len(key[0]))
        return d

    def describe(self) -> str:
        return f"{type(self).__name__[:-5]}(0, {self.scale:g})"

    def to_config(self) -> dict:
        return {"family": self.family, "scale": self.scale}


class NormalPrior(_IIDPrior):
    """i.i.d. Normal(0, scale) on every entry (BLoB). KL to a Normal guide has a closed form."""

    family = "normal"

    def _base(self, zero):
        return dist.Normal(zero, zero + self.scale)


class LaplacePrior(_IIDPrior):
    """i.i.d. Laplace(0, scale): sparser updates. KL to a Normal guide has a closed form (torch's); Trace_ELBO
    estimates it by Monte Carlo all the same, TraceMeanField_ELBO and the paper objective use the closed form."""

    family = "laplace"

    def _base(self, zero):
        return dist.Laplace(zero, zero + self.scale)


class StudentTPrior(_IIDPrior):
    """i.i.d. Student-t(df, 0, scale): heavy tails. No closed-form KL to a Normal guide: the KL is estimated by
    Monte Carlo (Trace_ELBO), and the paper objective refuses it."""

    family = "student_t"

    def __init__(self, scale: float = 0.2, df: float = 3.0):
        super().__init__(scale)
        if not math.isfinite(df) or df <= 0:
            raise ValueError(f"Student-t df must be > 0, got {df}")
        self.df = float(df)

    def _base(self, zero):
        return dist.StudentT(zero + self.df, zero, zero + self.scale)

    def describe(self) -> str:
        return f"StudentT({self.df:g}, 0, {self.scale:g})"

    def to_config(self) -> dict:
        return {"family": self.family, "scale": self.scale, "df": self.df}


PRIORS = {"normal": NormalPrior, "laplace": LaplacePrior, "student_t": StudentTPrior}


def make_prior(family: str = "normal", scale: float = 0.2, **kwargs):
    """Build a prior by family name (``normal``, ``laplace``, ``student_t``)."""
    if family not in PRIORS:
        raise ValueError(f"unknown prior family {family!r}; choose one of {', '.join(PRIORS)}")
    return PRIORS[family](scale, **kwargs)
