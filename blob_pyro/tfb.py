"""Training-free Bayesianization (TFB, Shi et al., NeurIPS 2025): one variance scale sigma for a trained LoRA, found
by a search on training examples instead of by SVI.

::

    fit(run.model, run.guide, train, cfg.fit)                          # ordinary MLE, Bayesian factor A (AutoDelta)
    anchor = anchor_split(train, size=500, seed=0)                     # training examples (trained on), never dev
    record = bayesianize(run.model, run.guide, anchor, threshold=0.01)  # rewrites B, returns the search's record
    run.guide = record.pop("guide")                                    # a BlobGuide: predict / ArviZ / k-hat / ppc
    record["sigma"], record["nll_at_0"], record["nll"], record["trace"]

**The posterior family.** For each LoRA layer with trained factors A (r, in) and B (out, r), take the thin SVD
``B = U diag(d) Vᵀ`` and re-parameterise without changing the product: ``B' = U diag(d)`` (deterministic) and
``A' = Vᵀ A`` (Bayesian). The guide is BLoB's mean-field Normal on A' (:class:`~blob_pyro.guides.BlobGuide`,
``std = rho²``) with mean A' and std ``sigma / d_i`` on every entry of row i. A draw then moves the weight by
``s · B' ΔA' = s · U (diag(d) ΔA')``, and ``diag(d) ΔA'`` has i.i.d. N(0, sigma²) entries: the weight posterior is
the *low-rank isotropic* Gaussian ``N(W, s² sigma² · I_in ⊗ U Uᵀ)`` of the paper, with one number sigma for every
layer. (This is the official ``modelwrappers/tfblora.py`` parameterisation: SVD of lora_B, std on lora_A.)

**The search.** sigma is the largest value in ``[0, sigma_max]`` (bisection to ``sigma_max / 2**steps``) whose
posterior predictive keeps the anchor set's NLL within ``threshold`` nats of the trained weights':
``|NLL(sigma) - NLL(0)| <= threshold``. The NLL is the mean over the anchor examples of ``-log p̄(ŷ)``, where p̄
averages the softmax of ``num_samples`` draws and ŷ is the class the trained weights predict (the official code's
pseudo-labels: the constraint bounds how far the Bayesian model moves from the trained one, not its fit to the
labels). Every sigma is scored with the same random numbers (``seed``), so NLL(sigma) is a deterministic, continuous
function of sigma and the bisection's bracket means what it says. Differences from the official code: the
official tolerance is ``|ΔNLL| / NLL(0) / n_anchor`` (relative and divided by the anchor count, so it loosens as
the anchor set grows); the official search returns the smallest tested sigma that *breaks* the constraint (or
its untested upper end); each official step draws fresh noise. ``sigma_max`` is the official ``--bayes-beta``
(default 0.2; its ``--bayes-final-beta`` = 0.18 is parsed but never read by ``tfblora.py``).
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError, TrainingError

__all__ = ["TFB_FILE", "DEFAULT_ANCHOR_SIZE", "SVD_FLOOR", "anchor_split", "reparametrise", "tfb_guide", "set_sigma",
           "anchor_nll", "search_sigma", "bayesianize", "read_record"]

TFB_FILE = "tfb.json"

DEFAULT_ANCHOR_SIZE = 500
"""Anchor examples when ``tfb_anchor_size`` is not set (the official ``--anchor-size``), or the whole training split
if it is smaller."""

SVD_FLOOR = 1e-6
"""Added to each singular value before dividing sigma by it (as the official code does): a zero singular value
means that row of A' does not reach the output, so its std only has to stay finite."""


def anchor_split(data, size: int, seed: int):
    """The anchor set: ``size`` examples of the *training* split ``data`` (which the model was trained on), chosen by
    ``seed`` alone (a permutation from its own generator, no global RNG drawn), in the split's order.

    An empty anchor set or one larger than the split is refused (ConfigError, one line).
    """
    import dataclasses

    examples = list(getattr(data, "examples", data))
    n = len(examples)
    if size < 1:
        raise ConfigError(f"method=tfb needs a non-empty anchor set; got tfb_anchor_size={size}")
    if size > n:
        raise ConfigError(f"method=tfb: tfb_anchor_size={size} is larger than the training split ({n} examples)")
    keep = set(torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size].tolist())
    out = [e for i, e in enumerate(examples) if i in keep]
    if dataclasses.is_dataclass(data):
        return dataclasses.replace(data, examples=tuple(out))
    return out


