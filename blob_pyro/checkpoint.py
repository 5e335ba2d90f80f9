"""Resumable training checkpoints: one safetensors file, written atomically, no pickle.

A checkpoint holds everything a run needs to continue exactly where it stopped:

- every parameter in Pyro's param store (variational and deterministic), as unconstrained tensors,
  with the name of each constraint (checked on restore, never evaluated);
- the optimiser and learning-rate scheduler state (what ``fit``'s ``state["optimizer_state"]()``
  returns): tensors go into the file, everything else into JSON;
- the step (the data order and the KL weight are pure functions of it and the seed);
- every random number generator: torch CPU (and CUDA when used), Python ``random``, NumPy (Pyro
  draws from these three).

Tensors live in the safetensors file and everything else in its JSON metadata, so one temporary
file + fsync + rename makes the write atomic: a reader sees the old checkpoint or the new one,
never half of one. Loading uses ``safetensors`` and ``json`` only::

    ckpt = capture(step, optimizer_state)           # after a training step (fit's callback)
    save_checkpoint(run_dir / CHECKPOINT, ckpt)
    ...
    ckpt = load_checkpoint(run_dir / CHECKPOINT)    # CheckpointError (one line) if damaged
    restore_params(ckpt)                            # into the (already populated) param store
    fit(..., start_step=ckpt.step, state={"optimizer_state": ckpt.optimizer, "rng_state": ckpt.rng})

:class:`GracefulInterrupt` turns Ctrl-C (SIGINT) and SIGTERM into a flag that the training loop
checks between steps, so an interrupted run saves a consistent checkpoint before it exits.
"""

from __future__ import annotations

import json
import math
import random
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from .errors import CheckpointError
from .io import atomic_save_safetensors

__all__ = ["CHECKPOINT", "Checkpoint", "CheckpointError", "GracefulInterrupt", "capture", "save_checkpoint",
           "load_checkpoint", "restore_params", "get_rng_state", "set_rng_state"]

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "blob_pyro.checkpoint"
VERSION = "1"


@dataclass
class Checkpoint:
    step: int
    params: dict[str, torch.Tensor]  # param store name -> unconstrained value (CPU)
    constraints: dict[str, str]  # param store name -> constraint name
    optimizer: Any  # optimiser/scheduler state, as the training loop gave it
    rng: dict  # see get_rng_state()

    def nonfinite(self) -> str | None:
        """Name of the first parameter or optimiser tensor holding NaN or inf, else None."""
        for name, t in self.params.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
        tensors: dict[str, torch.Tensor] = {}
        _encode(self.optimizer, tensors, "optimizer")
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                return name
        return None


# ---- random number generators ---------------------------------------------------------------
def get_rng_state() -> dict:
    """State of every RNG a run draws from: torch CPU (+ CUDA if initialised), Python, NumPy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- capture and restore --------------------------------------------------------------------
def capture(step: int, optimizer_state: Any) -> Checkpoint:
    """Snapshot the global param store, ``optimizer_state`` and the RNGs after training step ``step``."""
    state = pyro.get_param_store().get_state()
    params = {name: p.detach().cpu().clone().contiguous() for name, p in state["params"].items()}
    constraints = {name: repr(state["constraints"][name]) for name in params}
    return Checkpoint(int(step), params, constraints, optimizer_state, get_rng_state())


@torch.no_grad()
def restore_params(ckpt: Checkpoint) -> None:
    """Copy the checkpoint's values into the param store, in place (modules and optimisers keep their tensors).

    The store must already hold the same parameters (run the guide and model once first).
    """
    store = pyro.get_param_store().get_state()
    have, constraints = store["params"], store["constraints"]
    missing, extra = sorted(set(ckpt.params) - set(have)), sorted(set(have) - set(ckpt.params))
    if missing or extra:
        raise CheckpointError(f"checkpoint does not fit this model: parameters only in the checkpoint {missing[:3]}, "
                              f"only in the model {extra[:3]}")
    for name, value in ckpt.params.items():
        target = have[name]
        if tuple(target.shape) != tuple(value.shape):
            raise CheckpointError(f"checkpoint does not fit this model: {name} has shape {tuple(value.shape)}, "
                                  f"the model needs {tuple(target.shape)}")
        if repr(constraints[name]) != ckpt.constraints.get(name):
            raise CheckpointError(f"checkpoint does not fit this model: {name} has constraint "
                                  f"{ckpt.constraints.get(name)}, the model uses {constraints[name]!r}")
        target.copy_(value.to(device=target.device, dtype=target.dtype))


# ---- files ----------------------------------------------------------------------------------
def save_checkpoint(path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    tensors = {f"param/{name}": t for name, t in ckpt.params.items()}
    state = {"step": ckpt.step, "constraints": ckpt.constraints,
             "optimizer": _encode(ckpt.optimizer, tensors, "optimizer"),
             "rng": _encode_rng(ckpt.rng, tensors)}
    meta = {"format": FORMAT, "version": VERSION, "state": json.dumps(state)}
    atomic_save_safetensors(path, tensors, metadata=meta)


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (safetensors + JSON only)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as err:
        raise CheckpointError(f"{path} does not exist") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupted: {_first_line(err)}") from err
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a blob_pyro checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {meta.get('version')}, this blob_pyro reads {VERSION}")
    try:
        state = json.loads(meta["state"])
        params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
        return Checkpoint(int(state["step"]), params, dict(state["constraints"]),
                          _decode(state["optimizer"], tensors), _decode_rng(state["rng"], tensors))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupted: bad state ({type(err).__name__}: {_first_line(err)})") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---- JSON encoding of nested state (optimiser dicts, RNG tuples) -----------------------------
# Tensors become {"__tensor__": key} (stored in the safetensors file under key), tuples
# {"__tuple__": [...]}, dicts with non-string keys {"__items__": [[key, value], ...]}. Anything else
# that is not plain JSON is refused, so loading never constructs arbitrary objects.
def _encode(obj: Any, tensors: dict, prefix: str) -> Any:
    if torch.is_tensor(obj):
        key = f"{prefix}/{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, prefix) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, prefix), _encode(v, tensors, prefix)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _decode(obj: Any, tensors: dict) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _encode_rng(rng: dict, tensors: dict) -> dict:
    name, keys, pos, has_gauss, cached = rng["numpy"]
    out = {"torch": _encode(rng["torch"], tensors, "rng"), "python": _encode(rng["python"], tensors, "rng"),
           "numpy": [str(name), np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)]}
    if "cuda" in rng:
        out["cuda"] = _encode(list(rng["cuda"]), tensors, "rng")
    return out


def _decode_rng(data: dict, tensors: dict) -> dict:
    name, keys, pos, has_gauss, cached = data["numpy"]
    out = {"torch": _decode(data["torch"], tensors), "python": _decode(data["python"], tensors),
           "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)}
    if "cuda" in data:
        out["cuda"] = _decode(data["cuda"], tensors)
    return out


# ---- signals --------------------------------------------------------------------------------
class GracefulInterrupt:
    """Context manager: the first SIGINT/SIGTERM only sets ``signum``; a second one interrupts at once.

    ::

        with GracefulInterrupt() as stop:
            for step in steps:
                train_one(step)
                if stop.signum is not None:
                    save_checkpoint(...)
                    break

    Handlers are installed only in the main thread (elsewhere the context does nothing).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # asked twice: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
