"""Small offline models and examples for tests (no weights downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from blob_pyro.data import Example


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from blob_pyro.backbone import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm"))


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer randomly initialised Llama with the MiniLM tokenizer (letters are single tokens)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=101, eos_token_id=102, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    minilm_tokenizer().save_pretrained(str(path))
    return path


def toy_examples(n: int = 16, num_classes: int = 2, seed: int = 0) -> list[Example]:
    """Examples whose label is readable from the text, so a model can learn them."""
    g = torch.Generator().manual_seed(seed)
    words = ["red", "blue", "green", "black", "white"][:num_classes]
    out = []
    for i in range(n):
        label = int(torch.randint(num_classes, (1,), generator=g))
        q = f"the colour is {words[label]}. which colour?"
        choices = tuple(words)
        prompt = q + "\nChoices:\n" + "\n".join(f"{'ABCDE'[k]}) {w}" for k, w in enumerate(words)) + "\nAnswer:"
        out.append(Example(index=i, prompt=prompt, choices=choices,
                           mc_texts=tuple((q, w) for w in words), label=label))
    return out
