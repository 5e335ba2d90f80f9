"""blob_pyro.laplace and method=laplace on the tiny network: the GGN against hand-computed and independently
computed answers, a positive-definite posterior precision, a prior precision that maximises the Laplace marginal
likelihood, draws that differ from the MAP's, and a save->load round trip of the Laplace guide and laplace.json.
KFAC: exact (the GGN block) for one example at one position, the KFAC-expand factors by hand over tokens, padding
left out, the Kronecker log det and marginal stds against dense matrices, and its draws' covariance."""

import json
import math

import pyro
import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.config import RunConfig
from blob_pyro.errors import ConfigError, RunError
from blob_pyro.guides import guide_std, make_guide
from blob_pyro.infer import fit
from blob_pyro.laplace import (
    LAPLACE_FILE,
    LaplaceGuide,
    fit_laplace,
    ggn,
    kfac,
    laplace_sites,
    log_marglik,
    placeholder_guide,
    tune_prior_precision,
)
from blob_pyro.lora import inject_lora
from blob_pyro.model import BlobModel
from blob_pyro.predictive import predict
from blob_pyro.priors import NormalPrior
from blob_pyro.training import _read_laplace, guide_state, post_fit, save_run

from .tiny import IN, MeanLinear, TinyHead, TinyNet, features, tiny_examples, tiny_run

pyro.enable_validation(True)


def _map_run(hessian="diag", subset="all", steps=30):
    cfg = RunConfig.from_dict({"method": "laplace", "laplace_hessian": hessian, "laplace_subset": subset,
                               "lr": 5e-2, "max_steps": steps, "batch_size": 4, "seed": 1, "eval_batch_size": 8})
    run = tiny_run(cfg, num_data=16)
    run.train = tiny_examples(16, seed=5)
    fit(run.model, run.guide, run.train, run.config.fit, progress=False)
    return run


def test_method_laplace_resolves_to_map_plus_its_own_settings_and_refuses_conflicts():
    cfg = RunConfig.from_dict({"method": "laplace"}).resolve()
    assert (cfg.bayes.guide, cfg.bayes.bayesian_factor, cfg.fit.kl_schedule, cfg.bayes.prior) == \
        ("auto_delta", "both", "standard", "normal")
    assert (cfg.predict.num_samples, cfg.laplace_hessian, cfg.laplace_subset) == (1000, "diag", "all")
    with pytest.raises(ConfigError) as err:  # no MAP point: a BLoB guide
        RunConfig.from_dict({"method": "laplace", "guide": "blob"}).resolve()
    assert str(err.value) == "method=laplace implies guide=auto_delta; got guide=blob (drop one of them)"
    assert RunConfig.from_dict({"method": "laplace", "laplace_hessian": "kfac"}).resolve().laplace_hessian == "kfac"
    with pytest.raises(ConfigError, match="laplace_hessian must be one of diag, full, kfac; got 'block'"):
        RunConfig.from_dict({"method": "laplace", "laplace_hessian": "block"}).resolve()
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"method": "map", "laplace_hessian": "diag"}).resolve()
    assert str(err.value) == "laplace_hessian is a setting of method=laplace; got method=map"


def test_fit_laplace_refuses_a_guide_without_a_map_point():
    model = tiny_run(RunConfig.from_dict({"method": "blob"})).model
    with pytest.raises(RunError) as err:
        fit_laplace(model, make_guide("blob", model), tiny_examples(4))
    assert "needs a MAP point" in str(err.value) and "\n" not in str(err.value)


