"""Diagnostics of the variational fit: Pareto k̂ of q (Yao et al. 2018), PSIS-LOO and model comparison.

::

    run = load_run("runs/wg")
    train = load_split("winogrande_s", "train", "../shared/data")
    diag = vi_pareto_k(run.model, run.guide, train, num_samples=100, subsample_size=64)
    print(diag.khat, diag.reading)              # e.g. 3.1 "do not trust (k̂ >= 0.7)"
    loo_summary(idata); compare({"normal": idata_a, "laplace": idata_b})

**k̂ of the VI fit** (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?"). Draw θ_s ~ q,
s = 1..S, form the log importance ratios ``log r_s = log p(θ_s, y) − log q(θ_s)`` and fit a
generalised Pareto distribution to their largest values with ArviZ's PSIS. Its shape k̂ reads:
k̂ < 0.5 good (q is close to the posterior, importance sampling can even correct it), 0.5 ≤ k̂ < 0.7
usable (posterior means from q are roughly right), k̂ ≥ 0.7 do not trust q as the posterior. k̂ is
itself estimated from S draws: use S ≥ 100 (ArviZ ≥ 0.23 also reports ``min(1 − 1/log10 S, 0.7)``
as the sample-size-aware threshold, :func:`khat_threshold`).

**Which likelihood.** Scoring all N training examples under every draw costs S·N forward passes, so
``y`` is a documented subsample: ``subsample_size`` indices drawn *once* with a generator seeded by
``seed`` (``torch.randperm``) and shared by every draw. With ``scale="full"`` (the default) the
log-likelihood of the subsample is multiplied by N/n — the same estimator the Pyro model's data plate
uses in training — so log p(θ, y) estimates the *full-data* log joint and the target has the
posterior's width. (With ``scale="subsample"`` the target is the posterior given only n examples,
about N/n times wider; a q fit to N examples then looks too narrow and k̂ flags it whatever its
quality.) Because one fixed subsample is shared by all draws, the ratios are a deterministic
function of θ (no subsampling noise between draws); the target is the posterior of a "coreset"
in which every chosen example stands for N/n of them. ``subsample_size=None`` uses all N.

For a LoRA posterior with tens of thousands of dimensions expect k̂ ≫ 0.7: importance sampling
with any Gaussian q fails in such dimensions, so read predictive checks (:mod:`blob_pyro.ppc`),
calibration and PSIS-LOO instead of trusting q's marginals; k̂ says how far from that ideal.

**PSIS-LOO** uses the ``log_likelihood`` group of :func:`~blob_pyro.arviz_io.to_inference_data`
with q's draws in place of posterior draws. Leave-one-out means something for data the posterior
conditions on: build that idata with ``split="train"``. On held-out data use :func:`heldout_elpd`
(log of the mean predictive density), which needs no importance sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from . import arviz_io
from .optim import own_params
from .poutine.float64 import Float64Latents

__all__ = ["VIDiagnostic", "log_importance_ratios", "pareto_k", "vi_pareto_k", "khat_reading", "khat_threshold",
           "loo_summary", "heldout_elpd", "compare"]


def khat_reading(khat: float) -> str:
    """Yao et al. (2018): k̂ < 0.5 good, < 0.7 usable, otherwise do not trust."""
    if not np.isfinite(khat) and khat > 0:
        return "do not trust (k̂ = inf)"
    if khat < 0.5:
        return "good (k̂ < 0.5)"
    if khat < 0.7:
        return "usable (0.5 <= k̂ < 0.7)"
    return "do not trust (k̂ >= 0.7)"


def khat_threshold(num_samples: int) -> float:
    """Sample-size-aware k̂ threshold of Vehtari et al. (2024): ``min(1 − 1/log10 S, 0.7)``."""
    return float(min(1 - 1 / np.log10(num_samples), 0.7))


@dataclass
class VIDiagnostic:
    """Result of :func:`vi_pareto_k`; ``log_ratios`` etc. have shape (S,)."""

    khat: float
    reading: str
    log_ratios: np.ndarray  # log p(θ_s, y) − log q(θ_s), with the likelihood scaled as ``scale`` says
    log_weights: np.ndarray  # Pareto-smoothed, normalised
    ess: float  # 1 / Σ w², of the smoothed weights
    num_samples: int
    num_data: int
    subsample: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # indices used
    scale: str = "full"
    log_prior: np.ndarray | None = None
    log_lik: np.ndarray | None = None  # unscaled subsample log-likelihood per draw
    log_q: np.ndarray | None = None

    def to_dict(self) -> dict:
        return {"khat": self.khat, "reading": self.reading, "ess": self.ess, "num_samples": self.num_samples,
                "num_data": self.num_data, "subsample_size": int(len(self.subsample)), "scale": self.scale,
                "threshold_for_S": khat_threshold(self.num_samples)}


def pareto_k(log_ratios) -> tuple[float, np.ndarray]:
    """k̂ and PSIS log weights of 1-D log importance ratios (ArviZ's PSIS); k̂ = -inf for equal ratios."""
    log_ratios = np.asarray(log_ratios, dtype=np.float64).ravel()
    if np.ptp(log_ratios) < 1e-8 * (1.0 + np.abs(log_ratios).max()):
        # equal weights (q is the target up to round-off): the Pareto fit is undefined, and not needed
        return float("-inf"), np.full(log_ratios.size, -np.log(log_ratios.size))
    lw, khat = arviz_io.psislw(log_ratios)
    return khat, lw


def _latent_log_prob(trace) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
            total = total + site["fn"].log_prob(site["value"]).double().sum().cpu()
    return total


@torch.no_grad()
def log_importance_ratios(model, guide, batches, *, num_samples: int, num_data: int | None = None,
                          obs_site: str = "obs", seed: int = 0) -> dict[str, np.ndarray]:
    """log p(θ_s) + c·log p(y|θ_s) − log q(θ_s) for S draws θ_s ~ q; any Pyro model/guide pair.

    :param batches: list of model arguments (each called as ``model(batch)``); together they are the
        n observations scored. The latent draw is made once per s and replayed on every batch.
    :param num_data: N; the likelihood is scaled by c = N / n (``None``: c = 1, the batches are all data).
    :returns: dict of (S,) float64 arrays ``log_ratio``, ``log_prior``, ``log_lik`` (unscaled), ``log_q``.
    """
    out = {k: np.empty(num_samples) for k in ("log_ratio", "log_prior", "log_lik", "log_q")}
    n_obs = None
    # Float64Latents: float32 latent log-densities are NaN once a std is below ~1e-22 (collapsed posteriors)
    with torch.random.fork_rng(devices=[]), Float64Latents(), own_params():
        torch.manual_seed(seed)
        for s in range(num_samples):
            guide_trace = poutine.trace(guide).get_trace(batches[0])
            log_q = torch.zeros((), dtype=torch.float64)
            for site in guide_trace.nodes.values():
                if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                    log_q = log_q + site["fn"].log_prob(site["value"]).double().sum().cpu()
            log_lik, count, log_prior = torch.zeros((), dtype=torch.float64), 0, None
            for batch in batches:
                tr = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
                obs = tr.nodes[obs_site]
                lp = obs["fn"].log_prob(obs["value"])
                log_lik = log_lik + lp.double().sum().cpu()
                count += int(lp.numel())  # observations in the plate (event dims are summed by log_prob)
                if log_prior is None:
                    log_prior = _latent_log_prob(tr)
            n_obs = count
            c = 1.0 if num_data is None else num_data / count
            out["log_prior"][s], out["log_lik"][s], out["log_q"][s] = float(log_prior), float(log_lik), float(log_q)
            out["log_ratio"][s] = float(log_prior + c * log_lik - log_q)
    out["num_observed"] = np.array(n_obs)
    return out


def vi_pareto_k(model, guide, data, *, num_samples: int = 100, subsample_size: int | None = 64,
                num_data: int | None = None, scale: str = "full", batch_size: int = 16, seed: int = 0) -> VIDiagnostic:
    """k̂ of a BLoB guide against the posterior on ``data`` (the training split); see the module notes.

    :param data: TaskSplit or list of examples the posterior conditions on.
    :param subsample_size: n examples scored per draw (``None``: all).
    :param num_data: N (default ``len(data)``).
    :param scale: ``"full"`` (likelihood × N/n) or ``"subsample"`` (×1).
    """
    from pyro.infer.autoguide import AutoDelta

    if isinstance(guide, AutoDelta):
        raise ValueError("k̂ needs a guide with a density: AutoDelta (MLE/MAP) is a point estimate")
    if scale not in ("full", "subsample"):
        raise ValueError(f"scale must be 'full' or 'subsample', got {scale!r}")
    examples = list(getattr(data, "examples", data))
    n_all = len(examples)
    n = n_all if subsample_size is None else min(int(subsample_size), n_all)
    idx = torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[:n].sort().values.numpy()
    chosen = [examples[i] for i in idx]
    device = next(model.network.parameters()).device
    batches = [model.head.collate(chosen[i:i + batch_size], device) for i in range(0, n, batch_size)]
    model.network.eval()
    big_n = int(num_data or n_all)
    res = log_importance_ratios(model, guide, batches, num_samples=num_samples,
                                num_data=big_n if scale == "full" else None, seed=seed)
    khat, lw = pareto_k(res["log_ratio"])
    return VIDiagnostic(khat=khat, reading=khat_reading(khat), log_ratios=res["log_ratio"], log_weights=lw,
                        ess=float(1.0 / np.exp(2 * lw).sum()), num_samples=num_samples, num_data=big_n,
                        subsample=idx, scale=scale, log_prior=res["log_prior"], log_lik=res["log_lik"],
                        log_q=res["log_q"])


# --------------------------------------------------------------------------------------------- predictive
def loo_summary(idata) -> dict:
    """PSIS-LOO of the predictive: elpd, its SE, p_loo and the count of examples per k̂ band.

    PSIS fits its Pareto tail to the largest min(0.2·S, 3·√S) weights and needs at least 5 of them:
    with S ≤ 20 draws every per-example k̂ is inf (ArviZ's "cannot fit"); use S ≥ 30.
    """
    res = arviz_io.loo(idata, pointwise=True)
    k = np.asarray(res.pareto_k).ravel()
    return {"elpd_loo": float(res["elpd_loo"]), "se": float(res["se"]), "p_loo": float(res["p_loo"]),
            "n": int(k.size), "khat_good": int((k < 0.5).sum()), "khat_ok": int(((k >= 0.5) & (k < 0.7)).sum()),
            "khat_bad": int((k >= 0.7).sum()), "khat_max": float(np.nanmax(k)) if k.size else float("nan")}


def heldout_elpd(idata) -> dict:
    """Held-out log predictive density Σ_i log (1/S Σ_s p(y_i|θ_s)) and its SE (no importance sampling)."""
    ll = np.asarray(idata.log_likelihood["y"]).reshape(-1, idata.log_likelihood["y"].shape[-1])  # (S, N)
    lppd_i = np.logaddexp.reduce(ll, axis=0) - np.log(ll.shape[0])
    return {"elpd": float(lppd_i.sum()), "se": float(np.sqrt(lppd_i.size * lppd_i.var())),
            "mean": float(lppd_i.mean()), "n": int(lppd_i.size)}


def compare(idatas: dict):
    """``az.compare`` by PSIS-LOO over runs scored on the *same* examples (e.g. priors × guides)."""
    sizes = {name: int(np.asarray(d.observed_data["y"]).size) for name, d in idatas.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"runs were scored on different numbers of examples: {sizes}")
    return arviz_io.compare(idatas)
