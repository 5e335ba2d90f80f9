"""Posterior predictive: average the softmax of ``num_samples`` posterior draws (BLoB's rule).

::

    out = predict(model, guide, eval_split, num_samples=10)     # out.probs (N, K), out.labels (N,)
    out = predict(model, guide, eval_split, num_samples=0)      # posterior-mean weights (the paper's N=0)
    metrics = compute_metrics(out.probs, out.labels)

Each draw re-runs the guide and replays the model under it, exactly what
``Predictive(model, guide=guide, num_samples=S, return_sites=["logits"])`` does per batch, but with
Flipout as ``model.flipout`` says (fresh signs per example and token) and without storing the LoRA draws. ``sample_batched``
evaluates the S draws in one forward pass by repeating the batch S times, which Flipout makes valid
(each copy gets its own signs around one shared Gaussian draw per layer).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from pyro import poutine

from .optim import own_params, set_lora_dropout
from .poutine import flipout
from .precision import warn_if_emulated

__all__ = ["predict", "Prediction", "posterior_logits"]


@dataclass
class Prediction:
    probs: torch.Tensor  # (N, K) averaged probabilities
    labels: torch.Tensor  # (N,)
    logits: torch.Tensor | None = None  # (S, N, K) per-draw logits when keep_draws=True (S=1 for the mean)


def _model_logits(model, batch, guide_trace=None, condition=None) -> torch.Tensor:
    fn = model
    if guide_trace is not None:
        fn = poutine.replay(fn, trace=guide_trace)
    if condition is not None:
        fn = poutine.condition(fn, data=condition)
    return poutine.trace(fn).get_trace(batch).nodes["logits"]["value"]


def _repeat(batch: dict, times: int) -> dict:
    return {k: v.repeat_interleave(times, dim=0) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def posterior_logits(model, guide, batch, *, num_samples: int = 10, sample_batched: bool = False,
                     use_flipout: bool = True) -> torch.Tensor:
    """(S, B, K) logits of S posterior draws for one batch; S=0 gives (1, B, K) at the posterior mean.

    Flipout as ``model.flipout`` says, unless ``use_flipout=False`` (one weight draw for the whole batch). A guide
    that predicts in logit space (a Laplace guide with ``predictive == "glm"``) draws the S logits from its
    linearised network instead (:func:`blob_pyro.laplace_glm.glm_logits`).
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    with own_params():  # this model's and guide's own values, not another run's left in the param store
        return _posterior_logits(model, guide, batch, num_samples, sample_batched, use_flipout)


def _posterior_logits(model, guide, batch, num_samples, sample_batched, use_flipout):
    if num_samples == 0:
        return _model_logits(model, batch, condition=guide.median(batch)).unsqueeze(0)
    if getattr(guide, "predictive", None) == "glm":
        from .laplace_glm import glm_logits

        return glm_logits(model, guide, batch, num_samples=num_samples)
    per = getattr(model, "flipout", None) if use_flipout else None
    flip = (lambda: flipout(per)) if per else contextlib.nullcontext
    if sample_batched:
        if not per:
            raise ValueError("sample_batched needs Flipout: without it all copies would share one weight draw")
        size = batch["labels"].shape[0]
        big = _repeat(batch, num_samples)
        with flip():
            logits = _model_logits(model, big, guide_trace=poutine.trace(guide).get_trace(big))
        return logits.reshape(size, num_samples, -1).transpose(0, 1)
    draws = []
    for _ in range(num_samples):
        with flip():
            draws.append(_model_logits(model, batch, guide_trace=poutine.trace(guide).get_trace(batch)))
    return torch.stack(draws)


@torch.no_grad()
def predict(model, guide, data, *, num_samples: int = 10, batch_size: int = 16, sample_batched: bool = False,
            keep_draws: bool = False, progress: bool = True, autocast_dtype: torch.dtype | None = None) -> Prediction:
    """Predictive probabilities on ``data`` (a TaskSplit or list of examples), batched, under no_grad."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    examples = list(getattr(data, "examples", data))
    # batch examples of similar length together (less padding), then restore the original order
    order = sorted(range(len(examples)), key=lambda i: _length_key(examples[i]))
    examples = [examples[i] for i in order]
    device = next(model.network.parameters()).device
    set_lora_dropout(model.network)  # MC dropout stays on at prediction
    device_type = torch.device(device).type
    warn_if_emulated(device_type, autocast_dtype)
    amp = torch.autocast(device_type=device_type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    probs, labels, draws = [], [], []
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"predict (S={num_samples})", dynamic_ncols=True, leave=False)
    with amp, own_params():  # one scope for the whole loop, not one per batch (posterior_logits' own)
        for start in starts:
            batch = model.head.collate(examples[start:start + batch_size], device)
            logits = _posterior_logits(model, guide, batch, num_samples, sample_batched, use_flipout=True).float()
            probs.append(torch.softmax(logits, dim=-1).mean(0).cpu())
            labels.append(batch["labels"].cpu())
            if keep_draws:
                draws.append(logits.cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return Prediction(torch.cat(probs)[inverse], torch.cat(labels)[inverse],
                      torch.cat(draws, dim=1)[:, inverse] if keep_draws else None)


def _length_key(example) -> int:
    texts = [example.prompt] + [t for pair in example.mc_texts for t in pair if t]
    return max(len(t) for t in texts)
