"""The network part of the model through ``torch.compile``: backbone, LoRA and Flipout in one graph.

::

    model.compile_network()                  # or RuntimeConfig(compile=True), --compile true
    fit(model, guide, data, cfg)             # Pyro, the guide and the ELBO stay eager; the network runs compiled

At small sizes a step's cost is the number of operators it dispatches more than the arithmetic (see
``benchmarks/results/perf.md``): the network's forward and backward are most of them, and a compiled graph fuses
them. The ELBO's one-pass float64 densities of the latent sites and their closed-form KL
(:func:`~blob_pyro.poutine.float64.normal_log_densities`: elementwise over every entry of every factor, and their
backward) run as a second, small graph, whose KL the step logs. The ELBO step then takes torch's fused AdamW (one
kernel for all parameters; it rounds differently from the eager CPU step's multi-tensor kernels, as on CUDA).
Pyro's traces, the guide's draws and the priors stay outside the graphs, as do the Flipout handler and its random
draws: before the graph runs, the mean of every bound draw is looked up in the handler and the sign bits of the
whole call are drawn in one call of the handler's generator (:class:`~blob_pyro.poutine.flipout.
SignPool`), which on a CPU gives the same bits as the per-layer draws of an eager call (on a GPU, where the
generator spreads a draw over threads by its size, other bits of the same distribution). How many bytes a call
needs depends on the batch's shape: the first call of every new shape runs eagerly and counts them.

What changes against the eager network on a CPU (``tests/unit/test_compiled.py``): nothing in the draws (the
Gaussian draws are the guide's, outside; the signs are the same bits; LoRA dropout draws eager masks under
Inductor's ``fallback_random``); Inductor's fused kernels may round differently from eager ones, so losses and gradients
agree to float32 rounding rather than bit for bit. New input shapes and each switch of grad mode (training,
prediction) may compile again (Dynamo's automatic dynamic shapes: three compiles in a 120-step OpenBookQA run,
``benchmarks/results/compiled/``). While :func:`~blob_pyro.lora.tap_layers` taps a layer (KFAC) the network runs
eagerly; a gradient-checkpointed network (whose recomputation replays the signs from Python) is refused.
"""

from __future__ import annotations

import torch

from .errors import ModelError
from .lora import ADAPTER
from .poutine.flipout import SignPool, active_flipout
from .poutine.float64 import normal_log_densities

__all__ = ["CompiledNetwork"]


def _shape_key(batch: dict) -> tuple:
    return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()) if torch.is_tensor(v))


class CompiledNetwork:
    """``head.logits(network, batch)`` of a :class:`~blob_pyro.model.BlobModel`, compiled; called by the model
    inside :func:`~blob_pyro.lora.bind_values` like the eager call it replaces.

    :param model: the BlobModel whose ``head`` and ``network`` it runs (read at every call, so a retargeted head
        is followed).
    :param compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``...); for Inductor (the
        default backend) ``options`` are merged over ``{"fallback_random": True}``. ``options={"cpp_wrapper": True}``
        (``compile_cpp_wrapper=true``) has Inductor write the code around the compiled kernels in C++: the same
        numbers with less Python per call, for longer compiles (``benchmarks/results/compiled/``).
    """

    def __init__(self, model, **compile_kwargs):
        if any(getattr(m, "_blob_checkpointed", False) for m in model.network.modules()):
            raise ModelError("the network's blocks are gradient-checkpointed, which replays Flipout's signs from "
                             "Python: compile a network without checkpointing")
        self.model = model
        self.variants = [(site.layer.lora_variant[ADAPTER], site.factor) for site in model.sites]
        if compile_kwargs.get("backend", "inductor") == "inductor":  # other backends take other options
            compile_kwargs["options"] = {"fallback_random": True, **compile_kwargs.get("options", {})}
        self.compile_kwargs = compile_kwargs  # what every graph here is compiled with
        self.sign_bytes: dict[tuple, int] = {}  # batch shape -> bytes of Flipout signs one call draws
        self.calls = {"eager": 0, "compiled": 0}
        self._no_signs = SignPool(torch.empty(0, dtype=torch.uint8), "token")  # no Flipout: nothing is drawn
        self._graph = torch.compile(self._logits, **compile_kwargs)
        # what the ELBO step hands fill_normal_densities for this model (blob_pyro.infer); the one step without it (a
        # run's validated first) logs its KL eagerly rather than compile a graph for one call
        self.log_densities = torch.compile(normal_log_densities, **compile_kwargs)

    def _logits(self, batch: dict) -> torch.Tensor:
        return self.model.head.logits(self.model.network, batch)

    def __call__(self, batch: dict) -> torch.Tensor:
        handler = active_flipout()
        if any(v.tap is not None for v, _ in self.variants):  # a tap's Python hooks see eager tensors
            return self._eager(batch)
        locs = []
        for variant, factor in self.variants:
            value = variant.values.get(factor)
            loc = handler.loc_of(value) if handler is not None and value is not None else None
            locs.append(loc)
        flipped = any(loc is not None for loc in locs)
        if flipped:
            key = _shape_key(batch)
            nbytes = self.sign_bytes.get(key)
            if nbytes is None:  # a new shape: run it eagerly and count the signs it draws
                before = handler.bytes_drawn
                out = self._eager(batch)
                self.sign_bytes[key] = handler.bytes_drawn - before
                return out
            device = next(iter(self.model.network.parameters())).device
            pool = SignPool(handler.draw_bytes(nbytes, device), handler.per)
        else:
            pool = self._no_signs
        try:
            for (variant, factor), loc in zip(self.variants, locs):
                if loc is not None:
                    variant.locs[factor] = loc
                variant.signs = pool
            out = self._graph(batch)
        finally:
            for variant, _ in self.variants:
                variant.locs.clear()
                variant.signs = None
        pool.check_used()
        self.calls["compiled"] += 1
        return out

    def _eager(self, batch: dict) -> torch.Tensor:
        self.calls["eager"] += 1
        return self._logits(batch)
