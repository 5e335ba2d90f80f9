"""blob_pyro.tfb and method=tfb on the tiny network: the re-parameterisation keeps the trained weights; the guide is
the low-rank isotropic family (std x singular value = sigma); the searched sigma keeps the anchor NLL change within
the threshold and the next tested sigma above it breaks it; draws differ from the mean; tfb.json and the saved guide
round-trip the predictions; bad settings are one line."""

import json

import pyro
import pytest
import torch

from blob_pyro.config import RunConfig
from blob_pyro.data import TaskSplit
from blob_pyro.errors import ConfigError, RunError, TrainingError
from blob_pyro.guides import BlobGuide
from blob_pyro.infer import fit
from blob_pyro.predictive import predict
from blob_pyro.tfb import TFB_FILE, anchor_nll, anchor_split, read_record, search_sigma, tfb_guide
from blob_pyro.training import post_fit, save_run

from .tiny import TinyNet, tiny_examples, tiny_run

SETTINGS = {"method": "tfb", "lr": 5e-2, "max_steps": 30, "batch_size": 4, "seed": 1, "eval_batch_size": 8,
            "num_samples": 4, "tfb_anchor_size": 12, "tfb_sigma_max": 0.5, "tfb_threshold": 0.02,
            "tfb_search_steps": 8}


def _tfb_run(**overrides):
    """method=tfb on TinyNet as training.build + _train_and_save do it (train, anchor, post_fit)."""
    cfg = RunConfig.from_dict({**SETTINGS, **overrides}).resolve()
    train = tiny_examples(32, seed=5)
    run = tiny_run(cfg, num_data=len(train))
    run.train = train
    run.anchor = anchor_split(train, cfg.tfb_anchor_size, cfg.fit.seed)
    fit(run.model, run.guide, run.train, cfg.fit, progress=False)
    point = predict(run.model, run.guide, run.anchor, num_samples=0, progress=False).probs
    trained_a = run.guide.median()  # factor A lives in the point-estimate guide, B in PEFT
    delta = {s.name: s.layer.lora_B["default"].weight.detach() @ trained_a[s.name] for s in run.model.sites}
    post_fit(run)
    return run, point, delta


def test_method_tfb_resolves_to_mle_on_factor_a_and_refuses_bad_settings_in_one_line():
    cfg = RunConfig.from_dict({"method": "tfb"}).resolve()
    assert (cfg.bayes.guide, cfg.bayes.bayesian_factor, cfg.fit.kl_schedule, cfg.fit.kl_multiplier) == \
        ("auto_delta", "A", "fixed", 0.0)
    assert (cfg.tfb_threshold, cfg.tfb_search_steps, cfg.tfb_sigma_max, cfg.tfb_anchor_size,
            cfg.predict.num_samples) == (0.01, 10, 0.2, None, 10)
    bad = [({"tfb_threshold": 0.0}, "tfb_threshold > 0; got tfb_threshold=0.0"),
           ({"tfb_threshold": -0.5}, "got tfb_threshold=-0.5"),
           ({"tfb_anchor_size": 0}, "non-empty anchor set"),
           ({"tfb_sigma_max": 0.0}, "tfb_sigma_max must be a finite number > 0"),
           ({"num_samples": 0}, "num_samples=0"),
           ({"guide": "blob"}, "method=tfb implies guide=auto_delta; got guide=blob"),
           ({"bayesian_factor": "B"}, "method=tfb implies bayesian_factor=A")]
    for settings, message in bad:
        with pytest.raises(ConfigError) as err:
            RunConfig.from_dict({"method": "tfb", **settings}).resolve()
        assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="tfb_threshold is a setting of method=tfb; got method=mle"):
        RunConfig.from_dict({"method": "mle", "tfb_threshold": 0.1}).resolve()


def test_the_anchor_set_is_training_examples_chosen_by_the_seed():
    train = tiny_examples(20)
    anchor = anchor_split(train, 6, seed=3)
    assert len(anchor) == 6 and {e.index for e in anchor} <= {e.index for e in train}
    assert [e.index for e in anchor] == sorted(e.index for e in anchor)  # the split's order
    assert [e.index for e in anchor_split(train, 6, seed=3)] == [e.index for e in anchor]
    assert [e.index for e in anchor_split(train, 6, seed=4)] != [e.index for e in anchor]
    split = TaskSplit("tiny", "train", tuple(train), 2, ("A", "B"), "memory")
    assert anchor_split(split, 6, seed=3).split == "train"
    with pytest.raises(ConfigError, match="non-empty anchor set"):
        anchor_split(train, 0, seed=0)
    with pytest.raises(ConfigError, match="larger than the training split"):
        anchor_split(train, 21, seed=0)


def test_search_sigma_finds_the_largest_passing_scale_of_a_known_curve():
    sigma, trace = search_sigma(lambda s: s**2, threshold=0.01, sigma_max=1.0, steps=12)
    assert sigma <= 0.1 < sigma + 1.0 / 2**12  # sqrt(threshold) = 0.1, to the bisection's resolution
    assert trace[0] == {"sigma": 1.0, "change": 1.0, "ok": False} and len(trace) == 13
    failed = min(t["sigma"] for t in trace if not t["ok"])
    assert failed - sigma == pytest.approx(1.0 / 2**12)  # the bracket is tight
    # a negative change counts by its size; an upper end that passes is returned without bisection
    assert search_sigma(lambda s: -(s**2), threshold=0.01, sigma_max=1.0, steps=12)[0] == sigma
    assert search_sigma(lambda s: s**2, threshold=0.01, sigma_max=0.05, steps=12) == \
        (0.05, [{"sigma": 0.05, "change": pytest.approx(0.0025), "ok": True}])
    with pytest.raises(TrainingError, match="every sigma down to"):
        search_sigma(lambda s: 1.0, threshold=0.01, sigma_max=1.0, steps=5)


