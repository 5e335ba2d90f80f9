"""blob_pyro.laplace_glm on the tiny network: the logit covariance J Σ Jᵀ against a brute-force Jacobian and a dense
Σ for every Laplace structure, the GLM predictive against Monte Carlo of the sampled one on a network linear in its
Laplace parameters, absent options, a save->load round trip of the metrics, and the setting's refusals."""

import json
import math

import pyro
import pytest
import torch

from blob_pyro.config import RunConfig
from blob_pyro.errors import ConfigError
from blob_pyro.infer import fit
from blob_pyro.laplace import LAPLACE_FILE, LaplaceGuide, fit_laplace, kfac_eigen, placeholder_guide
from blob_pyro.laplace_glm import glm_logits, jacobians, linearised_logits, logit_moments
from blob_pyro.lora import bind_values, inject_lora
from blob_pyro.model import BlobModel
from blob_pyro.predictive import posterior_logits, predict
from blob_pyro.training import Run, metrics_of, post_fit, predict_split, save_run

from .tiny import MeanLinear, TinyHead, tiny_examples, tiny_run

pyro.enable_validation(True)


def _laplace_run(hessian="diag", subset="all", predictive="glm", num_classes=3):
    cfg = RunConfig.from_dict({"method": "laplace", "laplace_hessian": hessian, "laplace_subset": subset,
                               "laplace_predictive": predictive, "lr": 5e-2, "max_steps": 20, "batch_size": 4,
                               "seed": 1, "eval_batch_size": 8, "num_samples": 4})
    run = tiny_run(cfg, num_data=16, num_classes=num_classes)
    run.train = tiny_examples(16, num_classes=num_classes, seed=5)
    fit(run.model, run.guide, run.train, run.config.fit, progress=False)
    post_fit(run)
    return run


def _dense_covariance(guide) -> torch.Tensor:
    """Σ (D, D) over the guide's Laplace sites flattened in order, by inverting its dense precision."""
    if guide.hessian == "full":
        return torch.linalg.inv(guide.precision_matrix)
    blocks = []
    for name in guide.laplace_names:
        if guide.hessian == "diag":
            blocks.append(torch.diag(guide.precision.get_submodule(name.rsplit(".", 1)[0])
                                     .get_buffer(name.rsplit(".", 1)[1]).double().reciprocal().reshape(-1)))
        else:
            hv, hu, qv, qu = guide.kfac_parts(name)
            h, q = hu @ torch.diag(hv) @ hu.T, qu @ torch.diag(qv) @ qu.T
            eye = torch.eye(len(hv) * len(qv), dtype=torch.float64)
            blocks.append(torch.linalg.inv(torch.kron(h, q) + float(guide.prior_precision) * eye))
    return torch.block_diag(*blocks)


def _brute_jacobian(model, guide, batch) -> torch.Tensor:
    """(B, K, D): torch.autograd.functional.jacobian of the batch's logits w.r.t. the flat Laplace parameters."""
    point = guide.median()
    names = guide.laplace_names
    flat = torch.cat([point[n].reshape(-1) for n in names])
    sizes = [math.prod(guide.shapes[n]) for n in names]

    def logits_of(v):
        values = {n: t.reshape(guide.shapes[n]) for n, t in zip(names, torch.split(v, sizes))}
        with bind_values(model.sites, {**point, **values}):
            return model.head.logits(model.network, batch)

    model.network.eval()
    return torch.autograd.functional.jacobian(logits_of, flat).double()


@pytest.mark.parametrize("hessian,subset", [("diag", "all"), ("full", "all"), ("kfac", "all"), ("kfac", "last_layer")])
def test_the_logit_covariance_is_the_brute_force_j_sigma_jt(hessian, subset):
    run = _laplace_run(hessian, subset)
    guide = run.guide
    assert guide.predictive == "glm" and run.laplace["predictive"] == "glm"
    batch = run.model.head.collate(tiny_examples(6, num_classes=3, seed=9))
    mean, cov = logit_moments(run.model, guide, batch)
    jac = _brute_jacobian(run.model, guide, batch)
    assert torch.allclose(jacobians(run.model, guide, batch)[1], jac, rtol=1e-5, atol=1e-8)
    want = torch.einsum("bkd,de,ble->bkl", jac, _dense_covariance(guide), jac)
    assert float(want.diagonal(dim1=1, dim2=2).min()) > 1e-6  # a real test: the logits do vary
    assert torch.allclose(cov, want, rtol=1e-6, atol=1e-10)
    run.model.network.eval()
    with bind_values(run.model.sites, guide.median()):
        assert torch.allclose(mean, run.model.head.logits(run.model.network, batch))  # the mean is the MAP's




