"""blob_pyro.heads with a word-level tokenizer built in memory and stand-in networks: batching, padding and which
logits each head reads."""

from types import SimpleNamespace

import pytest
import torch

from blob_pyro.data import Example
from blob_pyro.errors import HeadError
from blob_pyro.heads import HEADS, CausalLMHead, ClozeHead, MultipleChoiceHead, SequenceClassificationHead

from .tiny import word_tokenizer

WORDS = ["red", "blue", "green", "black", "white"]


def _examples(counts=(2, 2), prompts=None):
    out = []
    for i, n in enumerate(counts):
        prompt = prompts[i] if prompts else "the colour is red ? Answer :"
        out.append(Example(i, prompt, tuple(WORDS[:n]), tuple((f"which colour is {WORDS[i]} ?", w)
                                                                for w in WORDS[:n]), label=i % n))
    return out


class Scorer(torch.nn.Module):
    """Stand-in encoder: one score per sequence, the masked mean of token embeddings times a vector."""

    def __init__(self, vocab=64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 4)
        self.out = torch.nn.Linear(4, 1)
        self.calls = []

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        self.calls.append(tuple(input_ids.shape))
        m = attention_mask.unsqueeze(-1).float()
        h = (self.emb(input_ids) * m).sum(-2) / m.sum(-2)
        return SimpleNamespace(logits=self.out(h).squeeze(-1))


def test_causal_lm_head_pads_left_and_reads_the_option_tokens():
    tok = word_tokenizer()
    head = CausalLMHead(tok, ("A", "B"), max_length=6)
    assert (tok.padding_side, tok.truncation_side) == ("left", "left")
    assert head.option_ids == [tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")]
    examples = _examples(prompts=["red :", "the colour is red blue green ? Answer :"])
    batch = head.collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "position_ids", "labels", "index"}
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    assert ids.shape == (2, 6) and mask[0].tolist() == [0, 0, 1, 1, 1, 1]  # padded on the left
    assert pos[0].tolist() == [0, 0, 0, 1, 2, 3] and pos[1].tolist() == list(range(6))  # positions follow the mask
    # truncated on the left: the end of the prompt ("Answer :" and [SEP]) survives
    assert tok.convert_ids_to_tokens(ids[1].tolist())[-3:] == ["Answer", ":", "[SEP]"]
    assert batch["labels"].tolist() == [0, 1] and batch["index"].tolist() == [0, 1]

    seen = {}

    def network(input_ids, attention_mask, position_ids, logits_to_keep):
        seen["keep"] = logits_to_keep
        vocab = torch.arange(input_ids.shape[1] * 30.0).reshape(1, input_ids.shape[1], 30)
        return SimpleNamespace(logits=vocab.expand(input_ids.shape[0], -1, -1)[:, -1:])

    logits = head.logits(network, batch)
    assert seen["keep"] == 1 and logits.shape == (2, 2) and logits.dtype == torch.float32
    assert logits[0].tolist() == [5 * 30.0 + head.option_ids[0], 5 * 30.0 + head.option_ids[1]]
    assert head.to_config() == {"kind": "causal_lm", "num_classes": 2, "max_length": 6, "option_words": ["A", "B"]}


def test_causal_lm_head_without_logits_to_keep_uses_the_last_position():
    head = CausalLMHead(word_tokenizer(), ("True", "False"))
    batch = head.collate(_examples())

    def old_network(input_ids, attention_mask, position_ids):
        return SimpleNamespace(logits=torch.randn(input_ids.shape[0], input_ids.shape[1], 40))

    assert head.logits(old_network, batch).shape == (2, 2)


def test_option_words_that_share_a_token_are_refused():
    with pytest.raises(HeadError) as err:
        CausalLMHead(word_tokenizer(), ("A", "zebra", "zebra2"))  # both unknown words map to [UNK]
    assert "non-distinct" in str(err.value) and isinstance(err.value, ValueError)


