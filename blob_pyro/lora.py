"""PEFT bridge: inject LoRA with PEFT, and route the Bayesian factor through a ``LoraVariant``.

PEFT owns the adapter (``LoraConfig`` / ``get_peft_model``, ``save_pretrained``); blob_pyro only
replaces each LoRA layer's forward with :class:`BlobLoraVariant`, PEFT's extension point for a
custom LoRA forward. The variant reads the factor values bound by the Pyro model for the current
call (a posterior draw) and applies them with :func:`~blob_pyro.poutine.flipout.flipout_linear`::

    net = inject_lora(hf_model, target_modules=["query", "value"], r=8, lora_alpha=16)
    layers = lora_layers(net)         # {"bert.encoder.layer.0.attention.self.query": LoraLayer, ...}

Outside a model call (no values bound) the variant uses PEFT's own weights, i.e. plain LoRA.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import LoraVariant

from .errors import TargetModuleError
from .poutine.flipout import flipout_apply, flipout_linear

__all__ = [
    "ADAPTER",
    "BlobLoraVariant",
    "LoraSite",
    "TargetModuleError",
    "inject_lora",
    "lora_layers",
    "bind_values",
    "tap_layers",
    "linear_module_names",
    "checkpoint_contexts",
]

ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."


class BlobLoraVariant(LoraVariant):
    """LoRA forward ``result + scaling * B(A(dropout(x)))`` with A and/or B taken from a bound draw.

    ``values`` maps ``"A"``/``"B"`` to an (r, in) / (out, r) tensor for the duration of one model
    call; missing factors fall back to the PEFT parameters. ``tap``, when set (:func:`tap_layers`), is
    called as ``tap(x, h, y)`` with the two factor applications' tensors: x (..., in) the input of A,
    h = A x (..., r) the output of A and input of B, y = B h (..., out) the output of B (before the scaling).
    """

    def __init__(self):
        self.values: dict[str, torch.Tensor] = {}
        self.tap = None
        # set by blob_pyro.compiled for one call of a compiled network: the means of the bound draws and the
        # pool their signs come from, so that the graph holds no Pyro handler and no random draw
        self.locs: dict[str, torch.Tensor] = {}
        self.signs = None

    @staticmethod
    def init(module, adapter_name, **kwargs):  # PEFT protocol; nothing to add to the layer
        return None

    @staticmethod
    def _delta_weight(module, adapter):
        return module.get_delta_weight(adapter)

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + BlobLoraVariant._delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight):
        orig_weight.data += BlobLoraVariant._delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - BlobLoraVariant._delta_weight(module, active_adapter).to(orig_weight.dtype)

    def forward(self, module, active_adapter, x, result, **kwargs):
        a = self.values.get("A", module.lora_A[active_adapter].weight)
        b = self.values.get("B", module.lora_B[active_adapter].weight)
        x = module.lora_dropout[active_adapter](x)
        if self.signs is None:  # eager: Flipout finds each draw's mean through the active handler
            h = flipout_linear(x, a)
            y = flipout_linear(h, b)
        else:
            h = self._resolved(x, a, "A")
            y = self._resolved(h, b, "B")
        if self.tap is not None:
            self.tap(x, h, y)
        return result + y * module.scaling[active_adapter]

    def _resolved(self, x: torch.Tensor, weight: torch.Tensor, factor: str) -> torch.Tensor:
        loc = self.locs.get(factor)
        return F.linear(x, weight) if loc is None else flipout_apply(x, weight, loc, self.signs)


@dataclass(frozen=True)
class LoraSite:
    """One Bayesian LoRA factor: its Pyro site name, shape and the layer it lives in."""

    name: str  # "<module path>.lora_A" or "<module path>.lora_B"
    module_path: str
    factor: str  # "A" or "B"
    shape: tuple[int, int]
    layer: LoraLayer

    @property
    def device(self) -> torch.device:
        return self.layer.lora_A[ADAPTER].weight.device

    def peft_weight(self) -> torch.nn.Parameter:
        """The PEFT parameter of this factor (holds PEFT's init, and the posterior mean once saved)."""
        mods = self.layer.lora_A if self.factor == "A" else self.layer.lora_B
        return mods[ADAPTER].weight


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Leaf names of the model's Linear layers (what ``target_modules`` can name)."""
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    return names


def inject_lora(
    model: torch.nn.Module,
    target_modules: list[str],
    *,
    r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    modules_to_save: list[str] | None = None,
) -> PeftModel:
    """Freeze ``model`` and wrap it with a PEFT LoRA adapter whose layers use :class:`BlobLoraVariant`."""
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    full = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in target_modules if t not in leaves and t not in full]
    if missing:
        raise TargetModuleError(
            f"target modules {missing} are not Linear layers of this model; "
            f"its Linear layers are: {', '.join(linear_module_names(model))}"
        )
    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        modules_to_save=modules_to_save,
    )
    net = get_peft_model(model, config)
    attach_variants(net)
    return net