def _linear_guide(hessian: str):
    """A factor-B model of :class:`MeanLinear` and a LaplaceGuide over B with a random (not fitted) precision."""
    torch.manual_seed(0)
    net = inject_lora(MeanLinear(), ["proj"], r=2, lora_alpha=4.0)
    net.base_model.model.proj.lora_A["default"].weight.data.normal_(0, 0.5)
    model = BlobModel(net, TinyHead(3), bayesian_factor="B", num_data=8, flipout=None)
    (site,) = model.sites
    g = torch.Generator().manual_seed(1)
    loc = {site.name: 0.3 * torch.randn(site.shape, generator=g)}
    d_out, d_in = site.shape
    if hessian == "diag":
        precision = {site.name: 2.0 + torch.rand(site.shape, generator=g) * 20}
    elif hessian == "full":
        a = torch.randn(d_out * d_in, d_out * d_in, generator=g, dtype=torch.float64)
        precision = a @ a.T + 3.0 * torch.eye(d_out * d_in, dtype=torch.float64)
    else:
        h, q = torch.randn(d_out, d_out, generator=g), torch.randn(d_in, d_in, generator=g)
        precision = {site.name: kfac_eigen(h @ h.T, q @ q.T)}
    guide = LaplaceGuide(model, loc, precision, hessian=hessian, prior_precision=1.5, predictive="sample")
    return model, guide


@pytest.mark.parametrize("hessian", ["diag", "full", "kfac"])
def test_on_a_network_linear_in_its_laplace_parameters_glm_is_the_sampled_predictive(hessian):
    model, guide = _linear_guide(hessian)
    batch = model.head.collate(tiny_examples(4, num_classes=3, seed=3))
    mean, cov = logit_moments(model, guide, batch)
    torch.manual_seed(0)
    sampled = posterior_logits(model, guide, batch, num_samples=4000).double()  # the network on weight draws
    guide.predictive = "glm"
    glm = posterior_logits(model, guide, batch, num_samples=20000).double()  # draws in logit space
    for draws in (sampled, glm):
        centred = draws - draws.mean(0)
        empirical = torch.einsum("sbk,sbl->bkl", centred, centred) / (draws.shape[0] - 1)
        sd = cov.diagonal(dim1=1, dim2=2).sqrt()
        assert torch.allclose(draws.mean(0), mean.double(), atol=float(5 * sd.max() / math.sqrt(draws.shape[0])))
        # Var of an empirical covariance entry: (σ_kk σ_ll + σ_kl²)/S; five standard errors
        tol = 5 * torch.sqrt((sd[:, :, None] ** 2 * sd[:, None, :] ** 2 + cov ** 2) / draws.shape[0])
        assert ((empirical - cov).abs() <= tol).all(), hessian
    assert float(cov.diagonal(dim1=1, dim2=2).min()) > 1e-4


class _AbsentHead(TinyHead):
    """TinyHead whose option 2 is absent (logit −inf) for even example indices, as an ARC item with fewer options."""

    def logits(self, network, batch):
        logits = super().logits(network, batch)
        absent = torch.zeros_like(logits, dtype=torch.bool)
        absent[:, 2] = batch["index"] % 2 == 0
        return logits.masked_fill(absent, float("-inf"))


@pytest.mark.parametrize("hessian", ["diag", "kfac"])
def test_absent_options_stay_minus_infinity_and_carry_no_variance(hessian):
    run = _laplace_run(hessian)
    run.model.head = _AbsentHead(3)
    batch = run.model.head.collate(tiny_examples(6, num_classes=3, seed=9))
    absent = batch["index"] % 2 == 0
    mean, cov = logit_moments(run.model, run.guide, batch)
    assert torch.isneginf(mean[absent, 2]).all() and torch.isfinite(mean[~absent]).all()
    assert (cov[absent, 2, :] == 0).all() and (cov[absent, :, 2] == 0).all()
    assert (cov[~absent, 2, 2] > 0).all() and (cov[absent, 0, 0] > 0).all()
    torch.manual_seed(0)
    draws = glm_logits(run.model, run.guide, batch, num_samples=50)
    assert torch.isneginf(draws[:, absent, 2]).all()
    assert torch.isfinite(draws[:, ~absent]).all() and torch.isfinite(draws[:, :, :2]).all()
    probs = predict(run.model, run.guide, tiny_examples(6, num_classes=3, seed=9), num_samples=5, progress=False).probs
    assert (probs[absent, 2] == 0).all() and torch.allclose(probs.sum(-1), torch.ones(6))
    # the linearised network at weight draws (the ArviZ export) keeps them too
    f, jac = jacobians(run.model, run.guide, batch)
    lin = linearised_logits(f, jac, run.guide, [run.guide() for _ in range(3)])
    assert torch.isneginf(lin[:, absent, 2]).all() and torch.isfinite(lin[:, ~absent]).all()


