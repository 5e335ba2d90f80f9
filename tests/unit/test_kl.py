"""blob_pyro.kl: the KL schedules (BLoB's re-weighting, standard, fixed) and the closed-form KL, which is
checked against a Monte Carlo estimate and refused for every prior without one."""

import math

import pyro
import pytest
import torch

from blob_pyro.errors import ConfigError
from blob_pyro.guides import make_guide
from blob_pyro.kl import KL_SCHEDULES, BlobKLSchedule, FixedKL, StandardKL, closed_form_kl, make_kl_schedule
from blob_pyro.optim import register_parameters
from blob_pyro.priors import PRIORS, make_prior

from .tiny import tiny_model

NO_CLOSED_FORM = {"student_t": "StudentT"}
"""Prior families without a closed-form KL to the Normal guide in torch (Normal and Laplace have one)."""
"""Families without a closed-form KL against a Normal guide (torch has none)."""


def test_blob_kl_schedule_matches_official_cycle_lengths():
    table = {640: 316, 1119: 393, 2251: 517, 2558: 544, 4957: 706, 9427: 909}
    for n, m in table.items():
        assert BlobKLSchedule(n, 4).cycle == m
    assert BlobKLSchedule(640, 4, world_size=2).cycle == 158
    s = BlobKLSchedule(640, 4)
    m = s.cycle
    assert s.weight(m) == pytest.approx(0.5, rel=1e-9)
    assert s.weight(m - 1) == pytest.approx(0.25, rel=1e-9)
    assert s.weight(m + 1) == s.weight(1) and s.weight(1) < 1e-90
    assert sum(s.weight(t) for t in range(1, m + 1)) == pytest.approx(1.0, rel=1e-9)
    assert all(s.weight(t) < s.weight(t + 1) for t in range(1, m))
    assert BlobKLSchedule(640, 4, dataset_rescaling=False).cycle == 160
    assert BlobKLSchedule(3, 4).cycle == 1  # fewer examples than a batch: one-step cycles, weight 2/3
    assert BlobKLSchedule(3, 4).weight(5) == pytest.approx(2 / 3)


def test_standard_and_fixed_schedules():
    assert StandardKL(640).weight(7) == 1 / 640
    assert FixedKL(640, 0.5).weight(3) == 0.5 / 640
    assert FixedKL(640, 0.0).weight(1) == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="multiplier"):
            FixedKL(10, bad)


def test_a_given_kl_cycle_replaces_the_formulas_m():
    s = BlobKLSchedule(400, 8, cycle=25)
    assert s.cycle == 25 and BlobKLSchedule(400, 8).cycle == 131  # 100 * 400^(pi/8) / 8
    assert sum(s.weight(t) for t in range(1, 26)) == pytest.approx(1.0, abs=1e-7)  # one KL per cycle
    assert s.weight(25) == pytest.approx(2 ** 25 / (2 ** 26 - 1)) and s.weight(50) == s.weight(25)
    assert s.weight(26) == s.weight(1) < 1e-7
    assert make_kl_schedule("blob", 400, 8, cycle=25).cycle == 25
    with pytest.raises(ValueError, match="cycle must be >= 1"):
        BlobKLSchedule(400, 8, cycle=0)


def test_make_kl_schedule_by_name():
    assert isinstance(make_kl_schedule("blob", 640, 4), BlobKLSchedule)
    assert make_kl_schedule("blob", 640, 4, world_size=2).cycle == 158
    assert make_kl_schedule("standard", 64, 4).weight(1) == 1 / 64
    assert make_kl_schedule("fixed", 64, 4, multiplier=0.25).weight(1) == 0.25 / 64
    assert set(KL_SCHEDULES) == {"blob", "standard", "fixed"}
    with pytest.raises(ConfigError, match="unknown kl_schedule 'cyclic'; choose one of blob, standard, fixed"):
        make_kl_schedule("cyclic", 64, 4)


def _moved_guide(model):
    """A BLoB guide moved off its init (mean ~ 0.1, std x9) so the KL has a non-trivial mean term."""
    guide = make_guide("blob", model)
    register_parameters(model, guide)
    with torch.no_grad():
        for name in guide.site_names:
            loc = pyro.param(f"BlobGuide.loc.{name}").unconstrained()
            loc.add_(0.1 * torch.randn_like(loc))
            pyro.param(f"BlobGuide.rho.{name}").unconstrained().mul_(3.0)
    return guide


@pytest.mark.parametrize("family", list(PRIORS))
def test_closed_form_kl_equals_monte_carlo_or_is_refused(family):
    """For every prior family: the closed form (float64) is the MC estimate of E_q[log q - log p], or, where torch
    has no closed form, a one-line ConfigError naming both families (never the KL of another family)."""
    torch.manual_seed(0)
    model = tiny_model("B", prior=make_prior(family, 0.2))
    guide = _moved_guide(model)
    name = model.sites[0].name
    q, p = guide.site_distribution(name), model.prior_distributions()[name]
    if family in NO_CLOSED_FORM:
        with pytest.raises(ConfigError) as err:
            closed_form_kl(q, p)
        msg = str(err.value)
        assert "\n" not in msg and "Normal" in msg and NO_CLOSED_FORM[family] in msg and "prior=normal" in msg
        return
    kl = closed_form_kl(q, p)
    assert kl.dtype == torch.float64 and kl.dim() == 0
    with torch.no_grad():
        draws = q.sample((20000,))
        mc = (q.log_prob(draws).double() - p.log_prob(draws).double())
    se = mc.std().item() / math.sqrt(len(mc))
    assert abs(mc.mean().item() - kl.item()) < 4 * se + 1e-9, (mc.mean().item(), kl.item(), se)


def test_closed_form_normal_kl_is_blobs_formula_and_differentiable():
    torch.manual_seed(1)
    model = tiny_model("A")
    guide = _moved_guide(model)
    name = model.sites[0].name
    q = guide.site_distribution(name)
    loc, std = q.base_dist.loc.detach().double(), q.base_dist.scale.detach().double()
    by_hand = (torch.log(0.2 / std) + (std**2 + loc**2) / (2 * 0.2**2) - 0.5).sum().item()
    kl = closed_form_kl(q, model.prior_distributions()[name])
    assert kl.item() == pytest.approx(by_hand, rel=1e-7)  # prior scale 0.2 is a float32
    kl.backward()
    rho = pyro.param(f"BlobGuide.rho.{name}").unconstrained()
    assert rho.grad is not None and torch.isfinite(rho.grad).all() and rho.grad.dtype == torch.float32
