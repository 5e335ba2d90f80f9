"""Atomic writes: a reader sees the old file or the new one, never half of one.

::

    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics))
    atomic_save_safetensors(run_dir / "posterior.safetensors", tensors, metadata={"guide": "BlobGuide"})
    with atomic_dir(run_dir / "adapter") as tmp:        # fill tmp; it replaces adapter/ on success
        network.save_pretrained(tmp)
    with atomic_new_dir(cache / "model") as tmp:        # fill tmp; kept only if no model/ appeared meanwhile
        hf_model.save_pretrained(tmp)

Each write goes to a uniquely named temporary file in the target's folder, is fsynced, renamed over the
target, and the folder is fsynced, so a crash or Ctrl-C leaves either the previous content or the new.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_bytes", "atomic_save_safetensors", "atomic_dir",
           "atomic_new_dir"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then fsync it and rename it to ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` through :func:`atomic_write` (tensors are made contiguous on the CPU)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


@contextlib.contextmanager
def atomic_dir(path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it replaces ``path`` (removed on error).

    The old folder is removed just before the rename, so a crash in that instant leaves no folder at ``path``,
    never a mixed one.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_new_dir(path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; on success it becomes ``path`` unless ``path`` exists.

    For caches that several processes may fill at once: whichever complete copy is renamed first stays, the
    later one is dropped (a rename onto a non-empty folder fails), and no reader ever sees a partial folder.
    """
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
        else:
            _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
