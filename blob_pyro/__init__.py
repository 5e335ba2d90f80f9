"""blob_pyro: BLoB (Bayesian Low-Rank Adaptation by Backpropagation) as a Pyro probabilistic program.

::

    from blob_pyro import FitConfig, RunConfig, build, compute_metrics, fit, predict
    run = build(RunConfig.from_dict({"model": "minilm", "dataset": "arc_easy", "data_dir": "../shared/data"}))
    fit(run.model, run.guide, run.train, FitConfig(max_steps=200, batch_size=16, lr=1e-3))
    out = predict(run.model, run.guide, run.eval, num_samples=10)
    print(compute_metrics(out.probs, out.labels))

Where things live: ``model`` (the Pyro model), ``priors``, ``guides``, ``poutine`` (Flipout, KL scaling,
float64 latents), ``kl`` (KL schedules), ``infer`` (``fit``), ``optim``, ``predictive``, ``metrics`` and
``uncertainty`` (scores), ``lora`` (PEFT bridge), ``heads``, ``backbone`` (GGUF files: ``gguf_cache``), ``data``,
``config`` and ``methods`` (settings), ``training`` (run folders), ``checkpoint``, ``io``, ``errors``, ``logs``,
``cli``; the Bayesian workflow in
``arviz_io``, ``diagnostics``, ``ppc`` and ``plots`` (the ``workflow`` extra).
"""

from importlib import import_module

__version__ = "0.2.0"

# name -> module; imported on first use, so `import blob_pyro` stays light and the CLI can set up logging
# before PEFT (and through it bitsandbytes) is imported
_API = {
    "BlobGuide": "guides", "make_guide": "guides", "GUIDES": "guides",
    "BlobModel": "model",
    "NormalPrior": "priors", "LaplacePrior": "priors", "StudentTPrior": "priors", "make_prior": "priors",
    "PRIORS": "priors",
    "BlobKLSchedule": "kl", "FixedKL": "kl", "StandardKL": "kl",
    "flipout": "poutine", "scale_latents": "poutine", "float64_latents": "poutine",
    "RunConfig": "config", "AdapterConfig": "config", "BayesConfig": "config", "FitConfig": "config",
    "PredictConfig": "config", "RuntimeConfig": "config",
    "fit": "infer",
    "predict": "predictive",
    "compute_metrics": "metrics",
    "uncertainty_metrics": "uncertainty", "ood_auroc": "uncertainty",
    "load_split": "data",
    "build": "training", "evaluate": "training", "load_run": "training", "train_run": "training",
    "resume_run": "training", "save_run": "training",
    "BlobPyroError": "errors",
    "quiet_library_logs": "logs",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    if name in _API:
        value = getattr(import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'blob_pyro' has no attribute {name!r}")


def __dir__():
    return __all__
