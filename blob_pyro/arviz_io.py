"""ArviZ bridge: a BLoB run as ``InferenceData``, and the only module that knows ArviZ versions.

::

    run = load_run("runs/wg", dataset="winogrande_s", data_dir="../shared/data")
    idata = to_inference_data(run, num_samples=50, train_log="runs/wg/train_log.jsonl")
    save(idata, "runs/wg/idata.nc"); idata = load("runs/wg/idata.nc")
    summary(idata)                    # az.summary(idata, kind="stats") with a 94 % HDI on any ArviZ
    az.loo(idata); az.plot_ppc(idata)

Groups (one chain: the draws are i.i.d. from the guide q, so R-hat means nothing and ESS ≈ S):

- ``posterior`` — readable per-draw quantities, never every LoRA tensor × draws:
  ``factor_entry`` (chain, draw, site, entry), a fixed seeded subset of entries of each Bayesian factor;
  ``factor_norm`` (chain, draw, site), ‖factor‖_F; ``update_norm`` (chain, draw, layer), the
  Frobenius norm of each layer's update ``scaling * B @ A``.
- ``posterior_predictive`` — ``y`` (chain, draw, example) replicated labels and ``logits``
  (chain, draw, example, class), the per-draw logits they were drawn from.
- ``log_likelihood`` — ``y`` (chain, draw, example) = log p(y_i | θ_s).
- ``observed_data`` — ``y`` (example); ``constant_data`` — ``example_index`` (the split's indices).
- ``variational`` — the guide's std summaries per site (``std_mean``, ``std_min``, ``std_max``) and
  ``entry_loc`` / ``entry_std`` of the chosen entries. They describe q itself, not a draw, so they
  are kept out of ``posterior`` (there they would be constants with sd 0 in ``az.summary``).
- ``training`` — the ELBO trace of ``train_log.jsonl`` per ``step``: ``loss`` (per-example
  negative ELBO with the KL weighted by ``kl_weight``), ``nll``, ``kl``, ``kl_weight``, ``lr_*``.
  Training steps are not posterior draws, so this is not ``sample_stats`` (indexed by chain, draw).

Draw s is one joint posterior draw: θ_s ~ q is drawn once and shared by every example (Flipout off),
so ``posterior``, ``posterior_predictive`` and ``log_likelihood`` line up draw by draw and replicated
label *vectors* have the posterior's cross-example correlation (what PPC test statistics need).

ArviZ 0.x (Python < 3.12 here) returns ``InferenceData``; ArviZ 1.x returns an ``xarray.DataTree``.
Every version difference lives in the small section "ArviZ version shims" below.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

with warnings.catch_warnings():  # 0.23 warns about the 1.x refactor at import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["ARVIZ_MAJOR", "to_inference_data", "joint_draws", "from_dict", "add_group", "assign_coords", "groups", "save", "load",
           "summary", "psislw", "loo", "compare", "plot_ppc", "read_train_log"]

ARVIZ_MAJOR = int(az.__version__.split(".")[0])


# ------------------------------------------------------------------------------- ArviZ version shims
def from_dict(groups: dict, *, coords=None, dims=None, attrs=None):
    """Build InferenceData (0.x) / DataTree (1.x) from ``{group: {var: array (chain, draw, ...)}}``."""
    if ARVIZ_MAJOR >= 1:
        return az.from_dict(groups, coords=coords, dims=dims, attrs=attrs)
    return az.from_dict(**groups, coords=coords, dims=dims, attrs=attrs)


def add_group(idata, name: str, dataset: xr.Dataset):
    """Add a group that has no (chain, draw) dims (e.g. the training trace)."""
    if ARVIZ_MAJOR >= 1:
        idata[name] = xr.DataTree(dataset)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not a standard group" on 0.x
            idata.add_groups({name: dataset})
    return idata


def assign_coords(idata, group: str, **coords):
    """Add (non-dimension) coordinates to one group in place."""
    if ARVIZ_MAJOR >= 1:
        idata[group] = idata[group].assign_coords(**coords)
    else:
        setattr(idata, group, getattr(idata, group).assign_coords(**coords))
    return idata


def groups(idata) -> list[str]:
    return list(idata.children) if ARVIZ_MAJOR >= 1 else list(idata.groups())


def save(idata, path) -> Path:
    """Write NetCDF (all groups, custom ones included)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path))
    return path


