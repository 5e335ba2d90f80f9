"""blob_pyro: BLoB (Bayesian Low-Rank Adaptation by Backpropagation) as a Pyro probabilistic program.

::

    from blob_pyro import TrainConfig, build, fit, predict, compute_metrics
    run = build(TrainConfig(model="minilm", dataset="winogrande_s", data_dir="../shared/data"))
    fit(run.model, run.guide, run.train, max_steps=200, batch_size=16, lr=1e-3)
    out = predict(run.model, run.guide, run.eval, num_samples=10)
    print(compute_metrics(out.probs, out.labels))

Where things live: ``model`` (the Pyro model), ``guides``, ``priors``, ``reparam`` (Flipout), ``kl``
(KL schedules), ``infer`` (SVI and the paper's optimiser), ``predictive``, ``metrics``, ``lora`` (PEFT
bridge), ``heads``, ``backbone``, ``data``, ``config``, ``runs`` (files), ``cli``.
"""

from .config import TrainConfig
from .data import load_split
from .guides import BlobGuide, make_guide
from .infer import fit
from .kl import BlobKLSchedule, FixedKL, StandardKL, scale_latents
from .metrics import compute_metrics
from .model import BlobModel
from .predictive import predict
from .priors import LaplacePrior, NormalPrior, StudentTPrior, make_prior
from .reparam import flipout
from .runs import build, evaluate, load_run, train_run

__version__ = "0.1.0"

__all__ = [
    "BlobGuide", "BlobKLSchedule", "BlobModel", "FixedKL", "LaplacePrior", "NormalPrior", "StandardKL",
    "StudentTPrior", "TrainConfig", "build", "compute_metrics", "evaluate", "fit", "flipout", "load_run",
    "load_split", "make_guide", "make_prior", "predict", "scale_latents", "train_run", "__version__",
]