def test_the_rotation_keeps_the_trained_weights_and_the_guide_is_low_rank_isotropic():
    run, point, delta = _tfb_run()
    guide, record = run.guide, run.tfb
    assert isinstance(guide, BlobGuide) and guide.site_names == [s.name for s in run.model.sites]
    for site in run.model.sites:  # B'A' = BA: the point estimate is unchanged
        after = site.layer.lora_B["default"].weight @ site.peft_weight()
        assert torch.allclose(after, delta[site.name], atol=1e-5)
        b = site.layer.lora_B["default"].weight  # B' = U diag(d): orthogonal columns of norms d
        d = torch.tensor(record["singular_values"][site.name])
        assert torch.allclose(b.T @ b, torch.diag(d**2), atol=1e-5)
        # std of A' row i = sigma / d_i: diag(d) ΔA' is i.i.d. N(0, sigma²), the weight noise s·U·diag(d)·ΔA'
        assert torch.allclose(guide.std()[site.name] * (d.unsqueeze(-1) + 1e-6),
                              torch.full(site.shape, record["sigma"]), rtol=1e-5)
        assert torch.equal(guide.median()[site.name], site.peft_weight())
    at_mean = predict(run.model, guide, run.anchor, num_samples=0, progress=False).probs
    assert torch.allclose(at_mean, point, atol=1e-5)


def test_the_searched_sigma_keeps_the_anchor_nll_within_the_threshold_and_is_the_largest_that_does():
    run, point, _ = _tfb_run()
    record, cfg = run.tfb, run.config
    labels = point.argmax(-1)
    assert record["indices"] == [e.index for e in run.anchor] and record["num_examples"] == 12
    assert 0 < record["sigma"] < cfg.tfb_sigma_max  # an interior answer: the search had something to find

    def change(sigma):
        from blob_pyro.tfb import set_sigma

        d = {k: torch.tensor(v) for k, v in record["singular_values"].items()}
        set_sigma(run.guide, d, sigma)
        try:
            return anchor_nll(run.model, run.guide, run.anchor, labels, num_samples=cfg.predict.num_samples,
                              seed=cfg.fit.seed, batch_size=8) - record["nll_at_0"]
        finally:
            set_sigma(run.guide, d, record["sigma"])

    nll0 = anchor_nll(run.model, run.guide, run.anchor, labels, num_samples=0, seed=0)
    assert nll0 == pytest.approx(record["nll_at_0"], rel=1e-9)
    at_sigma = change(record["sigma"])
    assert abs(at_sigma) <= cfg.tfb_threshold and record["nll"] == pytest.approx(record["nll_at_0"] + at_sigma)
    # the largest: the next tested sigma (one bisection step above) breaks the constraint
    resolution = cfg.tfb_sigma_max / 2**cfg.tfb_search_steps
    assert record["sigma_failed"] - record["sigma"] == pytest.approx(resolution)
    assert abs(change(record["sigma_failed"])) > cfg.tfb_threshold
    assert all(abs(t["change"]) <= cfg.tfb_threshold for t in record["trace"] if t["ok"])


def test_draws_differ_from_the_mean_and_the_run_round_trips_through_its_files(tmp_path):
    from peft import PeftModel

    from blob_pyro.lora import attach_variants
    from blob_pyro.model import BlobModel

    run, _, _ = _tfb_run()
    data = tiny_examples(12, seed=9)
    mean = predict(run.model, run.guide, data, num_samples=0, progress=False).probs
    torch.manual_seed(3)
    sampled = predict(run.model, run.guide, data, num_samples=4, progress=False).probs
    assert not torch.allclose(sampled, mean, atol=1e-4)
    save_run(tmp_path, run)
    record = json.loads((tmp_path / TFB_FILE).read_text())
    assert record == run.tfb and read_record(tmp_path) == record

    # what load_run does: the adapter (A' mean, B') into a fresh network, then the TFB guide from posterior.safetensors
    from safetensors.torch import load_file

    torch.manual_seed(SETTINGS["seed"])  # the frozen base as tiny_run made it (seeded before TinyNet)
    pyro.clear_param_store()
    network = PeftModel.from_pretrained(TinyNet(), str(tmp_path / "adapter"), is_trainable=True)
    attach_variants(network)
    model = BlobModel(network, run.model.head, bayesian_factor="A", num_data=32)
    guide = tfb_guide(model, {s.name: torch.ones(s.shape[0]) for s in model.sites}, record["sigma"])
    with torch.no_grad():
        guide()
    pyro.clear_param_store()
    guide.load_state_dict(load_file(str(tmp_path / "posterior.safetensors")))
    assert torch.allclose(predict(model, guide, data, num_samples=0, progress=False).probs, mean, atol=1e-6)
    torch.manual_seed(3)
    assert torch.allclose(predict(model, guide, data, num_samples=4, progress=False).probs, sampled, atol=1e-6)


def test_a_missing_or_broken_tfb_json_is_one_line(tmp_path):
    with pytest.raises(RunError, match="is missing"):
        read_record(tmp_path)
    (tmp_path / TFB_FILE).write_text('{"sigma": 0}')
    with pytest.raises(RunError, match="finite number > 0"):
        read_record(tmp_path)
    (tmp_path / TFB_FILE).write_text("[")
    with pytest.raises(RunError, match="does not hold a TFB record"):
        read_record(tmp_path)


def test_post_fit_without_an_anchor_set_is_refused():
    run = tiny_run(RunConfig.from_dict({"method": "tfb"}))
    with pytest.raises(ConfigError, match="anchor set"):
        post_fit(run)
