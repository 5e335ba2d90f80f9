"""blob_pyro.infer: fit's loop and its two step kinds (ELBO and the paper's), what they log, what they refuse."""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions import kl_divergence

from blob_pyro.config import FitConfig
from blob_pyro.errors import ConfigError, TrainingError
from blob_pyro.guides import make_guide
from blob_pyro.infer import ElboStep, KeepTrace_ELBO, PaperStep, _context, fit, kl_terms, make_step, resolved_fit_config
from blob_pyro.kl import closed_form_kl
from blob_pyro.optim import register_parameters
from blob_pyro.poutine import float64_latents
from blob_pyro.poutine.float64 import normal_site_kls
from blob_pyro.priors import make_prior

from .tiny import store_snapshot, tiny_examples, tiny_model


def _fit(model, guide, n=16, **cfg):
    settings = dict(max_steps=4, batch_size=4, lr=1e-2, kl_schedule="standard")
    settings.update(cfg)
    return fit(model, guide, tiny_examples(n), FitConfig(**settings), progress=False)


def test_fit_returns_one_record_per_step_and_trains():
    model = tiny_model("B", num_data=32)
    guide = make_guide("blob", model)
    log = fit(model, guide, tiny_examples(32), FitConfig(max_steps=30, batch_size=8, lr=3e-2, kl_schedule="standard",
                                                         warmup_ratio=0.0), progress=False)
    assert [r["step"] for r in log] == list(range(1, 31))
    assert set(log[0]) == {"step", "loss", "nll", "kl", "kl_weight", "lr", "seconds"}
    assert all(r["kl_weight"] == 1 / 32 for r in log)
    assert set(log[0]["lr"]) == {"loc", "scale"} and log[0]["lr"]["loc"] == pytest.approx(3e-2 * 29 / 30)
    first, last = sum(r["nll"] for r in log[:5]) / 5, sum(r["nll"] for r in log[-5:]) / 5
    assert last < first - 0.1, (first, last)


def test_logged_loss_is_nll_plus_weighted_kl_with_the_analytic_kl():
    model = tiny_model("B")
    log = _fit(model, make_guide("blob", model), elbo="meanfield", kl_schedule="fixed", kl_multiplier=3.0)
    for r in log:  # TraceMeanField_ELBO: the loss holds the same closed-form KL that is logged
        assert r["loss"] == pytest.approx(r["nll"] + r["kl_weight"] * r["kl"], rel=1e-5)


def test_fit_accepts_a_split_and_reads_the_schedule():
    from blob_pyro.data import TaskSplit

    examples = tiny_examples(16)
    split = TaskSplit("tiny", "train", tuple(examples), 2, ("A", "B"), "memory")
    model = tiny_model("B", num_data=16)
    log = fit(model, make_guide("blob", model), split, FitConfig(max_steps=3, batch_size=4, kl_schedule="fixed",
                                                                kl_multiplier=0.5), progress=False)
    assert [r["kl_weight"] for r in log] == [0.5 / 16] * 3
    model = tiny_model("B", num_data=16)
    log = fit(model, make_guide("blob", model), examples, FitConfig(max_steps=2, batch_size=4), progress=False)
    assert log[0]["kl_weight"] < log[1]["kl_weight"] < 1e-3  # the default: BLoB's schedule, increasing in a cycle
    model = tiny_model("B", num_data=16)
    log = fit(model, make_guide("blob", model), examples, FitConfig(max_steps=4, batch_size=4, kl_cycle=2),
              progress=False)
    assert [r["kl_weight"] for r in log] == pytest.approx([2 / 7, 4 / 7] * 2)  # 2^i / (2^3 - 1), i = 1, 2


def test_fit_refuses_a_model_whose_plate_size_is_not_the_data_size():
    model = tiny_model("B", num_data=64)
    with pytest.raises(ConfigError) as err:
        _fit(model, make_guide("blob", model), n=16)
    assert "num_data=64" in str(err.value) and "16" in str(err.value) and "\n" not in str(err.value)