def test_the_diagonal_ggn_of_a_lora_linear_model_matches_the_hand_computation():
    torch.manual_seed(0)
    net = inject_lora(MeanLinear(), ["proj"], r=2, lora_alpha=4.0)
    model = BlobModel(net, TinyHead(3), bayesian_factor="both", num_data=12, prior=NormalPrior(0.2), flipout=None)
    point = {"proj.lora_A": 0.3 * torch.randn(2, IN), "proj.lora_B": 0.4 * torch.randn(3, 2)}
    examples = tiny_examples(12, num_classes=3, seed=2)
    diag, loglik = ggn(model, point, model.sites, examples, hessian="diag")
    # by hand: f = (W0 + s B A) x̄;  ∂f_k/∂B_kj = s (A x̄)_j;  ∂f_k/∂A_jl = s B_kj x̄_l;  Λ = diag p − p pᵀ
    s, a, b = 2.0, point["proj.lora_A"].double(), point["proj.lora_B"].double()
    w = net.base_model.model.proj.base_layer.weight.double() + s * b @ a
    batch = model.head.collate(examples)
    xbar = batch["x"].double().mean(1)  # (N, IN)
    p = torch.softmax(xbar @ w.T, -1)
    want_a = torch.zeros(2, IN, dtype=torch.float64)
    want_b = torch.zeros(3, 2, dtype=torch.float64)
    for n in range(len(examples)):
        lam = torch.diag(p[n]) - torch.outer(p[n], p[n])
        want_b += s**2 * torch.diagonal(lam)[:, None] * (a @ xbar[n])[None, :] ** 2
        want_a += s**2 * torch.einsum("kj,kq,qj->j", b, lam, b)[:, None] * xbar[n][None, :] ** 2
    assert torch.allclose(diag, torch.cat([want_a.reshape(-1), want_b.reshape(-1)]), rtol=1e-5, atol=1e-9)
    want_ll = torch.log(p[torch.arange(len(examples)), batch["labels"]]).sum()
    assert loglik == pytest.approx(float(want_ll), rel=1e-5)