def attach_variants(net: PeftModel) -> None:
    """Route every LoRA layer of ``net`` through a fresh :class:`BlobLoraVariant`."""
    for layer in lora_layers(net).values():
        layer.lora_variant[ADAPTER] = BlobLoraVariant()


def lora_layers(net: torch.nn.Module) -> dict[str, LoraLayer]:
    """LoRA layers by module path relative to the wrapped Hugging Face model."""
    out = {}
    for name, module in net.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_A", {}):
            out[name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name] = module
    return out


_BOUND: dict[int, BlobLoraVariant] = {}  # variants holding values now (read by checkpoint_contexts)


@contextlib.contextmanager
def bind_values(sites: list[LoraSite], values: dict[str, torch.Tensor]):
    """Bind factor draws to their layers for the duration of one forward pass."""
    bound = []
    try:
        for site in sites:
            if site.name in values:
                variant = site.layer.lora_variant[ADAPTER]
                variant.values[site.factor] = values[site.name]
                bound.append(variant)
                _BOUND[id(variant)] = variant
        yield
    finally:
        for variant in bound:
            variant.values.clear()
            _BOUND.pop(id(variant), None)


@contextlib.contextmanager
def tap_layers(layers: dict[str, LoraLayer], fn):
    """Call ``fn(path, x, h, y)`` on every LoRA application of the given layers (``{path: layer}``) while inside.

    x, h, y are the live tensors of :meth:`BlobLoraVariant.forward` (see there), so ``fn`` can register tensor
    hooks on h and y to see the gradients of the factors' outputs (what KFAC needs; :mod:`blob_pyro.laplace`).
    A layer run again in backward (gradient checkpointing) calls ``fn`` again; ``fn`` decides what to keep.
    """
    variants = [layer.lora_variant[ADAPTER] for layer in layers.values()]
    try:
        for path, variant in zip(layers, variants):
            variant.tap = (lambda x, h, y, _path=path: fn(_path, x, h, y))
        yield
    finally:
        for variant in variants:
            variant.tap = None


def checkpoint_contexts():
    """``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) around blocks that hold LoRA layers.

    A checkpointed block is run again during backward, after :func:`bind_values` has unbound the draws
    and, in the paper's step, after the Flipout handler has exited. The first context records, while the
    block runs forward, which values are bound, the active Flipout handler's means and every packed
    sign it draws; the second puts them back for the recomputation, so backward sees exactly the
    forward's weights and signs::

        torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=checkpoint_contexts)

    (:func:`blob_pyro.backbone.enable_gradient_checkpointing` does this for every block.)
    """
    from .poutine.flipout import FlipoutReplay, active_flipout

    record: dict = {}

    @contextlib.contextmanager
    def forward_context():
        record["bound"] = [(variant, dict(variant.values)) for variant in _BOUND.values()]
        handler = active_flipout()
        tape: list[torch.Tensor] = []
        record["flipout"] = (handler, tape)
        if handler is None:
            yield
            return
        handler.tapes.append(tape)
        try:
            yield
        finally:
            handler.tapes.remove(tape)
        record["flipout"] = (handler.frozen_copy(), tape)

    @contextlib.contextmanager
    def recompute_context():
        previous = [(variant, dict(variant.values)) for variant, _ in record.get("bound", [])]
        for variant, values in record.get("bound", []):
            variant.values.clear()
            variant.values.update(values)
        handler, tape = record.get("flipout", (None, []))
        replay = FlipoutReplay(handler, tape) if handler is not None else contextlib.nullcontext()
        try:
            with replay:
                yield
        finally:
            for variant, values in previous:
                variant.values.clear()
                variant.values.update(values)

    # the recomputation runs once per backward pass through the block: several when the graph is retained
    # (the Laplace curvature's one backward pass per option), so its context must enter more than once
    return forward_context(), _Reenterable(recompute_context)


class _Reenterable:
    """A context manager entered anew (``factory()``) each time, where a generator-based one enters only once."""

    def __init__(self, factory):
        self._factory = factory
        self._open: list = []

    def __enter__(self):
        context = self._factory()
        self._open.append(context)
        return context.__enter__()

    def __exit__(self, *exc):
        return self._open.pop().__exit__(*exc)