def test_fit_refuses_fewer_examples_than_a_batch():
    model = tiny_model("B", num_data=3)
    with pytest.raises(ConfigError, match="fewer than batch_size"):
        _fit(model, make_guide("blob", model), n=3)


def test_fit_does_not_join_a_process_group(monkeypatch):
    """A launcher's environment alone does not make fit distributed: joining is the caller's step."""
    import torch.distributed

    import blob_pyro.distributed as distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("fit joined a process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(distributed, "init_from_env", refuse)
    model = tiny_model("B")
    log = _fit(model, make_guide("blob", model), max_steps=2)
    assert len(log) == 2 and not torch.distributed.is_initialized()


def test_logged_kl_is_the_kl_before_the_optimiser_step():
    # The optimiser updates the guide's means in place; a KL read from the trace after the step mixed
    # new means with the old draw and stds (for the low-rank guide: Monte Carlo KLs of ±1e12).
    torch.manual_seed(0)
    model = tiny_model("B")
    guide = make_guide("blob", model)
    batch = model.head.collate(tiny_examples(4))
    step = make_step(model, guide, FitConfig(max_steps=10, lr=0.1, warmup_ratio=0.0))
    priors = model.prior_distributions()

    def closed_form():
        with torch.no_grad():
            return sum(kl_divergence(guide.site_distribution(n), p).sum().item() for n, p in priors.items())

    step.step(batch, 1e-3, 16)
    before = closed_form()
    record = step.step(batch, 1e-3, 16)
    after = closed_form()
    assert record["kl"] == pytest.approx(before, rel=1e-6)
    assert after != pytest.approx(before, rel=1e-6)  # the step moved the guide: the check can fail


def test_trace_meanfield_elbo_uses_the_closed_form_kl():
    model = tiny_model("B")
    guide = make_guide("blob", model, eps=0.05)  # stds ~2e-3: the two draws below nearly agree
    batch = model.head.collate(tiny_examples(1))
    loss = TraceMeanField_ELBO().loss(model, guide, batch)
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    kl = kl_terms(model_trace.nodes, guide_trace.nodes).item()
    nll = -model_trace.nodes["obs"]["fn"].log_prob(batch["labels"]).sum().item() * 16  # plate scale N/B
    assert loss == pytest.approx(kl + nll, rel=1e-3)


def test_logged_kl_of_autonormal_is_a_kl_estimate():
    """AutoNormal draws through an auxiliary site and a Delta: the logged KL must include the auxiliary log q,
    so that its mean over draws is the closed-form KL (without it, it was -log p(theta): negative)."""
    torch.manual_seed(0)
    model = tiny_model("both")
    guide = make_guide("auto_normal", model, eps=0.3)
    batch = model.head.collate(tiny_examples(2))
    priors = model.prior_distributions()
    draws = []
    with torch.no_grad():
        for _ in range(400):
            guide_trace = poutine.trace(guide).get_trace(batch)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
            draws.append(kl_terms(model_trace.nodes, guide_trace.nodes).item())
        closed = sum(kl_divergence(dist.Normal(*guide._get_loc_and_scale(n)), p.base_dist).sum().item()
                     for n, p in priors.items())
    draws = torch.tensor(draws, dtype=torch.float64)
    assert closed > 0
    assert abs(draws.mean().item() - closed) < 4 * draws.std().item() / 20  # 4 standard errors of 400 draws


def test_logged_kl_of_a_point_estimate_is_the_map_penalty():
    """AutoDelta (mle/map): the `kl` of the train log is -log p(theta) at the point, the term MAP minimises."""
    model = tiny_model("B")
    guide = make_guide("auto_delta", model)
    batch = model.head.collate(tiny_examples(2))
    guide_trace = poutine.trace(guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    priors = model.prior_distributions()
    by_hand = -sum(priors[s.name].log_prob(guide_trace.nodes[s.name]["value"]).sum().item() for s in model.sites)
    assert kl_terms(model_trace.nodes, guide_trace.nodes).item() == pytest.approx(by_hand, rel=1e-6)
    assert by_hand < 0  # B starts at 0, where the N(0, 0.2) density is 2.0 > 1: a penalty, not a KL


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_make_step_is_the_elbo_step_with_two_lr_groups(elbo):
    model = tiny_model("B")
    guide = make_guide("blob", model)
    step = make_step(model, guide, FitConfig(max_steps=10, lr=1e-2, scale_lr=1e-1, warmup_ratio=0.2, elbo=elbo))
    pyro_elbo = TraceMeanField_ELBO if elbo == "meanfield" else Trace_ELBO
    assert isinstance(step, ElboStep) and isinstance(step.elbo, pyro_elbo)
    assert isinstance(step.elbo, TraceMeanField_ELBO) == (elbo == "meanfield")
    assert step.current_lr() == pytest.approx({"loc": 1e-2 / 3, "scale": 1e-1 / 3})  # warm-up step 1 of 2
    record = step.step(model.head.collate(tiny_examples(4)), 1 / 16, 16)
    assert all(math.isfinite(record[k]) for k in ("loss", "nll", "kl"))
    assert step.current_lr() == pytest.approx({"loc": 2e-2 / 3, "scale": 2e-1 / 3})
    names = step.state_dict()["params"]
    assert any(".rho." in n for n in names) and any(n.startswith("network$$$") for n in names)


def test_elbo_step_state_round_trips_and_refuses_another_model():
    model = tiny_model("B")
    guide = make_guide("blob", model)
    step = make_step(model, guide, FitConfig(max_steps=10))
    step.step(model.head.collate(tiny_examples(4)), 1 / 16, 16)
    state = step.state_dict()
    again = make_step(model, guide, FitConfig(max_steps=10))
    again.load_state_dict(state)
    assert again.current_lr() == step.current_lr()
    pyro.clear_param_store()
    other = tiny_model("both")
    wrong = make_step(other, make_guide("blob", other), FitConfig(max_steps=10))
    with pytest.raises(TrainingError, match="does not fit"):
        wrong.load_state_dict(state)


def test_paper_objective_steps_rho_and_the_deterministic_factor():
    model = tiny_model("A")
    guide = make_guide("blob", model)
    register_parameters(model, guide)
    before = store_snapshot()
    log = _fit(model, guide, objective="paper", kl_schedule="blob")
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)
    assert set(log[-1]["lr"]) == {"adamw", "sgd"}
    after = store_snapshot()
    rho = [k for k in after if ".rho." in k]
    assert rho and all(not torch.equal(after[k], before[k]) for k in rho)  # SGD on NLL + weighted KL
    b = [k for k in after if k.endswith("lora_B.default.weight")]
    assert b and all(torch.count_nonzero(after[k]) > 0 for k in b)  # B (deterministic, zero-init) trained by AdamW
    for r in log:  # the logged KL is the closed form of the prior actually used
        assert r["loss"] == pytest.approx(r["nll"] + r["kl_weight"] * r["kl"], rel=1e-6)


def test_paper_objective_optimises_the_laplace_priors_own_closed_form_kl():
    """A Laplace prior has a closed-form KL to the Normal guide: the paper step logs and optimises that KL, not the
    KL to a Normal with the Laplace's loc and scale."""
    model = tiny_model("A", prior=make_prior("laplace", 0.2))
    guide = make_guide("blob", model)
    log = fit(model, guide, tiny_examples(16), FitConfig(max_steps=2, batch_size=4, objective="paper"),
              progress=False)
    with torch.no_grad():
        laplace = sum(closed_form_kl(guide.site_distribution(n), p) for n, p in model.prior_distributions().items())
        as_normal = sum(closed_form_kl(guide.site_distribution(n), dist.Normal(0.0, 0.2).expand(s.shape).to_event(2))
                        for n, s in ((s.name, s) for s in model.sites))
    step = make_step(model, guide, FitConfig(objective="paper"))
    assert step.kl().item() == pytest.approx(laplace.item(), rel=1e-12)
    assert abs(laplace.item() - as_normal.item()) > 1e-3 * abs(as_normal.item())  # the two KLs differ here
    assert all(math.isfinite(r["kl"]) for r in log)


def test_paper_objective_refuses_a_prior_without_closed_form_kl_before_training():
    model = tiny_model("A", prior=make_prior("student_t", 0.2))
    guide = make_guide("blob", model)
    called = []
    with pytest.raises(ConfigError) as err:
        fit(model, guide, tiny_examples(16), FitConfig(max_steps=2, batch_size=4, objective="paper"),
            progress=False, callback=lambda *a: called.append(a))
    assert not called and "\n" not in str(err.value) and "prior" in str(err.value)
    with pytest.raises(ConfigError):
        make_step(model, guide, FitConfig(objective="paper"))


@pytest.mark.parametrize("guide_name", ["lowrank", "auto_normal", "auto_delta"])
def test_paper_objective_needs_the_blob_guide(guide_name):
    model = tiny_model("A")
    with pytest.raises(ConfigError, match="'blob' guide"):
        make_step(model, make_guide(guide_name, model), FitConfig(objective="paper"))


def test_paper_step_state_round_trips():
    model = tiny_model("A")
    guide = make_guide("blob", model)
    step = make_step(model, guide, FitConfig(max_steps=10, objective="paper"))
    assert isinstance(step, PaperStep)
    step.step(model.head.collate(tiny_examples(4)), 0.5, 16)
    again = make_step(model, guide, FitConfig(max_steps=10, objective="paper"))
    again.load_state_dict(step.state_dict())
    assert again.current_lr() == step.current_lr()
    with pytest.raises(TrainingError, match="does not fit"):
        again.load_state_dict({**step.state_dict(), "params": ["x"]})


def test_non_finite_logits_are_a_training_error_naming_the_step():
    model = tiny_model("B")
    real, calls = model.head.logits, []

    def logits(network, batch):  # the forward of step 3 overflows
        calls.append(1)
        out = real(network, batch)
        return out * float("nan") if len(calls) == 3 else out

    model.head.logits = logits
    with pytest.raises(TrainingError) as err:
        _fit(model, make_guide("blob", model), max_steps=5)
    msg = str(err.value)
    assert msg.startswith("non-finite loss at step 3 (NaN/inf in ") and "\n" not in msg and "smaller lr" in msg


@pytest.mark.parametrize("guide_name", ["blob", "lowrank"])
def test_bf16_autocast_step_trains_and_logs_finite_values(guide_name):
    model = tiny_model("B")
    guide = make_guide(guide_name, model)
    step = make_step(model, guide, FitConfig(max_steps=4, lr=1e-2), autocast_dtype=torch.bfloat16, device="cpu")
    batch = model.head.collate(tiny_examples(4))
    records = [step.step(batch, 1 / 16, 16) for _ in range(3)]
    assert all(math.isfinite(r[k]) for r in records for k in ("loss", "nll", "kl"))
    assert guide.median()[model.sites[0].name].abs().sum() > 0  # the means moved


def test_resolved_fit_config_fills_what_is_not_set():
    cfg = resolved_fit_config()
    assert (cfg.objective, cfg.kl_schedule, cfg.kl_multiplier) == ("elbo", "blob", 1.0)
    assert resolved_fit_config(FitConfig(objective="paper"), lr=0.5).lr == 0.5
    assert resolved_fit_config(FitConfig(kl_multiplier=0.0)).kl_multiplier == 0.0


# ---- the step's fast path computes what the plain one does, bit for bit -----------------------------
class _Tape(Messenger):
    """Every sample message of the last run (the step's bookkeeping before it read the ELBO's traces)."""

    def __enter__(self):
        self.sites = {}
        return super().__enter__()

    def _pyro_sample(self, msg):
        self.sites[msg["name"]] = msg


def _plain_kl(model_sites, guide_sites):
    total = 0.0
    for name, site in guide_sites.items():
        if site["is_observed"]:
            continue
        if (site.get("infer") or {}).get("is_auxiliary"):  # AutoNormal's draw: its log q belongs to the KL
            total = total + site["fn"].log_prob(site["value"]).sum()
            continue
        if name not in model_sites:
            continue
        prior = model_sites[name]["fn"]
        try:
            total = total + kl_divergence(site["fn"], prior).sum()
        except NotImplementedError:
            total = total + (site["fn"].log_prob(site["value"]) - prior.log_prob(site["value"])).sum()
    return torch.as_tensor(total)


def _plain_elbo_step(step, batch, kl_weight, num_data):
    """What ElboStep.step did with Pyro's own ELBO, a handler per site and per-tensor AdamW: the reference."""
    elbo = (TraceMeanField_ELBO if isinstance(step.elbo, TraceMeanField_ELBO) else Trace_ELBO)()
    model_tape, guide_tape = _Tape(), _Tape()

    def model(*args):
        with model_tape:
            return step.model(*args)

    def guide(*args):
        with guide_tape:
            return step.guide(*args)

    with _context(step.model, scale=num_data * kl_weight, autocast_dtype=None, device_type="cpu"):
        loss = elbo.loss_and_grads(model, guide, batch)
        with torch.no_grad():
            kl = _plain_kl(model_tape.sites, guide_tape.sites).item()
            obs = model_tape.sites["obs"]
            nll = (-obs["fn"].log_prob(obs["value"]).mean()).item()
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    step.scheduler.step()
    return {"loss": loss / num_data, "nll": nll, "kl": kl}


def _per_tensor(optimizer):
    """The same optimiser with torch's per-tensor loop (the CPU default before the step asked for foreach)."""
    groups = [{k: v for k, v in g.items() if k != "foreach"} for g in optimizer.param_groups]
    return type(optimizer)(groups, foreach=False)


def _fast_and_plain(make, cfg: FitConfig, run_plain, weights=(1e-3, 0.02, 0.5, 0.1, 1e-3, 0.02)):
    """The step's records and final parameters, and the plain reference's, from the same start and RNG state."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide, batches = make()
    register_parameters(model, guide)
    start, rng = store_snapshot(), torch.get_rng_state()
    out = []
    for plain in (False, True):
        with torch.no_grad():
            for name, value in pyro.get_param_store().named_parameters():
                value.copy_(start[name])
        torch.set_rng_state(rng)
        step = make_step(model, guide, cfg)
        records = [(run_plain if plain else type(step).step)(step, b, w, 16) for b, w in zip(batches, weights)]
        out.append((records, store_snapshot()))
    (fast_records, fast_params), (plain_records, plain_params) = out
    assert fast_records == plain_records  # floats compared exactly
    assert fast_params.keys() == plain_params.keys() and all(torch.equal(fast_params[k], plain_params[k])
                                                              for k in fast_params)
    assert any(not torch.equal(fast_params[k], start[k]) for k in start)  # the steps moved something


def _tiny(guide_name, factor="B"):
    def make():
        model = tiny_model(factor)
        return model, make_guide(guide_name, model), [model.head.collate(tiny_examples(8)[i:i + 4]) for i in (0, 4, 2, 1, 3, 0)]
    return make


@pytest.mark.parametrize("guide_name,elbo", [("blob", "trace"), ("lowrank", "trace"), ("auto_delta", "trace"),
                                             ("auto_normal", "trace"), ("blob", "meanfield")])
def test_elbo_step_is_bit_identical_to_pyros_elbo_with_a_handler_per_site_and_per_tensor_adamw(guide_name, elbo):
    def plain(step, batch, w, n):
        if not getattr(step, "_plain", False):
            step.optimizer = _per_tensor(step.optimizer)
            step.scheduler = torch.optim.lr_scheduler.LambdaLR(step.optimizer, step.scheduler.lr_lambdas[0])
            step._plain = True
        return _plain_elbo_step(step, batch, w, n)

    _fast_and_plain(_tiny(guide_name, "both" if guide_name == "auto_normal" else "B"),
                    FitConfig(max_steps=10, lr=3e-2, warmup_ratio=0.2, elbo=elbo), plain)


def test_paper_step_is_bit_identical_with_per_tensor_optimisers():
    def plain(step, batch, w, n):
        if not getattr(step, "_plain", False):
            step.opt1, step.opt2 = _per_tensor(step.opt1), _per_tensor(step.opt2)
            step.sched1 = torch.optim.lr_scheduler.LambdaLR(step.opt1, step.sched1.lr_lambdas[0])
            step.sched2 = torch.optim.lr_scheduler.LambdaLR(step.opt2, step.sched2.lr_lambdas[0])
            step._plain = True
        step.validate.validated = False  # the reference validates every step
        return PaperStep.step(step, batch, w, n)

    _fast_and_plain(_tiny("blob", "A"), FitConfig(max_steps=10, lr=3e-2, warmup_ratio=0.2, objective="paper"), plain)


@pytest.mark.parametrize("wrap", [True, False])
def test_point_estimate_kl_is_read_off_the_model_trace_bit_for_bit(wrap):
    from blob_pyro.poutine import float64_latents

    model = tiny_model("both")
    guide = make_guide("auto_delta", model)
    batch = model.head.collate(tiny_examples(2))
    with float64_latents() if wrap else contextlib.nullcontext():
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    model_trace.compute_log_prob()
    fast = kl_terms(model_trace.nodes, guide_trace.nodes)
    plain = sum(kl_divergence(guide_trace.nodes[s.name]["fn"], model_trace.nodes[s.name]["fn"]).sum()
                for s in model.sites)
    assert fast.dtype == (torch.float64 if wrap else torch.float32) and fast.item() == plain.item()


def _loss_and_grads(elbo, model, guide, batch, scale, monkeypatch):
    """(loss, gradients, how many times the ELBO read a tensor's value with .item())"""
    params = list(register_parameters(model, guide).values())
    for p in params:
        p.grad = None
    pyro.set_rng_seed(3)
    reads, item = [], torch.Tensor.item
    with _context(model, scale=scale, autocast_dtype=None, device_type="cpu"), monkeypatch.context() as m:
        m.setattr(torch.Tensor, "item", lambda self: reads.append(1) or item(self))
        loss = elbo.loss_and_grads(model, guide, batch)
    return loss, [None if p.grad is None else p.grad.clone() for p in params], len(reads)


@pytest.mark.parametrize("guide_name", ["blob", "lowrank", "auto_normal", "auto_delta"])
@pytest.mark.parametrize("particles", [1, 3])
def test_kept_trace_elbo_returns_pyros_value_without_a_read_per_site(guide_name, particles, monkeypatch):
    pyro.clear_param_store()
    torch.manual_seed(0)
    model = tiny_model("both")
    guide = make_guide(guide_name, model)
    batch = model.head.collate(tiny_examples(4))
    expected, expected_grads, pyro_reads = _loss_and_grads(Trace_ELBO(num_particles=particles), model, guide, batch,
                                                           0.37, monkeypatch)
    loss, grads, reads = _loss_and_grads(KeepTrace_ELBO(num_particles=particles), model, guide, batch, 0.37,
                                         monkeypatch)
    assert pyro_reads >= 2 * particles and reads == 0  # Pyro reads every site; the kept-trace ELBO none
    assert torch.is_tensor(loss) and loss.dtype == torch.float64
    assert loss.item() == expected  # exactly: the same float64 sum in the same order
    assert all((g is None and e is None) or torch.equal(g, e) for g, e in zip(grads, expected_grads))


@pytest.mark.parametrize("factor, prior, guide_name, fused", [
    ("B", "normal", "blob", 2), ("both", "normal", "blob", 4), ("both", "laplace", "blob", 0),
    ("both", "normal", "lowrank", 0), ("B", "normal", "auto_normal", 0)])
@pytest.mark.parametrize("particles", [1, 2])
def test_unvalidated_steps_compute_normal_densities_in_one_pass_to_the_same_numbers(factor, prior, guide_name, fused,
                                                                                    particles, monkeypatch):
    """Without validation (every step after a run's first) the Normal latent sites' float64 densities are computed
    for all sites at once: Pyro's loss, every gradient and every site's recorded density, bit for bit."""
    import blob_pyro.infer as infer

    pyro.clear_param_store()
    torch.manual_seed(0)
    model = tiny_model(factor, prior=make_prior(prior, 0.3))
    guide = make_guide(guide_name, model)
    batch = model.head.collate(tiny_examples(4))
    filled, fill = [], infer.fill_normal_densities
    monkeypatch.setattr(infer, "fill_normal_densities", lambda m, g, kernel=None: filled.append(fill(m, g, kernel)) or filled[-1])
    with pyro.validation_enabled(False):
        expected, expected_grads, _ = _loss_and_grads(Trace_ELBO(num_particles=particles), model, guide, batch, 0.37,
                                                      monkeypatch)
        elbo = KeepTrace_ELBO(num_particles=particles)
        loss, grads, _ = _loss_and_grads(elbo, model, guide, batch, 0.37, monkeypatch)
    assert filled == [fused] * particles
    assert loss.item() == expected
    assert all((g is None and e is None) or torch.equal(g, e) for g, e in zip(grads, expected_grads))
    model_trace, guide_trace = elbo.traces
    for site in model.sites:  # the recorded densities are what Pyro's own per-site computation records
        for trace in (model_trace, guide_trace):
            node = trace.nodes[site.name]
            assert node["log_prob"].dtype == torch.float64 and node["log_prob"].shape == ()
            assert torch.equal(node["unscaled_log_prob"], node["fn"].log_prob(node["value"]))
            assert torch.equal(node["log_prob"], node["unscaled_log_prob"] * node["scale"])
        parts = guide_trace.nodes[site.name]["score_parts"]
        assert torch.equal(parts.entropy_term, parts.log_prob) and parts.score_function == 0
    # the one pass also recorded each filled site's closed-form KL: what the logged KL reads, the numbers computed anew
    recorded = {n: s["closed_form_kl"] for n, s in guide_trace.nodes.items() if "closed_form_kl" in s}
    assert len(recorded) == fused
    for node in guide_trace.nodes.values():
        node.pop("closed_form_kl", None)
    with torch.no_grad():
        fresh = normal_site_kls(model_trace.nodes, guide_trace.nodes)
    assert recorded.keys() <= fresh.keys()
    assert all(torch.equal(kl, fresh[n]) and not kl.requires_grad for n, kl in recorded.items())


@pytest.mark.parametrize("guide_name, prior", [("blob", "normal"), ("blob", "laplace"), ("lowrank", "normal")])
def test_logged_kl_of_normal_sites_in_one_pass_is_the_per_site_kl(guide_name, prior, monkeypatch):
    import blob_pyro.infer as infer

    pyro.clear_param_store()
    model = tiny_model("both", prior=make_prior(prior, 0.3))
    guide = make_guide(guide_name, model)
    batch = model.head.collate(tiny_examples(2))
    with float64_latents():
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    kls = normal_site_kls(model_trace.nodes, guide_trace.nodes)
    assert len(kls) == (4 if (guide_name, prior) == ("blob", "normal") else 0)
    for name, kl in kls.items():
        assert kl.dtype == torch.float64
        assert torch.equal(kl, kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]))
    with torch.no_grad():
        fused = kl_terms(model_trace.nodes, guide_trace.nodes)
        monkeypatch.setattr(infer, "normal_site_kls", lambda m, g: {})
        assert torch.equal(fused, kl_terms(model_trace.nodes, guide_trace.nodes))


