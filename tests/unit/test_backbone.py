"""blob_pyro.backbone without downloading a model: aliases and paths, default targets, configuration errors, and
gradient checkpointing (which replays the forward's LoRA draws and Flipout signs) on the tiny network."""

from types import SimpleNamespace

import pytest
import torch
from helpers import checkpointing_gradients, hide_bitsandbytes

from blob_pyro.backbone import (
    _looks_like_path,
    default_targets,
    enable_gradient_checkpointing,
    head_kind_for,
    load_backbone,
    load_config,
    repeated_blocks,
    resolve_model,
)
from blob_pyro.errors import ModelError

from .tiny import TinyNet, tiny_examples, tiny_model


def test_paths_and_hub_ids():
    assert [_looks_like_path(n) for n in ("gpt2", "meta-llama/Llama-2-7b-hf", "./m", "/abs/m", "~/m", "a/b/c")] == \
        [False, False, True, True, True, True]
    assert resolve_model("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


@pytest.mark.parametrize("model_type, targets, kind", [
    ("bert", ["query", "value"], "multiple_choice"), ("roberta", ["query", "value"], "multiple_choice"),
    ("distilbert", ["q_lin", "v_lin"], "multiple_choice"), ("llama", ["q_proj", "v_proj", "lm_head"], "causal_lm"),
    ("mistral", ["q_proj", "v_proj", "lm_head"], "causal_lm"), ("gpt2", ["c_attn", "lm_head"], "causal_lm"),
])
def test_default_targets_and_head_kind(model_type, targets, kind):
    config = SimpleNamespace(model_type=model_type)
    assert default_targets(config) == targets and head_kind_for(config) == kind


def test_a_missing_model_path_is_one_line(tmp_path):
    with pytest.raises(ModelError) as err:
        load_config(str(tmp_path / "no_model"))
    assert str(err.value) == f"model path {tmp_path / 'no_model'} does not exist"


@pytest.fixture
def bert_config_dir(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16).save_pretrained(str(tmp_path))
    return tmp_path


def test_unreadable_model_folder_and_unknown_head(tmp_path, bert_config_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot load model"):
        load_config(str(tmp_path / "empty"))
    assert load_config(str(bert_config_dir)).model_type == "bert"
    with pytest.raises(ModelError, match="unknown head 'regression'"):
        load_backbone(str(bert_config_dir), num_classes=2, head="regression")


def test_quantised_loading_without_bitsandbytes_is_one_clear_error(bert_config_dir, monkeypatch):
    hide_bitsandbytes(monkeypatch)
    with pytest.raises(ModelError) as err:
        load_backbone(str(bert_config_dir), num_classes=4, load_in_8bit=True, device="cpu")
    assert str(err.value) == "8-bit/4-bit loading needs bitsandbytes: pip install 'blob_pyro[quant]'"


def test_repeated_blocks_are_the_longest_uniform_module_list():
    net = TinyNet()
    assert repeated_blocks(net) == list(net.layers)
    assert repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []
    with pytest.raises(ModelError, match="no repeated blocks"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("factor", ["A", "B"])
def test_gradient_checkpointing_replays_draws_and_signs(factor):
    def make_model(ckpt):
        model = tiny_model(factor, seed=0)
        if ckpt:
            assert enable_gradient_checkpointing(model.network) == 2
            assert enable_gradient_checkpointing(model.network) == 2  # idempotent
        return model

    grads, saved = checkpointing_gradients(make_model, tiny_examples(4))
    assert saved[True] < saved[False]  # the blocks' activations were not kept
    for where in ("inside", "outside"):
        plain, ckpt = grads[False, where], grads[True, where]
        assert plain.keys() == ckpt.keys() and any("rho" in k for k in plain)
        for name in plain:
            assert torch.allclose(plain[name], ckpt[name], rtol=1e-5, atol=1e-7), (where, name)


def test_checkpointed_blocks_run_unchanged_without_gradients():
    model = tiny_model("B")
    batch = model.head.collate(tiny_examples(3))
    with torch.no_grad():
        before = model.head.logits(model.network, batch)
        enable_gradient_checkpointing(model.network)
        after = model.head.logits(model.network, batch)
    assert torch.equal(before, after)