@torch.no_grad()
def reparametrise(model, means: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Rotate each layer's trained (A, B) to (A' = Vᵀ A, B' = U diag(d)) with ``B = U diag(d) Vᵀ``; B·A is unchanged.

    ``means``: site name -> trained A (r, in) for every Bayesian factor of ``model`` (which must be factor A).
    Writes B' (out, r) into PEFT's lora_B and A' into PEFT's lora_A and the model's init (the guide's mean).
    Returns (A' per site, d (r,) per site).
    """
    if model.bayesian_factor != "A":
        raise ValueError(f"TFB puts its variance on lora_A; the model's Bayesian factor is {model.bayesian_factor}")
    new_means, singular = {}, {}
    for site in model.sites:
        a = means[site.name].detach()
        b = site.layer.lora_B["default"].weight
        u, d, vh = torch.linalg.svd(b.detach().double(), full_matrices=False)  # u (out, r), d (r,), vh (r, r)
        a_new = (vh @ a.double()).to(a.dtype)
        b.copy_((u * d).to(b.dtype))
        site.peft_weight().copy_(a_new)
        model._init[site.name] = a_new.clone()
        new_means[site.name], singular[site.name] = a_new, d.to(a.dtype)
    return new_means, singular


def tfb_guide(model, singular: dict[str, torch.Tensor], sigma: float):
    """The TFB posterior as a :class:`~blob_pyro.guides.BlobGuide` over ``model``'s A' sites: mean = the model's init
    (A', see :func:`reparametrise`), std = ``sigma / (d_i + SVD_FLOOR)`` on row i (``std_param="square"``)."""
    from .checkpoint import get_rng_state, set_rng_state
    from .guides import BlobGuide

    state = get_rng_state()  # BlobGuide draws its initial rho; TFB overwrites it, so no later draw may change
    try:
        guide = BlobGuide(model, std_param="square")
    finally:
        set_rng_state(state)
    set_sigma(guide, singular, sigma)
    return guide


@torch.no_grad()
def set_sigma(guide, singular: dict[str, torch.Tensor], sigma: float) -> None:
    """Set every std of a TFB guide to ``sigma / (d_i + SVD_FLOOR)`` (row i of each site's A')."""
    from .guides import deep_getattr

    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    for name, d in singular.items():
        rho = deep_getattr(guide.rho, name)
        std = (sigma / (d.to(rho.device, torch.float64) + SVD_FLOOR)).unsqueeze(-1).expand(rho.shape)
        rho.copy_(std.sqrt().to(rho.dtype))


@torch.no_grad()
def anchor_nll(model, guide, anchor, labels: torch.Tensor, *, num_samples: int, seed: int, batch_size: int = 32,
               autocast_dtype=None) -> float:
    """Mean NLL of ``labels`` (N,) under the posterior predictive of ``num_samples`` draws (0: the mean's softmax),
    with the torch and Pyro RNGs seeded by ``seed`` for the call and restored after (common random numbers)."""
    from .checkpoint import get_rng_state, set_rng_state
    from .predictive import predict

    state = get_rng_state()
    try:
        torch.manual_seed(seed)
        out = predict(model, guide, anchor, num_samples=num_samples, batch_size=batch_size, progress=False,
                      autocast_dtype=autocast_dtype)
    finally:
        set_rng_state(state)
    picked = out.probs.double().gather(1, labels.view(-1, 1).cpu()).squeeze(1)
    return float(-picked.clamp_min(1e-300).log().mean())


def search_sigma(change, *, threshold: float, sigma_max: float, steps: int) -> tuple[float, list[dict]]:
    """The largest sigma in ``[0, sigma_max]`` with ``|change(sigma)| <= threshold``, by bisection.

    ``change(sigma) -> float`` is NLL(sigma) - NLL(0). ``sigma_max`` is tried first (and returned if it passes);
    otherwise ``steps`` bisections of [0, sigma_max] keep ``low`` passing and ``high`` failing, and ``low`` is
    returned: the constraint holds there and fails ``sigma_max / 2**steps`` above it. Returns (sigma, trace), one
    trace entry {"sigma", "change", "ok"} per evaluation. TrainingError if no tested sigma > 0 passes.
    """
    trace = []

    def ok(sigma):
        c = float(change(sigma))
        passed = math.isfinite(c) and abs(c) <= threshold
        trace.append({"sigma": sigma, "change": c, "ok": passed})
        return passed

    if ok(sigma_max):
        return sigma_max, trace
    low, high = 0.0, sigma_max
    for _ in range(steps):
        mid = (low + high) / 2
        if ok(mid):
            low = mid
        else:
            high = mid
    if low == 0.0:
        raise TrainingError(f"method=tfb: every sigma down to {high:.3g} changes the anchor NLL by more than "
                            f"tfb_threshold={threshold}; raise tfb_threshold or tfb_search_steps, or lower tfb_sigma_max")
    return low, trace


def bayesianize(model, point_guide, anchor, *, threshold: float = 0.01, sigma_max: float = 0.2, steps: int = 10,
                num_samples: int = 10, seed: int = 0, batch_size: int = 32, autocast_dtype=None) -> dict:
    """TFB on a trained point estimate: re-parameterise (A, B), search sigma on ``anchor``, build the guide.

    ``model``: a :class:`~blob_pyro.model.BlobModel` with Bayesian factor A; ``point_guide``: its trained
    point-estimate guide (``median()`` gives the trained A). Returns the record ``tfb.json`` holds (sigma, the
    anchor's indices, the pseudo-labels' NLL at 0 and at sigma, the search trace, the settings) plus ``"guide"``:
    the TFB :class:`~blob_pyro.guides.BlobGuide` at sigma.
    """
    from .predictive import predict

    if not (math.isfinite(threshold) and threshold > 0):
        raise ConfigError(f"tfb_threshold must be a finite number > 0; got {threshold}")
    examples = list(getattr(anchor, "examples", anchor))
    if not examples:
        raise ConfigError("method=tfb needs a non-empty anchor set of training examples")
    if num_samples < 1:
        raise ConfigError("method=tfb scores sigma with posterior draws; num_samples must be >= 1")
    means, singular = reparametrise(model, point_guide.median())
    guide = tfb_guide(model, singular, sigma_max)
    kwargs = {"batch_size": batch_size, "autocast_dtype": autocast_dtype}
    at_mean = predict(model, guide, examples, num_samples=0, progress=False, **kwargs)
    labels = at_mean.probs.argmax(-1)  # the trained weights' own answers (pseudo-labels)
    nll0 = anchor_nll(model, guide, examples, labels, num_samples=0, seed=seed, **kwargs)

    def change(sigma):
        set_sigma(guide, singular, sigma)
        return anchor_nll(model, guide, examples, labels, num_samples=num_samples, seed=seed, **kwargs) - nll0

    sigma, trace = search_sigma(change, threshold=threshold, sigma_max=sigma_max, steps=steps)
    set_sigma(guide, singular, sigma)
    nll = nll0 + next(t["change"] for t in reversed(trace) if t["sigma"] == sigma)
    failed = [t["sigma"] for t in trace if not t["ok"]]
    return {"sigma": sigma, "sigma_failed": min(failed) if failed else None, "threshold": threshold,
            "sigma_max": sigma_max, "steps": steps, "num_samples": num_samples, "seed": seed,
            "num_examples": len(examples), "indices": [int(e.index) for e in examples],
            "split": getattr(anchor, "split", None), "labels": "predicted by the trained weights",
            "nll_at_0": nll0, "nll": nll, "trace": trace,
            "singular_values": {k: v.tolist() for k, v in singular.items()}, "guide": guide}


def read_record(run_dir) -> dict:
    """The TFB record of a run folder (RunError, one line, if missing or unusable)."""
    from pathlib import Path

    from .training import read_method_record

    return read_method_record(Path(run_dir) / TFB_FILE, "sigma", method="tfb", keeps="its searched sigma",
                              holds="a TFB record")