@pytest.mark.parametrize("guide_name, prior, fused", [("auto_delta", "normal", 4), ("auto_normal", "normal", 4),
                                                      ("auto_delta", "laplace", 0)])
@pytest.mark.parametrize("scale", [0.0, 0.37])
def test_logged_kl_of_point_estimates_in_one_pass_is_the_per_site_kl(guide_name, prior, fused, scale, monkeypatch):
    """mle's logged KL (AutoDelta under a zero KL weight, whose model trace holds no prior density): -log p(v) of
    all sites in one pass, bit for bit what ``kl_divergence`` gives per site; with a weight the model trace's own
    densities are read off instead (nothing computed again)."""
    import blob_pyro.infer as infer
    from blob_pyro.poutine.float64 import point_estimate_kls

    pyro.clear_param_store()
    torch.manual_seed(0)
    model = tiny_model("both", prior=make_prior(prior, 0.3))
    guide = make_guide(guide_name, model)
    batch = model.head.collate(tiny_examples(2))
    with _context(model, scale=scale, autocast_dtype=None, device_type="cpu"), pyro.validation_enabled(False):
        guide_trace = poutine.trace(guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch)
    model_trace.compute_log_prob()
    with torch.no_grad():
        kls = point_estimate_kls(model_trace.nodes, guide_trace.nodes)
        assert len(kls) == (fused if scale == 0 else 0)
        for name, kl in kls.items():
            assert kl.dtype == torch.float64 and kl.shape == ()
            assert torch.equal(kl, kl_divergence(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"]).sum())
        fast = kl_terms(model_trace.nodes, guide_trace.nodes)
        monkeypatch.setattr(infer, "point_estimate_kls", lambda m, g: {})
        assert torch.equal(fast, kl_terms(model_trace.nodes, guide_trace.nodes))


def test_kept_trace_elbo_takes_pyros_value_for_a_score_function_site():
    pyro.clear_param_store()

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        p = pyro.param("p", torch.tensor(0.6), constraint=dist.constraints.unit_interval)
        pyro.sample("z", dist.Bernoulli(p))

    with float64_latents():
        pyro.set_rng_seed(1)
        expected = Trace_ELBO().loss_and_grads(model, guide)
        pyro.set_rng_seed(1)
        loss = KeepTrace_ELBO().loss_and_grads(model, guide)
    assert isinstance(loss, float) and loss == expected


def test_mle_step_logs_the_map_penalty_without_computing_it_in_the_elbo():
    """At weight 0 the ELBO computes no latent density (blob_pyro.poutine.scale); the log still has -log p(theta)."""
    from blob_pyro.poutine.float64 import as_float64

    pyro.clear_param_store()
    model = tiny_model("B")
    guide = make_guide("auto_delta", model)
    batch = model.head.collate(tiny_examples(4))
    step = make_step(model, guide, FitConfig(max_steps=10, lr=1e-2, warmup_ratio=0.0))
    step.step(batch, 0.0, 16)  # moves B away from 0
    priors = model.prior_distributions()
    with torch.no_grad():
        point = guide(batch)
        by_hand = -sum(as_float64(priors[s.name]).log_prob(point[s.name].double()).sum().item() for s in model.sites)
    record = step.step(batch, 0.0, 16)
    assert record["kl"] == pytest.approx(by_hand, rel=1e-12)
