"""Training: stochastic variational inference with ``pyro.infer.SVI``, or the paper's two-optimiser step.

::

    log = fit(model, guide, train_split, max_steps=200, batch_size=16, lr=5e-4)       # SVI, Trace_ELBO
    log = fit(model, guide, train_split, max_steps=5000, batch_size=4, preset="paper")  # official optimisation

``fit`` returns one record per step (``loss``, ``nll``, ``kl``, ``kl_weight``, ``lr``, ``seconds``), the
content of ``train_log.jsonl``. Each step draws one posterior sample (Flipout by default); the KL
part of the ELBO is weighted by a schedule from :mod:`blob_pyro.kl`.

SVI path: one ``Trace_ELBO`` (or ``TraceMeanField_ELBO``) step with a Pyro optimiser that gives every
parameter its own AdamW and learning-rate schedule: ``lr`` for means and deterministic parameters,
``scale_lr`` for the std parameters (``rho``, AutoNormal ``scales``, low-rank ``cov_factor``),
6 % linear warm-up then linear decay to 0 at ``max_steps``.

Paper path (``preset="paper"``, §1.5 of the reference): per step, AdamW(lr, eps=1e-6) on the batch-mean
NLL for the means and the deterministic factor; then, with the means already updated, plain SGD(kl_lr)
on π·KL for every parameter — so rho is stepped by SGD on NLL + π·KL (its NLL gradient is never
cleared by the first optimiser), exactly as the official code.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from typing import Callable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from .kl import make_kl_schedule, scale_latents
from .reparam import flipout

__all__ = ["fit", "warmup_linear", "batches", "TrainingError", "kl_terms"]


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
    """Mixin keeping the last (model, guide) traces of an ELBO, to log NLL and KL per step."""

    last_traces = None

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        self.last_traces = (model_trace, guide_trace)
        return model_trace, guide_trace


class RecordingTraceELBO(_Recorder, Trace_ELBO):
    pass


class RecordingTraceMeanFieldELBO(_Recorder, TraceMeanField_ELBO):
    pass


def kl_terms(model_trace, guide_trace) -> torch.Tensor:
    """KL(q‖p) summed over latent sites (unscaled): closed form where known, else the MC estimate."""
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


def _nll(model_trace) -> torch.Tensor:
    obs = model_trace.nodes["obs"]
    return -obs["fn"].log_prob(obs["value"]).mean()


def _is_scale_param(name: str) -> bool:
    return any(tag in name for tag in (".rho.", "scales", "cov_factor"))


def fit(model, guide, train, *, max_steps: int, batch_size: int = 16, lr: float = 5e-4, scale_lr: float | None = None,
        warmup_ratio: float = 0.06, weight_decay: float = 0.0, elbo: str = "trace", kl_schedule: str = "standard",
        kl_multiplier: float = 1.0, gamma: float = 8.0, use_flipout: bool = True, flipout_per: str = "token",
        preset: str | None = None, kl_lr: float = 0.01, seed: int = 0, world_size: int = 1, progress: bool = True,
        device=None, autocast_dtype: torch.dtype | None = None, start_step: int = 0, state=None,
        callback: Callable[[dict, dict], None] | None = None) -> list[dict]:
    """Fit ``guide`` to the posterior of ``model`` on ``train`` (a TaskSplit or list of examples).

    :param start_step: steps already done (resuming); training continues with step ``start_step + 1``.
    :param state: when resuming, ``{"optimizer_state": ..., "rng_state": ...}`` from a checkpoint; the
        RNGs are restored after the optimisers are set up, just before the first step.
    :param callback: called after every step with (record, state) where ``state`` holds what a
        checkpoint needs (``step``, and ``optimizer_state``: a function returning the optimiser and
        scheduler state); used by :func:`blob_pyro.runs.train_run` for checkpoints and Ctrl-C.
    :returns: list of per-step records.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be > 0, got {max_steps}")
    examples = list(getattr(train, "examples", train))
    num_data = len(examples) * world_size
    model.num_data = num_data
    schedule = make_kl_schedule(kl_schedule, num_data, batch_size, world_size=world_size, gamma=gamma,
                                multiplier=kl_multiplier)
    scale_lr = lr if scale_lr is None else scale_lr
    device = device or next(model.network.parameters()).device
    head = model.head
    stream = batches(examples, batch_size, seed=seed, start=start_step)
    if elbo not in ("trace", "meanfield"):
        raise ValueError(f"elbo must be 'trace' or 'meanfield', got {elbo!r}")
    flip = (lambda: flipout(flipout_per)) if use_flipout else contextlib.nullcontext
    amp = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    model.network.eval()  # frozen backbone: no backbone dropout; LoRA dropout is switched on separately
    _lora_dropout_train(model.network)

    if preset == "paper":
        step_fn, lrs = _paper_stepper(model, guide, lr=lr, kl_lr=kl_lr, max_steps=max_steps,
                                      warmup_ratio=warmup_ratio, flip=flip, amp=amp, first_batch=None,
                                      head=head, examples=examples, device=device)
    elif preset is None:
        step_fn, lrs = _svi_stepper(model, guide, lr=lr, scale_lr=scale_lr, weight_decay=weight_decay,
                                    max_steps=max_steps, warmup_ratio=warmup_ratio, elbo=elbo, flip=flip, amp=amp)
    else:
        raise ValueError(f"unknown preset {preset!r}; the only preset is 'paper'")
    if state is not None and "optimizer_state" in state:
        lrs["load"](state["optimizer_state"])
    if state is not None and "rng_state" in state:  # resuming: draw exactly what the interrupted run would have
        from .checkpoint import set_rng_state

        set_rng_state(state["rng_state"])

    log = []
    bar = _progress(range(start_step + 1, max_steps + 1), progress, "train")
    for step in bar:
        _, chunk = next(stream)
        batch = head.collate(chunk, device)
        t0 = time.perf_counter()
        w = schedule.weight(step)
        try:
            record = step_fn(batch, w, num_data)
        except ValueError as err:  # distribution validation refusing NaN/inf logits or parameters
            if "invalid values" not in str(err):
                raise
            first = str(err).strip().splitlines()[0]
            m = re.search(r"parameter (\w+).*?distribution (\w+)", first)
            what = f"{m.group(1)} of a {m.group(2)}" if m else first[:120]
            raise TrainingError(f"non-finite loss at step {step} (NaN/inf in {what}); training diverged, "
                                f"try a smaller lr") from err
        record.update(step=step, kl_weight=w, lr=lrs["current"](), seconds=time.perf_counter() - t0)
        if not all(math.isfinite(record[k]) for k in ("loss", "nll", "kl")):
            raise TrainingError(f"non-finite loss at step {step} (loss={record['loss']}, nll={record['nll']}, kl={record['kl']})")
        log.append(record)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(nll=f"{record['nll']:.3f}", kl=f"{record['kl']:.3g}")
        if callback is not None:
            callback(record, {"step": step, "optimizer_state": lrs["save"]})
    return log


