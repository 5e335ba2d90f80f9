"""Training: stochastic variational inference with ``pyro.infer.SVI``, or the paper's two-optimiser step.

::

    log = fit(model, guide, train_split, max_steps=200, batch_size=16, lr=5e-4)       # SVI, Trace_ELBO
    log = fit(model, guide, train_split, max_steps=5000, batch_size=4, preset="paper")  # official optimisation

``fit`` returns one record per step (``loss``, ``nll``, ``kl``, ``kl_weight``, ``lr``, ``seconds``), the
content of ``train_log.jsonl``. Each step draws one posterior sample (Flipout by default); the KL
part of the ELBO is weighted by a schedule from :mod:`blob_pyro.kl`.

SVI path: one ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) step with a Pyro optimiser
(:class:`GroupedAdamW`: one multi-tensor AdamW in two learning-rate groups): ``lr`` for means and deterministic parameters,
``scale_lr`` for the std parameters (``rho``, AutoNormal ``scales``, low-rank ``corr_factor``),
6 % linear warm-up then linear decay to 0 at ``max_steps``.

Paper path (``preset="paper"``, §1.5 of the reference): per step, AdamW(lr, eps=1e-6) on the batch-mean
NLL for the means and the deterministic factor; then, with the means already updated, plain SGD(kl_lr)
on π·KL for every parameter — so rho is stepped by SGD on NLL + π·KL (its NLL gradient is never
cleared by the first optimiser), exactly as the official code.

One step on its own (benchmarks, custom loops) comes from :func:`make_stepper`::

    stepper = make_stepper(model, guide, max_steps=200, lr=1e-3)
    record = stepper.step(batch, kl_weight=1 / 640, num_data=640)      # {"loss", "nll", "kl"}

Several processes (``accelerate launch`` / ``torchrun``): ``fit`` joins the process group from the
environment, gives each process its slice of every global batch of ``batch_size × world_size``
examples, averages gradients before each optimiser step and averages the logged numbers; see
:mod:`blob_pyro.distributed`.

Precision: the log-densities of the latent sites (the KL part of the ELBO) are computed in float64 on
the float32 variational parameters, as the official code computes its KL (:class:`Float64Latents`),
with or without mixed precision (``autocast_dtype``: the network then runs under autocast). In float32
the Normal log-density of a draw is NaN once a std falls below ~1e-22 (std² underflows to 0).
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyro
import torch
import pyro.distributions as dist
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence, register_kl

from . import distributed
from .kl import make_kl_schedule, scale_latents
from .precision import warn_if_emulated
from .reparam import flipout

__all__ = ["fit", "make_stepper", "Stepper", "warmup_linear", "batches", "TrainingError", "kl_terms",
           "Float64Latents"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


def warmup_linear(max_steps: int, warmup_ratio: float = 0.06) -> Callable[[int], float]:
    """LR multiplier: linear warm-up over ``warmup_ratio * max_steps`` steps, then linear decay to 0."""
    warm = int(warmup_ratio * max_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (max_steps - step) / max(1, max_steps - warm))

    return factor


def batches(examples, batch_size: int, *, seed: int, shuffle: bool = True, start: int = 0) -> Iterator[tuple[int, list]]:
    """Endless epochs of minibatches (drop_last), reshuffled every epoch from ``seed``; yields (position, batch).

    ``start`` skips the first ``start`` batches, which makes a resumed run see the same data order.
    """
    n = len(examples)
    if n < batch_size:
        raise ValueError(f"the training split has {n} examples, fewer than batch_size={batch_size}")
    per_epoch = n // batch_size
    pos = start
    while True:
        epoch, i = divmod(pos, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)) if shuffle else torch.arange(n)
        idx = order[i * batch_size:(i + 1) * batch_size].tolist()
        yield pos, [examples[j] for j in idx]
        pos += 1


class _Recorder:
    """Mixin keeping the last (model, guide) traces of an ELBO, and their KL, to log NLL and KL per step.

    The KL is computed here, when the traces are made, because the optimiser then updates the guide's
    parameters in place: a site's ``fn`` read after ``svi.step`` mixes the new means with the old
    draw (and the old stds), and its Monte Carlo log-density becomes meaningless (±1e12 once stds are
    ~1e-9 and the mean moved by ~1e-4).
    """

    last_traces = None
    last_kl = None

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        self.last_traces = (model_trace, guide_trace)
        with torch.no_grad():
            self.last_kl = kl_terms(model_trace, guide_trace).detach()
        return model_trace, guide_trace


class RecordingTraceELBO(_Recorder, Trace_ELBO):
    pass


class RecordingTraceMeanFieldELBO(_Recorder, TraceMeanField_ELBO):
    pass


def kl_terms(model_trace, guide_trace) -> torch.Tensor:
    """KL(q‖p) summed over latent sites (unscaled): closed form where known, else the MC estimate.

    For a point-estimate (``Delta``) site the MC term is log δ − log p = −log p(θ), the MAP penalty: what the
    ELBO optimises, and negative when the prior density exceeds 1 (the KL of a point mass is infinite).
    """
    total = 0.0
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name not in model_trace.nodes:
            continue
        if site.get("infer", {}).get("is_auxiliary"):
            continue
        prior = model_trace.nodes[name]["fn"]
        try:
            total = total + kl_divergence(site["fn"], prior).sum()
        except NotImplementedError:
            value = site["value"]
            total = total + (site["fn"].log_prob(value) - prior.log_prob(value)).sum()
    return torch.as_tensor(total)


# ---- float64 latent densities under mixed precision -------------------------------------------
def _as_float64(d):
    """``d`` with float64 parameters (same family), or None for a family not handled here."""
    if isinstance(d, dist.Independent):
        inner = _as_float64(d.base_dist)
        return None if inner is None else dist.Independent(inner, d.reinterpreted_batch_ndims)
    if isinstance(d, dist.TransformedDistribution):
        inner = _as_float64(d.base_dist)
        return None if inner is None else dist.TransformedDistribution(inner, d.transforms)
    if isinstance(d, dist.Normal):
        return dist.Normal(d.loc.double(), d.scale.double())
    if isinstance(d, dist.Laplace):
        return dist.Laplace(d.loc.double(), d.scale.double())
    if isinstance(d, dist.StudentT):
        return dist.StudentT(d.df.double(), d.loc.double(), d.scale.double())
    if isinstance(d, dist.LowRankMultivariateNormal):
        return dist.LowRankMultivariateNormal(d.loc.double(), d.cov_factor.double(), d.cov_diag.double())
    if isinstance(d, dist.Delta):
        return dist.Delta(d.v.double(), d.log_density.double(), event_dim=d.event_dim)
    return None


class Float64Density(dist.TorchDistribution):
    """Samples exactly as ``base`` (same dtype, same draws); ``log_prob`` and KL are computed in float64.

    Parameters stay float32 (gradients flow through the casts); families that :func:`_as_float64`
    does not know keep their own dtype.
    """

    _wraps_density = True  # blob_pyro.reparam looks through this wrapper for the draw's mean
    arg_constraints: dict = {}

    def __init__(self, base):
        self.base_dist = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

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
        wide = _as_float64(self.base_dist)
        if wide is None:
            return self.base_dist.log_prob(value)
        return wide.log_prob(value.double())

    def expand(self, batch_shape, _instance=None):
        return Float64Density(self.base_dist.expand(batch_shape))


@register_kl(Float64Density, Float64Density)
def _kl_float64(p, q):
    wp, wq = _as_float64(p.base_dist), _as_float64(q.base_dist)
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


def _nll(model_trace) -> torch.Tensor:
    obs = model_trace.nodes["obs"]
    return -obs["fn"].log_prob(obs["value"]).mean()


def _is_scale_param(name: str) -> bool:
    return any(tag in name for tag in (".rho.", "scales", "corr_factor"))


@dataclass
class Stepper:
    """One training step of a (model, guide) pair, and its optimiser state (see :func:`make_stepper`).

    ``step(batch, kl_weight, num_data)`` runs guide and model on one collated batch, steps the optimisers
    and returns ``{"loss", "nll", "kl"}`` (loss per example, NLL the batch mean, KL unscaled).
    ``current_lr()`` gives the learning rates, ``save()``/``load(state)`` the optimiser and scheduler state.
    """

    step: Callable[[dict, float, int], dict]
    current_lr: Callable[[], dict]
    save: Callable[[], Any]
    load: Callable[[Any], None]


def make_stepper(model, guide, *, max_steps: int, lr: float = 5e-4, scale_lr: float | None = None,
                 warmup_ratio: float = 0.06, weight_decay: float = 0.0, elbo: str = "trace",
                 use_flipout: bool = True, flipout_per: str = "token", preset: str | None = None,
                 kl_lr: float = 0.01, autocast_dtype: torch.dtype | None = None, device=None) -> Stepper:
    """The optimisation step ``fit`` uses, on its own (same arguments as :func:`fit`)::

        stepper = make_stepper(model, guide, max_steps=100, lr=1e-3)
        batch = model.head.collate(examples[:16])
        record = stepper.step(batch, kl_weight=1 / 640, num_data=640)

    Under several processes (:mod:`blob_pyro.distributed`) gradients are averaged over processes before
    each optimiser step; the returned record is this process's.
    """
    if elbo not in ("trace", "meanfield"):
        raise ValueError(f"elbo must be 'trace' or 'meanfield', got {elbo!r}")
    device = device or next(model.network.parameters()).device
    scale_lr = lr if scale_lr is None else scale_lr
    flip = (lambda: flipout(flipout_per)) if use_flipout else contextlib.nullcontext
    if autocast_dtype is not None:
        device_type = torch.device(device).type
        warn_if_emulated(device_type, autocast_dtype)

        @contextlib.contextmanager
        def amp():
            with Float64Latents(), torch.autocast(device_type=device_type, dtype=autocast_dtype):
                yield
    else:
        # float32 too: a float32 Normal log-density is NaN once std = rho**2 falls below ~1e-22 (its
        # variance underflows to 0 and the draw's offset with it: 0/0), which Adam reaches by chance.
        amp = Float64Latents
    if preset == "paper":
        return _paper_stepper(model, guide, lr=lr, kl_lr=kl_lr, max_steps=max_steps, warmup_ratio=warmup_ratio,
                              flip=flip, amp=amp, device=device)
    if preset is not None:
        raise ValueError(f"unknown preset {preset!r}; the only preset is 'paper'")
    return _svi_stepper(model, guide, lr=lr, scale_lr=scale_lr, weight_decay=weight_decay, max_steps=max_steps,
                        warmup_ratio=warmup_ratio, elbo=elbo, flip=flip, amp=amp)


def fit(model, guide, train, *, max_steps: int, batch_size: int = 16, lr: float = 5e-4, scale_lr: float | None = None,
        warmup_ratio: float = 0.06, weight_decay: float = 0.0, elbo: str = "trace", kl_schedule: str = "standard",
        kl_multiplier: float = 1.0, gamma: float = 8.0, use_flipout: bool = True, flipout_per: str = "token",
        preset: str | None = None, kl_lr: float = 0.01, seed: int = 0, world_size: int | None = None,
        progress: bool = True, device=None, autocast_dtype: torch.dtype | None = None, start_step: int = 0,
        state=None, callback: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Fit ``guide`` to the posterior of ``model`` on ``train`` (a TaskSplit or list of examples).

    :param batch_size: examples per step *per process*; with K processes a step sees K·batch_size examples.
    :param world_size: number of processes; default (and the only accepted value when given) is the size of
        the ``torch.distributed`` process group, joined from the launcher's environment (1 without one).
        Every process passes the whole training set; N is its size.
    :param start_step: steps already done (resuming); training continues with step ``start_step + 1``.
    :param state: when resuming, ``{"optimizer_state": ..., "rng_state": ...}`` from a checkpoint; the
        RNGs are restored after the optimisers are set up, just before the first step.
    :param callback: called after every step with (record, state) where ``state`` holds what a
        checkpoint needs (``step``, and ``optimizer_state``: a function returning the optimiser and
        scheduler state); used by :func:`blob_pyro.runs.train_run` for checkpoints and Ctrl-C. Called on
        every process, with the record averaged over processes.
    :returns: list of per-step records.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    distributed.init_from_env(device or next(model.network.parameters()).device)
    procs, rank = distributed.world_size(), distributed.rank()
    if world_size is not None and int(world_size) != procs:
        raise ValueError(f"world_size={world_size} but this process group has {procs} process(es); "
                         f"start the processes with accelerate launch or torchrun (see blob_pyro.distributed)")
    examples = list(getattr(train, "examples", train))
    num_data = len(examples)  # the global N: every process holds the whole training set
    if procs > 1 and num_data < batch_size * procs:
        raise ValueError(f"the training split has {num_data} examples, fewer than batch_size x processes = "
                         f"{batch_size} x {procs}")
    model.num_data = num_data
    schedule = make_kl_schedule(kl_schedule, num_data, batch_size, world_size=procs, gamma=gamma,
                                multiplier=kl_multiplier)
    device = device or next(model.network.parameters()).device
    head = model.head
    stream = batches(examples, batch_size * procs, seed=seed, start=start_step)

    model.network.eval()  # frozen backbone: no backbone dropout; LoRA dropout is switched on separately
    _lora_dropout_train(model.network)

    stepper = make_stepper(model, guide, max_steps=max_steps, lr=lr, scale_lr=scale_lr, warmup_ratio=warmup_ratio,
                           weight_decay=weight_decay, elbo=elbo, use_flipout=use_flipout, flipout_per=flipout_per,
                           preset=preset, kl_lr=kl_lr, autocast_dtype=autocast_dtype, device=device)
    if procs > 1:
        _same_start(model, guide)
    if state is not None and "optimizer_state" in state:
        stepper.load(state["optimizer_state"])
    if state is not None and "rng_state" in state:  # resuming: draw exactly what the interrupted run would have
        from .checkpoint import set_rng_state

        set_rng_state(state["rng_state"])

    log = []
    bar = _progress(range(start_step + 1, max_steps + 1), progress and rank == 0, "train")
    for step in bar:
        _, chunk = next(stream)
        batch = head.collate(chunk[rank * batch_size:(rank + 1) * batch_size], device)
        t0 = time.perf_counter()
        w = schedule.weight(step)
        try:
            record = stepper.step(batch, w, num_data)
        except ValueError as err:  # distribution validation refusing NaN/inf logits or parameters
            if "invalid values" not in str(err):
                raise
            first = str(err).strip().splitlines()[0]
            m = re.search(r"parameter (\w+).*?distribution (\w+)", first)
            what = f"{m.group(1)} of a {m.group(2)}" if m else first[:120]
            raise TrainingError(f"non-finite loss at step {step} (NaN/inf in {what}); training diverged, "
                                f"try a smaller lr") from err
        if procs > 1:
            record["loss"], record["nll"], record["kl"] = distributed.mean_of(
                [record["loss"], record["nll"], record["kl"]])
        record.update(step=step, kl_weight=w, lr=stepper.current_lr(), seconds=time.perf_counter() - t0)
        if not all(math.isfinite(record[k]) for k in ("loss", "nll", "kl")):
            raise TrainingError(f"non-finite loss at step {step} (loss={record['loss']}, nll={record['nll']}, kl={record['kl']})")
        log.append(record)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl']:.3g}")
        if callback is not None:
            callback(record, {"step": step, "optimizer_state": stepper.save})
    return log


def _same_start(model, guide) -> None:
    """Register every parameter (without touching the RNG streams) and copy rank 0's values to all processes."""
    from .checkpoint import get_rng_state, set_rng_state

    rng = get_rng_state()
    batch = model.example_batch()
    with torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(batch)
        poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    set_rng_state(rng)
    params = dict(pyro.get_param_store().named_parameters())
    distributed.broadcast_tensors([params[name] for name in sorted(params)])


