"""Pyro's validation, paid on the first step of a fit: later steps check only what a diverging step shows.

Validation (argument constraints of every distribution a step builds, the support of every value it scores, Pyro's
trace checks) costs ~2 ms per step at B = 1, T = 16 and only *checks*: a step computes the same numbers with it off.
Shapes, supports and the model's structure cannot change between steps, so :class:`ValidateOnce` runs the first
step as the caller's Pyro setting says and later ones with validation off; a later step whose loss, NLL or KL is
non-finite has its own traces checked as validation would have checked them (the same ``ValueError``, so ``fit``
names the same culprit), and one that raises is run again from the same RNG state under the caller's setting::

    once = ValidateOnce(params)                 # the tensors whose .grad the step fills
    record, traces = once.run(lambda: forward_backward(batch), ok=lambda out: all_finite(out[0]))
    # where the run diverged: raise_if_invalid(args_of=[guide_trace, model_trace], values=[...]) first

Where the caller has validation off (``pyro.enable_validation(False)``, ``python -O``) nothing is turned on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import pyro.distributions as dist
import pyro.infer.util as infer_util
import pyro.poutine.util as poutine_util
import torch
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

__all__ = ["ValidateOnce", "validation_on", "validation_off", "raise_if_invalid", "check_args"]


def validation_on() -> bool:
    """Whether any of Pyro's validation switches (or torch's distribution default) is on."""
    return bool(dist.is_validation_enabled() or infer_util.is_validation_enabled()
                or poutine_util.is_validation_enabled() or torch.distributions.Distribution._validate_args)


@contextlib.contextmanager
def validation_off():
    """Pyro's three switches and torch's distribution default off inside, each restored to what it was."""
    saved = (dist.is_validation_enabled(), infer_util.is_validation_enabled(), poutine_util.is_validation_enabled(),
             torch.distributions.Distribution._validate_args)
    dist.enable_validation(False)
    infer_util.enable_validation(False)
    poutine_util.enable_validation(False)
    try:
        yield
    finally:
        dist.enable_validation(saved[0])  # sets torch's default too: torch's own is restored after it
        infer_util.enable_validation(saved[1])
        poutine_util.enable_validation(saved[2])
        torch.distributions.Distribution.set_default_validate_args(saved[3])


def _wrapped(d):
    """The distribution inside blob_pyro's Float64Density (which validates a value against it), else ``d``."""
    return d.base_dist if getattr(d, "_wraps_density", False) else d


def check_args(d) -> None:
    """Check ``d``'s parameters as torch checks them when it builds a distribution with validation on (a wrapper's
    inner distribution first: it was built first), raising the same ``ValueError``."""
    inner = getattr(d, "base_dist", None)
    if isinstance(inner, torch.distributions.Distribution):
        check_args(inner)
    try:
        arg_constraints = d.arg_constraints
    except NotImplementedError:
        return
    for param, constraint in arg_constraints.items():
        if constraints.is_dependent(constraint):
            continue
        if param not in d.__dict__ and isinstance(getattr(type(d), param, None), lazy_property):
            continue
        value = getattr(d, param)
        if not torch._is_all_true(constraint.check(value)):
            raise ValueError(f"Expected parameter {param} ({type(value).__name__} of shape {tuple(value.shape)}) "
                             f"of distribution {d!r} to satisfy the constraint {constraint!r}, but found invalid "
                             f"values:\n{value}")


def raise_if_invalid(args_of: Iterable, values: Iterable[tuple]) -> None:
    """Raise the ``ValueError`` validation would have raised for a step that ran without it.

    :param args_of: traces whose sample sites' distributions were built in the step, in the order they were built.
    :param values: ``(distribution, value)`` pairs in the order the step scored them.
    """
    for trace in args_of:
        for site in trace.nodes.values():
            if site["type"] == "sample" and isinstance(site["fn"], torch.distributions.Distribution):
                check_args(site["fn"])
    for fn, value in values:
        if isinstance(fn, torch.distributions.Distribution) and torch.is_tensor(value):
            _wrapped(fn)._validate_sample(value)


def scored_values(*traces) -> list[tuple]:
    """``(distribution, value)`` of every sample site of ``traces``, in trace order (what a step scores)."""
    return [(site["fn"], site["value"]) for trace in traces for site in trace.nodes.values() if site["type"] == "sample"]


class ValidateOnce:
    """Run a step's forward and backward part validated the first time, unvalidated after (see the module).

    :param params: every tensor whose ``.grad`` the step fills; a run that raised is repeated only where they all
        started without a gradient (as ``fit``'s steps leave them), so the repetition starts where the first did.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = list(params)
        self.validated = False

    def run(self, fn: Callable, ok: Callable, diagnose: Callable | None = None):
        """``fn()``; ``ok(result)`` says whether the result is finite, ``diagnose(result)`` raises what validation
        would have raised on a result that is not (:func:`raise_if_invalid`) and returns where it finds nothing."""
        if not (self.validated and validation_on() and all(p.grad is None for p in self.params)):
            out = fn()
            self.validated = True
            return out
        rng = _rng_state(self.params)
        try:
            with validation_off():
                out = fn()
        except Exception:  # run it again as the caller's setting says: it raises what a validated step raises
            self._clear_grads()
            _set_rng_state(rng)
            return fn()
        if not ok(out) and diagnose is not None:
            try:
                diagnose(out)
            except ValueError:  # a validated step raises before its backward pass: no gradient is left behind
                self._clear_grads()
                raise
        return out

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None


def _rng_state(params) -> tuple:
    devices = {p.device for p in params if p.device.type == "cuda"}
    return torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in devices}


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, s in cuda.items():
        torch.cuda.set_rng_state(s, device)
