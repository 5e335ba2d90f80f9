"""Data-parallel training over several processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

:func:`blob_pyro.training.train_run` calls :func:`init_from_env`, which joins the process group that a
launcher describes in the environment (call it yourself before :func:`blob_pyro.fit` in your own loop)
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    accelerate launch --num_processes 4 -m blob_pyro.cli train --model ... --output-dir runs/x   # GPUs
    accelerate launch --multi_gpu --num_processes 2 -m blob_pyro.cli train ...                 # CPU, gloo
    torchrun --nproc_per_node 2 -m blob_pyro.cli train ...

What each process does (see docs/distributed.md):

- every process loads the whole training set and walks the same sequence of *global* batches of
  ``batch_size × world_size`` examples (the order comes from the seed); process ``rank`` takes the
  ``rank``-th slice of ``batch_size`` examples, so ``batch_size`` is per process, as in the official code;
- the likelihood is scaled by the global N, and the gradients of every param-store parameter are
  averaged over processes before each optimiser step (:func:`average_gradients`), so K processes
  with ``batch_size`` B follow the single-process ELBO with batch K·B;
- all processes share the seed, hence the same initial parameters (also broadcast from rank 0) and the
  same Gaussian draws of the LoRA factors; Flipout signs differ per process (``stream = rank``);
- only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["init_from_env", "is_distributed", "world_size", "rank", "local_rank", "is_main", "barrier",
           "average_gradients", "broadcast_tensors", "mean_of", "any_true",
           "gather_objects", "broadcast_object", "device_for"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() else None


def is_distributed() -> bool:
    dist = _dist()
    return dist is not None and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", rank())) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | torch.device | None = None) -> bool:
    """Join the process group described by the launcher's environment; True when running distributed.

    Does nothing (returns False) for a single process or when ``WORLD_SIZE`` is unset or 1; returns True
    without re-initialising when a group already exists. The backend is NCCL when ``device`` is CUDA (or
    ``auto`` with a GPU present), else gloo.
    """
    dist = _dist()
    if dist is None:
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    name = str(device or "auto")
    cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_world_size() > 1


def device_for(name: str) -> torch.device:
    """The device this process trains on: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under a launcher."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and is_distributed():
        return torch.device("cuda", local_rank())
    return torch.device(name)


def _comm_device(device=None) -> torch.device:
    """Where small tensors for collectives live: the GPU for NCCL, else the CPU."""
    if device is not None:
        return torch.device(device)
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        _dist().barrier()


def _flat_all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over processes with one all-reduce per device and dtype."""
    dist = _dist()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    n = world_size()
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(n)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """Replace each ``p.grad`` by its mean over processes (no-op for one process).

    Parameters are ordered by their param-store name so every process reduces the same list; those
    without a gradient are skipped (they are the same on every process: the model is).
    """
    if not is_distributed():
        return
    import pyro

    store = pyro.get_param_store()
    with_grad = [p for p in params if p.grad is not None]
    with_grad.sort(key=lambda p: store.param_name(p) or "")
    if with_grad:
        _flat_all_reduce_mean([p.grad for p in with_grad])


@torch.no_grad()
def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op for one process)."""
    if not is_distributed():
        return
    dist = _dist()
    for t in tensors:
        dist.broadcast(t.data, src=src)


def mean_of(values: list[float], device=None) -> list[float]:
    """Mean of each number over processes (the input for one process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(device))
    _dist().all_reduce(t, op=_dist().ReduceOp.SUM)
    return (t / world_size()).tolist()


def any_true(flag: bool, device=None) -> bool:
    """True if ``flag`` is true on any process (e.g. Ctrl-C seen by one of them)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(device))
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process (``[obj]`` for one process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    _dist().all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]
