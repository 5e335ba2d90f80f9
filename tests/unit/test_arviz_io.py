"""blob_pyro.arviz_io: to_inference_data of a tiny run: groups, dims, shapes, joint draws, NetCDF round trip,
ArviZ functions on it."""

import json

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
import xarray as xr

from blob_pyro import arviz_io
from blob_pyro.config import RunConfig
from blob_pyro.errors import RunError

from .tiny import tiny_examples as toy_examples
from .tiny import tiny_run

S, N = 4, 6


def _run(guide="blob", factor="B"):
    cfg = RunConfig.from_dict({"dataset": "winogrande_s", "bayesian_factor": factor, "guide": guide,
                               "eval_batch_size": 4, "eps": 0.3})
    return tiny_run(cfg, num_data=32)


def _log(tmp_path):
    path = tmp_path / "train_log.jsonl"
    recs = [{"loss": 1.0 / s, "nll": 0.7, "kl": 100.0 + s, "step": s, "kl_weight": 1e-3 * s,
             "lr": {"loc": 1e-3, "scale": 2e-3}, "seconds": 0.1} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def idata_and_run(tmp_path_factory):
    run = _run()
    examples = toy_examples(N, seed=1)
    idata = arviz_io.to_inference_data(run, data=examples, num_samples=S, entries_per_site=3, seed=0,
                                       train_log=_log(tmp_path_factory.mktemp("log")))
    return idata, run, examples


def test_groups_dims_and_shapes(idata_and_run):
    idata, run, examples = idata_and_run
    assert set(arviz_io.groups(idata)) == {"posterior", "posterior_predictive", "log_likelihood", "observed_data",
                                           "constant_data", "variational", "training"}
    n_sites, n_layers = len(run.model.sites), len({s.module_path for s in run.model.sites})
    post = idata.posterior
    assert post["factor_entry"].dims == ("chain", "draw", "site", "entry")
    assert post["factor_entry"].shape == (1, S, n_sites, 3)
    assert post["factor_norm"].shape == (1, S, n_sites)
    assert post["update_norm"].dims == ("chain", "draw", "layer") and post["update_norm"].shape == (1, S, n_layers)
    assert list(post["site_name"].values) == [s.name for s in run.model.sites]
    assert list(post["site"].values) == ["L0 proj B", "L1 proj B"] and list(post["layer"].values) == ["L0 proj", "L1 proj"]
    assert set(post.data_vars) == {"factor_entry", "factor_norm", "update_norm"}  # never whole LoRA tensors
    pp = idata.posterior_predictive
    assert pp["y"].dims == ("chain", "draw", "example") and pp["y"].shape == (1, S, N)
    assert np.issubdtype(pp["y"].dtype, np.integer) and set(np.unique(pp["y"])) <= {0, 1}
    assert pp["logits"].shape == (1, S, N, 2)
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "example") and ll.shape == (1, S, N) and bool((ll <= 0).all())
    assert list(idata.observed_data["y"].values) == [e.label for e in examples]
    assert list(idata.constant_data["example_index"].values) == [e.index for e in examples]
    var = idata.variational
    assert var["std_mean"].shape == (n_sites,) and var["entry_loc"].shape == (n_sites, 3)
    assert bool((var["std_min"] <= var["std_mean"]).all()) and bool((var["std_mean"] <= var["std_max"]).all())
    tr = idata.training
    assert list(tr["step"].values) == [1, 2, 3, 4, 5]
    assert {"loss", "nll", "kl", "kl_weight", "lr_loc", "lr_scale"} <= set(tr.data_vars)
    assert float(tr["kl"].sel(step=3)) == 103.0


def test_log_likelihood_matches_logits_and_draws_differ(idata_and_run):
    idata, _, examples = idata_and_run
    logits = torch.as_tensor(idata.posterior_predictive["logits"].values[0])
    labels = torch.tensor([e.label for e in examples])
    expect = torch.log_softmax(logits.double(), -1)[:, torch.arange(N), labels]
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expect.numpy(), rtol=1e-6, atol=1e-9)
    entries = idata.posterior["factor_entry"].values[0]
    assert np.ptp(entries, axis=0).max() > 0  # S distinct draws from q
    # the draws scatter around q's mean with q's std
    loc, std = idata.variational["entry_loc"].values, idata.variational["entry_std"].values
    assert np.all(np.abs(entries.mean(0) - loc) < 6 * std / np.sqrt(S) + 1e-7)


