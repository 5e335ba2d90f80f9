"""Methods and presets: named bundles of the settings they imply.

::

    RunConfig.from_dict({"method": "mle"}).resolve().bayes.guide          # 'auto_delta'
    RunConfig.from_dict({"method": "mle", "guide": "lowrank"}).resolve()
    # ConfigError: method=mle implies guide=auto_delta; got guide=lowrank (drop one of them)

Each method *requires* some settings (an explicit different value is refused with one line naming both) and
*defaults* others (used when the setting is not given; an explicit value wins). ``blob`` is the settings
as given. The meaning of each is in ``docs/methods.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import ConfigError

__all__ = ["Method", "METHODS", "PRESETS", "OWN_SETTINGS", "FROM_RUN_SOURCES", "apply_method", "BBB_INIT_SCALE",
           "LAPLACE_SAMPLES"]

LAPLACE_SAMPLES = {"glm": 1000, "sample": 10}
"""Default ``num_samples`` of ``method=laplace`` per predictive. A glm draw is a Gaussian draw of K logits, free once
J Σ Jᵀ is computed; its logit variance is large (Laplace keeps most directions near the prior's width), so the
average of the softmax over draws needs many of them for its Monte Carlo error to stop costing accuracy and NLL
(docs/methods.md). A ``sample`` draw is a pass of the network, as for every other method."""

BBB_INIT_SCALE = 0.1
"""Initial std of every AutoNormal scale for ``method=bbb`` (Pyro's AutoNormal default); the guide's initial
std is eps², so bbb's default eps is √0.1."""


@dataclass(frozen=True)
class Method:
    """What a method or preset implies: ``requires`` (refuse a conflict) and ``defaults`` (fill if unset)."""

    name: str
    summary: str
    requires: dict = field(default_factory=dict)
    defaults: dict = field(default_factory=dict)


_NO_KL = {"kl_schedule": "fixed", "kl_multiplier": 0.0}

METHODS = {
    "blob": Method("blob", "BLoB: the settings as given (default: factor B, BLoB guide, BLoB KL re-weighting)"),
    "mle": Method("mle", "plain LoRA: a point estimate (AutoDelta) without a prior",
                  requires={"guide": "auto_delta", **_NO_KL}, defaults={"num_samples": 0}),
    "map": Method("map", "point estimate of both factors under the prior at the minibatch-ELBO weight 1/N",
                  requires={"guide": "auto_delta", "bayesian_factor": "both", "kl_schedule": "standard"},
                  defaults={"num_samples": 0}),
    "mcdropout": Method("mcdropout", "plain LoRA with LoRA dropout kept on at prediction",
                        requires={"guide": "auto_delta", **_NO_KL}, defaults={"lora_dropout": 0.1}),
    "bbb": Method("bbb", "Bayes-by-backprop on both factors: AutoNormal at a standard initial scale, standard ELBO",
                  requires={"guide": "auto_normal", "bayesian_factor": "both", "kl_schedule": "standard"},
                  defaults={"eps": math.sqrt(BBB_INIT_SCALE)}),
    "ensemble": Method("ensemble", "deep ensemble: ensemble_size mle runs with seeds seed + 1000 j, their "
                                   "probabilities averaged (blob_pyro.ensemble)",
                       requires={"guide": "auto_delta", **_NO_KL}, defaults={"num_samples": 0, "ensemble_size": 3}),
    "temperature": Method("temperature", "mle, then one temperature T fitted by NLL on a held-out slice of the "
                                         "training split, dividing the logits at prediction (blob_pyro.temperature)",
                          requires={"guide": "auto_delta", **_NO_KL},
                          defaults={"num_samples": 0, "calibration_fraction": 0.1}),
    "tfb": Method("tfb", "mle on factor A, then training-free Bayesianization: a Gaussian on A' (B's SVD) whose one "
                         "scale sigma is the largest keeping the NLL of training examples within tfb_threshold "
                         "(blob_pyro.tfb)",
                  requires={"guide": "auto_delta", "bayesian_factor": "A", **_NO_KL},
                  defaults={"num_samples": 10, "tfb_threshold": 0.01, "tfb_search_steps": 10, "tfb_sigma_max": 0.2}),
    "laplace": Method("laplace", "map, then a post-hoc Laplace approximation N(MAP, (GGN + delta I)^-1) over the LoRA "
                                 "factors, delta tuned by the marginal likelihood (blob_pyro.laplace)",
                      requires={"guide": "auto_delta", "bayesian_factor": "both", "kl_schedule": "standard",
                                "prior": "normal"},
                      defaults={"laplace_hessian": "diag", "laplace_subset": "all", "laplace_predictive": "glm"}),
}

OWN_SETTINGS = {"ensemble_size": "ensemble", "calibration_fraction": "temperature", "tfb_threshold": "tfb",
                "tfb_anchor_size": "tfb", "tfb_search_steps": "tfb", "tfb_sigma_max": "tfb", "laplace_hessian": "laplace",
                "laplace_subset": "laplace", "laplace_predictive": "laplace"}
"""Settings that only one method reads: given with another method they are refused rather than ignored."""

FROM_RUN_SOURCES = {"laplace": ("mle", "map"), "tfb": ("mle", "map")}
"""The post-hoc methods that can start from a finished run (``from_run``) instead of training, and the methods that
run may have been trained with: a point estimate of the LoRA factors without dropout or a posterior of its own.
(Laplace-LoRA's own MAP is the AdamW fine-tune, ``mle`` here; its prior enters through the fitted precision.)"""

PRESETS = {
    "paper": Method("paper", "the official optimisation: Bayesian A, BLoB guide and KL re-weighting, AdamW on the "
                             "NLL then SGD on the closed-form weighted KL (a prior with a closed-form KL to a Normal)",
                    requires={"bayesian_factor": "A", "guide": "blob", "kl_schedule": "blob", "objective": "paper"},
                    defaults={"eps": 0.05}),
}


def _apply(flat: dict, method: Method, label: str) -> None:
    for key, value in method.requires.items():
        given = flat.get(key)
        if given is not None and given != value:
            raise ConfigError(f"{label} implies {key}={value}; got {key}={given} (drop one of them)")
        flat[key] = value
    for key, value in method.defaults.items():
        if flat.get(key) is None:
            flat[key] = value


def _check_tfb(out: dict) -> None:
    threshold, size = out["tfb_threshold"], out.get("tfb_anchor_size")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ConfigError(f"method=tfb bounds the anchor NLL change by tfb_threshold > 0; got tfb_threshold={threshold}")
    if size is not None and size < 1:
        raise ConfigError(f"method=tfb needs a non-empty anchor set of training examples; got tfb_anchor_size={size}")
    if out["tfb_search_steps"] < 0:
        raise ConfigError(f"tfb_search_steps must be >= 0; got {out['tfb_search_steps']}")
    if not (math.isfinite(out["tfb_sigma_max"]) and out["tfb_sigma_max"] > 0):
        raise ConfigError(f"tfb_sigma_max must be a finite number > 0; got {out['tfb_sigma_max']}")
    if out.get("num_samples") == 0:
        raise ConfigError("method=tfb scores each sigma with posterior draws; got num_samples=0 (evaluate a finished "
                          "run at the mean with blob-pyro evaluate --num-samples 0)")


def _closed_form(family: str) -> bool:
    """Whether a prior family has a closed-form KL against the Normal guide (which family it is decides)."""
    from .kl import normal_kl_has_closed_form
    from .priors import PRIORS

    return family not in PRIORS or normal_kl_has_closed_form(PRIORS[family]())


def apply_method(flat: dict, method: str, preset: str | None = None) -> dict:
    """``flat`` settings with ``method`` and ``preset`` applied (a new dict); ConfigError on a conflict."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out = dict(flat)
    if preset is not None and method != "blob":
        raise ConfigError(f"preset={preset} is BLoB's optimisation; it cannot be combined with method={method}")
    if preset is not None:
        _apply(out, PRESETS[preset], f"preset={preset}")
    for key, owner in OWN_SETTINGS.items():
        if out.get(key) is not None and method != owner:
            raise ConfigError(f"{key} is a setting of method={owner}; got method={method}")
    _apply(out, METHODS[method], f"method={method}")
    if method == "ensemble" and out["ensemble_size"] < 2:
        raise ConfigError(f"method=ensemble needs ensemble_size >= 2; got ensemble_size={out['ensemble_size']}")
    if method == "temperature" and not 0 < out["calibration_fraction"] < 1:
        raise ConfigError(f"method=temperature holds out a share 0 < calibration_fraction < 1 of the training split; "
                          f"got calibration_fraction={out['calibration_fraction']}")
    if method == "tfb":
        _check_tfb(out)
    if method == "laplace" and out.get("num_samples") is None:
        out["num_samples"] = LAPLACE_SAMPLES.get(out["laplace_predictive"])  # an unknown predictive is refused later
    if method == "mcdropout" and not out.get("lora_dropout"):
        raise ConfigError("method=mcdropout needs lora_dropout > 0; got lora_dropout=0")
    if out.get("objective") == "paper" and out.get("guide") not in (None, "blob"):
        raise ConfigError(f"objective=paper steps the blob guide's rho by SGD; got guide={out.get('guide')}")
    prior = out.get("prior")
    if out.get("objective") == "paper" and prior is not None and not _closed_form(prior):
        raise ConfigError(f"objective=paper optimises the closed-form KL, which prior={prior} does not have against "
                          f"the Normal guide; use prior=normal or laplace, or objective=elbo (Monte Carlo KL)")
    return out
