"""blob_pyro.distributed in one process: every helper is a no-op, and nothing joins a group unless asked.

(Two real processes under ``accelerate launch``: tests/integration/test_distributed.py.)"""

import torch

from blob_pyro import distributed


def test_helpers_are_single_process_no_ops():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    t = torch.arange(3.0)
    distributed.broadcast_tensors([t])
    assert torch.equal(t, torch.arange(3.0))
    assert (distributed.world_size(), distributed.rank(), distributed.local_rank()) == (1, 0, 0)
    assert distributed.is_main() and not distributed.is_distributed()
    assert distributed.mean_of([1.0, 2.5]) == [1.0, 2.5]
    assert distributed.any_true(True) and not distributed.any_true(False)
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}] and distributed.broadcast_object("x") == "x"
    distributed.barrier()


def test_init_from_env_does_nothing_without_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is False
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") is False
    assert not torch.distributed.is_initialized()


def test_device_for():
    assert distributed.device_for("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert distributed.device_for("auto").type == expected
