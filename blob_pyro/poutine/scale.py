"""Scale the KL part of an ELBO: multiply the log-density scale of every latent site, in model and guide.

::

    with scale_latents(num_data * schedule.weight(step)):
        loss = elbo.differentiable_loss(model, guide, batch)

The likelihood sits in a plate of size N (scaled N/B), so scaling the latent sites by ``N · w`` makes the
per-step objective ``mean NLL + w · KL`` (see :mod:`blob_pyro.kl` for the schedules of ``w``). Observed
sites are left alone.

At scale exactly 0 (``mle``) a latent site adds exactly 0 to the ELBO and to every gradient, so the handler records
that zero as the site's log-density (and, for a reparameterised draw, its score parts: no score-function term).
Pyro computes a site's log-density only where none is recorded, so the step computes none of these densities and
runs no backward through them: the same loss and gradients, and 300 fewer operators per MiniLM ``mle`` step. A draw
that is not reparameterised keeps its score parts, whose score-function term is not scaled.
"""

from __future__ import annotations

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .float64 import Float64Density

__all__ = ["LatentScaleMessenger", "scale_latents"]


class LatentScaleMessenger(Messenger):
    """Multiply the log-density scale of every *unobserved* sample site (model and guide)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _pyro_sample(self, msg):
        if not msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]

    def _pyro_post_sample(self, msg):
        if (self.scale == 0 and not msg["is_observed"] and not site_is_subsample(msg)
                and not (msg.get("infer") or {}).get("enumerate")):
            _record_zero_density(msg)


_ZEROS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _record_zero_density(msg) -> None:
    """Record a zero log-density of the site's batch shape (in the dtype its density would have: float64 under
    :class:`~blob_pyro.poutine.Float64Density`), as Pyro's trace would after scaling it by 0."""
    fn, value = msg["fn"], msg["value"]
    if isinstance(fn, Float64Density):
        dtype = torch.float64
    else:
        dtype = value.dtype if torch.is_tensor(value) and value.is_floating_point() else torch.get_default_dtype()
    device = value.device if torch.is_tensor(value) else None
    key = (tuple(fn.batch_shape), dtype, device)
    zeros = _ZEROS.get(key)
    if zeros is None:  # constants without gradient, shared by every step: nothing writes into a log-density
        zero = torch.zeros(fn.batch_shape, dtype=dtype, device=device)
        zeros = _ZEROS[key] = (zero, zero.sum())
    msg["log_prob"], msg["log_prob_sum"] = zeros
    if fn.has_rsample:
        msg["score_parts"] = ScoreParts(log_prob=zeros[0], score_function=0, entropy_term=zeros[0])


def scale_latents(scale: float) -> LatentScaleMessenger:
    """Context manager: scale the KL part of an ELBO (latent sites only) by ``scale``."""
    return LatentScaleMessenger(scale)
