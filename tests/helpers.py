"""Small offline models and examples for tests (no weights downloaded)."""

from __future__ import annotations

import builtins
from pathlib import Path

import pyro
import torch
from pyro import poutine

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


def save_tiny_gguf(path: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """A 2-layer random Llama written as a GGUF file (~120 KB) the way llama.cpp lays one out: Q8_0 matrices
    (so loading it de-quantises), float32 norms, a byte-level BPE vocabulary of 263 tokens whose merges make
    " A" … " E" single tokens; ``<|endoftext|>`` is BOS/EOS, ``<|pad|>`` pads."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    specials = ["<|endoftext|>", "<|pad|>"]
    merges = [f"\u0120 {letter}" for letter in "ABCDE"]
    tokens = specials + sorted(set(bytes_to_unicode().values())) + [m.replace(" ", "") for m in merges]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - 2))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)

    def matrix(name, rows, cols):
        data = (0.1 * rng.standard_normal((rows, cols))).astype(np.float32)
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)

    def norm(name):
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), hidden)
    kv = kv_heads * hidden // heads
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", hidden, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, hidden)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_up.weight", ffn, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, ffn)
    norm("output_norm.weight")
    matrix("output.weight", len(tokens), hidden)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
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


_ARC_SUBJECTS = ("A student", "A science class", "A farmer", "A group of scientists", "A teacher", "An engineer")
_ARC_ACTIONS = ("measures the temperature of water in three containers", "plants bean seeds in pots of different soil",
                "records the mass of a rock sample before and after heating", "observes the phases of the Moon each night",
                "drops balls of different sizes from the same height", "compares how fast ice melts in sunlight and shade")
_ARC_OPTIONS = ("the amount of sunlight each plant receives", "gravity", "the size of the container",
                "a decrease in the air pressure around it", "evaporation", "the type of soil in the pot",
                "heat energy from the Sun", "the mass of the object stays the same", "friction between the surfaces",
                "the number of days in the experiment")


def arc_like_examples(n: int = 8, seed: int = 0) -> list[Example]:
    """ARC-Easy-like 4-option science questions for the cloze head: a two-sentence stem and options of one to
    eight words, so each cloze row ("Question: ...\\nAnswer: option") is about 60 MiniLM WordPiece tokens and an
    option 1 to 8 of them. The label is random: these time a step, they teach nothing."""
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    out = []
    for i in range(n):
        stem = (f"{pick(_ARC_SUBJECTS)} {pick(_ARC_ACTIONS)} for five days and writes the results in a table. "
                f"{pick(_ARC_SUBJECTS)} {pick(_ARC_ACTIONS)} in the same way. Which factor most likely explains "
                f"the difference between the two sets of results?")
        order = torch.randperm(len(_ARC_OPTIONS), generator=g)[:4].tolist()
        options = tuple(_ARC_OPTIONS[j] for j in order)
        label = int(torch.randint(4, (1,), generator=g))
        prompt = f"Question: {stem}\n" + "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(options)) + "\nAnswer:"
        out.append(Example(index=i, prompt=prompt, choices=options, mc_texts=tuple((stem, o) for o in options),
                           label=label))
    return out


def hide_bitsandbytes(monkeypatch) -> None:
    """Make ``import bitsandbytes`` fail for the rest of the test, as on a machine without it."""
    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)


def _grads(model, guide, batch, *, backward_inside: bool) -> dict:
    """Gradients of every param-store parameter for one ELBO-like loss, with fixed draws and signs."""
    from blob_pyro.poutine import flipout

    pyro.set_rng_seed(3)
    with flipout(seed=11):
        gt = poutine.trace(guide).get_trace(batch)
        mt = poutine.trace(poutine.replay(model, trace=gt)).get_trace(batch)
        loss = -mt.nodes["obs"]["fn"].log_prob(batch["labels"]).mean()
        if backward_inside:  # SVI: backward inside the handler
            loss.backward()
    if not backward_inside:  # the paper's step: backward after the handler exited
        loss.backward()
    store = pyro.get_param_store()
    out = {name: p.unconstrained().grad.clone() for name, p in store.items() if p.unconstrained().grad is not None}
    for p in store.values():
        p.unconstrained().grad = None
    return out


def checkpointing_gradients(make_model, examples) -> tuple[dict, dict]:
    """Gradients with gradient checkpointing off and on, and the elements saved for backward in each case.

    ``make_model(checkpointing: bool)`` builds the model; the BLoB guide's parameters are moved off their init so
    both LoRA factors matter. Returns ``grads[(checkpointing, "inside" | "outside")]`` (backward inside or after the
    Flipout handler) and ``saved[checkpointing]``.
    """
    from blob_pyro.guides import make_guide
    from blob_pyro.optim import register_parameters

    grads, saved = {}, {}
    for ckpt in (False, True):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = make_model(ckpt)
        guide = make_guide("blob", model)
        register_parameters(model, guide)
        with torch.no_grad():
            for p in pyro.get_param_store().values():
                p.unconstrained().add_(0.05 * torch.randn_like(p))
        batch = model.head.collate(examples)
        sizes = []

        def count(t, sizes=sizes):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            grads[ckpt, "inside"] = _grads(model, guide, batch, backward_inside=True)
        saved[ckpt] = sum(sizes)
        grads[ckpt, "outside"] = _grads(model, guide, batch, backward_inside=False)
    return grads, saved