def _lora_dropout_train(network) -> None:
    for name, module in network.named_modules():
        if "lora_dropout" in name and isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.train()


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, dynamic_ncols=True, leave=False)


def _svi_stepper(model, guide, *, lr, scale_lr, weight_decay, max_steps, warmup_ratio, elbo, flip, amp):
    def optim_args(module_name, param_name):
        full = f"{module_name}.{param_name}" if module_name else param_name
        return {"lr": scale_lr if _is_scale_param("." + full + ".") else lr, "weight_decay": weight_decay}

    optim = pyro.optim.LambdaLR({"optimizer": torch.optim.AdamW, "optim_args": optim_args,
                                 "lr_lambda": warmup_linear(max_steps, warmup_ratio)})
    loss = RecordingTraceELBO() if elbo == "trace" else RecordingTraceMeanFieldELBO()
    svi = SVI(model, guide, optim, loss=loss)

    def step(batch, w, num_data):
        with scale_latents(num_data * w), flip(), amp():
            value = svi.step(batch)
        optim.step()  # advance every per-parameter LR schedule
        model_trace, guide_trace = loss.last_traces
        with torch.no_grad():
            nll = _nll(model_trace).item()
            kl = kl_terms(model_trace, guide_trace).item()
        return {"loss": value / num_data, "nll": nll, "kl": kl}

    def current():
        out = {}
        store = pyro.get_param_store()
        for param, sched in optim.optim_objs.items():
            key = "scale" if _is_scale_param("." + store.param_name(param) + ".") else "loc"
            out.setdefault(key, sched.get_last_lr()[0])
        return out

    return step, {"current": current, "save": optim.get_state, "load": optim.set_state}


def _paper_stepper(model, guide, *, lr, kl_lr, max_steps, warmup_ratio, flip, amp, first_batch, head, examples, device):
    from .guides import BlobGuide

    if not isinstance(guide, BlobGuide) or guide.covariance != "diagonal":
        raise ValueError("the paper preset needs the 'blob' guide (mean-field Normal)")
    # register every parameter once (guide params and the network's deterministic ones)
    with torch.no_grad():
        probe = head.collate(examples[:1], device)
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

    return step, {"current": lambda: {"adamw": sched1.get_last_lr()[0], "sgd": sched2.get_last_lr()[0]},
                  "save": save, "load": load}
