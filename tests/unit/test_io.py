"""blob_pyro.io: a reader sees the old file or the new one; a failed write leaves the old one and no temporaries."""

import os
import stat

import pytest
import torch

from blob_pyro.io import (
    atomic_dir,
    atomic_new_dir,
    atomic_save_safetensors,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
)


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_text_replaces_the_file(tmp_path):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new ✓\n")
    assert path.read_text(encoding="utf-8") == "new ✓\n" and _names(tmp_path) == ["metrics.json"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable as a normal file, not mkstemp's 0600
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


class Boom(Exception):
    pass


@pytest.mark.parametrize("interrupt", [Boom, KeyboardInterrupt])
def test_an_exception_during_a_write_leaves_the_old_file_and_no_temporaries(tmp_path, interrupt):
    path = tmp_path / "config.json"
    atomic_write_text(path, "precious")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half of the new")
        raise interrupt()

    with pytest.raises(interrupt):
        atomic_write(path, write)
    assert path.read_text() == "precious" and _names(tmp_path) == ["config.json"]


def test_a_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        atomic_write(tmp_path / "new.txt", lambda tmp: (_ for _ in ()).throw(Boom()))
    assert _names(tmp_path) == []


def test_a_failing_rename_leaves_the_old_file_and_no_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    def fail(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and _names(tmp_path) == ["a.txt"]


def test_atomic_save_safetensors(tmp_path, monkeypatch):
    from safetensors import safe_open

    path = tmp_path / "posterior.safetensors"
    t = torch.arange(6.0).reshape(2, 3).t()  # not contiguous
    atomic_save_safetensors(path, {"w": t, "v": torch.ones(2, requires_grad=True)}, metadata={"guide": "BlobGuide"})
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"guide": "BlobGuide"} and torch.equal(f.get_tensor("w"), t)
    good = path.read_bytes()

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_safetensors(path, {"w": torch.zeros(1)})
    assert path.read_bytes() == good and _names(tmp_path) == ["posterior.safetensors"]


def test_atomic_dir_replaces_a_folder_on_success_only(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.json").write_text("1")
    assert _names(target) == ["a.json"] and stat.S_IMODE(target.stat().st_mode) == 0o755
    with atomic_dir(target) as tmp:  # an existing folder is replaced whole, not merged
        (tmp / "b.json").write_text("2")
    assert _names(target) == ["b.json"]
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "c.json").write_text("3")
            raise Boom()
    assert _names(target) == ["b.json"] and _names(tmp_path) == ["adapter"]


def test_atomic_new_dir_keeps_a_folder_that_appeared_first(tmp_path):
    target = tmp_path / "cache"
    with atomic_new_dir(target) as tmp:
        (tmp / "a.json").write_text("1")
    assert _names(target) == ["a.json"] and stat.S_IMODE(target.stat().st_mode) == 0o755
    with atomic_new_dir(target) as tmp:  # another writer's complete folder is kept, this copy dropped
        (tmp / "b.json").write_text("2")
    assert _names(target) == ["a.json"] and _names(tmp_path) == ["cache"]
    with pytest.raises(Boom):
        with atomic_new_dir(tmp_path / "new") as tmp:
            (tmp / "c.json").write_text("3")
            raise Boom()
    assert _names(tmp_path) == ["cache"]