def test_glm_draws_are_not_the_weight_draws_and_n0_is_the_map():
    run = _laplace_run("kfac")
    examples = tiny_examples(8, num_classes=3, seed=2)
    at_map = predict(run.model, run.guide, examples, num_samples=0, progress=False).probs
    torch.manual_seed(3)
    glm = predict(run.model, run.guide, examples, num_samples=6, progress=False, keep_draws=True)
    run.guide.predictive = "sample"
    torch.manual_seed(3)
    sampled = predict(run.model, run.guide, examples, num_samples=6, progress=False, keep_draws=True)
    assert glm.logits.shape == sampled.logits.shape == (6, 8, 3)
    assert not torch.allclose(glm.probs, at_map, atol=1e-5) and not torch.allclose(glm.probs, sampled.probs, atol=1e-5)
    run.guide.predictive = "glm"
    assert torch.allclose(predict(run.model, run.guide, examples, num_samples=0, progress=False).probs, at_map)


@pytest.mark.parametrize("hessian", ["diag", "full", "kfac"])
def test_a_saved_glm_run_round_trips_its_metrics(tmp_path, hessian):
    run = _laplace_run(hessian)
    run.eval = _split(tiny_examples(10, num_classes=3, seed=2))
    torch.manual_seed(7)
    pred = predict_split(run, progress=False)
    metrics = metrics_of(run, run.eval, pred)
    assert metrics["laplace_predictive"] == "glm" and metrics["num_samples"] == 4
    save_run(tmp_path / "run", run, metrics=metrics, prediction=pred)
    record = json.loads((tmp_path / "run" / LAPLACE_FILE).read_text())
    assert record["predictive"] == "glm"
    from safetensors.torch import load_file

    loaded = placeholder_guide(run.model, hessian=hessian, subset="all", predictive=record["predictive"])
    loaded.load_state_dict(load_file(str(tmp_path / "run" / "posterior.safetensors")))
    again_run = Run(run.config, run.model, loaded, None, run.eval, laplace=record)
    torch.manual_seed(7)
    again = metrics_of(again_run, run.eval, predict_split(again_run, progress=False))
    assert again == metrics
    saved = load_file(str(tmp_path / "run" / "predictions.safetensors"))
    assert saved["logits"].shape == (4, 10, 3)


def _split(examples):
    from blob_pyro.data import TaskSplit

    return TaskSplit("tiny", "dev", tuple(examples), 3, ("red", "blue", "green"), "in memory")


def test_laplace_predictive_is_a_setting_of_method_laplace_only():
    assert RunConfig.from_dict({"method": "laplace"}).resolve().laplace_predictive == "glm"
    assert RunConfig.from_dict({"method": "laplace", "laplace_predictive": "sample"}).resolve().laplace_predictive \
        == "sample"
    for method in ("map", "mle", "blob", "tfb"):
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict({"method": method, "laplace_predictive": "glm"}).resolve()
        assert str(err.value) == f"laplace_predictive is a setting of method=laplace; got method={method}"
    with pytest.raises(ConfigError, match="laplace_predictive must be one of glm, sample; got 'probit'"):
        RunConfig.from_dict({"method": "laplace", "laplace_predictive": "probit"}).resolve()
    model, _ = _linear_guide("diag")
    with pytest.raises(ConfigError, match="laplace_predictive must be one of glm, sample; got 'mc'"):
        LaplaceGuide(model, {s.name: torch.zeros(s.shape) for s in model.sites}, predictive="mc")


def test_laplace_draws_by_default_as_many_samples_as_its_predictive_needs():
    from blob_pyro.methods import LAPLACE_SAMPLES

    def samples(**kw):
        return RunConfig.from_dict({"method": "laplace", **kw}).resolve().predict.num_samples

    assert samples() == LAPLACE_SAMPLES["glm"] == 1000  # logit draws: free once J Sigma J^T is known
    assert samples(laplace_predictive="sample") == LAPLACE_SAMPLES["sample"] == 10  # network passes
    assert samples(num_samples=7) == samples(laplace_predictive="sample", num_samples=7) == 7  # explicit wins


def test_evaluate_refuses_laplace_predictive_for_another_method_in_one_line(tmp_path, capsys):
    from blob_pyro.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"config": {"method": "mle", "model": "minilm"}}))
    assert main(["evaluate", "--run", str(tmp_path), "--laplace-predictive", "glm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "blob-pyro: error: laplace_predictive is a setting of method=laplace; got method=mle"


def test_fit_laplace_refuses_an_unknown_predictive_before_any_curvature():
    run = _laplace_run("diag")
    with pytest.raises(ConfigError, match="laplace_predictive must be one of"):
        fit_laplace(run.model, _autodelta(run), run.train, predictive="probit")


def _autodelta(run):
    from blob_pyro.guides import make_guide

    guide = make_guide("auto_delta", run.model)
    guide()
    return guide
