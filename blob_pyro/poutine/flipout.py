"""Flipout as a Pyro effect handler.

Inside ``flipout()``, a LoRA factor whose value was drawn from a distribution with a known mean
is applied as ``x @ loc.T + ((x * r) @ (value - loc).T) * s``, with fresh Rademacher signs ``r``
(input side) and ``s`` (output side) for every example and token: one shared Gaussian draw per
layer, decorrelated across positions by the sign flips (Wen et al. 2018; ``docs/reference.md``)::

    with flipout():
        loss = svi.step(batch)          # guide draws once per layer, signs differ per token
    with flipout(per="sequence"):       # one sign vector per example (cheaper; see FlipoutMessenger)
        loss = svi.step(batch)

Outside the handler, or for a value with no recorded mean (AutoDelta, a conditioned value),
the factor is applied as the plain matrix it is: one weight sample shared by the whole batch.

How the signs are made and kept (what makes Flipout cost about what plain LoRA costs):

- Signs are random *bits*: one random byte gives 8 signs, drawn from a generator the handler seeds
  once from the global torch RNG when it is entered (so ``torch.manual_seed`` still fixes every draw,
  and the global RNG advances by the same amount whatever the batch shape: the Gaussian draws of
  processes that share a seed stay in step; ``stream`` decorrelates their signs).
- A sign flip is an XOR of the sign bit (exact, the same as multiplying by ±1), so no float sign
  tensor is ever built.
- :class:`FlipoutLinearFunction` saves only ``x``, the mean, the perturbation and the packed bits
  (1 bit per sign) for backward, where the signs are unpacked again: no bool mask (1 byte per sign) and,
  for a Bayesian ``lora_A``, no flipped copy of the layer input (4 bytes per element) lives until backward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import Independent
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK

from ..distributed import rank as _rank

__all__ = ["FlipoutMessenger", "FlipoutReplay", "FlipoutLinearFunction", "SignPool", "flipout", "flipout_linear",
           "flipout_apply", "active_flipout", "apply_signs", "sign_bytes"]

_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SHIFTS: dict[tuple, torch.Tensor] = {}


def _distribution_loc(fn, infer: dict, value: torch.Tensor) -> torch.Tensor | None:
    """The mean a draw ``value`` was perturbed around, if the site says or the distribution has one."""
    loc = (infer or {}).get("flipout_loc")
    if loc is None:
        base = fn
        # look through Independent and blob_pyro.poutine.Float64Density to the distribution itself
        while isinstance(base, Independent) or getattr(base, "_wraps_density", False):
            base = base.base_dist
        loc = getattr(base, "loc", None)
    if loc is None or not torch.is_tensor(loc):
        return None
    if loc.shape != value.shape:
        if loc.numel() != value.numel():
            return None
        loc = loc.reshape(value.shape)
    return loc


def sign_bytes(numel: int) -> int:
    """Bytes of random bits needed for ``numel`` signs (a multiple of 8, so they view as any int type)."""
    return 8 * max(1, math.ceil(numel / 64))


def apply_signs(t: torch.Tensor, bits: torch.Tensor, shape) -> torch.Tensor:
    """``t * r`` where r (shape ``shape``, broadcast against t) holds the signs packed in ``bits`` (uint8).

    Bit k of the packed words decides the sign of element k of ``shape`` (row-major); the flip is an
    XOR of t's sign bit, so the result is exactly ``t * r`` in any float dtype::

        bits = torch.randint(0, 256, (sign_bytes(x.numel()),), dtype=torch.uint8)
        y = apply_signs(x, bits, x.shape)           # same bits, same signs: apply twice gives x back
    """
    itype = _INT_OF[t.element_size()]
    return (t.view(itype) ^ _sign_mask(bits, shape, itype, t.device)).view(t.dtype)


def _flip_(t: torch.Tensor, bits: torch.Tensor, shape) -> torch.Tensor:
    """In-place :func:`apply_signs` (for a tensor nobody else holds)."""
    itype = _INT_OF[t.element_size()]
    t.view(itype).bitwise_xor_(_sign_mask(bits, shape, itype, t.device))
    return t


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a call where it is one already (a dispatch per call counts at small sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


def _sign_mask(bits: torch.Tensor, shape, itype: torch.dtype, device) -> torch.Tensor:
    """Integer tensor of ``shape``: the sign bit set where the packed bit is 1, every other bit 0."""
    nbits = torch.iinfo(itype).bits
    key = (itype, device)
    shifts = _SHIFTS.get(key)
    if shifts is None:
        shifts = _SHIFTS[key] = torch.arange(nbits, dtype=itype, device=device)
    numel = math.prod(shape)
    words = bits.view(itype)
    if words.numel() * nbits != numel:  # slices only where the words hold more bits than signs (a dispatch each)
        words = words[: math.ceil(numel / nbits)]
    mask = words.unsqueeze(-1) << shifts
    mask.bitwise_and_(torch.iinfo(itype).min)
    return mask.view(shape) if mask.numel() == numel else mask.reshape(-1)[:numel].reshape(shape)


class FlipoutMessenger(Messenger):
    """Records the mean of every latent draw so that :func:`flipout_linear` can flip around it.

    :param str per: ``"token"`` (the paper: signs for every example and position) or
        ``"sequence"`` (one sign vector per example, shared by its tokens; cheaper, still
        decorrelates examples).
    :param int seed: seed of the sign generator; by default one number is drawn from the global
        torch RNG when the handler is entered.
    :param int stream: mixed into the seed so that processes sharing the global RNG state (data-parallel
        training) draw different signs; default: this process's rank (0 when not distributed).
    """

    def __init__(self, per: str = "token", *, seed: int | None = None, stream: int | None = None):
        if per not in ("token", "sequence"):
            raise ValueError(f"flipout per must be 'token' or 'sequence', got {per!r}")
        super().__init__()
        self.per = per
        self.seed = seed
        self.stream = stream
        self._locs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        self._seed = 0
        self.tapes: list[list[torch.Tensor]] = []  # gradient checkpointing records the bits drawn here
        self._given: set[int] = set()
        self.bytes_drawn = 0

    def __enter__(self):
        self._locs = {}
        self._generators = {}
        self._given = set()
        self.bytes_drawn = 0
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        # a fixed odd multiplier spreads streams apart; seeds stay in [0, 2**63)
        stream = _rank() if self.stream is None else int(self.stream)
        self._seed = (seed + stream * 0x9E3779B97F4A7C15) % (2**63)
        return super().__enter__()

    def __exit__(self, *args):
        self._locs = {}
        self._generators = {}
        return super().__exit__(*args)

    def _pyro_sample(self, msg):
        # A value that is already there (replayed from the guide, conditioned) was not drawn around this
        # site's distribution: a replayed model site must not register its *prior's* mean (an AutoDelta
        # draw would otherwise be sign-flipped around 0, turning MLE/MAP LoRA outputs into noise).
        if msg["done"] or msg["value"] is not None:
            self._given.add(id(msg))

    def _pyro_post_sample(self, msg):
        if id(msg) in self._given:
            self._given.discard(id(msg))
            return
        value = msg["value"]
        if msg["is_observed"] or not torch.is_tensor(value) or id(value) in self._locs:
            return
        loc = _distribution_loc(msg["fn"], msg["infer"], value)
        if loc is not None:
            self.register(value, loc)

    def register(self, value: torch.Tensor, loc: torch.Tensor) -> None:
        """Declare that ``value`` is a draw around ``loc`` (what sample sites do automatically)."""
        # keep a reference to value so its id cannot be reused while we are active
        self._locs[id(value)] = (value, loc)

    def loc_of(self, value: torch.Tensor) -> torch.Tensor | None:
        entry = self._locs.get(id(value))
        return None if entry is None or entry[0] is not value else entry[1]

    def random_bits(self, numel: int, device) -> torch.Tensor:
        """Packed random bits for ``numel`` signs on ``device`` (uint8, see :func:`apply_signs`)."""
        bits = self.draw_bytes(sign_bytes(numel), device)
        for tape in self.tapes:
            tape.append(bits)
        return bits

    def draw_bytes(self, nbytes: int, device) -> torch.Tensor:
        """``nbytes`` random bytes (uint8) from this handler's generator on ``device``; ``bytes_drawn`` counts them."""
        device = torch.device(device)
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
            gen.manual_seed(self._seed)
        self.bytes_drawn += nbytes
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device, generator=gen)

    def frozen_copy(self) -> FlipoutMessenger:
        """A copy that knows the same means (for replaying a block under gradient checkpointing)."""
        copy = FlipoutMessenger(self.per, seed=0, stream=0)
        copy._locs = dict(self._locs)
        return copy


