"""KL weighting across minibatches, applied with a scale on the latent sites of model and guide alike.

A schedule gives ``weight(step)``: the weight of KL(q‖p) relative to the *batch-mean* NLL, i.e. the
per-step objective is ``mean NLL + weight · KL``. In the Pyro model the likelihood sits in a plate
of size N (scaled N/B), so the latent sites are scaled by ``N · weight``::

    schedule = BlobKLSchedule(num_data=640, batch_size=4)      # docs/reference.md
    with scale_latents(num_data * schedule.weight(step)):      # blob_pyro.poutine
        loss = elbo.differentiable_loss(model, guide, batch)
    kl = closed_form_kl(guide.site_distribution(name), prior)  # float64; refused where there is no closed form

- :class:`StandardKL`: the minibatch ELBO, weight 1/N (each step sees KL once per epoch of data).
- :class:`BlobKLSchedule`: π_t = 2^i / (2^(M+1) − 1), i = t mod M in 1..M (increasing within a cycle),
  with M = int(100 · N^(π/γ) / (world_size · B)) under dataset rescaling (γ = 8), else steps per epoch, or a
  given ``cycle``.
- :class:`FixedKL`: a constant multiplier c, weight c/N.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Normal
from torch.distributions import kl_divergence

from .errors import ConfigError

__all__ = ["StandardKL", "BlobKLSchedule", "FixedKL", "make_kl_schedule", "KL_SCHEDULES", "closed_form_kl",
           "normal_kl_has_closed_form"]


class StandardKL:
    """The standard minibatch ELBO: KL weight 1/N per step."""

    name = "standard"

    def __init__(self, num_data: int):
        self.num_data = int(num_data)

    def weight(self, step: int) -> float:
        return 1.0 / self.num_data


class FixedKL:
    """KL weight ``multiplier / N`` (``multiplier = 1`` is the standard ELBO; < 1 tempers the prior)."""

    name = "fixed"

    def __init__(self, num_data: int, multiplier: float = 1.0):
        if not math.isfinite(multiplier) or multiplier < 0:
            raise ValueError(f"kl multiplier must be a finite number >= 0, got {multiplier}")
        self.num_data = int(num_data)
        self.multiplier = float(multiplier)

    def weight(self, step: int) -> float:
        return self.multiplier / self.num_data


class BlobKLSchedule:
    """BLoB's KL re-weighting, as the official code does it (``docs/reference.md``).

    :param int num_data: N, training examples (counted after drop_last, as the official code does).
    :param int batch_size: per-process batch size B.
    :param float gamma: γ of the dataset rescaling (8).
    :param int world_size: number of processes; M is divided by it so the number of cycles does
        not depend on the process count.
    :param bool dataset_rescaling: M from the formula above; otherwise M = steps per epoch.
    :param cycle: M itself (overrides both): the number of KL spikes a run gets is max_steps / M, and the formula's
        M, made for the paper's 5,000 steps, gives a short run on a small split only two or three.
    """

    name = "blob"

    def __init__(self, num_data: int, batch_size: int, *, gamma: float = 8.0, world_size: int = 1,
                 dataset_rescaling: bool = True, cycle: int | None = None):
        self.num_data = int(num_data)
        kept = (self.num_data // batch_size) * batch_size  # N after drop_last, as the official loader counts it
        if cycle is not None:
            if int(cycle) < 1:
                raise ValueError(f"the KL cycle must be >= 1 step, got {cycle}")
            m = int(cycle)
        elif dataset_rescaling:
            m = int(100 * kept ** (math.pi / gamma) / world_size / batch_size)
        else:
            m = self.num_data // (batch_size * world_size)
        self.cycle = max(1, m)

    def weight(self, step: int) -> float:
        """π for 1-based step ``step``."""
        m = self.cycle
        i = step % m
        i = m if i == 0 else i
        # 2^i / (2^(m+1) - 1) computed in log space: m is several hundred
        return math.exp((i - (m + 1)) * math.log(2.0) - math.log1p(-(2.0 ** -(m + 1))))


KL_SCHEDULES = {"blob": BlobKLSchedule, "standard": StandardKL, "fixed": FixedKL}


def make_kl_schedule(name: str, num_data: int, batch_size: int, *, world_size: int = 1,
                     gamma: float = 8.0, multiplier: float = 1.0, dataset_rescaling: bool = True,
                     cycle: int | None = None):
    if name == "standard":
        return StandardKL(num_data)
    if name == "blob":
        return BlobKLSchedule(num_data, batch_size, gamma=gamma, world_size=world_size,
                              dataset_rescaling=dataset_rescaling, cycle=cycle)
    if name == "fixed":
        return FixedKL(num_data, multiplier)
    raise ConfigError(f"unknown kl_schedule {name!r}; choose one of {', '.join(KL_SCHEDULES)}")


def closed_form_kl(q, p) -> torch.Tensor:
    """KL(q‖p) summed over all entries, in float64, from the closed form of the two distributions given.

    Refused (:class:`~blob_pyro.errors.ConfigError`, one line) where torch has no closed form for the pair, e.g.
    a Normal guide against a Student-t prior (Normal against Normal or Laplace has one): the KL is never replaced
    by that of another family.
    """
    from .poutine.float64 import as_float64

    wq, wp = as_float64(q), as_float64(p)
    if wq is None or wp is None:
        raise ConfigError(f"no float64 form of {type(q if wq is None else p).__name__}")
    try:
        return kl_divergence(wq, wp).sum()
    except NotImplementedError as err:
        raise ConfigError(f"no closed-form KL between the guide's {_family(q)} and the prior's {_family(p)}; "
                          f"use prior=normal or an objective that estimates the KL by Monte Carlo") from err


def normal_kl_has_closed_form(prior) -> bool:
    """Whether KL(Normal guide ‖ ``prior``) has a closed form in torch (``prior``: a callable ``prior(site)``)."""
    from types import SimpleNamespace

    p = prior(SimpleNamespace(shape=(1,), device=None))
    q = Normal(torch.zeros(1), torch.ones(1)).to_event(1)
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


def _family(d) -> str:
    while hasattr(d, "base_dist"):
        d = d.base_dist
    return type(d).__name__
