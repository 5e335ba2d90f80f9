"""Heads: how a batch of examples becomes tensors, and how the network's output becomes (B, K) logits.

- :class:`CausalLMHead` — next-token logits at the last prompt position, restricted to the option
  tokens (A/B/…, or False/True for BoolQ), as in the paper. Left padding, explicit position ids.
- :class:`ClozeHead` — a causal LM scores each option by the log-probability of its text after the
  question (lm-evaluation-harness's ARC); absent options get −inf.
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

__all__ = ["CausalLMHead", "ClozeHead", "continuation_token_ids", "MultipleChoiceHead", "SequenceClassificationHead",
           "HEADS", "HeadError"]


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


class ClozeHead(_Head):
    """Score each option by the causal LM's summed log-probability of its text after the question (cloze).

    The way lm-evaluation-harness scores ARC: option j of an example is the continuation ``" " + text`` after the
    context ``"Question: {question}\nAnswer:"``, with (question, text) = ``Example.mc_texts[j]`` (ARC, OBQA, MMLU:
    the stem and the option; BoolQ: passage and question, and "false"/"true"). Its class logit is
    ``Σ_t log p(token_t | context, tokens_<t)`` over the option's tokens, divided by ``norm``: ``"none"``
    (lm-eval's ``acc``), ``"chars"`` (the option text's length in characters: lm-eval's ``acc_norm``) or
    ``"tokens"`` (its token count). Absent options (ARC items with fewer than 5) get −inf. WinoGrande, whose
    option fills a blank inside the sentence, has no text after a question and is refused.

    Every present (example, option) sequence is one row of one forward pass, so Flipout gives each its own
    signs. Batch tensors keep the example first (``(B, K, L)``, ``(B, K)``), so repeating a batch along dim 0
    (sample-batched prediction) repeats whole examples. Left padding and position ids as in
    :class:`CausalLMHead`; the LM head runs on the last positions only (``logits_to_keep``).
    """

    kind = "cloze"
    NORMS = ("none", "chars", "tokens")

    def __init__(self, tokenizer, num_classes: int, max_length: int = 300, norm: str = "none"):
        super().__init__(tokenizer, num_classes, max_length)
        if norm not in self.NORMS:
            raise HeadError(f"cloze norm must be one of {', '.join(self.NORMS)}, got {norm!r}")
        self.norm = norm
        with_special = tokenizer("x")["input_ids"]
        bare = tokenizer("x", add_special_tokens=False)["input_ids"]
        start = next((i for i in range(len(with_special)) if with_special[i:i + len(bare)] == bare), 0)
        self.prefix_ids = list(with_special[:start])  # what the tokenizer puts first: BOS (Llama), [CLS] (BERT)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @staticmethod
    def context(question: str) -> str:
        return f"Question: {question}\nAnswer:"

    def encode(self, question: str, text: str) -> tuple[list[int], int]:
        """(token ids of prefix + context + continuation, number of continuation tokens), lm-eval's split: the
        continuation is what ``context + " " + text`` has after the context's own tokens."""
        context = self.context(question)
        ctx = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        whole = self.tokenizer(f"{context} {text}", add_special_tokens=False)["input_ids"]
        cont = whole[len(ctx):]
        room = self.max_length - len(self.prefix_ids) - len(cont)
        if not cont or room < 1:
            raise HeadError(f"option {text!r} is {len(cont)} tokens after its question; the cloze head needs "
                            f"1 to {self.max_length - len(self.prefix_ids) - 1} (max_length={self.max_length})")
        return self.prefix_ids + ctx[-room:] + cont, len(cont)

    def collate(self, examples, device=None) -> dict:
        k = self.num_classes
        rows, cont_len, divisor, present = [], [], [], []
        for e in examples:
            if len(e.mc_texts) > k:
                raise HeadError(f"example {e.index} has {len(e.mc_texts)} options, more than {k}")
            for j in range(k):
                if j >= len(e.mc_texts):
                    rows.append([])
                    cont_len.append(0)
                    divisor.append(1.0)
                    present.append(False)
                    continue
                question, text = e.mc_texts[j]
                if text is None:
                    raise HeadError(f"example {e.index}: the cloze head scores an option's text after its question, "
                                    f"and this dataset's options fill a blank inside the sentence; use head causal_lm")
                ids, n = self.encode(question, text)
                rows.append(ids)
                cont_len.append(n)
                divisor.append({"none": 1.0, "chars": float(max(len(text), 1)), "tokens": float(n)}[self.norm])
                present.append(True)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        target = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (r, n) in enumerate(zip(rows, cont_len)):
            if r:
                ids[i, length - len(r):] = torch.tensor(r)
                attention[i, length - len(r):] = 1
                target[i, length - n:] = True
        shape = (len(examples), k)
        batch = {
            "input_ids": ids.reshape(*shape, length).to(device),
            "attention_mask": attention.reshape(*shape, length).to(device),
            "position_ids": (attention.cumsum(-1) - 1).clamp(min=0).reshape(*shape, length).to(device),
            "continuation_mask": target.reshape(*shape, length).to(device),
            "choice_mask": torch.tensor(present, device=device).reshape(shape),
            "cloze_divisor": torch.tensor(divisor, device=device).reshape(shape),
        }
        batch.update(_common(examples, device))
        return batch

    def logits(self, network, batch) -> torch.Tensor:
        mask = batch["choice_mask"]  # (B, K); the M present options go through the network as (M, L)
        kwargs = {key: batch[key][mask] for key in ("input_ids", "attention_mask", "position_ids")}
        target = batch["continuation_mask"][mask]  # (M, L): True on the option's tokens (the last C at most)
        keep = int(target.sum(-1).max()) + 1 if target.numel() else 1  # position t predicts token t + 1
        try:
            out = network(**kwargs, logits_to_keep=keep).logits[:, -keep:]
        except TypeError:  # older architectures without logits_to_keep
            out = network(**kwargs).logits[:, -keep:]
        first = target.shape[-1] - keep + 1
        ids = kwargs["input_ids"][:, first:]  # (M, keep-1): the tokens the kept positions predict
        logp = torch.log_softmax(out[:, :-1].float(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        scores = logp.masked_fill(~target[:, first:], 0.0).sum(-1) / batch["cloze_divisor"][mask]
        return scores.new_full(mask.shape, float("-inf")).masked_scatter(mask, scores)

    def to_config(self) -> dict:
        return {**super().to_config(), "norm": self.norm}


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


HEADS = {h.kind: h for h in (CausalLMHead, ClozeHead, MultipleChoiceHead, SequenceClassificationHead)}