def _lora_dropout_train(network) -> None:
    for name, module in network.named_modules():
        if "lora_dropout" in name and isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.train()


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True, leave=False)


class GroupedAdamW(pyro.optim.PyroOptim):
    """Pyro-compatible optimiser: one multi-tensor ``torch.optim.AdamW`` over every parameter SVI steps.

    Same update as ``pyro.optim.LambdaLR({"optimizer": AdamW, ...})`` with per-parameter learning rates,
    which builds one AdamW and one scheduler *per parameter* and steps them one by one (about 40
    optimiser calls per step for MiniLM, each a handful of kernels on a GPU). Here the parameters
    fall into two groups, ``lr`` for means and deterministic parameters and ``scale_lr`` for std
    parameters, under one ``LambdaLR``::

        optim = GroupedAdamW(lr=1e-3, scale_lr=1e-3, weight_decay=0.0, lr_lambda=warmup_linear(200))
        svi = SVI(model, guide, optim, Trace_ELBO())
        svi.step(batch); optim.step()          # the optimiser step, then the schedule

    ``get_state``/``set_state`` name parameters by their param-store name (state set before the first
    step is applied when the optimiser is created); ``set_state`` also accepts the per-parameter state
    that ``pyro.optim.PyroOptim.get_state`` wrote (checkpoints of earlier versions).
    """

    FORMAT = "blob_pyro.grouped_adamw"

    def __init__(self, *, lr: float, scale_lr: float, weight_decay: float, lr_lambda: Callable[[int], float]):
        super().__init__(torch.optim.AdamW, {"lr": lr, "weight_decay": weight_decay})
        self.lr, self.scale_lr, self.weight_decay, self.lr_lambda = lr, scale_lr, weight_decay, lr_lambda
        self.optimizer: torch.optim.AdamW | None = None
        self.scheduler = None
        self.names: list[str] = []
        self._pending = None

    def _kind(self, name: str) -> int:
        return 1 if _is_scale_param("." + name + ".") else 0

    def _create(self, params: list[torch.Tensor]) -> None:
        store = pyro.get_param_store()
        by_name = {store.param_name(p): p for p in params}
        saved = list(self._pending.get("params", [])) if isinstance(self._pending, dict) and \
            self._pending.get("format") == self.FORMAT else []
        self.names = [n for n in saved if n in by_name] + sorted(n for n in by_name if n not in saved)
        groups = [{"params": [], "lr": self.lr, "weight_decay": self.weight_decay},
                  {"params": [], "lr": self.scale_lr, "weight_decay": self.weight_decay}]
        for name in self.names:
            groups[self._kind(name)]["params"].append(by_name[name])
        fused = all(p.is_cuda and p.dtype == torch.float32 for p in params) or None
        self.optimizer = torch.optim.AdamW(groups, fused=fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_lambda)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state)

    def __call__(self, params, *args, **kwargs) -> None:
        params = list(params)
        if self.optimizer is None:
            self._create(params)
        else:
            store = pyro.get_param_store()
            known = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            for p in params:
                if id(p) not in known:  # a parameter first seen after step 1
                    name = store.param_name(p)
                    self.optimizer.param_groups[self._kind(name)]["params"].append(p)
                    self.names.append(name)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Advance the learning-rate schedule (once per training step, after the optimiser step)."""
        if self.scheduler is not None:
            self.scheduler.step()

    def current_lr(self) -> dict:
        if self.scheduler is None:
            return {}
        lrs = self.scheduler.get_last_lr()
        return {key: lrs[i] for i, key in enumerate(("loc", "scale")) if self.optimizer.param_groups[i]["params"]}

    def get_state(self) -> dict:
        if self.optimizer is None:
            return self._pending if self._pending is not None else {}
        return {"format": self.FORMAT, "params": list(self.names), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def set_state(self, state: dict) -> None:
        if self.optimizer is None:
            self._pending = state
        else:
            self._load(state)

    def _load(self, state: dict) -> None:
        if not state:
            return
        if state.get("format") != self.FORMAT:
            state = self._from_per_parameter(state)
        if list(state["params"]) != self.names:
            raise TrainingError("the saved optimiser state lists other parameters than this model has")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _from_per_parameter(self, state: dict) -> dict:
        """Convert ``PyroOptim.get_state()`` ({name: {"optimizer", "scheduler"}}) to this class's state."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise TrainingError(f"the saved optimiser state has no entry for parameter {missing[0]!r}")
        current = self.optimizer.state_dict()
        per_param = {}
        order = [n for g in range(2) for n in self.names if self._kind(n) == g]  # optimiser index order
        for i, name in enumerate(order):
            old = state[name]["optimizer"]["state"]
            if old:
                per_param[i] = next(iter(old.values()))
        sched = next(iter(state.values()))["scheduler"]
        epoch = int(sched.get("last_epoch", 0))
        scheduler = self.scheduler.state_dict()
        scheduler.update({k: sched[k] for k in ("last_epoch", "_step_count") if k in sched})
        scheduler["_last_lr"] = [group["initial_lr"] * self.lr_lambda(epoch) for group in current["param_groups"]]
        groups = [dict(group, lr=lr) for group, lr in zip(current["param_groups"], scheduler["_last_lr"])]
        return {"format": self.FORMAT, "params": list(self.names), "scheduler": scheduler,
                "optimizer": {"state": per_param, "param_groups": groups}}


