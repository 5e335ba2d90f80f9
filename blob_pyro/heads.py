"""Heads: how a batch of examples becomes tensors, and how the network's output becomes (B, K) logits.

- :class:`CausalLMHead` — next-token logits at the last prompt position, restricted to the option
  tokens (A/B/…, or False/True for BoolQ), as in the paper. Left padding, explicit position ids.
- :class:`MultipleChoiceHead` — an encoder scores each (context, option) pair; absent options
  (ARC items with fewer than 5) get logit −inf.
- :class:`SequenceClassificationHead` — an encoder reads the lettered prompt; K-way classifier.

::

    head = CausalLMHead(tokenizer, option_words=("A", "B"))
    batch = head.collate(examples)                 # dict of tensors + "labels" + "index"
    logits = head.logits(network, batch)           # (B, K)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import HeadError

__all__ = ["CausalLMHead", "continuation_token_ids", "MultipleChoiceHead", "SequenceClassificationHead", "HEADS", "HeadError"]


def _common(examples, device):
    labels = torch.tensor([e.label for e in examples], dtype=torch.long, device=device)
    index = torch.tensor([e.index for e in examples], dtype=torch.long, device=device)
    return {"labels": labels, "index": index}


class _Head:
    kind = ""

    def __init__(self, tokenizer, num_classes: int, max_length: int = 256):
        self.tokenizer = tokenizer
        self.num_classes = int(num_classes)
        self.max_length = int(max_length)

    def to_config(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "max_length": self.max_length}


ANSWER_PROMPT = "Answer:"
"""What every prompt of :mod:`blob_pyro.data` ends with (BoolQ: ``"Answer (true or false):"``); the option
tokens are read as the tokenizer continues it."""


def continuation_token_ids(tokenizer, words: Sequence[str], prompt: str = ANSWER_PROMPT) -> list[int]:
    """The single token id each word gets when it follows ``prompt`` after a space (``prompt + " " + word``).

    That is the token a causal LM predicts next: SentencePiece (Llama-2) gives ``"▁A"`` for ``"Answer: A"``,
    byte-level BPE (Llama-3, Qwen2, SmolLM2, Gemma 3) gives ``"ĠA"``/``" A"`` — not the token of ``"A"`` on its
    own, which BPE writes without the space. Raises :class:`HeadError` when a word is not exactly one token
    there, or two words share one.
    """
    before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for word in words:
        after = tokenizer(f"{prompt} {word}", add_special_tokens=False)["input_ids"]
        rest = after[len(before):]
        if after[:len(before)] != before or len(rest) != 1:
            pieces = tokenizer.convert_ids_to_tokens(rest if after[:len(before)] == before else after)
            raise HeadError(f"option word {word!r} is not one token after {prompt!r} with this tokenizer "
                            f"(it reads {pieces}); the causal-LM head scores one next token per option")
        ids.append(rest[0])
    if len(set(ids)) != len(ids):
        raise HeadError(f"option words {tuple(words)} map to non-distinct tokens {ids} after {prompt!r} "
                        f"with this tokenizer")
    return ids


class CausalLMHead(_Head):
    """Score the option words by the causal LM's next-token logits after the prompt.

    Fixes over the paper's code: prompts are truncated on the *left* (the official code cut on the
    right and could drop the "Answer:" suffix of long BoolQ passages), and position ids follow the
    attention mask, so left padding does not shift positions.
    The option tokens are the ones the tokenizer writes for ``"Answer: A"`` after ``"Answer:"``
    (:func:`continuation_token_ids`), so BPE tokenizers score the space token ``" A"`` as their LM predicts it.
    """

    kind = "causal_lm"

    def __init__(self, tokenizer, option_words: Sequence[str], max_length: int = 300):
        super().__init__(tokenizer, len(option_words), max_length)
        self.option_words = tuple(option_words)
        tokenizer.padding_side = "left"
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.bos_token or tokenizer.eos_token
        self.option_ids = continuation_token_ids(tokenizer, self.option_words)

    def collate(self, examples, device=None) -> dict:
        enc = self.tokenizer([e.prompt for e in examples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        mask = enc["attention_mask"]
        batch = {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": mask.to(device),
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0).to(device),
        }
        batch.update(_common(examples, device))
        return batch

    def logits(self, network, batch) -> torch.Tensor:
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        try:
            out = network(**kwargs, logits_to_keep=1)
        except TypeError:  # older architectures without logits_to_keep
            out = network(**kwargs)
        return out.logits[:, -1, self.option_ids].float()

    def to_config(self) -> dict:
        return {**super().to_config(), "option_words": list(self.option_words)}


class MultipleChoiceHead(_Head):
    """Encoder multiple choice: one (context, option) sequence per option, one score each."""

    kind = "multiple_choice"

    def collate(self, examples, device=None) -> dict:
        k = self.num_classes
        first, second, present = [], [], []
        for e in examples:
            if len(e.mc_texts) > k:
                raise HeadError(f"example {e.index} has {len(e.mc_texts)} options, more than {k}")
            for j in range(k):
                a, b = e.mc_texts[j] if j < len(e.mc_texts) else ("", None)
                first.append(a)
                second.append(b)
                present.append(j < len(e.mc_texts))
        pair = None if all(b is None for b in second) else [b or "" for b in second]
        enc = self.tokenizer(first, pair, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        batch = {key: v.reshape(len(examples), k, -1).to(device) for key, v in enc.items()}
        batch["choice_mask"] = torch.tensor(present, device=device).reshape(len(examples), k)
        batch.update(_common(examples, device))
        return batch

    def logits(self, network, batch) -> torch.Tensor:
        # Only the options that exist are encoded: ARC pads 99.5 % of its questions from 4 to 5 slots, and
        # encoding the empty slot costs a fifth of every ARC forward. The present (example, option) rows
        # go through the network as one "question" with n choices, in the same row order as the full
        # (B, K) layout, and their scores are scattered back; absent slots score -inf.
        mask = batch["choice_mask"]
        kwargs = {key: batch[key][mask].unsqueeze(0)
                  for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        scores = network(**kwargs).logits.float().reshape(-1)
        return scores.new_full(mask.shape, float("-inf")).masked_scatter(mask, scores)


class SequenceClassificationHead(_Head):
    """Encoder K-way classifier over the lettered prompt."""

    kind = "sequence_classification"

    def collate(self, examples, device=None) -> dict:
        enc = self.tokenizer([e.prompt for e in examples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = {key: v.to(device) for key, v in enc.items()}
        batch.update(_common(examples, device))
        return batch

    def logits(self, network, batch) -> torch.Tensor:
        kwargs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch}
        return network(**kwargs).logits.float()


HEADS = {h.kind: h for h in (CausalLMHead, MultipleChoiceHead, SequenceClassificationHead)}