class FlipoutReplay(FlipoutMessenger):
    """Flipout for the recomputation of a checkpointed block: ``handler``'s means, and the recorded
    sign bits handed out again in the order they were drawn (see :func:`blob_pyro.lora.checkpoint_contexts`)."""

    def __init__(self, handler: FlipoutMessenger, tape: list[torch.Tensor]):
        super().__init__(handler.per, seed=0, stream=0)
        self._frozen = dict(handler._locs)
        self._tape = tape
        self._next = 0

    def __enter__(self):
        self._next = 0
        result = super().__enter__()  # draws nothing: the seed is fixed
        self._locs = dict(self._frozen)
        return result

    def random_bits(self, numel: int, device) -> torch.Tensor:
        if self._next >= len(self._tape):
            raise RuntimeError("gradient checkpointing recomputed more Flipout layers than the forward pass ran")
        bits = self._tape[self._next]
        self._next += 1
        if bits.numel() != sign_bytes(numel):
            raise RuntimeError("gradient checkpointing recomputed a Flipout layer with another input shape")
        return bits


def flipout(per: str = "token", *, seed: int | None = None, stream: int | None = None) -> FlipoutMessenger:
    """Context manager: apply Bayesian LoRA factors with Flipout (see module docstring)."""
    return FlipoutMessenger(per=per, seed=seed, stream=stream)


