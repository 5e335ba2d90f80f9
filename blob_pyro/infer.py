"""Training: one loop, ``fit(model, guide, data, cfg)``, over one of two step kinds.

::

    log = fit(model, guide, train_split, FitConfig(max_steps=200, batch_size=16, lr=1e-3))
    log = fit(model, guide, train_split, FitConfig(max_steps=5000, batch_size=4, objective="paper"))
    log[-1]       # {"step", "loss", "nll", "kl", "kl_weight", "lr", "seconds"}: one train_log.jsonl line

- :class:`ElboStep` (``objective="elbo"``): ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) ``loss_and_grads``
  with the KL part weighted by the schedule (:mod:`blob_pyro.kl`), then one ``torch.optim.AdamW`` step in two
  groups: ``lr`` for means and deterministic parameters, ``scale_lr`` for the guide's scale parameters;
  6 % linear warm-up then linear decay.
- :class:`PaperStep` (``objective="paper"``, the official code): AdamW(lr, eps=1e-6) on the batch-mean NLL for
  the means and deterministic parameters, then plain SGD(kl_lr) on π·KL (closed form, float64) for every
  parameter, so rho is stepped by SGD on NLL + π·KL (its NLL gradient is not cleared by the first optimiser).

Every step runs under :func:`~blob_pyro.poutine.scale_latents` (the KL weight),
:func:`~blob_pyro.poutine.flipout` (when ``model.flipout`` is set) and
:func:`~blob_pyro.poutine.float64_latents` (latent log-densities in float64), plus autocast if asked.
``fit`` neither joins a process group nor changes the model: under a launcher, join first
(:func:`blob_pyro.distributed.init_from_env`); gradients are then averaged over processes before each step.

Validation: a step object validates its first step as Pyro's setting says (``pyro.enable_validation``, on unless
Python runs with ``-O``) and runs later steps with validation off, which computes the same numbers
(:mod:`blob_pyro.validation`). A later step whose loss, NLL or KL is non-finite has its traces checked as
validation would have checked them before any optimiser step, so a diverging run stops with the same one-line
:class:`~blob_pyro.errors.TrainingError` naming the same culprit; one that raises runs again, validated, from the
same RNG state. With validation off no step is validated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.kl import _kl_delta
from pyro.distributions.util import is_identically_zero
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence
from torch.distributions.kl import _dispatch_kl

from . import distributed
from .config import FitConfig, with_defaults
from .data import batches
from .errors import ConfigError, TrainingError
from .kl import closed_form_kl, make_kl_schedule
from .optim import param_groups, register_parameters, set_lora_dropout, warmup_linear
from .poutine import Float64Density, flipout, float64_latents, scale_latents
from .poutine.float64 import fill_normal_densities, normal_site_kls, point_estimate_kls
from .precision import warn_if_emulated
from .validation import ValidateOnce, raise_if_invalid, scored_values

__all__ = ["fit", "make_step", "ElboStep", "PaperStep", "kl_terms", "resolved_fit_config", "KeepTrace_ELBO",
           "KeepTraceMeanField_ELBO"]

STATE_FORMAT = "blob_pyro.grouped_adamw"  # the ELBO step's optimiser state (checkpoints)
# torch picks the per-tensor Python loop on CPU; the multi-tensor kernels do the same arithmetic per element
# (bit-identical parameters, tests/unit/test_infer.py) without a Python round per parameter. Fused AdamW is not
# bit-identical to either, so the ELBO step uses it only where the numbers differ from the eager CPU step's anyway
# (float32 on CUDA, a compiled network).
_FOREACH = True


def resolved_fit_config(cfg: FitConfig | None = None, **settings) -> FitConfig:
    """``cfg`` (default ``FitConfig()``) with ``settings`` applied and every "not set" field at its default."""
    return with_defaults(dataclasses.replace(cfg or FitConfig(), **settings))


# ---- what one step records ----------------------------------------------------------------------
class _KeepTraces:
    """Keeps the (model, guide) traces of each particle of a call (``particles``; ``traces`` the last): the step's KL
    and NLL are read from them, so no extra handler rides on every sample site and no log-density is computed
    twice. The caller empties ``particles`` between calls."""

    traces: tuple | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.particles: list[tuple] = []

    def _get_trace(self, model, guide, args, kwargs):
        self.traces = super()._get_trace(model, guide, args, kwargs)
        self.particles.append(self.traces)
        return self.traces


class _FusedNormalDensities:
    """``Trace_ELBO._get_trace`` with the Normal latent sites' float64 log-densities computed in one pass
    (:func:`~blob_pyro.poutine.float64.fill_normal_densities`): the same numbers, one elementwise pass for all
    sites instead of a ``log_prob`` per site and trace (compiled with the network of a model that has one,
    :mod:`blob_pyro.compiled`). With validation on, or a ``GuideMessenger``, Pyro's own
    ``get_importance_trace`` runs (its checks need it; the first step of a run is validated)."""

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled() or isinstance(poutine.unwrap(guide), Messenger):
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        fill_normal_densities(model_trace, guide_trace, kernel=getattr(getattr(model, "compiled", None), "log_densities",
                                                                       None))
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        return model_trace, guide_trace


class KeepTrace_ELBO(_KeepTraces, _FusedNormalDensities, Trace_ELBO):
    """Pyro's ``Trace_ELBO`` that also keeps the last particle's traces in ``traces``, returns the ELBO's value
    as a tensor read off the surrogate loss and, unvalidated, computes the Normal latent sites' densities in one
    pass (the same numbers and gradients).

    Pyro adds up the value with one ``.item()`` per sample site of both traces: on a GPU each is a host sync, 26
    per step for MiniLM's 12 Bayesian factors. Where every guide site is reparameterised (no score-function term) and the first
    model site's log-density is float64 (as under :func:`~blob_pyro.poutine.float64_latents`), the surrogate is the
    same float64 sum of the same per-site terms in the same order as Pyro's sum of Python floats, so its detached
    value is that number exactly; any other pair of traces takes Pyro's own computation.
    """

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        model_sites = [s for s in model_trace.nodes.values() if s["type"] == "sample"]
        guide_sites = [s for s in guide_trace.nodes.values() if s["type"] == "sample"]
        first = model_sites[0]["log_prob_sum"] if model_sites else None
        if (not torch.is_tensor(first) or first.dtype != torch.float64
                or not all(is_identically_zero(s["score_parts"].score_function) for s in guide_sites)):
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        surrogate = 0
        for site in model_sites:
            surrogate = surrogate + site["log_prob_sum"]
        for site in guide_sites:
            entropy_term = site["score_parts"].entropy_term
            if not is_identically_zero(entropy_term):
                surrogate = surrogate - entropy_term.sum()
            else:  # what Pyro's value subtracts: a site without an entropy term still has a log-density
                surrogate = surrogate - site["log_prob_sum"].detach()
        return -surrogate.detach(), -surrogate


class KeepTraceMeanField_ELBO(_KeepTraces, TraceMeanField_ELBO):
    """Pyro's ``TraceMeanField_ELBO``, unchanged, that also keeps the last particle's traces in ``traces``."""


ELBOS = {"trace": KeepTrace_ELBO, "meanfield": KeepTraceMeanField_ELBO}


def kl_terms(model_sites: dict, guide_sites: dict) -> torch.Tensor:
    """KL(q‖p) summed over latent sites (unscaled): closed form where known, else the one-draw MC estimate.

    ``*_sites`` map names to trace nodes or messages. For a point-estimate (``Delta``) site the MC term is
    log δ − log p = −log p(θ), the MAP penalty: what the ELBO optimises, negative when the prior density
    exceeds 1 (the KL of a point mass is infinite). A guide that draws through auxiliary sites (Pyro's
    ``AutoNormal``: an ``_unconstrained`` Normal, then a ``Delta`` at its transform) adds their log q, so its
    term is the one-draw estimate log q(u) + log δ − log p(θ) of its KL, as in the ELBO. The MC term reuses
    the trace nodes' ``unscaled_log_prob`` where both have one (the same densities of the same draw). Normal sites
    (guide and prior) and point estimates under a Normal prior whose density the model trace lacks (``mle``'s zero
    weight) are computed in one pass each (:mod:`blob_pyro.poutine.float64`): the per-site numbers, bit for bit.
    """
    total = 0.0
    normal = normal_site_kls(model_sites, guide_sites)  # Normal guide and prior: all those sites in one pass
    normal.update(point_estimate_kls(model_sites, guide_sites))  # mle's points (no prior density in its trace): the same
    for name, site in guide_sites.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if name in normal:
            total = total + normal[name]
            continue
        if (site.get("infer") or {}).get("is_auxiliary"):
            log_q = site.get("unscaled_log_prob")
            total = total + (site["fn"].log_prob(site["value"]) if log_q is None else log_q).sum()
            continue
        if name not in model_sites:
            continue
        model_site = model_sites[name]
        prior = model_site["fn"]
        penalty = _point_estimate_kl(site, model_site)
        if penalty is not None:
            total = total + penalty
            continue
        try:
            total = total + kl_divergence(site["fn"], prior).sum()
        except NotImplementedError:
            if "unscaled_log_prob" in site and "unscaled_log_prob" in model_site:
                total = total + (site["unscaled_log_prob"] - model_site["unscaled_log_prob"]).sum()
            else:
                value = site["value"]
                total = total + (site["fn"].log_prob(value) - prior.log_prob(value)).sum()
    return torch.as_tensor(total)


def _point_estimate_kl(site, model_site) -> torch.Tensor | None:
    """``kl_divergence(δ_v, p).sum()`` of a point-estimate site, read off the model trace, or None.

    Pyro's KL of a ``Delta`` is ``−p.log_prob(v)``; where both sites are wrapped alike (both in
    :class:`~blob_pyro.poutine.Float64Density`, or neither) and the model site's value is v itself (replayed from the
    guide), the model trace already holds that very density (``unscaled_log_prob``): the same number, not computed
    again.
    """
    q, p = site["fn"], model_site["fn"]
    wrapped = isinstance(q, Float64Density)
    if wrapped != isinstance(p, Float64Density) or "unscaled_log_prob" not in model_site:
        return None
    if wrapped:
        q, p = q.base_dist, p.base_dist
    if type(q) is not dist.Delta or _dispatch_kl(type(q), type(p)) is not _kl_delta:
        return None
    if model_site["value"] is not site["value"] or site["value"].shape != q.v.shape:
        return None
    return (-model_site["unscaled_log_prob"]).sum()


def _nll(obs_site) -> torch.Tensor:
    log_p = obs_site.get("unscaled_log_prob")
    if log_p is None:
        log_p = obs_site["fn"].log_prob(obs_site["value"])
    return -log_p.mean()


def _context(model, *, scale: float | None, autocast_dtype, device_type: str):
    """The handlers every training step runs under (see the module docstring)."""
    stack = contextlib.ExitStack()
    if scale is not None:
        stack.enter_context(scale_latents(scale))
    per = getattr(model, "flipout", None)
    if per:
        stack.enter_context(flipout(per))
    stack.enter_context(float64_latents())
    if autocast_dtype is not None:
        stack.enter_context(torch.autocast(device_type=device_type, dtype=autocast_dtype))
    return stack


# ---- the two step kinds ---------------------------------------------------------------------------
class ElboStep:
    """One ELBO step: ``loss_and_grads`` of Pyro's ELBO, then AdamW in two learning-rate groups.

    ``step(batch, kl_weight, num_data) -> {"loss", "nll", "kl"}`` (loss per example, NLL the batch mean, KL
    unscaled); ``state_dict()``/``load_state_dict()`` hold the optimiser and schedule; ``current_lr()``.
    """

    def __init__(self, model, guide, cfg: FitConfig, *, autocast_dtype=None, device_type: str = "cpu"):
        self.model, self.guide, self.cfg = model, guide, cfg
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        params = register_parameters(model, guide)
        groups = param_groups(params, guide, lr=cfg.lr, scale_lr=cfg.scale_lr, weight_decay=cfg.weight_decay)
        for key, g in zip(("loc", "scale"), groups):
            g["key"] = key
        self.groups = [g for g in groups if g["params"]]
        self.names = [n for g in self.groups for n in g["names"]]
        self.params = [p for g in self.groups for p in g["params"]]
        # fused AdamW (one kernel for all parameters) rounds differently from the multi-tensor one: it is taken where the
        # numbers already differ from the eager CPU step's, on CUDA and with a compiled network (blob_pyro.compiled)
        compiled = getattr(model, "compiled", None) is not None
        fused = all((p.is_cuda or compiled) and p.dtype == torch.float32 for p in self.params) or None
        self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "key")} for g in self.groups],
                                           fused=fused, foreach=_FOREACH if not fused else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_linear(cfg.max_steps,
                                                                                          cfg.warmup_ratio))
        self.elbo = ELBOS[cfg.elbo](num_particles=cfg.num_particles)
        self.validate = ValidateOnce(self.params)

    def _loss_and_grads(self, batch: dict, kl_weight: float, num_data: int) -> tuple:
        self.elbo.particles = []
        with _context(self.model, scale=num_data * kl_weight, autocast_dtype=self.autocast_dtype,
                      device_type=self.device_type):
            loss = self.elbo.loss_and_grads(self.model, self.guide, batch)
            model_trace, guide_trace = self.elbo.traces
            with torch.no_grad():  # read before the optimiser moves the parameters the sites refer to
                kl = kl_terms(model_trace.nodes, guide_trace.nodes)
                nll = _nll(model_trace.nodes["obs"])
                # one transfer for the three numbers the log keeps (each float64 conversion is exact)
                loss, nll, kl = torch.stack([torch.as_tensor(loss, dtype=torch.float64, device=nll.device),
                                             nll.double(), kl.double().to(nll.device)]).tolist()
        return loss, nll, kl

    def _diagnose(self, _) -> None:
        for model_trace, guide_trace in self.elbo.particles:  # the order a validated step checks them in
            raise_if_invalid([guide_trace, model_trace], scored_values(model_trace, guide_trace))

    def step(self, batch: dict, kl_weight: float, num_data: int) -> dict:
        try:
            loss, nll, kl = self.validate.run(lambda: self._loss_and_grads(batch, kl_weight, num_data),
                                              ok=lambda out: all(math.isfinite(v) for v in out), diagnose=self._diagnose)
        finally:
            self.elbo.traces, self.elbo.particles = None, []  # nothing of this step outlives it
        distributed.average_gradients(self.params)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return {"loss": loss / num_data, "nll": nll, "kl": kl}

    def current_lr(self) -> dict:
        return {g["key"]: lr for g, lr in zip(self.groups, self.scheduler.get_last_lr())}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "params": list(self.names), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT or list(state.get("params", [])) != self.names:
            raise TrainingError("the saved optimiser state does not fit this model and guide (other parameters or "
                                "another optimiser)")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


class PaperStep:
    """The official code's step: AdamW on the NLL (means), then SGD on π·KL (means and rho); see the module."""

    def __init__(self, model, guide, cfg: FitConfig, *, autocast_dtype=None, device_type: str = "cpu"):
        if not hasattr(guide, "site_distribution") or getattr(guide, "covariance", None) != "diagonal":
            raise ConfigError("objective=paper needs the 'blob' guide (mean-field Normal)")
        self.model, self.guide = model, guide
        self.autocast_dtype, self.device_type = autocast_dtype, device_type
        self.priors = model.prior_distributions()
        for name, prior in self.priors.items():  # refuse a prior without a closed-form KL before training
            closed_form_kl(guide.site_distribution(name), prior)
        params = register_parameters(model, guide)
        (means, self.mean_names), (rho, rho_names) = [(g["params"], g["names"]) for g in
                                                      param_groups(params, guide, lr=cfg.lr)]
        self.order = self.mean_names + rho_names
        self.params = means + rho
        self.opt1 = torch.optim.AdamW(means, lr=cfg.lr, eps=1e-6, weight_decay=0.0, foreach=_FOREACH)
        self.opt2 = torch.optim.SGD(means + rho, lr=cfg.kl_lr, foreach=_FOREACH)
        factor = warmup_linear(cfg.max_steps, cfg.warmup_ratio)
        self.sched1 = torch.optim.lr_scheduler.LambdaLR(self.opt1, factor)
        self.sched2 = torch.optim.lr_scheduler.LambdaLR(self.opt2, factor)
        self.validate = ValidateOnce(self.params)

    def kl(self) -> torch.Tensor:
        total = 0.0
        for name, prior in self.priors.items():
            total = total + closed_form_kl(self.guide.site_distribution(name), prior)
        return total

    def _forward(self, batch: dict) -> tuple:
        with _context(self.model, scale=None, autocast_dtype=self.autocast_dtype, device_type=self.device_type):
            guide_trace = poutine.trace(self.guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(self.model, trace=guide_trace)).get_trace(batch)
        nll = _nll(model_trace.nodes["obs"])
        return nll, nll.item(), (model_trace, guide_trace)

    @staticmethod
    def _diagnose(out) -> None:
        model_trace, guide_trace = out[2]
        obs = model_trace.nodes["obs"]
        raise_if_invalid([guide_trace, model_trace], [(obs["fn"], obs["value"])])

    def step(self, batch: dict, kl_weight: float, num_data: int) -> dict:
        # the KL below is built after the first optimiser step, under the caller's validation as before
        nll, nll_value, _ = self.validate.run(lambda: self._forward(batch), ok=lambda out: math.isfinite(out[1]),
                                              diagnose=self._diagnose)
        nll.backward()
        distributed.average_gradients(self.params)  # the NLL part; the KL part is the same on every process
        self.opt1.step()
        self.opt1.zero_grad()  # rho keeps its NLL gradient, as in the official code
        self.sched1.step()
        kl = self.kl()
        (kl_weight * kl).backward()
        self.opt2.step()
        self.opt2.zero_grad()
        self.sched2.step()
        return {"loss": nll_value + kl_weight * kl.item(), "nll": nll_value, "kl": kl.item()}

    def current_lr(self) -> dict:
        return {"adamw": self.sched1.get_last_lr()[0], "sgd": self.sched2.get_last_lr()[0]}

    def state_dict(self) -> dict:
        return {"opt1": self.opt1.state_dict(), "opt2": self.opt2.state_dict(), "sched1": self.sched1.state_dict(),
                "sched2": self.sched2.state_dict(), "params": list(self.order)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("params") != self.order:
            raise TrainingError("the saved optimiser state does not fit this model and guide (other parameters)")
        self.opt1.load_state_dict(state["opt1"])
        self.opt2.load_state_dict(state["opt2"])
        self.sched1.load_state_dict(state["sched1"])
        self.sched2.load_state_dict(state["sched2"])


STEPS = {"elbo": ElboStep, "paper": PaperStep}


def make_step(model, guide, cfg: FitConfig | None = None, *, autocast_dtype: torch.dtype | None = None, device=None):
    """The step ``fit`` takes, on its own (benchmarks, custom loops)::

        step = make_step(model, guide, FitConfig(max_steps=100, lr=1e-3))
        record = step.step(model.head.collate(examples[:16]), kl_weight=1 / 640, num_data=640)
    """
    cfg = resolved_fit_config(cfg)
    device = torch.device(device or next(model.network.parameters()).device)
    warn_if_emulated(device.type, autocast_dtype)
    return STEPS[cfg.objective](model, guide, cfg, autocast_dtype=autocast_dtype, device_type=device.type)


# ---- the loop -----------------------------------------------------------------------------------
def fit(model, guide, data, cfg: FitConfig | None = None, *, autocast_dtype: torch.dtype | None = None,
        progress: bool = True, start_step: int = 0, state: dict | None = None,
        callback: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Fit ``guide`` (and the model's deterministic parameters) to ``data`` (a TaskSplit or list of examples).

    :param cfg: the optimisation settings (:class:`~blob_pyro.config.FitConfig`); ``batch_size`` is per
        process: under a process group of K, a step sees K·batch_size examples and N is the whole data.
    :param autocast_dtype: run the network under autocast in this dtype (e.g. ``torch.bfloat16``).
    :param start_step: steps already done (resuming): training continues with step ``start_step + 1``.
    :param state: when resuming, ``{"optimizer_state": ..., "rng_state": ...}`` from a checkpoint; the RNGs
        are restored just before the first step.
    :param callback: called after every step with ``(record, {"step", "optimizer_state"})`` where
        ``optimizer_state()`` returns the optimiser and schedule state (checkpoints, Ctrl-C).
    :returns: one record per step.
    """
    cfg = resolved_fit_config(cfg)
    examples = list(getattr(data, "examples", data))
    num_data = len(examples)
    procs, rank = distributed.world_size(), distributed.rank()
    if getattr(model, "num_data", num_data) != num_data:
        raise ConfigError(f"the model's plate size is num_data={model.num_data} but the data has {num_data} "
                          f"examples; build the model with num_data=len(data)")
    if num_data < cfg.batch_size * procs:
        raise ConfigError(f"the training split has {num_data} examples, fewer than batch_size x processes = "
                          f"{cfg.batch_size} x {procs}")
    device = next(model.network.parameters()).device
    schedule = make_kl_schedule(cfg.kl_schedule, num_data, cfg.batch_size, world_size=procs, gamma=cfg.gamma,
                                multiplier=cfg.kl_multiplier, cycle=cfg.kl_cycle)
    stream = batches(examples, cfg.batch_size * procs, seed=cfg.seed, start=start_step)
    set_lora_dropout(model.network)
    stepper = make_step(model, guide, cfg, autocast_dtype=autocast_dtype, device=device)
    if procs > 1:  # every process starts from rank 0's values
        distributed.broadcast_tensors(stepper.params)
    if state is not None and "optimizer_state" in state:
        stepper.load_state_dict(state["optimizer_state"])
    if state is not None and "rng_state" in state:  # resuming: draw exactly what the interrupted run would have
        from .checkpoint import set_rng_state

        set_rng_state(state["rng_state"])

    log = []
    bar = _progress(range(start_step + 1, cfg.max_steps + 1), progress and rank == 0)
    for step in bar:
        _, chunk = next(stream)
        batch = model.head.collate(chunk[rank * cfg.batch_size:(rank + 1) * cfg.batch_size], device)
        t0 = time.perf_counter()
        w = schedule.weight(step)
        try:
            record = stepper.step(batch, w, num_data)
        except ValueError as err:  # distribution validation refusing NaN/inf logits or parameters
            if "invalid values" not in str(err):
                raise
            raise TrainingError(f"non-finite loss at step {step} (NaN/inf in {_culprit(err)}); training diverged, "
                                f"try a smaller lr") from err
        if procs > 1:
            record["loss"], record["nll"], record["kl"] = distributed.mean_of(
                [record["loss"], record["nll"], record["kl"]])
        record.update(step=step, kl_weight=w, lr=stepper.current_lr(), seconds=time.perf_counter() - t0)
        if not all(math.isfinite(record[k]) for k in ("loss", "nll", "kl")):
            raise TrainingError(f"non-finite loss at step {step} (loss={record['loss']}, nll={record['nll']}, "
                                f"kl={record['kl']})")
        log.append(record)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl']:.3g}")
        if callback is not None:
            callback(record, {"step": step, "optimizer_state": stepper.state_dict})
    return log


def _culprit(err: ValueError) -> str:
    first = str(err).strip().splitlines()[0]
    m = re.search(r"parameter (\w+).*?distribution (\w+)", first)
    return f"{m.group(1)} of a {m.group(2)}" if m else first[:120]


def _progress(iterable, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="train", dynamic_ncols=True, leave=False)