def test_one_draw_is_shared_by_every_batch():
    run = _run()
    ex = toy_examples(3, seed=2)
    data = [ex[0], ex[1], ex[2], ex[0]]  # example 0 lands in batch 1 and batch 2 (batch_size=3)
    idata = arviz_io.to_inference_data(run, data=data, num_samples=3, batch_size=3, seed=5)
    logits = idata.posterior_predictive["logits"].values[0]
    np.testing.assert_allclose(logits[:, 0], logits[:, 3], rtol=1e-5, atol=1e-6)  # batch padding round-off only
    assert np.abs(logits[0] - logits[1]).max() > 1e-3  # while draws differ


def test_seeded_and_point_guide_is_exact():
    run = _run()
    data = toy_examples(4, seed=3)
    a = arviz_io.to_inference_data(run, data=data, num_samples=2, seed=7)
    b = arviz_io.to_inference_data(run, data=data, num_samples=2, seed=7)
    c = arviz_io.to_inference_data(run, data=data, num_samples=2, seed=8)
    xr.testing.assert_equal(a.posterior, b.posterior)
    xr.testing.assert_equal(a.posterior_predictive, b.posterior_predictive)
    assert not a.posterior["factor_entry"].equals(c.posterior["factor_entry"])
    # a point-mass guide: every draw is the mean, and the update norm is ||scaling * B @ A||_F of it
    run = _run(guide="auto_delta")
    d = arviz_io.to_inference_data(run, data=data, num_samples=2, seed=0)
    np.testing.assert_allclose(d.posterior["factor_entry"].values[0, 1], d.variational["entry_loc"].values)
    med = run.guide.median()
    site = run.model.sites[0]
    layer = site.layer
    w = layer.scaling["default"] * med[site.name].double() @ layer.lora_A["default"].weight.detach().double()
    first = d.posterior["update_norm"].values[0, :, 0]
    np.testing.assert_allclose(first, float(w.norm()), rtol=1e-6)


def test_netcdf_round_trip(idata_and_run, tmp_path):
    idata, _, _ = idata_and_run
    path = arviz_io.save(idata, tmp_path / "sub" / "idata.nc")
    back = arviz_io.load(path)
    assert arviz_io.groups(back) == arviz_io.groups(idata)
    for group in arviz_io.groups(idata):
        xr.testing.assert_identical(getattr(back, group), getattr(idata, group))
    assert back.attrs["dataset"] == "winogrande_s" and back.attrs["num_samples"] == S


def test_arviz_functions_run(idata_and_run):
    import arviz as az
    import matplotlib.pyplot as plt

    idata, _, _ = idata_and_run
    table = arviz_io.summary(idata)
    assert list(table.columns) == ["mean", "sd", "hdi_3%", "hdi_97%"]
    assert "update_norm[L0 proj]" in table.index and "factor_entry[L1 proj B, 0]" in table.index
    loo = arviz_io.loo(idata)
    assert np.isfinite(float(loo["elpd_loo"])) and len(loo.pareto_k) == N
    ax = arviz_io.plot_ppc(idata)
    assert ax is not None
    az.plot_posterior(idata, var_names=["update_norm"], coords={"layer": ["L1 proj"]})
    plt.close("all")


def test_labels_beyond_the_run_classes_are_refused():
    run = _run()
    ex = toy_examples(3, num_classes=3, seed=0)
    bad = [e for e in ex if e.label == 2] or pytest.skip("no label 2 drawn")
    with pytest.raises(RunError, match="classes"):
        arviz_io.to_inference_data(run, data=bad, num_samples=1)


def test_the_export_reads_the_splits_the_run_used(tmp_path):
    """A holdout run's training split ends before its held-out slice, which is its eval split; limits apply."""
    import json
    import types

    from blob_pyro.arviz_io import _resolve_data

    folder = tmp_path / "winogrande"
    folder.mkdir()
    rec = {"qID": "q", "sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}
    (folder / "train_s.jsonl").write_text((json.dumps(rec) + "\n") * 10)
    (folder / "dev.jsonl").write_text((json.dumps({**rec, "answer": "2"}) + "\n") * 4)
    base = {"dataset": "winogrande_s", "data_dir": str(tmp_path)}

    def split(settings, which):
        run = types.SimpleNamespace(config=RunConfig.from_dict({**base, **settings}), eval=None)
        return _resolve_data(run, None, None, which, None)

    assert [e.index for e in split({"holdout": 3}, "train").examples] == list(range(7))
    assert [e.index for e in split({"holdout": 3}, "eval").examples] == [7, 8, 9]
    assert len(split({"train_limit": 2}, "train")) == 2
    dev = split({"eval_limit": 3}, "eval")
    assert dev.split == "dev" and len(dev) == 3