def load(path):
    """Read what :func:`save` wrote, fully into memory (the file is closed afterwards)."""
    if ARVIZ_MAJOR >= 1:
        with xr.open_datatree(str(path)) as tree:
            return tree.load()
    return az.from_netcdf(str(path))  # 0.x loads into memory by default


def summary(idata, var_names=None, hdi_prob: float = 0.94):
    """``az.summary(kind="stats")`` with an explicit interval (0.x: 94 % HDI; 1.x default is 89 % ETI)."""
    if ARVIZ_MAJOR >= 1:
        return az.summary(idata, var_names=var_names, kind="stats", ci_kind="hdi", ci_prob=hdi_prob)
    return az.summary(idata, var_names=var_names, kind="stats", hdi_prob=hdi_prob)


def psislw(log_ratios) -> tuple[np.ndarray, float]:
    """Pareto-smoothed, normalised log weights and k̂ of 1-D log importance ratios log p − log q."""
    log_ratios = np.asarray(log_ratios, dtype=np.float64).ravel()
    if ARVIZ_MAJOR >= 1:  # arviz-stats' psislw takes log-likelihoods and negates them
        from arviz_stats.base import array_stats

        lw, khat = array_stats.psislw(-log_ratios, r_eff=1.0, axis=-1)
        lw = lw - np.logaddexp.reduce(lw)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            lw, khat = az.psislw(log_ratios, reff=1.0)
    return np.asarray(lw), float(khat)


def loo(idata, pointwise: bool = True):
    """PSIS-LOO from the ``log_likelihood`` group (ArviZ's high-k̂ warning is kept in ``.warning``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return az.loo(idata, pointwise=pointwise)


def compare(idatas: dict):
    """``az.compare`` by PSIS-LOO; a DataFrame ranked best first."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # high-k̂ and pandas deprecation warnings from inside ArviZ
        return az.compare(idatas, ic="loo") if ARVIZ_MAJOR < 1 else az.compare(idatas)


def plot_ppc(idata, ax=None, num_pp_samples: int | None = 50, seed: int = 0):
    """The label distribution: observed vs replicated draws (0.x ``plot_ppc``; 1.x ``plot_ppc_dist``)."""
    total = int(np.prod(idata.posterior_predictive["y"].shape[:2]))
    num_pp_samples = total if num_pp_samples is None else min(int(num_pp_samples), total)
    if ARVIZ_MAJOR >= 1:
        return az.plot_ppc_dist(idata, var_names=["y"], num_samples=num_pp_samples)
    return az.plot_ppc(idata, var_names=["y"], ax=ax, num_pp_samples=num_pp_samples, random_seed=seed)


# ------------------------------------------------------------------------------- the run -> InferenceData
def _device(model) -> torch.device:
    return next(model.network.parameters()).device


