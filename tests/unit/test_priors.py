"""blob_pyro.priors: i.i.d. priors over a whole factor, built by family name, with checked scales."""

import math

import pyro.distributions as dist
import pytest
import torch

from blob_pyro.priors import PRIORS, LaplacePrior, NormalPrior, StudentTPrior, make_prior

from .tiny import tiny_model

BASES = {"normal": dist.Normal, "laplace": dist.Laplace, "student_t": dist.StudentT}


@pytest.mark.parametrize("family", PRIORS)
def test_every_family_is_iid_over_the_factor_shape(family):
    site = tiny_model("A").sites[0]
    prior = make_prior(family, 0.3)
    d = prior(site)
    assert isinstance(d, dist.Independent) and isinstance(d.base_dist, BASES[family])
    assert d.event_shape == site.shape and d.batch_shape == ()
    assert torch.all(d.base_dist.loc == 0) and torch.allclose(d.base_dist.scale, torch.tensor(0.3))
    assert d.log_prob(torch.zeros(site.shape)).dtype == torch.float32
    assert prior.to_config()["family"] == family and prior.to_config()["scale"] == 0.3
    assert "0.3" in prior.describe()


def test_student_t_degrees_of_freedom():
    prior = make_prior("student_t", 0.1, df=5.0)
    assert isinstance(prior, StudentTPrior) and prior.df == 5.0
    d = prior(tiny_model("B").sites[0])
    assert torch.all(d.base_dist.df == 5.0)
    assert prior.describe() == "StudentT(5, 0, 0.1)" and prior.to_config() == {"family": "student_t", "scale": 0.1,
                                                                              "df": 5.0}
    with pytest.raises(ValueError, match="df"):
        StudentTPrior(0.1, df=0)


def test_normal_prior_density_is_the_papers():
    site = tiny_model("B").sites[0]
    value = torch.full(site.shape, 0.1)
    n = math.prod(site.shape)
    by_hand = n * (-0.5 * (0.1 / 0.2) ** 2 - math.log(0.2 * math.sqrt(2 * math.pi)))
    assert NormalPrior(0.2)(site).log_prob(value).item() == pytest.approx(by_hand, rel=1e-5)
    assert NormalPrior(0.2).describe() == "Normal(0, 0.2)" and LaplacePrior(0.1).describe() == "Laplace(0, 0.1)"


@pytest.mark.parametrize("scale", [0, -0.1, float("nan"), float("inf")])
def test_scale_must_be_finite_and_positive(scale):
    for family in PRIORS:
        with pytest.raises(ValueError, match="prior_scale"):
            make_prior(family, scale)


def test_unknown_family_names_the_choices():
    with pytest.raises(ValueError, match="normal, laplace, student_t"):
        make_prior("cauchy", 0.1)


def test_a_prior_is_built_once_per_shape_and_device_and_gives_the_same_densities():
    from types import SimpleNamespace

    prior = NormalPrior(0.2)
    a, b = SimpleNamespace(shape=(3, 2), device=None), SimpleNamespace(shape=(2, 3), device="cpu")
    assert prior(a) is prior(SimpleNamespace(shape=(3, 2), device=None)) and prior(b) is not prior(a)
    x = torch.randn(3, 2)
    fresh = dist.Normal(torch.zeros(()), torch.zeros(()) + 0.2).expand((3, 2)).to_event(2)
    assert torch.equal(prior(a).log_prob(x), fresh.log_prob(x)) and prior(a).event_shape == (3, 2)
