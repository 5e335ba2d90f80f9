"""Flipout as a Pyro effect handler.

Inside ``flipout()``, a LoRA factor whose value was drawn from a distribution with a known mean
is applied as ``x @ loc.T + ((x * r) @ (value - loc).T) * s``, with fresh Rademacher signs ``r``
(input side) and ``s`` (output side) for every example and token: one shared Gaussian draw per
layer, decorrelated across positions by the sign flips (Wen et al. 2018; BLoB §1.3)::

    with flipout():
        loss = svi.step(batch)          # guide draws once per layer, signs differ per token

Outside the handler, or for a value with no recorded mean (AutoDelta, a conditioned value),
the factor is applied as the plain matrix it is: one weight sample shared by the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pyro.distributions import Independent
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

__all__ = ["FlipoutMessenger", "flipout", "flipout_linear", "active_flipout"]


def _distribution_loc(fn, infer: dict, value: torch.Tensor) -> torch.Tensor | None:
    """The mean a draw ``value`` was perturbed around, if the site says or the distribution has one."""
    loc = (infer or {}).get("flipout_loc")
    if loc is None:
        base = fn
        while isinstance(base, Independent):
            base = base.base_dist
        loc = getattr(base, "loc", None)
    if loc is None or not torch.is_tensor(loc):
        return None
    if loc.shape != value.shape:
        if loc.numel() != value.numel():
            return None
        loc = loc.reshape(value.shape)
    return loc


class FlipoutMessenger(Messenger):
    """Records the mean of every latent draw so that :func:`flipout_linear` can flip around it.

    :param str per: ``"token"`` (the paper: signs for every example and position) or
        ``"sequence"`` (one sign vector per example, shared by its tokens; cheaper, still
        decorrelates examples).
    """

    def __init__(self, per: str = "token"):
        if per not in ("token", "sequence"):
            raise ValueError(f"flipout per must be 'token' or 'sequence', got {per!r}")
        super().__init__()
        self.per = per
        self._locs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self):
        self._locs = {}
        return super().__enter__()

    def __exit__(self, *args):
        self._locs = {}
        return super().__exit__(*args)

    def _pyro_post_sample(self, msg):
        value = msg["value"]
        if msg["is_observed"] or not torch.is_tensor(value) or id(value) in self._locs:
            return
        loc = _distribution_loc(msg["fn"], msg["infer"], value)
        if loc is not None:
            # keep a reference to value so its id cannot be reused while we are active
            self._locs[id(value)] = (value, loc)

    def loc_of(self, value: torch.Tensor) -> torch.Tensor | None:
        entry = self._locs.get(id(value))
        return None if entry is None or entry[0] is not value else entry[1]


def flipout(per: str = "token") -> FlipoutMessenger:
    """Context manager: apply Bayesian LoRA factors with Flipout (see module docstring)."""
    return FlipoutMessenger(per=per)


def active_flipout() -> FlipoutMessenger | None:
    for frame in reversed(_PYRO_STACK):
        if isinstance(frame, FlipoutMessenger):
            return frame
    return None


def _flip(t: torch.Tensor, shape) -> torch.Tensor:
    """``t * r`` for Rademacher signs r of ``shape`` (broadcast against t).

    Random bytes + ``where`` took about half the time of float ``bernoulli_`` signs and a multiply
    (24.6 vs 44.6 ms for a 64×40×384 input on this project's 2-core CPU); same distribution.
    """
    keep = torch.randint(0, 2, shape, dtype=torch.int8, device=t.device).bool()
    return torch.where(keep, t, -t)


def flipout_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (x: (..., in), weight: (out, in)), with Flipout when a handler knows weight's mean."""
    handler = active_flipout()
    loc = handler.loc_of(weight) if handler is not None else None
    if loc is None:
        return F.linear(x, weight)
    delta = weight - loc
    if handler.per == "sequence" and x.dim() >= 3:
        in_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        out_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (weight.shape[0],)
    else:
        in_shape = x.shape
        out_shape = x.shape[:-1] + (weight.shape[0],)
    return F.linear(x, loc) + _flip(F.linear(_flip(x, in_shape), delta), out_shape)