def _hand_bpe(pre_tokenizer, space: str, words=("A", "B")):
    """A BPE tokenizer with a hand vocabulary: ``space`` is the pre-tokenizer's space mark ("Ġ" byte-level, "▁"
    Metaspace); merges build ``space+w`` for each option word w, and ``Answer`` (Metaspace: ``▁Answer``)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    answer = ("▁" if space == "▁" else "") + "Answer"
    merges = [(space, w) for w in words]
    merges += [(answer[:i], answer[i]) for i in range(1, len(answer))]
    chars = sorted(set("".join(words) + answer + ":" + space + "<>pad"))
    vocab = {"<pad>": 0}
    for piece in chars + [a + b for a, b in merges]:
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def test_option_tokens_are_the_ones_that_continue_the_prompt():
    """BPE (Llama-3, Qwen2, SmolLM2, Gemma 3) writes "Answer: A" as ["Answer", ":", "ĠA"]: the head scores "ĠA", not
    the token of "A" alone (which the paper's code took); SentencePiece writes "▁A" either way."""
    from tokenizers import pre_tokenizers

    bpe = _hand_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), "Ġ")
    assert bpe.convert_ids_to_tokens(bpe("Answer: A", add_special_tokens=False)["input_ids"]) == ["Answer", ":", "ĠA"]
    head = CausalLMHead(bpe, ("A", "B"))
    assert head.option_ids == bpe.convert_tokens_to_ids(["ĠA", "ĠB"])
    assert head.option_ids[0] != bpe("A", add_special_tokens=False)["input_ids"][-1]  # the old rule's token

    sp = _hand_bpe(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"), "▁")
    assert sp.convert_ids_to_tokens(sp("Answer: A", add_special_tokens=False)["input_ids"]) == ["▁Answer", ":", "▁A"]
    head = CausalLMHead(sp, ("A", "B"))
    assert head.option_ids == sp.convert_tokens_to_ids(["▁A", "▁B"])
    assert head.option_ids == [sp(w, add_special_tokens=False)["input_ids"][-1] for w in "AB"]  # unchanged for SP


def test_an_option_that_is_not_one_token_after_the_prompt_is_refused():
    from tokenizers import pre_tokenizers

    bpe = _hand_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), "Ġ")
    with pytest.raises(HeadError) as err:
        CausalLMHead(bpe, ("A", "AB"))  # " AB" is ["ĠA", "B"]
    assert "'AB' is not one token after 'Answer:'" in str(err.value) and "\n" not in str(err.value)


def test_multiple_choice_head_encodes_only_present_options():
    """Packing the present options gives the full (B, K) layout's scores, -inf where an option is absent."""
    head = MultipleChoiceHead(word_tokenizer(), num_classes=5, max_length=16)
    examples = _examples(counts=(4, 5, 3, 4))
    batch = head.collate(examples)
    assert batch["input_ids"].shape[:2] == (4, 5) and batch["choice_mask"].sum() == 16
    net = Scorer()
    packed = head.logits(net, batch)
    assert net.calls == [(1, 16, batch["input_ids"].shape[-1])]  # one pass over the 16 present options
    full = net(batch["input_ids"], batch["attention_mask"]).logits
    mask = batch["choice_mask"]
    assert packed.shape == (4, 5)
    assert torch.isinf(packed[~mask]).all() and (packed[~mask] < 0).all()
    torch.testing.assert_close(packed[mask], full[mask])
    # gradients reach the network through the scatter
    packed[mask].sum().backward()
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0
    six = Example(0, "", tuple(WORDS) + ("x",), tuple(("q", w) for w in WORDS + ["x"]), 0)
    with pytest.raises(HeadError, match="more than 5"):
        head.collate([six])


def test_sequence_classification_head():
    head = SequenceClassificationHead(word_tokenizer(), num_classes=2, max_length=12)
    batch = head.collate(_examples())
    assert batch["input_ids"].shape[0] == 2 and "labels" in batch

    def network(input_ids, attention_mask, token_type_ids=None):
        return SimpleNamespace(logits=torch.ones(input_ids.shape[0], 2, dtype=torch.float64))

    out = head.logits(network, batch)
    assert out.shape == (2, 2) and out.dtype == torch.float32
    assert set(HEADS) == {"causal_lm", "cloze", "multiple_choice", "sequence_classification"}


