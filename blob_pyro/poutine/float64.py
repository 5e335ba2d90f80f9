"""Float64 log-densities for the latent sites: the KL part of the ELBO in double precision.

::

    with float64_latents():                                   # around an SVI step, float32 or autocast
        loss = elbo.differentiable_loss(model, guide, batch)

Every latent (unobserved) site's distribution is wrapped in :class:`Float64Density`: it samples exactly
as before (same dtype, same draws) while ``log_prob`` and ``kl_divergence`` are computed in float64 on
the float32 parameters (gradients flow through the casts). A float32 Normal log-density is NaN once a
std falls below ~1e-22 (its variance underflows to 0); see ``docs/numerics.md``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence, register_kl

__all__ = ["Float64Density", "Float64Latents", "float64_latents", "as_float64", "float64_copy"]


_FAMILIES = ((dist.Normal, ("loc", "scale")), (dist.Laplace, ("loc", "scale")), (dist.StudentT, ("df", "loc", "scale")),
             (dist.LowRankMultivariateNormal, ("loc", "cov_factor", "cov_diag")), (dist.Delta, ("v", "log_density")))
"""The families :func:`as_float64` copies, each with its parameter tensors in constructor order."""


def _family(d) -> tuple:
    """(family, the parameter tensors :func:`as_float64` casts) of ``d`` under its Independent/Transformed
    wrappers, or (None, ())."""
    while isinstance(d, (dist.Independent, dist.TransformedDistribution)):
        d = d.base_dist
    for family, names in _FAMILIES:
        if isinstance(d, family):
            return family, tuple(getattr(d, n) for n in names)
    return None, ()


def as_float64(d):
    """``d`` with float64 parameters (same family), or None for a family not handled here.

    The copy does not validate its arguments again: they are exact casts of ``d``'s, which ``d`` validated (or
    was built not to). :class:`Float64Density` validates a value against ``d`` where ``d`` validates.
    """
    if isinstance(d, dist.Independent):
        inner = as_float64(d.base_dist)
        return None if inner is None else dist.Independent(inner, d.reinterpreted_batch_ndims, validate_args=False)
    if isinstance(d, dist.TransformedDistribution):
        inner = as_float64(d.base_dist)
        return None if inner is None else dist.TransformedDistribution(inner, d.transforms, validate_args=False)
    family, tensors = _family(d)
    if family is None:
        return None
    extra = {"event_dim": d.event_dim} if family is dist.Delta else {}
    return family(*(t.double() for t in tensors), validate_args=False, **extra)


def float64_copy(d):
    """:func:`as_float64` of ``d``, kept on ``d`` and handed out again while ``d``'s tensors are unchanged (same
    tensors, same in-place versions) where reusing it builds no graph: ``d`` has no tensor that needs a gradient (a
    prior, copied once for all steps), or gradients are off (the KL a step logs reuses the copies its ELBO made).
    The same casts of the same values: the same float64 numbers."""
    tensors = _family(d)[1]
    key = tuple((id(t), t._version) for t in tensors)
    cached = d.__dict__.get("_float64_copy")
    if (cached is not None and cached[0] == key
            and (not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors))):
        return cached[1]
    wide = as_float64(d)
    if tensors:  # keeps the tensors alive with the copy: an id in the key cannot be reused by another tensor
        d.__dict__["_float64_copy"] = (key, wide, tensors)
    return wide


class Float64Density(dist.TorchDistribution):
    """Samples exactly as ``base`` (same dtype, same draws); ``log_prob`` and KL are computed in float64.

    Parameters stay float32 (gradients flow through the casts); families that :func:`as_float64`
    does not know keep their own dtype.
    """

    _wraps_density = True  # blob_pyro.poutine.flipout looks through this wrapper for the draw's mean
    arg_constraints: dict = {}

    def __init__(self, base):
        self.base_dist = base
        # validation as the caller has it when the wrapper is built (it has no arguments of its own to check): a
        # step run with validation off does not check values against a prior built, and validated, long before
        super().__init__(base.batch_shape, base.event_shape)

    @property
    def has_rsample(self):
        return self.base_dist.has_rsample

    @property
    def support(self):
        return self.base_dist.support

    @property
    def mean(self):
        return self.base_dist.mean

    @property
    def variance(self):
        return self.base_dist.variance

    def sample(self, sample_shape=torch.Size()):
        return self.base_dist.sample(sample_shape)

    def rsample(self, sample_shape=torch.Size()):
        return self.base_dist.rsample(sample_shape)

    def log_prob(self, value):
        wide = float64_copy(self.base_dist)
        if wide is None:
            return self.base_dist.log_prob(value)
        if self._validate_args and self.base_dist._validate_args:  # what the float64 copy would check, on the original
            self.base_dist._validate_sample(value)
        return wide.log_prob(value.double())

    def expand(self, batch_shape, _instance=None):
        return Float64Density(self.base_dist.expand(batch_shape))


@register_kl(Float64Density, Float64Density)
def _kl_float64(p, q):
    wp, wq = float64_copy(p.base_dist), float64_copy(q.base_dist)
    if wp is None or wq is None:
        return kl_divergence(p.base_dist, q.base_dist)
    return kl_divergence(wp, wq)


class Float64Latents(Messenger):
    """Wrap the distribution of every latent (unobserved) sample site in :class:`Float64Density`.

    Used around every SVI step (float32 or autocast) so that the KL part of the ELBO (log q − log p of
    the draws, or the closed-form KL of ``TraceMeanField_ELBO``) is computed and summed in float64::

        with Float64Latents(), torch.autocast("cuda", dtype=torch.bfloat16):
            svi.step(batch)
    """

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg) or isinstance(msg["fn"], Float64Density):
            return
        if isinstance(msg["fn"], torch.distributions.Distribution):
            msg["fn"] = Float64Density(msg["fn"])



def float64_latents() -> Float64Latents:
    """Context manager: latent log-densities (and closed-form KLs) in float64; see :class:`Float64Latents`."""
    return Float64Latents()
