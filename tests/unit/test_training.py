"""blob_pyro.training on the tiny network: seeds, versions, the run folder's files (save -> load round trip of the
posterior and of the vanilla PEFT adapter), evaluate, the train log, read_run_config.

(build/train_run/load_run on MiniLM and the tiny Llama: tests/integration/test_training.py.)"""

import json
import random

import numpy as np
import pyro
import pytest
import torch
from safetensors.torch import load_file

from blob_pyro.config import RunConfig
from blob_pyro.data import TaskSplit
from blob_pyro.errors import RunError
from blob_pyro.predictive import predict
from blob_pyro.training import (
    _truncate_log,
    evaluate,
    guide_state,
    pick_device,
    read_run_config,
    run_versions,
    save_run,
    set_seed,
)

from .tiny import TinyNet, tiny_examples, tiny_run


def test_set_seed_fixes_every_rng():
    def draws():
        return torch.rand(2).tolist(), random.random(), float(np.random.rand())

    set_seed(5)
    a = draws()
    set_seed(5)
    assert draws() == a
    set_seed(6)
    assert draws() != a


def test_runtime_helpers():
    assert RunConfig.from_dict({"bf16": True}).runtime.autocast_dtype() == torch.bfloat16
    assert RunConfig().runtime.autocast_dtype() is None
    assert pick_device("cpu") == torch.device("cpu")


def test_run_versions_record_what_reproducibility_depends_on():
    versions = run_versions()
    assert {"python", "torch", "pyro", "transformers", "peft", "blob_pyro", "git_commit", "machine",
            "cpu_capability", "cuda_device"} <= set(versions)
    assert versions["torch"] == torch.__version__ and versions["pyro"] == pyro.__version__
    # bit-for-bit reproducibility holds per CPU kernel level: the record says which one ran
    assert versions["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert versions["git_commit"] is None or len(versions["git_commit"]) == 40
    json.dumps(versions)


def _trained_tiny(guide="blob", factor="B"):
    cfg = RunConfig.from_dict({"guide": guide, "bayesian_factor": factor, "eps": 0.3, "num_samples": 3,
                               "eval_batch_size": 4})
    run = tiny_run(cfg, num_data=16)
    with torch.no_grad():  # a posterior away from the init
        run.guide()
        for p in run.guide.parameters():
            p.add_(0.1 * torch.randn_like(p))
    examples = tiny_examples(10, seed=2)
    run.eval = TaskSplit("tiny", "dev", tuple(examples), 2, ("A", "B"), "memory")
    return run


@pytest.mark.parametrize("guide, factor", [("blob", "B"), ("lowrank", "both"), ("auto_normal", "A")])
def test_save_run_files_round_trip_the_posterior_and_the_adapter(tmp_path, guide, factor):
    from peft import PeftModel

    from blob_pyro.guides import make_guide
    from blob_pyro.lora import attach_variants
    from blob_pyro.model import BlobModel

    run = _trained_tiny(guide, factor)
    mean = predict(run.model, run.guide, run.eval, num_samples=0, progress=False).probs
    torch.manual_seed(3)
    sampled = predict(run.model, run.guide, run.eval, num_samples=3, progress=False).probs
    save_run(tmp_path / "run", run, metrics={"accuracy": 0.5})
    out = tmp_path / "run"
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "metrics.json", "posterior.safetensors"]
    assert json.loads((out / "metrics.json").read_text()) == {"accuracy": 0.5}
    post = load_file(str(out / "posterior.safetensors"))
    assert post.keys() == guide_state(run.guide).keys()

    # load: PEFT's adapter (the posterior mean, the deterministic factor and the classifier) + the guide's state
    def base():  # the frozen base: the same weights, as from_pretrained gives (tiny_run seeds 0 before TinyNet)
        torch.manual_seed(0)
        return TinyNet()

    pyro.clear_param_store()
    network = PeftModel.from_pretrained(base(), str(out / "adapter"), is_trainable=True)
    attach_variants(network)
    model = BlobModel(network, run.model.head, bayesian_factor=factor, prior=run.model.prior, num_data=16)
    torch.manual_seed(99)  # a fresh guide of the same family, initialised differently ...
    guide_ = make_guide(run.config.bayes.guide, model, eps=0.3, rank=run.config.bayes.guide_rank)
    with torch.no_grad():
        guide_()
    pyro.clear_param_store()
    guide_.load_state_dict(post)  # ... filled from posterior.safetensors
    assert torch.allclose(predict(model, guide_, run.eval, num_samples=0, progress=False).probs, mean, atol=1e-6)
    torch.manual_seed(3)
    assert torch.allclose(predict(model, guide_, run.eval, num_samples=3, progress=False).probs, sampled, atol=1e-6)
    # the adapter alone (vanilla PEFT, no blob_pyro) is the posterior-mean network
    vanilla = PeftModel.from_pretrained(base(), str(out / "adapter")).eval()
    with torch.no_grad():
        logits = vanilla(run.model.head.collate(list(run.eval.examples))["x"])
    assert torch.allclose(torch.softmax(logits, -1), mean, atol=1e-5)
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(".lora_A." in k or ".lora_B." in k or "classifier" in k for k in adapter), sorted(adapter)


