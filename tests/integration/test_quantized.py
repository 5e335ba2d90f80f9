"""8-bit and 4-bit backbones (bitsandbytes, the ``quant`` extra) on the CPU: what is quantised, what stays in
full precision, that the Bayesian LoRA factors reach the quantised layers, and save -> load.

The paper's GPU protocol loads Llama-2-7B in 8-bit; these tests run the same code path on tiny models.
(load_backbone's one-line error without bitsandbytes: tests/unit/test_backbone.py.)
"""

import json
import logging

import pytest
import torch
from helpers import hide_bitsandbytes, toy_examples

from blob_pyro.backbone import QUANT_SKIP_MODULES, load_backbone
from blob_pyro.cli import main
from blob_pyro.config import RunConfig
from blob_pyro.infer import fit
from blob_pyro.predictive import predict
from blob_pyro.training import build, load_run, save_run


def _bnb():
    return pytest.importorskip("bitsandbytes", reason="8/4-bit backbones need bitsandbytes: pip install -e '.[quant]'")


def test_quantised_training_without_bitsandbytes_is_one_clear_error(monkeypatch, capsys, tmp_path, data_dir):
    hide_bitsandbytes(monkeypatch)
    out = tmp_path / "run"
    code = main(["train", "--model", "minilm", "--dataset", "openbookqa", "--data-dir", str(data_dir),
                 "--load-in-8bit", "true", "--device", "cpu", "--output-dir", str(out), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "needs bitsandbytes" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_encoder_backbone_quantises_the_body_and_keeps_the_head(bits):
    bnb = _bnb()
    model, _, kind = load_backbone("minilm", num_classes=4, load_in_8bit=bits == "8bit",
                                   load_in_4bit=bits == "4bit", device="cpu")
    quantised = bnb.nn.Linear8bitLt if bits == "8bit" else bnb.nn.Linear4bit
    assert kind == "multiple_choice"
    layer = model.bert.encoder.layer[0].attention.self
    assert isinstance(layer.query, quantised) and isinstance(layer.value, quantised)
    # the classifier is trained (PEFT's modules_to_save): a plain float Linear, not a quantised one
    assert type(model.classifier) is torch.nn.Linear and model.classifier.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert set(QUANT_SKIP_MODULES) >= {"classifier", "lm_head"}


def test_causal_backbone_keeps_lm_head_in_full_precision(tiny_llama_dir):
    bnb = _bnb()
    model, _, kind = load_backbone(str(tiny_llama_dir), num_classes=2, load_in_8bit=True, device="cpu")
    assert kind == "causal_lm"
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("backbone, bits, factor, extra", [
    ("llama", "8bit", "A", {}),
    ("llama", "8bit", "B", {"gradient_checkpointing": True}),
    ("minilm", "4bit", "B", {}),
])
def test_quantised_run_samples_its_lora_factors_and_round_trips(tiny_llama_dir, tmp_path, backbone, bits, factor,
                                                               extra):
    """BLoB on a quantised base (the tiny Llama with the paper's q/v/lm_head targets; MiniLM's query/value in
    4 bits): the LoRA layers are PEFT's bitsandbytes ones, training moves the adapter, sampled factors change the
    predictions, and the saved run predicts what the trained one did."""
    _bnb()
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bit

    if backbone == "llama":
        model, dataset, targets, quantised_layers, num_classes = str(tiny_llama_dir), "winogrande_s", \
            ["q_proj", "v_proj", "lm_head"], 4, 2  # q, v in 2 layers; lm_head stays full precision
    else:
        model, dataset, targets, quantised_layers, num_classes = "minilm", "openbookqa", None, 12, 4  # 6 layers
    cfg = RunConfig.from_dict(dict(model=model, dataset=dataset, load_in_8bit=bits == "8bit",
                                   load_in_4bit=bits == "4bit", device="cpu", target_modules=targets,
                                   bayesian_factor=factor, max_length=48, max_steps=20, batch_size=8, lr=1e-2,
                                   kl_schedule="standard", num_samples=3, **extra))
    run = build(cfg, with_data=False)
    lora_type = LoraLinear8bit if bits == "8bit" else LoraLinear4bit
    assert sum(isinstance(m, lora_type) for m in run.model.network.modules()) == quantised_layers
    examples = toy_examples(16, num_classes, seed=1)
    run.model.num_data = len(examples)
    # no prediction before training: on AVX512-BF16 CPUs bitsandbytes 0.50's 4-bit layers repack their weights at
    # a forward in eval mode without gradients, and a training forward after that fails inside bitsandbytes
    before = {k: v.detach().clone() for k, v in run.guide.median().items()}
    log = fit(run.model, run.guide, examples, run.config.fit, progress=False)
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in log])))
    mean = predict(run.model, run.guide, examples, num_samples=0, progress=False).probs
    torch.manual_seed(3)
    sampled = predict(run.model, run.guide, examples, num_samples=3, progress=False).probs
    after = run.guide.median()
    assert set(after) == set(before) and not all(torch.equal(after[k], before[k]) for k in before)  # it trained
    assert not torch.allclose(sampled, mean, atol=1e-4)  # the draws reach the quantised layers
    save_run(tmp_path / "run", run)
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": run.config.to_dict()}))
    again = load_run(tmp_path / "run")  # the model and posterior only: the examples above are the data
    assert (again.config.runtime.load_in_8bit, again.config.runtime.load_in_4bit) == (bits == "8bit", bits == "4bit")
    assert torch.allclose(predict(again.model, again.guide, examples, num_samples=0, progress=False).probs, mean,
                          atol=1e-6)


def test_bitsandbytes_per_forward_cast_warning_is_logged_once(caplog):
    """bitsandbytes logs its fp16-cast notice on every 8-bit forward; blob_pyro lets each distinct one through once."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for dtype in ("test-dtype-1", "test-dtype-1", "test-dtype-2", "test-dtype-1"):
            log.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", dtype)
    assert [r.getMessage().split()[6] for r in caplog.records] == ["test-dtype-1", "test-dtype-2"]
