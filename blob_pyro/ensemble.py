"""Deep ensembles: K independent ``mle`` runs with their own seeds, probabilities averaged.

::

    cfg = RunConfig.from_dict({"method": "ensemble", "ensemble_size": 3, "seed": 0, ...})
    train_ensemble(cfg, "runs/ens")        # runs/ens/member0..2 (seeds 0, 1000, 2000), each a normal run folder
    run = load_run("runs/ens")             # run.members: the K member Runs; evaluate(run) averages them
    p, p_logit = ensemble_average([m0.probs, m1.probs], [m0.logits, m1.logits])   # (N, C) each

``ensemble_size`` members, member j an ``mle`` run (the ensemble's settings, ``method=mle``) with seed
:func:`member_seed` ``(seed, j) = seed + 1000 j``. The prediction is the members' probabilities averaged (the
Bayesian model average over a uniform mixture); :func:`ensemble_average` also gives the softmax of the averaged
logits (the official ``deepensemble`` rule), which the benchmark runner reports as a second row. The runner's
ensemble cells (``benchmarks/runner``) use these same seeds, folder names and averages.

The run folder: ``config.json`` (``method=ensemble``), ``member<j>/`` (each a run folder
:func:`~blob_pyro.training.load_run` reads alone), ``predictions.safetensors`` (``labels`` (N,), ``probs`` (N, C),
``member_logits`` (K, N, C)) and ``metrics.json``, written last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .config import RunConfig
from .errors import BlobPyroError, ConfigError, RunError
from .optim import own_params
from .training import PREDICTIONS

__all__ = ["ENSEMBLE_SEED_STRIDE", "member_seed", "member_configs", "member_dirs", "ensemble_average",
           "predict_members", "train_ensemble", "load_ensemble", "ensemble_draws", "PREDICTIONS"]

ENSEMBLE_SEED_STRIDE = 1000


def member_seed(seed: int, j: int) -> int:
    """Seed of member ``j`` of an ensemble seeded ``seed``."""
    return int(seed) + ENSEMBLE_SEED_STRIDE * int(j)


def member_configs(cfg: RunConfig, member_method: str = "mle") -> list[RunConfig]:
    """The resolved settings of each member of the ensemble ``cfg`` (``method=ensemble``)."""
    cfg = cfg.resolve()
    if cfg.method != "ensemble":
        raise ConfigError(f"member_configs needs method=ensemble; got method={cfg.method}")
    return [cfg.replace(method=member_method, ensemble_size=None, seed=member_seed(cfg.fit.seed, j)).resolve()
            for j in range(cfg.ensemble_size)]


def member_dirs(run_dir, size: int) -> list[Path]:
    return [Path(run_dir) / f"member{j}" for j in range(size)]


def ensemble_average(probs: list, logits: list | None = None) -> tuple:
    """(probability average, softmax of the logit average) of K members' (N, C) probs / (S, N, C) logits."""
    p = torch.stack([x.float() for x in probs]).mean(0)
    if logits is None:
        return p, None
    mean_logits = torch.stack([x.float().mean(0) for x in logits]).mean(0)
    return p, torch.softmax(mean_logits, dim=-1)


def predict_members(members: list, data, *, num_samples: int | None = None, batch_size: int | None = None,
                    sample_batched: bool | None = None, progress: bool = True):
    """A :class:`~blob_pyro.predictive.Prediction` of the ensemble: probs (N, C) the members' mean, logits
    (K, N, C) each member's (its own ``num_samples``; the logits of a point estimate at N = 0)."""
    from .predictive import Prediction, predict

    examples = list(getattr(data, "examples", data))
    probs, logits, labels = [], [], None
    for m in members:
        kw = m.config.predict.kwargs()
        kw.update({k: v for k, v in (("num_samples", num_samples), ("batch_size", batch_size),
                                     ("sample_batched", sample_batched)) if v is not None})
        with own_params():  # the members name their parameters alike
            out = predict(m.model, m.guide, examples, **kw, keep_draws=True, progress=progress,
                          autocast_dtype=m.config.runtime.autocast_dtype())
        labels = out.labels if labels is None else labels
        probs.append(out.probs)
        logits.append(out.logits.float().mean(0))
    return Prediction(ensemble_average(probs)[0], labels, torch.stack(logits))


def load_ensemble(run_dir, *, dataset: str | None = None, data_dir: str | None = None, device: str | None = None,
                  trust_remote_code: bool = False):
    """A :class:`~blob_pyro.training.Run` whose ``members`` are the loaded member runs (model and guide None)."""
    from .training import Run, eval_split_of, load_run, read_run_config, retarget_head

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    dirs = member_dirs(run_dir, cfg.ensemble_size)
    for d in dirs:
        if not (d / "metrics.json").is_file():
            raise RunError(f"ensemble member {d} is missing or unfinished; finish it with "
                           f"blob-pyro train --resume {run_dir}")
    members = []
    for d in dirs:
        with own_params():  # the members name their parameters alike
            members.append(load_run(d, device=device, trust_remote_code=trust_remote_code))
    eval_split = None
    if dataset is not None or data_dir is not None:
        eval_split = eval_split_of(cfg, dataset, data_dir)
    if dataset is not None and dataset != cfg.dataset:
        for m in members:
            retarget_head(m.model, dataset)
    cfg.runtime.trust_remote_code = trust_remote_code
    return Run(cfg, None, None, None, eval_split, members=members)


