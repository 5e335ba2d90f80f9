"""training.build wires each method into the model and guide it promises, on the tiny Llama (no data needed).

(What each method resolves to, refuses and does when trained and predicted: tests/unit/test_methods.py on the tiny
in-file network; ensembles and the benchmark cells: tests/integration/test_runner.py.)"""

import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

from blob_pyro.config import ConfigError, RunConfig
from blob_pyro.guides import BlobGuide, guide_std
from blob_pyro.methods import BBB_INIT_SCALE
from blob_pyro.priors import LaplacePrior, NormalPrior
from blob_pyro.training import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _build(path, **settings):
    cfg = RunConfig.from_dict({"model": str(path), "dataset": "winogrande_s", "max_length": 32, **settings})
    return build(cfg, with_data=False)


@pytest.mark.parametrize("settings, guide, factors, dropout", [
    ({"method": "mle"}, AutoDelta, {"B"}, 0.0),
    ({"method": "map"}, AutoDelta, {"A", "B"}, 0.0),
    ({"method": "mcdropout"}, AutoDelta, {"B"}, 0.1),
    ({"method": "bbb"}, AutoNormal, {"A", "B"}, 0.0),
    ({"method": "blob"}, BlobGuide, {"B"}, 0.0),
    ({"preset": "paper"}, BlobGuide, {"A"}, 0.0),
    ({"method": "blob", "guide": "lowrank", "bayesian_factor": "both"}, BlobGuide, {"A", "B"}, 0.0),
])
def test_build_makes_the_model_and_guide_the_method_asks_for(tiny_llama_dir, settings, guide, factors, dropout):
    run = _build(tiny_llama_dir, **settings)
    assert run.config == RunConfig.from_dict({"model": str(tiny_llama_dir), "dataset": "winogrande_s",
                                              "max_length": 32, **settings}).resolve()
    assert isinstance(run.guide, guide) and {s.factor for s in run.model.sites} == factors
    assert isinstance(run.model.prior, NormalPrior) and run.model.flipout == "token"
    drops = [m for n, m in run.model.network.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert all(m.p == pytest.approx(dropout) for m in drops) and (bool(drops) == (dropout > 0))
    if settings.get("guide") == "lowrank":
        assert run.guide.covariance == "lowrank" and run.guide.rank == run.config.bayes.guide_rank
    if settings.get("method") == "bbb":  # AutoNormal at Pyro's standard initial scale
        run.guide()  # sets AutoNormal up (median and guide_std alone do not: see tests/unit/test_guides.py)
        for std in guide_std(run.guide).values():
            assert torch.allclose(std, torch.full_like(std, BBB_INIT_SCALE), rtol=1e-4)
    assert run.train is None and run.eval is None and run.model.num_data == 1


def test_build_reads_prior_flipout_and_targets(tiny_llama_dir):
    run = _build(tiny_llama_dir, prior="laplace", prior_scale=0.1, flipout=False, target_modules=["q_proj"])
    assert isinstance(run.model.prior, LaplacePrior) and run.model.prior.scale == 0.1
    assert run.model.flipout is None
    assert {s.module_path for s in run.model.sites} == {"model.layers.0.self_attn.q_proj",
                                                        "model.layers.1.self_attn.q_proj"}
    assert _build(tiny_llama_dir, flipout_per="sequence").model.flipout == "sequence"


def test_build_refuses_a_conflict_before_loading_anything(tmp_path):
    with pytest.raises(ConfigError, match="method=mle implies guide=auto_delta; got guide=lowrank"):
        _build(tmp_path / "no_model_here", method="mle", guide="lowrank")