def active_flipout() -> FlipoutMessenger | None:
    for frame in reversed(_PYRO_STACK):
        if isinstance(frame, FlipoutMessenger):
            return frame
    return None


class FlipoutLinearFunction(torch.autograd.Function):
    """``y = x @ loc.T + s ⊙ ((r ⊙ x) @ delta.T)`` with signs r, s packed in ``in_bits``/``out_bits``.

    Saves x, loc, delta and the packed bits; backward unpacks the signs again::

        y = FlipoutLinearFunction.apply(x, loc, delta, in_bits, out_bits, x.shape, y_shape)

    Under autocast the matmuls run in the autocast dtype and backward computes in the gradient's
    dtype, returning each gradient in its input's dtype.
    """

    @staticmethod
    def forward(ctx, x, loc, delta, in_bits, out_bits, in_shape, out_shape):
        noise = _flip_(F.linear(apply_signs(x, in_bits, in_shape), delta), out_bits, out_shape)
        cdt = noise.dtype  # the autocast dtype, if any: add the mean path in place, in that dtype
        y = noise.reshape(-1, noise.shape[-1]).addmm_(_to(x.reshape(-1, x.shape[-1]), cdt), _to(loc, cdt).t())
        y = y.view(noise.shape)
        ctx.save_for_backward(x, loc, delta, in_bits, out_bits)
        # the bit -> element map depends on the dtype's width: backward flips in the same dtypes
        ctx.shapes = (tuple(in_shape), tuple(out_shape), noise.dtype)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, loc, delta, in_bits, out_bits = ctx.saved_tensors
        in_shape, out_shape, out_dtype = ctx.shapes
        cdt = grad.dtype
        grad_s = _to(apply_signs(_to(grad, out_dtype), out_bits, out_shape), cdt)  # s ⊙ g
        grad_x = grad_loc = grad_delta = None
        g2 = grad.reshape(-1, grad.shape[-1])
        itype = _INT_OF[x.element_size()]
        # r's mask (x's width) is made once for both uses: grad_x flips (s ⊙ g) delta, grad_delta flips x
        in_mask = _sign_mask(in_bits, in_shape, itype, x.device) if ctx.needs_input_grad[0] or ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[0]:
            back = _to(grad_s @ _to(delta, cdt), x.dtype)
            back.view(itype).bitwise_xor_(in_mask)  # r ⊙ ((s ⊙ g) delta)
            grad_x = back.reshape(-1, back.shape[-1]).addmm_(_to(g2, x.dtype), _to(loc, x.dtype)).view(back.shape)
        if ctx.needs_input_grad[1]:
            grad_loc = _to(g2.T @ _to(x.reshape(-1, x.shape[-1]), cdt), loc.dtype)
        if ctx.needs_input_grad[2]:
            xr = _to((x.view(itype) ^ in_mask).view(x.dtype), cdt)
            grad_delta = _to(grad_s.reshape(-1, grad.shape[-1]).T @ xr.reshape(-1, x.shape[-1]), delta.dtype)
        return grad_x, grad_loc, grad_delta, None, None, None, None