def ensemble_draws(members: list, examples, *, num_samples: int, seed: int = 0, batch_size: int = 32,
                   progress: bool = False, attrs: dict | None = None):
    """ArviZ data for posterior predictive checks: the members are the posterior draws.

    Draw s is member ``s mod K`` at its own prediction (a point estimate for ``mle`` members), so the S draws
    are a uniform mixture over the members; ``y_rep`` is one label vector per draw. Groups: posterior_predictive
    (``y`` (1, S, N), ``logits`` (1, S, N, C)), log_likelihood, observed_data.
    """
    from .arviz_io import from_dict

    examples = list(examples)
    pred = predict_members(members, examples, batch_size=batch_size, progress=progress)
    k = len(members)
    logits = pred.logits[torch.arange(num_samples) % k]  # (S, N, C)
    labels = pred.labels
    log_lik = torch.log_softmax(logits.double(), -1).gather(-1, labels[None, :, None].expand(num_samples, -1, 1))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        y_rep = torch.distributions.Categorical(logits=logits).sample()
    dims = {"y": ["example"], "logits": ["example", "class"]}
    coords = {"example": list(range(len(examples))), "class": list(range(logits.shape[-1]))}
    attrs = {"inference": f"deep ensemble of {k} members; draw s = member s mod {k}", "num_samples": int(num_samples),
             "seed": int(seed), "members": k, **(attrs or {})}
    return from_dict({"posterior_predictive": {"y": y_rep.numpy()[None], "logits": logits.numpy()[None]},
                      "log_likelihood": {"y": log_lik.squeeze(-1).numpy()[None]},
                      "observed_data": {"y": labels.numpy()}}, coords=coords, dims=dims, attrs=attrs)


def train_ensemble(cfg: RunConfig, out_dir, *, progress: bool = True, overwrite: bool = False, resume: bool = False,
                   trust_remote_code: bool = False) -> dict:
    """Train the members of ``cfg`` (``method=ensemble``) into ``out_dir/member<j>`` and write their average.

    Nothing is written before the settings and the data have loaded; if the first member fails before its
    folder exists, the ensemble's config.json is removed again. ``resume``: finished members are kept, an
    interrupted one continues from its checkpoint, missing ones train.
    """
    from . import distributed
    from .data import load_splits
    from .io import atomic_save_safetensors, atomic_write_text
    from .training import (
        TrainingInterrupted,
        eval_split_of,
        load_run,
        metrics_of,
        output_problem,
        predict_split,
        resume_run,
        run_versions,
        train_run,
    )

    cfg = cfg.resolve()
    configs = member_configs(cfg)
    out = Path(out_dir)
    distributed.init_from_env(cfg.runtime.device)
    main = distributed.is_main()  # every process trains every member; rank 0 writes the ensemble's files
    if not resume:
        problem = distributed.broadcast_object(output_problem(out, overwrite) if main else None)
        if problem:
            raise RunError(problem)
        train = load_splits(cfg.dataset, cfg.data_dir, train_limit=cfg.train_limit, eval_limit=cfg.eval_limit,
                            holdout=cfg.holdout)[0]  # fail before writing
        if len(train) < cfg.fit.batch_size:
            raise ConfigError(f"batch_size={cfg.fit.batch_size} is larger than the training split "
                              f"({len(train)} examples)")
        if main:
            if out.exists() and overwrite:
                shutil.rmtree(out) if out.is_dir() else out.unlink()
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.json", json.dumps({"config": cfg.to_dict(), "versions": run_versions()},
                                                              indent=2) + "\n")
        distributed.barrier()
    elif (out / "metrics.json").is_file():
        raise RunError(f"the run in {out} has already finished (metrics.json exists); nothing to resume")
    dirs = member_dirs(out, len(configs))
    for j, (mcfg, d) in enumerate(zip(configs, dirs)):
        try:
            if (d / "metrics.json").is_file():
                continue
            if (d / "config.json").is_file():
                resume_run(d, progress=progress, trust_remote_code=trust_remote_code)
            else:
                if d.exists():  # a member folder without config.json: killed before it started
                    shutil.rmtree(d)
                train_run(mcfg, d, progress=progress)
        except TrainingInterrupted as err:
            raise TrainingInterrupted(f"interrupted in member {j} of {len(configs)}; checkpoint saved, continue "
                                      f"with blob-pyro train --resume {out}", err.exit_code) from err
        except BlobPyroError:
            if j == 0 and not resume and main and not d.exists():  # nothing of the ensemble was trained
                shutil.rmtree(out)
            raise
    run = load_run(out, trust_remote_code=trust_remote_code)
    run.eval = eval_split_of(cfg)
    pred = predict_split(run, run.eval, progress=progress)  # one prediction: the metrics and the saved file
    metrics = metrics_of(run, run.eval, pred)
    metrics["members"] = [d.name for d in dirs]
    if main:
        atomic_save_safetensors(out / PREDICTIONS, {"labels": pred.labels, "probs": pred.probs.float(),
                                                    "member_logits": pred.logits.float()})
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    distributed.barrier()
    return metrics