class TinyCausalLM(torch.nn.Module):
    """Stand-in causal LM: the logits at a position read its token and its position id (nothing else), so a score
    computed on a padded row equals the one on the row alone exactly when padding and positions are right."""

    def __init__(self, vocab=64):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.pos = torch.nn.Embedding(64, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.calls = []

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0):
        self.calls.append((tuple(input_ids.shape), logits_to_keep))
        logits = self.out(torch.tanh(self.emb(input_ids) + self.pos(position_ids)))
        return SimpleNamespace(logits=logits[:, -logits_to_keep:])


def _cloze_by_hand(net, tok, question, text, prefix):
    """Σ log p(option tokens) on the unpadded row [prefix] + context + option, positions 0..n-1."""
    context = f"Question: {question}\nAnswer:"
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(f"{context} {text}", add_special_tokens=False)["input_ids"][len(ctx):]
    ids = torch.tensor([prefix + ctx + cont])
    logp = torch.log_softmax(net(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None]).logits[0], -1)
    n = ids.shape[1]
    return sum(logp[n - len(cont) - 1 + t, cont[t]] for t in range(len(cont))), len(cont)


@pytest.mark.parametrize("norm", ["none", "chars", "tokens"])
def test_cloze_head_scores_each_option_text_after_its_question(norm):
    tok = word_tokenizer()
    head = ClozeHead(tok, num_classes=5, max_length=32, norm=norm)
    assert head.prefix_ids == [tok.cls_token_id]  # what the tokenizer puts first ([CLS] here, BOS for Llama)
    examples = _examples(counts=(3, 5))
    examples[1] = Example(1, "", ("red", "blue green", "black", "white", "red red red"),
                          tuple(("which colour is blue ?", w) for w in ("red", "blue green", "black", "white",
                                                                       "red red red")), label=1)
    batch = head.collate(examples)
    assert batch["input_ids"].shape[:2] == (2, 5) and batch["choice_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert all(v.shape[0] == 2 for v in batch.values())  # example first: sample-batched prediction repeats rows
    net = TinyCausalLM()
    scores = head.logits(net, batch)
    assert scores.shape == (2, 5) and scores.dtype == torch.float32
    assert torch.isinf(scores[0, 3:]).all() and (scores[0, 3:] < 0).all()
    assert net.calls == [((8, batch["input_ids"].shape[-1]), 4)]  # 8 present rows; longest option is 3 tokens
    for b, e in enumerate(examples):
        for j, (question, text) in enumerate(e.mc_texts):
            total, n = _cloze_by_hand(net, tok, question, text, head.prefix_ids)
            divisor = {"none": 1.0, "chars": len(text), "tokens": n}[norm]
            torch.testing.assert_close(scores[b, j], (total / divisor).detach())
    scores[batch["choice_mask"]].sum().backward()  # gradients reach the network through the scatter
    assert net.out.weight.grad.abs().sum() > 0
    assert head.to_config() == {"kind": "cloze", "num_classes": 5, "max_length": 32, "norm": norm}
    assert "cloze" in HEADS


def test_cloze_head_refusals():
    tok = word_tokenizer()
    with pytest.raises(HeadError, match="cloze norm"):
        ClozeHead(tok, 2, norm="bytes")
    winogrande = Example(0, "", ("red", "blue"), (("the red one", None), ("the blue one", None)), 0)
    with pytest.raises(HeadError, match="fill a blank inside the sentence; use head causal_lm"):
        ClozeHead(tok, 2).collate([winogrande])
    with pytest.raises(HeadError, match="option 'red red red red' is 4 tokens after its question; .* 1 to 3"):
        ClozeHead(tok, 5, max_length=5).collate([Example(0, "", ("red red red red",), (("q", "red red red red"),), 0)])
    # a long question is cut on the left; the prefix and the option survive
    head = ClozeHead(tok, 2, max_length=6)
    batch = head.collate([Example(0, "", ("red", "blue"), (("the colour is red", "red"), ("the colour is red", "blue")), 0)])
    assert tok.convert_ids_to_tokens(batch["input_ids"][0, 1].tolist()) == ["[CLS]", "colour", "is", "red", "[UNK]", "blue"]
