"""Effect handlers (Pyro messengers) that BLoB's training and prediction run under.

::

    from blob_pyro.poutine import flipout, float64_latents, scale_latents
    with scale_latents(num_data * kl_weight), flipout("token"), float64_latents():
        loss = elbo.differentiable_loss(model, guide, batch)

- :mod:`~blob_pyro.poutine.flipout`: apply each LoRA draw with per-token random sign flips (Flipout).
- :mod:`~blob_pyro.poutine.scale`: weight the KL part of the ELBO (the latent sites only).
- :mod:`~blob_pyro.poutine.float64`: latent log-densities and KLs in float64.
"""

from .flipout import FlipoutMessenger, active_flipout, flipout, flipout_linear
from .float64 import Float64Density, Float64Latents, float64_latents
from .scale import LatentScaleMessenger, scale_latents

__all__ = ["FlipoutMessenger", "Float64Density", "Float64Latents", "LatentScaleMessenger", "active_flipout",
           "flipout", "flipout_linear", "float64_latents", "scale_latents"]