def test_evaluate_predicts_with_the_runs_settings(tmp_path):
    run = _trained_tiny()
    metrics = evaluate(run, progress=False)
    assert set(metrics) == {"accuracy", "ece", "nll", "brier", "dataset", "split", "num_samples", "num_examples",
                            "ece_bins", "confidence", "entropy", "expected_entropy", "mutual_information", "aurc",
                            "accuracy_at_80"}
    assert (metrics["dataset"], metrics["split"], metrics["num_samples"], metrics["num_examples"],
            metrics["ece_bins"]) == ("tiny", "dev", 3, 10, 15)
    assert metrics["mutual_information"] > 0
    mean = evaluate(run, num_samples=0, progress=False)
    assert mean["num_samples"] == 0 and evaluate(run, num_samples=0, progress=False) == mean
    assert mean["mutual_information"] == 0.0  # one draw: no epistemic part


def test_evaluate_scores_the_draws_of_its_one_prediction(monkeypatch):
    import blob_pyro.predictive as predictive
    from blob_pyro.metrics import compute_metrics
    from blob_pyro.uncertainty import uncertainty_metrics

    run = _trained_tiny()
    run.config.predict.ece_bins = 4
    seen = []

    def spy(*args, **kwargs):
        seen.append(predictive.predict.__wrapped_predict__(*args, **kwargs))
        return seen[-1]

    spy.__wrapped_predict__ = predictive.predict
    monkeypatch.setattr(predictive, "predict", spy)
    metrics = evaluate(run, progress=False)
    assert len(seen) == 1 and seen[0].logits.shape == (3, 10, 2)  # no extra forward pass for the new metrics
    out = seen[0]
    assert {k: metrics[k] for k in ("accuracy", "ece", "nll", "brier")} == compute_metrics(out.probs, out.labels,
                                                                                            n_bins=4)
    assert metrics["ece_bins"] == 4
    assert {k: metrics[k] for k in uncertainty_metrics(out.probs, out.labels)} == \
        uncertainty_metrics(torch.softmax(out.logits, -1), out.labels)


def test_evaluate_with_a_shifted_split_reports_the_ood_aurocs(monkeypatch):
    import blob_pyro.predictive as predictive
    from blob_pyro.uncertainty import ood_auroc

    run = _trained_tiny()
    shifted = TaskSplit("tiny", "shifted", tuple(tiny_examples(7, seed=9)), 2, ("A", "B"), "memory")
    seen, real = [], predictive.predict
    monkeypatch.setattr(predictive, "predict", lambda *a, **kw: seen.append(real(*a, **kw)) or seen[-1])
    metrics = evaluate(run, progress=False, ood_data=shifted)
    assert len(seen) == 2  # one prediction per split
    dev, out = (torch.softmax(p.logits, -1) for p in seen)
    want = ood_auroc(dev, out)
    assert metrics["ood"] == {"dataset": "tiny", "split": "shifted", "num_examples": 7,
                              **{f"auroc_{k}": v for k, v in want.items()}}
    assert metrics["num_examples"] == 10 and "ood" not in evaluate(run, progress=False)


def test_resume_drops_log_lines_after_the_checkpoint_and_half_written_ones(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    _truncate_log(log, 2)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
    log.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    _truncate_log(log, 5)
    assert log.read_text() == '{"step": 1, "loss": 1.0}\n'
    _truncate_log(log, 0)
    assert log.read_text() == ""
    _truncate_log(tmp_path / "absent.jsonl", 3)
    assert (tmp_path / "absent.jsonl").read_text() == ""


def test_read_run_config_resolves_and_refuses_what_it_cannot_use(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    cfg = RunConfig.from_dict({"method": "mle", "lr": 0.5})
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "versions": {}}))
    assert read_run_config(run) == cfg.resolve()
    (run / "config.json").write_text(json.dumps({"method": "mle", "lr": 0.5}))  # flat, without "config"
    assert read_run_config(run) == cfg.resolve()
    (run / "config.json").write_text(json.dumps({"config": {"method": "mle", "guide": "lowrank"}}))
    with pytest.raises(RunError) as err:
        read_run_config(run)
    assert str(run / "config.json") in str(err.value) and "method=mle" in str(err.value)
    (run / "config.json").write_text(json.dumps({"config": {"lr": "fast"}}))
    with pytest.raises(RunError, match="lr"):
        read_run_config(run)


def test_a_post_hoc_run_may_differ_from_its_source_in_what_neither_reads(tmp_path):
    """check_from_run compares what the source trained, but not eps of its point estimate (a changed default)."""
    from blob_pyro.errors import ConfigError
    from blob_pyro.training import check_from_run

    source = tmp_path / "mle"
    (source / "adapter").mkdir(parents=True)
    (source / "adapter" / "adapter_config.json").write_text("{}")
    (source / "metrics.json").write_text("{}")

    def write(**settings):
        stored = RunConfig.from_dict({"method": "mle", "max_steps": 3, **settings}).resolve()
        (source / "config.json").write_text(json.dumps({"config": stored.to_dict(), "versions": {}}))

    cfg = RunConfig.from_dict({"method": "laplace", "from_run": str(source), "max_steps": 3}).resolve()
    write(eps=0.05, std_param="softplus")
    check_from_run(cfg)  # neither the mle source nor laplace's point estimate reads them
    write(eps=0.05, lr=0.5)
    with pytest.raises(ConfigError) as err:
        check_from_run(cfg)
    assert "lr=0.5 there" in str(err.value) and "eps" not in str(err.value) and "\n" not in str(err.value)
