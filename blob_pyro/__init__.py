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

import logging as _logging

# With the optional bitsandbytes installed (the ``quant`` extra), PEFT imports it, and on CPUs with AVX512-BF16
# it logs at import that it could not fetch an optional 4-bit CPU kernel from the hub (offline, or before the
# kernel is cached). Every command and script would print those two warnings; 8/4-bit loading works without it.
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


class _OncePerMessage(_logging.Filter):
    """Let each distinct message through once: bitsandbytes logs "inputs will be cast ... to float16" on every
    forward of every 8-bit layer whose input is not float16 (fp32 norms, bf16 autocast): thousands per step."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: _logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


_logging.getLogger("bitsandbytes.autograd._functions").addFilter(_OncePerMessage())

from .config import TrainConfig  # noqa: E402
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