@torch.no_grad()
def joint_draws(model, guide, examples, *, num_samples: int, batch_size: int = 32, seed: int = 0,
                progress: bool = False):
    """Yield ``(guide_trace, logits)`` for S joint draws: θ_s ~ q once, ``logits`` (N, K) of every example.

    The logits come from :func:`~blob_pyro.predictive.posterior_logits` with the guide replayed on its
    own trace (``poutine.replay``), so every batch sees the same θ_s; Flipout is off for that reason. A guide that
    predicts with the network linearised at its MAP (a Laplace guide, ``predictive == "glm"``) pairs θ_s with the
    linearised logits f + J (θ_s − θ*) instead (:func:`blob_pyro.laplace_glm.linearised_logits`).
    The caller's torch RNG state is restored afterwards.
    """
    from pyro import poutine

    from .optim import own_params, set_lora_dropout
    from .predictive import posterior_logits

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    device = _device(model)
    batches = [model.head.collate(examples[i:i + batch_size], device) for i in range(0, len(examples), batch_size)]
    set_lora_dropout(model.network)  # MC dropout stays on, as in predict()
    draws = range(num_samples)
    if progress:
        from tqdm.auto import tqdm

        draws = tqdm(draws, desc=f"posterior draws (S={num_samples})", dynamic_ncols=True, leave=False)
    cuda = [device.index or 0] if device.type == "cuda" else []
    if getattr(guide, "predictive", None) == "glm":
        yield from _linearised_draws(model, guide, batches, num_samples, seed, cuda, progress)
        return
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for _ in draws:
            with own_params():  # per draw, not across the yield: the caller's code runs in between
                trace = poutine.trace(guide).get_trace(batches[0])
                fixed = poutine.replay(guide, trace=trace)
                logits = torch.cat([posterior_logits(model, fixed, b, num_samples=1, use_flipout=False)[0].float()
                                    for b in batches])
            yield trace, logits


def _linearised_draws(model, guide, batches, num_samples, seed, cuda, progress):
    """:func:`joint_draws` for a guide that predicts with the network linearised at its MAP (a Laplace guide with
    ``predictive == "glm"``): θ_s ~ q as there, each paired with the linearised logits f + J (θ_s − θ*), so the
    replicated labels come from the predictive the run reports. The Jacobians are taken once per batch for all S."""
    from pyro import poutine

    from .laplace_glm import jacobians, linearised_logits
    from .optim import own_params

    first = batches[0]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"linearised draws (S={num_samples})", dynamic_ncols=True, leave=False)
    with own_params():  # every draw is made before the first yield, so one scope holds no caller code
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            traces = [poutine.trace(guide).get_trace(first) for _ in range(num_samples)]
        values = [{n: trace.nodes[n]["value"].detach() for n in guide.laplace_names} for trace in traces]
        logits = torch.cat([linearised_logits(*jacobians(model, guide, b), guide, values).float() for b in batches],
                           dim=1)
    yield from zip(traces, logits)


def _labels(model, sites) -> tuple[list[str], list[str], list[str]]:
    """Short, unique labels for sites ("L3 query B") and layers ("L3 query"), plus layer paths."""
    from .plots import _short_site_name

    paths = list(dict.fromkeys(s.module_path for s in sites))
    layer_labels = [_short_site_name(p)[0] for p in paths]
    if len(set(layer_labels)) < len(layer_labels):
        layer_labels = list(paths)
    by_path = dict(zip(paths, layer_labels))
    site_labels = [f"{by_path[s.module_path]} {s.factor}" for s in sites]
    return site_labels, layer_labels, paths


def _update_norm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> float:
    """‖scaling · B A‖_F via the r×r Gram matrices: ‖BA‖² = Σ (BᵀB) ∘ (AAᵀ)."""
    gram = ((b.T.double() @ b.double()) * (a.double() @ a.T.double())).sum()
    return float(abs(scaling) * gram.clamp_min(0).sqrt())


def read_train_log(path) -> xr.Dataset | None:
    """``train_log.jsonl`` as a Dataset over ``step`` (nested dicts such as ``lr`` become ``lr_<key>``)."""
    path = Path(path)
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        return None
    flat = []
    for r in records:
        row = {}
        for key, value in r.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    row[key if sub is None else f"{key}_{sub}"] = float(v)
        flat.append(row)
    steps = np.array([row.get("step", i + 1) for i, row in enumerate(flat)], dtype=np.int64)
    keys = [k for k in dict.fromkeys(k for row in flat for k in row) if k != "step"]
    data = {k: ("step", np.array([row.get(k, np.nan) for row in flat])) for k in keys}
    return xr.Dataset(data, coords={"step": steps},
                      attrs={"loss": "per-example negative ELBO: nll + kl_weight * kl (BLoB's KL schedule)"})