def _svi_stepper(model, guide, *, lr, scale_lr, weight_decay, max_steps, warmup_ratio, elbo, flip, amp) -> Stepper:
    optim = GroupedAdamW(lr=lr, scale_lr=scale_lr, weight_decay=weight_decay,
                         lr_lambda=warmup_linear(max_steps, warmup_ratio))
    loss = RecordingTraceELBO() if elbo == "trace" else RecordingTraceMeanFieldELBO()
    svi = SVI(model, guide, distributed.GradientAveraging(optim) if distributed.is_distributed() else optim, loss=loss)

    def step(batch, w, num_data):
        with scale_latents(num_data * w), flip(), amp():
            value = svi.step(batch)
        optim.step()  # advance the learning-rate schedule
        model_trace, _ = loss.last_traces
        with torch.no_grad():
            nll = _nll(model_trace).item()
        kl = loss.last_kl.item()  # computed before the optimiser moved the guide's parameters
        return {"loss": value / num_data, "nll": nll, "kl": kl}

    return Stepper(step, optim.current_lr, optim.get_state, optim.set_state)


def _paper_stepper(model, guide, *, lr, kl_lr, max_steps, warmup_ratio, flip, amp, device) -> Stepper:
    from .guides import BlobGuide

    if not isinstance(guide, BlobGuide) or guide.covariance != "diagonal":
        raise ValueError("the paper preset needs the 'blob' guide (mean-field Normal)")
    # register every parameter once (guide params and the network's deterministic ones)
    with torch.no_grad():
        probe = model.example_batch()
        poutine.trace(poutine.replay(model, poutine.trace(guide).get_trace(probe))).get_trace(probe)
    store = pyro.get_param_store()
    named = dict(store.named_parameters())
    rho = [p for n, p in named.items() if _is_scale_param("." + n + ".")]
    means = [p for n, p in named.items() if not _is_scale_param("." + n + ".")]
    opt1 = torch.optim.AdamW(means, lr=lr, eps=1e-6, weight_decay=0.0)
    opt2 = torch.optim.SGD(means + rho, lr=kl_lr)
    factor = warmup_linear(max_steps, warmup_ratio)
    sched1 = torch.optim.lr_scheduler.LambdaLR(opt1, factor)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, factor)
    priors = model.prior_distributions()

    def kl_float64():
        total = 0.0
        for name, prior in priors.items():
            q = guide.site_distribution(name)
            qd = torch.distributions.Normal(q.base_dist.loc.double(), q.base_dist.scale.double())
            base = prior.base_dist if hasattr(prior, "base_dist") else prior
            pd = torch.distributions.Normal(base.loc.double(), base.scale.double())
            total = total + kl_divergence(qd, pd).sum()
        return total

    def step(batch, w, num_data):
        with flip(), amp():
            guide_trace = poutine.trace(guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
        nll = _nll(model_trace)
        nll.backward()
        distributed.average_gradients(means + rho)  # the NLL part; the KL part is the same on every process
        opt1.step()
        opt1.zero_grad()  # rho keeps its NLL gradient, as in the official code
        sched1.step()
        kl = kl_float64()
        (w * kl).backward()
        opt2.step()
        opt2.zero_grad()
        sched2.step()
        return {"loss": nll.item() + w * kl.item(), "nll": nll.item(), "kl": kl.item()}

    order = [store.param_name(p) for p in means + rho]  # optimiser state refers to parameters by position

    def save():
        return {"opt1": opt1.state_dict(), "opt2": opt2.state_dict(), "sched1": sched1.state_dict(),
                "sched2": sched2.state_dict(), "params": list(order)}

    def load(state):
        if state.get("params", order) != order:
            raise TrainingError("the saved optimiser state lists other parameters than this model has")
        opt1.load_state_dict(state["opt1"]); opt2.load_state_dict(state["opt2"])
        sched1.load_state_dict(state["sched1"]); sched2.load_state_dict(state["sched2"])

    return Stepper(step, lambda: {"adamw": sched1.get_last_lr()[0], "sgd": sched2.get_last_lr()[0]}, save, load)
