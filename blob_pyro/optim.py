"""Parameters and optimisers: which tensors train, at which learning rate, on which schedule.

::

    params = register_parameters(model, guide)          # {param-store name: tensor}, no data needed
    groups = param_groups(params, guide, lr=1e-3, scale_lr=1e-2)   # means | the guide's scale parameters
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(max_steps=200))

``own_params()`` runs a model and guide on the parameters they hold themselves, whatever Pyro's global
param store carries (prediction and diagnostics use it, so two loaded runs never see each other's values).

The guide names its scale parameters (``guide.scale_parameters()``; Pyro's AutoNormal and AutoDelta are
known here), so a new guide family never silently trains its stds at the means' rate.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

from .errors import ConfigError

__all__ = ["warmup_linear", "register_parameters", "scale_parameters", "param_groups", "set_lora_dropout", "own_params"]


def warmup_linear(max_steps: int, warmup_ratio: float = 0.06) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio * max_steps`` steps, then linear decay to 0."""
    warm = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warm))

    return factor


def own_params():
    """A context in which Pyro's param store starts empty and is restored afterwards.

    A model or guide *call* takes the store's value for each of its parameter names and writes it into the
    module (``pyro.module(..., update_module_params=True)``, and PyroModule's ``PyroParam`` attributes). Two runs
    built or loaded in one process name their parameters alike (``network$$$...``, ``loc.<site>``), so calling
    run B while the store holds run A's values would make B predict with A's weights and keep them. Inside this
    context each call registers, and uses, the tensors its own modules hold: after training these are the
    trained ones (the store held the same tensor objects), after ``load_run`` the loaded ones. Values put in the
    store by hand without a call (``pyro.get_param_store().load``) are not seen here.
    """
    return pyro.get_param_store().scope()


@torch.no_grad()
def register_parameters(model, guide) -> dict[str, torch.Tensor]:
    """Put every trainable parameter of ``model`` and ``guide`` in Pyro's param store; returns them by name.

    Needs no data: the network's parameters are registered as the model registers them, and the guide is run
    once without arguments (every guide :func:`~blob_pyro.guides.make_guide` builds sets itself up from
    ``model.latent_sites()`` or the model's prior part). The RNG streams are restored afterwards, so
    registering changes no later draw.
    """
    from .checkpoint import get_rng_state, set_rng_state

    rng = get_rng_state()
    try:
        pyro.module("network", model.network, update_module_params=True)
        guide()
    finally:
        set_rng_state(rng)
    return dict(sorted(pyro.get_param_store().named_parameters()))


def scale_parameters(guide) -> list[torch.Tensor] | None:
    """The guide's scale (std) parameters, or None when the guide does not say which they are."""
    if hasattr(guide, "scale_parameters"):
        return list(guide.scale_parameters())
    if isinstance(guide, AutoNormal):
        return list(guide.scales.parameters())
    if isinstance(guide, AutoDelta):
        return []
    return None


def param_groups(params: dict[str, torch.Tensor], guide, *, lr: float, scale_lr: float | None = None,
                 weight_decay: float = 0.0) -> list[dict]:
    """Two AdamW groups over ``params`` (name -> tensor): ``lr`` for means and deterministic parameters,
    ``scale_lr`` for the guide's scale parameters. Each group also lists its parameters' ``names``."""
    scales = scale_parameters(guide)
    if scales is None:
        if scale_lr is not None and scale_lr != lr:
            raise ConfigError(f"scale_lr needs a guide that names its scale parameters (a scale_parameters() "
                              f"method); {type(guide).__name__} has none")
        scales = []
    scale_ids = {id(p) for p in scales}
    groups = [{"params": [], "names": [], "lr": lr, "weight_decay": weight_decay},
              {"params": [], "names": [], "lr": lr if scale_lr is None else scale_lr, "weight_decay": weight_decay}]
    for name, p in params.items():
        g = groups[1 if id(p) in scale_ids else 0]
        g["params"].append(p)
        g["names"].append(name)
    return groups


def set_lora_dropout(network: torch.nn.Module) -> None:
    """Frozen backbone in eval mode (no dropout), LoRA dropout layers with p > 0 in train mode (active)."""
    network.eval()
    for name, module in network.named_modules():
        if "lora_dropout" in name and isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.train()
