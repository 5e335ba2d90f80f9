"""Scale the KL part of an ELBO: multiply the log-density scale of every latent site, in model and guide.

::

    with scale_latents(num_data * schedule.weight(step)):
        loss = elbo.differentiable_loss(model, guide, batch)

The likelihood sits in a plate of size N (scaled N/B), so scaling the latent sites by ``N · w`` makes the
per-step objective ``mean NLL + w · KL`` (see :mod:`blob_pyro.kl` for the schedules of ``w``). Observed
sites are left alone.
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger

__all__ = ["LatentScaleMessenger", "scale_latents"]


class LatentScaleMessenger(Messenger):
    """Multiply the log-density scale of every *unobserved* sample site (model and guide)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def _pyro_sample(self, msg):
        if not msg["is_observed"]:
            msg["scale"] = self.scale * msg["scale"]


def scale_latents(scale: float) -> LatentScaleMessenger:
    """Context manager: scale the KL part of an ELBO (latent sites only) by ``scale``."""
    return LatentScaleMessenger(scale)