def flipout_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (x: (..., in), weight: (out, in)), with Flipout when a handler knows weight's mean."""
    handler = active_flipout()
    loc = handler.loc_of(weight) if handler is not None else None
    if loc is None:
        return F.linear(x, weight)
    return flipout_apply(x, weight, loc, handler)


def flipout_apply(x: torch.Tensor, weight: torch.Tensor, loc: torch.Tensor, signs) -> torch.Tensor:
    """Flipout of ``x @ weight.T`` around ``loc`` with the signs ``signs.random_bits`` hands out and its ``per``
    (a :class:`FlipoutMessenger`, or a :class:`SignPool` drawn before a compiled network runs)."""
    delta = weight - loc
    out_features = weight.shape[0]
    if signs.per == "sequence" and x.dim() >= 3:
        in_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        out_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (out_features,)
    else:
        in_shape = tuple(x.shape)
        out_shape = tuple(x.shape[:-1]) + (out_features,)
    in_bits = signs.random_bits(math.prod(in_shape), x.device)
    out_bits = signs.random_bits(math.prod(out_shape), x.device)
    return FlipoutLinearFunction.apply(x, loc, delta, in_bits, out_bits, in_shape, out_shape)


class SignPool:
    """Packed sign bits drawn in one call, handed out in order: what a compiled network takes its Flipout signs
    from, so that no random draw (and no Pyro handler) is inside the graph.

    ``FlipoutMessenger.random_bits(n)`` draws ``sign_bytes`` bytes per call from the handler's generator; on a
    CPU one draw of the calls' total is the same bytes as the calls one after another, so a network that takes
    its signs from a pool of ``handler.random_bits`` computes what it computes under the handler::

        pool = SignPool(handler.draw_bytes(nbytes), handler.per)   # nbytes: what one call of the network used
        y = flipout_apply(x, weight, loc, pool)                     # ... for every Bayesian factor, in order
        pool.check_used()                                           # every byte handed out, none missing
    """

    def __init__(self, bits: torch.Tensor, per: str):
        self.bits, self.per, self.offset = bits, per, 0

    def random_bits(self, numel: int, device) -> torch.Tensor:
        n = sign_bytes(numel)
        start = self.offset
        self.offset = start + n
        return self.bits[start:start + n]

    def check_used(self) -> None:
        if self.offset != self.bits.numel():
            raise RuntimeError(f"the network took {self.offset} bytes of Flipout signs where {self.bits.numel()} were "
                               f"drawn for this batch shape")