def test_the_full_ggn_equals_an_independent_jacobian_and_its_diagonal_is_diag():
    run = _map_run(steps=10)
    model, sites = run.model, run.model.sites
    point = {k: v.detach() for k, v in run.guide.median().items()}
    examples = run.train[:6]
    full, ll_full = ggn(model, point, sites, examples, hessian="full")
    diag, ll_diag = ggn(model, point, sites, examples, hessian="diag")
    # independently: torch.autograd.functional.jacobian of all examples' logits w.r.t. the flat vector
    from blob_pyro.lora import bind_values

    shapes = [s.shape for s in sites]
    flat = torch.cat([point[s.name].reshape(-1) for s in sites])
    batch = model.head.collate(examples)

    def logits_of(v):
        parts = torch.split(v, [math.prod(sh) for sh in shapes])
        values = {s.name: t.reshape(s.shape) for s, t in zip(sites, parts)}
        with bind_values(sites, values):
            return model.head.logits(model.network, batch)

    jac = torch.autograd.functional.jacobian(logits_of, flat).double()  # (N, K, D)
    p = torch.softmax(logits_of(flat).detach().double(), -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    want = torch.einsum("nkd,nkq,nqe->de", jac, lam, jac)
    assert torch.allclose(full, want, rtol=1e-5, atol=1e-9)
    assert torch.allclose(diag, torch.diagonal(want), rtol=1e-5, atol=1e-9)
    assert ll_full == pytest.approx(ll_diag)


def _kfac_precision(guide, name):
    """The dense (D, D) posterior precision H ⊗ Q + δI of one site of a kfac LaplaceGuide."""
    hv, hu, qv, qu = guide.kfac_parts(name)
    h, q = hu @ torch.diag(hv) @ hu.T, qu @ torch.diag(qv) @ qu.T
    return torch.kron(h, q) + float(guide.prior_precision) * torch.eye(len(hv) * len(qv), dtype=torch.float64)


@pytest.mark.parametrize("hessian", ["diag", "full", "kfac"])
def test_the_posterior_precision_is_positive_definite_and_the_guide_draws_from_it(hessian):
    run = _map_run(hessian)
    result = fit_laplace(run.model, run.guide, run.train, hessian=hessian)
    guide, info = result.guide, result.info
    delta = info["prior_precision"]
    assert delta > 0 and info["num_parameters"] == guide.num_parameters == sum(v.numel() for v in run.guide.median().values())
    if hessian == "diag":
        prec = torch.cat([guide.precision.get_submodule(n.rsplit(".", 1)[0]).get_buffer(n.rsplit(".", 1)[1])
                          .reshape(-1) for n in guide.laplace_names])
        assert (prec >= delta * (1 - 1e-6)).all()
    elif hessian == "kfac":
        for name in guide.laplace_names:
            prec = _kfac_precision(guide, name)
            assert torch.linalg.eigvalsh(prec).min() >= delta * (1 - 1e-6)
            torch.linalg.cholesky(prec)
    else:
        prec = guide.precision_matrix
        assert torch.allclose(prec, prec.T)
        assert torch.linalg.eigvalsh(prec).min() >= delta * (1 - 1e-6)
        torch.linalg.cholesky(prec)  # positive definite
    # the guide's draws have the MAP mean and the Laplace std
    point = run.guide.median()
    torch.manual_seed(0)
    draws = [guide() for _ in range(4000)]
    std = guide_std(guide)
    for name in guide.site_names:
        stacked = torch.stack([d[name] for d in draws])
        assert torch.allclose(stacked.mean(0), point[name], atol=4 * float(std[name].max()) / math.sqrt(4000) + 1e-7)
        assert torch.allclose(stacked.std(0), std[name], rtol=0.1)


def test_the_tuned_prior_precision_maximises_the_marginal_likelihood():
    run = _map_run("full")
    info = fit_laplace(run.model, run.guide, run.train, hessian="full").info
    point = run.guide.median()
    sq = float(sum(v.double().square().sum() for v in point.values()))
    full, loglik = ggn(run.model, point, run.model.sites, run.train, hessian="full")
    eig = torch.linalg.eigvalsh(full)
    delta = info["prior_precision"]
    best = log_marglik(delta, eig, sq, loglik)
    assert best == pytest.approx(info["marglik"])
    for factor in (1.05, 1.5, 10.0):  # neighbours either side are worse
        assert log_marglik(delta * factor, eig, sq, loglik) < best
        assert log_marglik(delta / factor, eig, sq, loglik) < best
    # the marglik from the eigenvalues is the determinant form: log det(GGN + δI) computed directly
    direct = (loglik - 0.5 * delta * sq + 0.5 * eig.numel() * math.log(delta)
              - 0.5 * torch.logdet(full + delta * torch.eye(len(full), dtype=torch.float64)))
    assert best == pytest.approx(float(direct), rel=1e-9)
    assert info["marglik"] >= info["marglik_at_map_prior"]
    trace = info["marglik_trace"]
    assert trace and all(t["marglik"] <= best + 1e-9 for t in trace)


def test_tune_prior_precision_stops_at_its_bounds_when_the_maximum_lies_beyond():
    eig = torch.tensor([1.0, 2.0])
    assert tune_prior_precision(eig, 0.0, 0.0, hi=1e4)[0] == 1e4  # ‖θ*‖ = 0: marglik rises for ever
    assert tune_prior_precision(torch.zeros(2), 1.0, 0.0, lo=1e-6)[0] == 1e-6  # no curvature: δ as small as allowed


@pytest.mark.parametrize("hessian", ["diag", "kfac"])
def test_last_layer_covers_only_the_last_lora_module_and_keeps_the_rest_at_the_map(hessian):
    run = _map_run(hessian, "last_layer")
    sites = laplace_sites(run.model, "last_layer")
    assert [s.name for s in sites] == ["layers.1.proj.lora_A", "layers.1.proj.lora_B"]
    guide = fit_laplace(run.model, run.guide, run.train, hessian=hessian, subset="last_layer").guide
    draw = guide()
    point = run.guide.median()
    assert torch.equal(draw["layers.0.proj.lora_A"], point["layers.0.proj.lora_A"])
    assert not torch.equal(draw["layers.1.proj.lora_B"], point["layers.1.proj.lora_B"])
    assert float(guide_std(guide)["layers.0.proj.lora_B"].abs().max()) == 0.0


def test_full_is_refused_in_one_line_above_its_size_limit(monkeypatch):
    import blob_pyro.laplace as laplace

    monkeypatch.setattr(laplace, "FULL_MAX_PARAMETERS", 10)
    run = _map_run(steps=1)
    with pytest.raises(ConfigError) as err:
        fit_laplace(run.model, run.guide, run.train, hessian="full")
    assert "laplace_hessian=full over 240 parameters" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("hessian", ["diag", "full", "kfac"])
def test_post_fit_then_save_and_load_round_trips_the_laplace_posterior(tmp_path, hessian):
    run = _map_run(hessian)
    examples = tiny_examples(10, seed=2)
    at_map = predict(run.model, run.guide, examples, num_samples=0, progress=False).probs
    post_fit(run)
    assert isinstance(run.guide, LaplaceGuide) and run.laplace["hessian"] == hessian
    torch.manual_seed(3)
    sampled = predict(run.model, run.guide, examples, num_samples=5, progress=False).probs
    assert not torch.allclose(sampled, at_map, atol=1e-4)  # N > 0 draws differ from the MAP's prediction
    assert torch.allclose(predict(run.model, run.guide, examples, num_samples=0, progress=False).probs, at_map,
                          atol=1e-6)  # N = 0 is the MAP
    save_run(tmp_path / "run", run, metrics={"accuracy": 0.5})
    record = json.loads((tmp_path / "run" / LAPLACE_FILE).read_text())
    assert record["prior_precision"] == run.laplace["prior_precision"] and record["hessian"] == hessian
    assert {"marglik_trace", "seconds", "cpu_seconds", "num_parameters", "effective_parameters"} <= set(record)
    assert _read_laplace(tmp_path / "run")["prior_precision"] == record["prior_precision"]
    state = load_file(str(tmp_path / "run" / "posterior.safetensors"))
    assert state.keys() == guide_state(run.guide).keys()
    loaded = placeholder_guide(run.model, hessian=hessian, subset="all")
    loaded.load_state_dict(state)
    torch.manual_seed(3)
    again = predict(run.model, loaded, examples, num_samples=5, progress=False).probs
    assert torch.allclose(again, sampled, atol=1e-6)
    assert float(loaded.prior_precision) == pytest.approx(record["prior_precision"])


def test_a_damaged_laplace_json_is_refused_in_one_line(tmp_path):
    with pytest.raises(RunError, match="laplace.json is missing"):
        _read_laplace(tmp_path)
    (tmp_path / LAPLACE_FILE).write_text(json.dumps({"prior_precision": -1}))
    with pytest.raises(RunError, match="finite number > 0"):
        _read_laplace(tmp_path)


# ---- KFAC ----------------------------------------------------------------------------------------
class _OneToken(TinyHead):
    """TinyHead with T = 1: each example is one position, where KFAC is exact."""

    def collate(self, examples, device=None) -> dict:
        batch = super().collate(examples, device)
        return {**batch, "x": batch["x"][:, :1]}


def _random_point(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: 0.5 * torch.randn(s.shape, generator=g) for s in model.sites}


def test_kfac_is_the_exact_ggn_block_for_one_example_at_one_position():
    torch.manual_seed(0)
    net = inject_lora(TinyNet(3), ["proj"], r=2, lora_alpha=4.0)
    model = BlobModel(net, _OneToken(3), bayesian_factor="both", num_data=1, flipout=None)
    point = _random_point(model)
    example = tiny_examples(4, num_classes=3, seed=1)[2:3]
    full, ll_full = ggn(model, point, model.sites, example, hessian="full")
    factors, ll_kfac, positions = kfac(model, point, model.sites, example)
    assert positions == {"layers.0.proj": 1, "layers.1.proj": 1} and ll_kfac == pytest.approx(ll_full)
    start = 0
    for site in model.sites:  # the rank-one case: Σ_c (g_c ⊗ a)(g_c ⊗ a)ᵀ = (Σ_c g_c g_cᵀ) ⊗ a aᵀ
        size = math.prod(site.shape)
        h, q = factors[site.name]
        block = full[start:start + size, start:start + size]
        assert float(block.abs().max()) > 1e-4  # a real test: the block is not zero
        assert torch.allclose(torch.kron(h, q), block, rtol=1e-5, atol=1e-10), site.name
        start += size


def _one_lora_layer(base: torch.nn.Module, head, num_data: int):
    """(network, model, point): ``base``'s ``proj`` with LoRA r=2 (scaling 2) on both factors, and a random point."""
    torch.manual_seed(0)
    net = inject_lora(base, ["proj"], r=2, lora_alpha=4.0)
    model = BlobModel(net, head, bayesian_factor="both", num_data=num_data, flipout=None)
    return net, model, {"proj.lora_A": 0.3 * torch.randn(2, IN), "proj.lora_B": 0.4 * torch.randn(3, 2)}


def test_kfac_expand_over_tokens_matches_the_hand_computation_whatever_the_batch_size():
    net, model, point = _one_lora_layer(MeanLinear(), TinyHead(3), 12)
    examples = tiny_examples(12, num_classes=3, seed=2)
    factors, loglik, positions = kfac(model, point, model.sites, examples, batch_size=5)
    # by hand: f = mean_t (W0 x_t + s B A x_t); the output gradient of direction l_c at token t is s l_c / T for B
    # and s Bᵀ l_c / T for A, and Σ_c l_c l_cᵀ = Λ; so H_B = (s²/T) Σ_n Λ_n, H_A = (s²/T) Σ_n Bᵀ Λ_n B,
    # Q_A = mean over the N·T tokens of x xᵀ, Q_B = the same of (A x)(A x)ᵀ
    s, a, b = 2.0, point["proj.lora_A"].double(), point["proj.lora_B"].double()
    x = model.head.collate(examples)["x"].double()  # (N, T, IN)
    n, t = x.shape[:2]
    w = net.base_model.model.proj.base_layer.weight.double() + s * b @ a
    p = torch.softmax(x.mean(1) @ w.T, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    tokens = x.reshape(-1, IN)
    assert positions == {"proj": n * t}
    assert torch.allclose(factors["proj.lora_B"][0], s**2 / t * lam.sum(0), rtol=1e-5, atol=1e-10)
    assert torch.allclose(factors["proj.lora_A"][0], s**2 / t * b.T @ lam.sum(0) @ b, rtol=1e-5, atol=1e-10)
    assert torch.allclose(factors["proj.lora_A"][1], tokens.T @ tokens / (n * t), rtol=1e-5)
    assert torch.allclose(factors["proj.lora_B"][1], a @ tokens.T @ tokens @ a.T / (n * t), rtol=1e-5)
    one_by_one, loglik_1, _ = kfac(model, point, model.sites, examples, batch_size=1)
    assert loglik == pytest.approx(loglik_1)
    _assert_same_factors(factors, one_by_one)


def _assert_same_factors(factors: dict, others: dict) -> None:
    """Two KFAC results hold the same (H, Q) for every site, to float round-off."""
    assert factors.keys() == others.keys()
    for name, (h, q) in factors.items():
        assert torch.allclose(h, others[name][0], rtol=1e-5) and torch.allclose(q, others[name][1], rtol=1e-5)


class _Masked(torch.nn.Module):
    """logits = mean over the unmasked tokens of proj(x): padded tokens cannot move the logits."""

    def __init__(self):
        super().__init__()
        self.config = {"model_type": "custom"}
        self.proj = torch.nn.Linear(IN, 3, bias=False)

    def forward(self, x, mask):
        return (self.proj(x) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


class _PaddedHead(TinyHead):
    """Example i has 1 + i % 3 tokens; a batch pads to its longest with non-zero junk (what a tokenizer's pad
    embeddings look like to a LoRA layer)."""

    def collate(self, examples, device=None) -> dict:
        lengths = [1 + e.index % 3 for e in examples]
        longest = max(lengths)
        x = torch.full((len(examples), longest, IN), 7.0)
        mask = torch.zeros(len(examples), longest)
        for i, (e, length) in enumerate(zip(examples, lengths)):
            x[i, :length] = features(e)[:length]
            mask[i, :length] = 1.0
        batch = super().collate(examples, device)
        return {**batch, "x": x, "mask": mask}

    def logits(self, network, batch):
        return network(batch["x"], batch["mask"]).float()


def test_kfac_leaves_padded_positions_out():
    _, model, point = _one_lora_layer(_Masked(), _PaddedHead(3), 9)
    examples = tiny_examples(9, num_classes=3, seed=4)
    padded, _, positions = kfac(model, point, model.sites, examples, batch_size=9)
    alone, _, positions_alone = kfac(model, point, model.sites, examples, batch_size=1)  # no padding
    assert positions == positions_alone == {"proj": sum(1 + i % 3 for i in range(9))}
    _assert_same_factors(padded, alone)


def test_the_kronecker_marglik_and_log_det_are_the_dense_ones_and_delta_maximises_it():
    run = _map_run("kfac")
    info = fit_laplace(run.model, run.guide, run.train, hessian="kfac").info
    guide = fit_laplace(run.model, run.guide, run.train, hessian="kfac").guide
    delta = info["prior_precision"]
    point = run.guide.median()
    sq = float(sum(v.double().square().sum() for v in point.values()))
    eig = torch.cat([torch.outer(guide.kfac_parts(n)[0], guide.kfac_parts(n)[2]).reshape(-1) for n in guide.laplace_names])
    best = log_marglik(delta, eig, sq, info["log_likelihood"])
    assert best == pytest.approx(info["marglik"])
    logdet = sum(torch.logdet(_kfac_precision(guide, n)) for n in guide.laplace_names)  # dense H ⊗ Q + δI
    direct = info["log_likelihood"] - 0.5 * delta * sq + 0.5 * eig.numel() * math.log(delta) - 0.5 * float(logdet)
    assert best == pytest.approx(direct, rel=1e-9)
    for factor in (1.05, 1.5, 10.0):
        assert log_marglik(delta * factor, eig, sq, info["log_likelihood"]) < best
        assert log_marglik(delta / factor, eig, sq, info["log_likelihood"]) < best
    assert info["marglik"] >= info["marglik_at_map_prior"]
    assert info["kfac"] == {"approximation": "expand", "batch_size": 8,
                            "positions": {"layers.0.proj": 48, "layers.1.proj": 48}}


def test_kfac_draws_have_the_inverse_kronecker_covariance_and_std_is_its_diagonal():
    run = _map_run("kfac")
    fitted = fit_laplace(run.model, run.guide, run.train, hessian="kfac").guide
    # the tuned δ dwarfs this tiny run's curvature; a δ at 1 % of its largest eigenvalue makes the draws correlated
    parts = {n: fitted.kfac_parts(n) for n in fitted.laplace_names}
    delta = 0.01 * max(float(hv.max() * qv.max()) for hv, _, qv, _ in parts.values())
    guide = LaplaceGuide(run.model, run.guide.median(), parts, hessian="kfac", prior_precision=delta)
    name = "layers.1.proj.lora_A"
    cov = torch.linalg.inv(_kfac_precision(guide, name))
    std = guide.std()
    assert torch.allclose(std[name].double().reshape(-1), cov.diagonal().sqrt(), rtol=1e-5)
    torch.manual_seed(0)
    draws = torch.stack([guide()[name].reshape(-1) for _ in range(6000)]).double()
    centred = draws - run.guide.median()[name].reshape(-1).double()
    empirical = centred.T @ centred / len(draws)
    scale = cov.diagonal().sqrt()
    # per entry, the sample covariance's std is sqrt((Σ_ii Σ_jj + Σ_ij²) / n) <= sqrt(2 / n) in correlation units
    err = ((empirical - cov) / torch.outer(scale, scale)).abs().max()
    assert float(err) < 5 * math.sqrt(2 / len(draws))
    off = cov / torch.outer(scale, scale) - torch.eye(len(cov), dtype=torch.float64)
    assert float(off.abs().max()) > 0.1  # the draws are correlated: the test would catch independent ones


def test_the_curvature_is_unchanged_by_gradient_checkpointing():
    from blob_pyro.backbone import enable_gradient_checkpointing

    run = _map_run("kfac", steps=5)
    point = {k: v.detach() for k, v in run.guide.median().items()}
    plain, loglik, positions = kfac(run.model, point, run.model.sites, run.train, batch_size=4)
    diag, _ = ggn(run.model, point, run.model.sites, run.train[:4], hessian="diag")
    # blocks are recomputed in each of the K backward passes (the checkpoint's replay context enters K times), and
    # the recomputation calls the KFAC tap again
    assert enable_gradient_checkpointing(run.model.network) == 2
    assert torch.allclose(ggn(run.model, point, run.model.sites, run.train[:4], hessian="diag")[0], diag, rtol=1e-6)
    again, loglik_again, positions_again = kfac(run.model, point, run.model.sites, run.train, batch_size=4)
    assert positions_again == positions and loglik_again == pytest.approx(loglik)
    for name, (h, q) in plain.items():
        assert torch.allclose(h, again[name][0], rtol=1e-6) and torch.allclose(q, again[name][1], rtol=1e-6)