def _resolve_data(run, dataset, data_dir, split, data):
    from .data import load_split

    if data is not None:
        return data
    cfg = run.config
    if split == "eval" and run.eval is not None and dataset in (None, run.eval.dataset):
        return run.eval
    if split == "eval":
        from .training import eval_split_of

        return eval_split_of(cfg, dataset, data_dir)
    if split == "train" and cfg.holdout and dataset in (None, cfg.dataset):  # the examples the run trained on
        from .data import load_splits

        return load_splits(cfg.dataset, data_dir or cfg.data_dir, train_limit=cfg.train_limit, holdout=cfg.holdout)[0]
    limit = cfg.train_limit if split == "train" else cfg.eval_limit
    return load_split(dataset or cfg.dataset, split, data_dir or cfg.data_dir, limit=limit)


def to_inference_data(run, dataset: str | None = None, *, num_samples: int = 50, data=None,
                      data_dir: str | None = None, split: str = "eval", limit: int | None = None,
                      entries_per_site: int = 4, seed: int = 0, batch_size: int | None = None,
                      train_log=None, progress: bool = False):
    """A run as ArviZ data (groups in the module docstring); all shapes use S = ``num_samples``.

    :param run: a :class:`~blob_pyro.training.Run` or a run folder (then ``train_log`` defaults to its log).
    :param dataset: dataset of the split to score (default: the run's).
    :param data: a TaskSplit or list of examples, instead of ``dataset``/``split``.
    :param split: ``"eval"`` (held-out; for PPC and calibration) or ``"train"`` (the data the posterior
        conditions on; what PSIS-LOO means by leave-one-out).
    :param limit: keep only the first ``limit`` examples.
    :param entries_per_site: how many entries of each Bayesian factor go to ``posterior.factor_entry``;
        chosen by a generator seeded with ``seed``, so every call picks the same entries.
    :param seed: seeds the entry choice, θ_s ~ q and the replicated labels.
    """
    from .training import Run, load_run

    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'eval' or 'train', got {split!r}")
    if not isinstance(run, Run):
        run_dir = Path(run)
        run = load_run(run_dir, dataset=dataset, data_dir=data_dir)
        train_log = run_dir / "train_log.jsonl" if train_log is None else train_log
    model, guide, cfg = run.model, run.guide, run.config
    split_data = _resolve_data(run, dataset, data_dir, split, data)
    examples = list(getattr(split_data, "examples", split_data))[:limit]
    if not examples:
        raise ValueError("no examples to score")
    k = model.head.num_classes
    labels = np.array([e.label for e in examples], dtype=np.int64)
    if labels.max() >= k:
        from .errors import RunError

        raise RunError(f"the data has labels up to {labels.max()} but the run's model scores {k} classes")

    sites = model.sites
    site_labels, layer_labels, paths = _labels(model, sites)
    gen = torch.Generator().manual_seed(seed)
    n_entries = min([entries_per_site] + [int(np.prod(s.shape)) for s in sites])
    picks = [torch.randperm(int(np.prod(s.shape)), generator=gen)[:n_entries].sort().values for s in sites]
    layers = {p: next(s.layer for s in sites if s.module_path == p) for p in paths}

    entry, factor_norm, update_norm, logits_all = [], [], [], []
    for trace, logits in joint_draws(model, guide, examples, num_samples=num_samples, seed=seed,
                                     batch_size=batch_size or cfg.predict.eval_batch_size, progress=progress):
        theta = {s.name: trace.nodes[s.name]["value"].detach() for s in sites}
        entry.append([theta[s.name].reshape(-1)[idx.to(theta[s.name].device)].double().cpu().numpy()
                      for s, idx in zip(sites, picks)])
        factor_norm.append([float(theta[s.name].double().norm()) for s in sites])
        norms = []
        for p in paths:
            layer = layers[p]
            a = theta.get(f"{p}.lora_A", layer.lora_A["default"].weight.detach())
            b = theta.get(f"{p}.lora_B", layer.lora_B["default"].weight.detach())
            norms.append(_update_norm(a, b, layer.scaling["default"]))
        update_norm.append(norms)
        logits_all.append(logits.cpu())
    logits = torch.stack(logits_all)  # (S, N, K)
    log_lik = torch.log_softmax(logits.double(), -1).gather(-1, torch.as_tensor(labels)[None, :, None].expand(
        logits.shape[0], -1, 1)).squeeze(-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        y_rep = torch.distributions.Categorical(logits=logits).sample()

    def chain(x):
        return np.asarray(x)[None]

    coords = {"site": site_labels, "entry": np.arange(n_entries), "layer": layer_labels,
              "example": np.arange(len(examples)), "class": np.arange(k)}
    dims = {"factor_entry": ["site", "entry"], "factor_norm": ["site"], "update_norm": ["layer"],
            "y": ["example"], "logits": ["example", "class"], "example_index": ["example"]}
    name = (split_data.dataset if hasattr(split_data, "dataset") else cfg.dataset)
    how = ("variational ({}), draws from q" if getattr(guide, "predictive", None) != "glm" else
           "variational ({}), draws from q, logits of the network linearised at the MAP").format(type(guide).__name__)
    attrs = {"inference_library": "pyro", "inference": how,
             "dataset": name, "split": getattr(split_data, "split", split), "num_samples": int(num_samples),
             "seed": int(seed), "model": cfg.model, "bayesian_factor": model.bayesian_factor,
             "prior": getattr(model.prior, "describe", lambda: repr(model.prior))(), "guide": cfg.bayes.guide}
    idata = from_dict({
        "posterior": {"factor_entry": chain(entry), "factor_norm": chain(factor_norm), "update_norm": chain(update_norm)},
        "posterior_predictive": {"y": chain(y_rep.numpy()), "logits": chain(logits.numpy())},
        "log_likelihood": {"y": chain(log_lik.numpy())},
        "observed_data": {"y": labels},
        "constant_data": {"example_index": np.array([e.index for e in examples], dtype=np.int64)},
    }, coords=coords, dims=dims, attrs=attrs)
    assign_coords(idata, "posterior", site_name=("site", [s.name for s in sites]), module=("layer", paths))
    add_group(idata, "variational", _variational(model, guide, sites, picks, site_labels))
    trace_ds = read_train_log(train_log) if train_log is not None else None
    if trace_ds is not None:
        add_group(idata, "training", trace_ds)
    return idata


def _variational(model, guide, sites, picks, site_labels) -> xr.Dataset:
    """The guide's std summaries per site, and loc/std of the entries in ``posterior.factor_entry``."""
    from .guides import guide_std

    med = guide.median()
    try:
        stds = guide_std(guide)
    except TypeError:  # a guide without a std summary
        stds = {}
    data = {}
    loc = np.stack([med[s.name].reshape(-1)[idx.to(med[s.name].device)].double().cpu().numpy()
                    for s, idx in zip(sites, picks)])
    data["entry_loc"] = (("site", "entry"), loc)
    if stds:
        flat = [stds[s.name].reshape(-1).double().cpu() for s in sites]
        data["entry_std"] = (("site", "entry"), np.stack([f[idx].numpy() for f, idx in zip(flat, picks)]))
        data["std_mean"] = ("site", np.array([float(f.mean()) for f in flat]))
        data["std_min"] = ("site", np.array([float(f.min()) for f in flat]))
        data["std_max"] = ("site", np.array([float(f.max()) for f in flat]))
    return xr.Dataset(data, coords={"site": site_labels, "entry": np.arange(loc.shape[1]),
                                    "site_name": ("site", [s.name for s in sites])},
                      attrs={"guide": type(guide).__name__})
