"""A tiny in-file network for unit tests: no Hugging Face weights, no data folder, no network access.

::

    model = tiny_model("B")                        # BlobModel over a PEFT-wrapped TinyNet, sites layers.{0,1}.proj.lora_B
    guide = make_guide("blob", model)
    fit(model, guide, tiny_examples(16), FitConfig(max_steps=4, batch_size=4))
    run = tiny_run(RunConfig.from_dict({"method": "mle"}))   # what training.build does, on TinyNet

``TinyNet`` is two ``Linear`` blocks (``layers.0.proj``: 6 -> 8, ``layers.1.proj``: 8 -> 8, the LoRA targets, in a
``ModuleList`` so gradient checkpointing finds them) and a ``classifier`` (8 -> K) that PEFT trains as a
deterministic parameter (``modules_to_save``). Inputs are (B, T=3, 6) tensors, so Flipout has tokens to flip.
``TinyHead`` is what a head must offer :class:`~blob_pyro.model.BlobModel`: ``collate``, ``logits``,
``num_classes`` and ``kind``. Each example's features are a fixed function of its index with the label's
coordinate raised, so the task is learnable in a few steps.
"""

from __future__ import annotations

import pyro
import torch

from blob_pyro.data import Example
from blob_pyro.lora import inject_lora
from blob_pyro.model import BlobModel

IN, HIDDEN, TOKENS = 6, 8, 3
SITE_SHAPES = {"A": {"layers.0.proj": (2, IN), "layers.1.proj": (2, HIDDEN)},
               "B": {"layers.0.proj": (HIDDEN, 2), "layers.1.proj": (HIDDEN, 2)}}
"""Shapes of the LoRA factors at rank r = 2."""


class Block(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.proj = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class TinyNet(torch.nn.Module):
    """(B, T, 6) -> (B, K): two tanh(Linear) blocks, mean over tokens, a linear classifier."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.config = {"model_type": "custom"}  # what PEFT reads from a Hugging Face model
        self.layers = torch.nn.ModuleList([Block(IN, HIDDEN), Block(HIDDEN, HIDDEN)])
        self.classifier = torch.nn.Linear(HIDDEN, num_classes)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.classifier(x.mean(1))


class MeanLinear(torch.nn.Module):
    """logits = W · mean_t(x): one Linear (``proj``, IN -> 3) to put LoRA on, so Jacobians are closed-form."""

    def __init__(self):
        super().__init__()
        self.config = {"model_type": "custom"}
        self.proj = torch.nn.Linear(IN, 3, bias=False)

    def forward(self, x):
        return self.proj(x).mean(1)


def features(example: Example) -> torch.Tensor:
    """(T, 6) features of one example: seeded by its index, the label's coordinate raised by 2."""
    x = torch.randn(TOKENS, IN, generator=torch.Generator().manual_seed(1000 + example.index))
    x[:, example.label] += 2.0
    return x


class TinyHead:
    """collate(examples, device) -> {"x", "labels", "index"}; logits(network, batch) -> (B, K)."""

    kind = "tiny"

    def __init__(self, num_classes: int = 2):
        self.num_classes = num_classes

    def collate(self, examples, device=None) -> dict:
        return {"x": torch.stack([features(e) for e in examples]).to(device),
                "labels": torch.tensor([e.label for e in examples], dtype=torch.long, device=device),
                "index": torch.tensor([e.index for e in examples], dtype=torch.long, device=device)}

    def logits(self, network, batch) -> torch.Tensor:
        return network(batch["x"]).float()

    def to_config(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes}


def tiny_examples(n: int = 16, num_classes: int = 2, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    words = ("red", "blue", "green", "black", "white")[:num_classes]
    out = []
    for i in range(n):
        label = int(torch.randint(num_classes, (1,), generator=g))
        prompt = f"question {i}" + " ?" * (i % 3)  # lengths differ: predict sorts by length internally
        out.append(Example(i, prompt, words, tuple((prompt, w) for w in words), label))
    return out


def tiny_network(*, num_classes: int = 2, r: int = 2, lora_alpha: float = 4.0, lora_dropout: float = 0.0,
                 seed: int = 0):
    torch.manual_seed(seed)
    return inject_lora(TinyNet(num_classes), ["proj"], r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                       modules_to_save=["classifier"])


def tiny_model(factor: str = "B", *, num_data: int = 16, prior=None, flipout="token", num_classes: int = 2,
               lora_dropout: float = 0.0, seed: int = 0) -> BlobModel:
    network = tiny_network(num_classes=num_classes, lora_dropout=lora_dropout, seed=seed)
    return BlobModel(network, TinyHead(num_classes), bayesian_factor=factor, prior=prior, num_data=num_data,
                     flipout=flipout)


def tiny_run(cfg, *, num_data: int = 16, num_classes: int = 2):
    """:func:`blob_pyro.training.build` for TinyNet: the resolved ``cfg``'s adapter, prior, model and guide."""
    from blob_pyro.guides import make_guide
    from blob_pyro.priors import make_prior
    from blob_pyro.training import Run, set_seed

    cfg = cfg.resolve()
    set_seed(cfg.fit.seed)
    pyro.clear_param_store()
    ad, b = cfg.adapter, cfg.bayes
    network = inject_lora(TinyNet(num_classes), ["proj"], r=ad.lora_r, lora_alpha=ad.lora_alpha,
                          lora_dropout=ad.lora_dropout, modules_to_save=["classifier"])
    prior = make_prior(b.prior, b.prior_scale, **({"df": b.prior_df} if b.prior == "student_t" else {}))
    model = BlobModel(network, TinyHead(num_classes), bayesian_factor=b.bayesian_factor, prior=prior,
                      num_data=num_data, flipout=b.flipout_per if b.flipout else None)
    guide = make_guide(b.guide, model, eps=b.eps, std_param=b.std_param, rank=b.guide_rank)
    return Run(cfg, model, guide)


def store_snapshot() -> dict[str, torch.Tensor]:
    """Every param-store tensor (unconstrained), detached and cloned."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def word_tokenizer(extra_words=()):
    """A word-level fast tokenizer built in memory ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, then words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["A", "B", "C", "D", "E", "True", "False", "true", "false", "the", "colour", "is", "which", "?", ".",
             "red", "blue", "green", "black", "white", "question", "Answer", ":", *extra_words]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + list(dict.fromkeys(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
