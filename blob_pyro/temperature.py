"""Temperature scaling: one scalar T > 0 fitted by NLL on a held-out slice of the training split.

::

    train, held_out = calibration_split(train_split, fraction=0.1, seed=0)   # held_out is never trained on
    fit(run.model, run.guide, train, cfg.fit)                                 # ordinary MLE
    record = calibrate(run.model, run.guide, held_out)                        # sets run.model.temperature
    record["temperature"], record["nll_at_1"], record["nll"]                  # nll <= nll_at_1

The model divides its logits by ``model.temperature`` (1 while training), so ``predict``, ``evaluate``, the
ArviZ export and ``ppc`` all see the scaled likelihood ``obs ~ Categorical(logits / T)``. ``method=temperature``
(:mod:`blob_pyro.methods`) is ``mle`` plus this post-hoc step; the run folder's ``temperature.json`` holds T, the
held-out examples and their NLL at T = 1 and at T, and :func:`blob_pyro.training.load_run` restores T from it.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

__all__ = ["TEMPERATURE_FILE", "calibration_split", "fit_temperature", "calibrate", "nll_at"]

TEMPERATURE_FILE = "temperature.json"


def calibration_split(data, fraction: float, seed: int):
    """(train, held_out) of a TaskSplit (or list of examples): ``round(fraction · N)`` examples held out.

    Which ones is a function of ``seed`` alone (a permutation from its own generator, no global RNG drawn);
    both parts keep the split's order. An empty held-out slice or an empty remainder is refused (ConfigError).
    """
    import dataclasses

    examples = list(getattr(data, "examples", data))
    n = len(examples)
    size = int(round(fraction * n))
    if size < 1:
        raise ConfigError(f"method=temperature: calibration_fraction={fraction} of {n} training examples holds out "
                          f"none; raise calibration_fraction or train_limit")
    if size >= n:
        raise ConfigError(f"method=temperature: calibration_fraction={fraction} of {n} training examples leaves "
                          f"none to train on")
    held = set(torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size].tolist())
    keep = [e for i, e in enumerate(examples) if i not in held]
    out = [e for i, e in enumerate(examples) if i in held]
    if dataclasses.is_dataclass(data):
        return dataclasses.replace(data, examples=tuple(keep)), dataclasses.replace(data, examples=tuple(out))
    return keep, out


def nll_at(logits: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``labels`` (N,) under softmax(``logits`` (N, K) / T), in float64.

    A −∞ logit is an absent option (a question with fewer than K): it stays −∞ at every T and passes no
    gradient to T (dividing it would give ∞ · 0 = NaN in the backward pass).
    """
    logits = logits.double()
    absent = logits == float("-inf")
    scaled = logits.masked_fill(absent, 0.0) / temperature
    return torch.nn.functional.cross_entropy(scaled.masked_fill(absent, float("-inf")), labels)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T): LBFGS on log T from T = 1, in float64.

    The NLL is convex in 1/T, so the minimiser is unique when it is finite. ``logits`` may hold −∞ for absent
    options (:func:`nll_at`); NaN or +∞ is refused (ValueError), and so is a search that ends worse than T = 1,
    which a convex 1-D problem cannot do: a T silently left at 1 would report MLE's calibration as temperature
    scaling's.
    """
    logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
    if torch.isnan(logits).any() or (logits == float("inf")).any():
        raise ValueError("temperature scaling needs finite logits (-inf only for absent options); got NaN or +inf")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll_at(logits, labels, log_t.exp())
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not (t > 0 and math.isfinite(t)) or nll_at(logits, labels, t) > nll_at(logits, labels, 1.0):
        raise ValueError(f"the temperature search ended at T={t}, not below the NLL at T=1; the logits are "
                         f"degenerate")
    return t


@torch.no_grad()
def calibrate(model, guide, held_out, *, batch_size: int = 32, autocast_dtype=None) -> dict:
    """Fit T on ``held_out`` with the model's point-estimate logits and set ``model.temperature``.

    Returns the record ``temperature.json`` holds: temperature, num_examples, the example indices, and the
    held-out NLL at T = 1 (``nll_at_1``) and at T (``nll``).
    """
    from .predictive import predict

    examples = list(getattr(held_out, "examples", held_out))
    model.temperature = 1.0
    out = predict(model, guide, examples, num_samples=0, batch_size=batch_size, keep_draws=True, progress=False,
                  autocast_dtype=autocast_dtype)
    logits = out.logits[0]
    t = fit_temperature(logits, out.labels)
    model.temperature = t
    return {"temperature": t, "num_examples": len(examples), "indices": [int(e.index) for e in examples],
            "split": getattr(held_out, "split", None), "nll_at_1": float(nll_at(logits, out.labels, 1.0)),
            "nll": float(nll_at(logits, out.labels, t))}
