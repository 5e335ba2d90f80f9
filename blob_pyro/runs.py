"""Build, train, evaluate, save and load a run: the glue between config, model, guide and files.

::

    cfg = TrainConfig(model="minilm", dataset="winogrande_s", data_dir="../shared/data", max_steps=200)
    run = build(cfg)                      # model, guide, train/eval splits
    train_run(cfg, "runs/wg")            # writes config.json, train_log.jsonl, adapter/, posterior.safetensors, metrics.json
    run = load_run("runs/wg")            # restores model, guide and posterior
    out = predict(run.model, run.guide, run.eval, num_samples=10)

A run directory::

    config.json               everything needed to reproduce (settings, versions, git commit)
    train_log.jsonl           one JSON record per step
    adapter/                  vanilla PEFT adapter holding the posterior mean (PeftModel.from_pretrained)
    posterior.safetensors     the guide's variational parameters
    metrics.json              accuracy, ece, nll, brier + dataset, split, num_samples
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

from .config import ConfigError, TrainConfig
from .data import dataset_info, load_split
from .guides import make_guide
from .heads import CausalLMHead, MultipleChoiceHead, SequenceClassificationHead
from .lora import attach_variants, inject_lora, lora_layers
from .model import BlobModel
from .priors import make_prior

__all__ = ["Run", "RunError", "build", "evaluate", "build_model", "train_run", "evaluate_run", "load_run", "save_run",
           "atomic_write_text", "set_seed", "pick_device"]


class RunError(ValueError):
    """A run directory is missing, damaged or does not fit the requested model (one-line message)."""


@dataclass
class Run:
    config: TrainConfig
    model: BlobModel
    guide: object
    train: object = None
    eval: object = None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _make_head(kind: str, tokenizer, num_classes: int, option_words, max_length: int):
    if kind == "causal_lm":
        return CausalLMHead(tokenizer, option_words, max_length)
    if kind == "multiple_choice":
        return MultipleChoiceHead(tokenizer, num_classes, max_length)
    return SequenceClassificationHead(tokenizer, num_classes, max_length)


def build_model(cfg: TrainConfig, *, num_data: int = 1, adapter_dir: str | os.PathLike | None = None) -> BlobModel:
    """The Pyro model for ``cfg`` (fresh LoRA, or the adapter in ``adapter_dir``)."""
    from .backbone import default_targets, load_backbone

    num_classes, option_words = dataset_info(cfg.dataset)
    hf_model, tokenizer, kind = load_backbone(
        cfg.model, num_classes=num_classes, head=cfg.head, trust_remote_code=cfg.trust_remote_code,
        load_in_8bit=cfg.load_in_8bit, load_in_4bit=cfg.load_in_4bit)
    targets = list(cfg.target_modules) if cfg.target_modules else default_targets(hf_model.config)
    modules_to_save = ["classifier"] if kind != "causal_lm" else None
    if adapter_dir is None:
        network = inject_lora(hf_model, targets, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                              lora_dropout=cfg.lora_dropout, modules_to_save=modules_to_save)
    else:
        from peft import PeftModel

        network = PeftModel.from_pretrained(hf_model, str(adapter_dir), is_trainable=True)
        attach_variants(network)
    network.to(pick_device(cfg.device))
    head = _make_head(kind, tokenizer, num_classes, option_words, cfg.max_length)
    prior = make_prior(cfg.prior, cfg.prior_scale, **({"df": cfg.prior_df} if cfg.prior == "student_t" else {}))
    return BlobModel(network, head, bayesian_factor=cfg.bayesian_factor, prior=prior, num_data=num_data)


def build(cfg: TrainConfig, *, with_data: bool = True) -> Run:
    """Seeded construction of data, model and guide for a (validated, effective) config."""
    cfg = cfg.effective().validate()
    set_seed(cfg.seed)
    pyro.clear_param_store()
    train = eval_split = None
    if with_data:
        train = load_split(cfg.dataset, "train", cfg.data_dir, limit=cfg.train_limit)
        eval_split = load_split(cfg.dataset, "eval", cfg.data_dir, limit=cfg.eval_limit)
        if len(train) < cfg.batch_size:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the training split ({len(train)} examples)")
    model = build_model(cfg, num_data=len(train) if train is not None else 1)
    guide = make_guide(cfg.guide, model, eps=cfg.eps, std_param=cfg.std_param, rank=cfg.guide_rank)
    return Run(cfg, model, guide, train, eval_split)


# ---- files ---------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _versions() -> dict:
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        from importlib.metadata import version

        out["blob_pyro"] = version("blob_pyro")
    except Exception:  # not installed as a distribution (e.g. a source checkout on sys.path)
        out["blob_pyro"] = None
    try:
        here = Path(__file__).resolve().parent
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                           timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def guide_state(guide) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in guide.state_dict().items()}


def save_run(out_dir, run: Run, *, metrics: dict | None = None) -> None:
    """Write adapter/ (posterior mean, vanilla PEFT) and posterior.safetensors; metrics.json if given."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, guide = run.model, run.guide
    model.write_factors(guide.median(model.example_batch()) if _needs_args(guide) else guide.median())
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".adapter."))
    try:
        os.chmod(tmp, 0o755)
        model.network.save_pretrained(str(tmp))
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")
        os.replace(tmp, out / "adapter")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    meta = {"guide": type(guide).__name__, "bayesian_factor": model.bayesian_factor,
            "sites": json.dumps([s.name for s in model.sites])}
    fd, tmpf = tempfile.mkstemp(dir=out, prefix=".posterior.")
    os.close(fd)
    save_file(guide_state(guide), tmpf, metadata=meta)
    os.chmod(tmpf, 0o644)
    os.replace(tmpf, out / "posterior.safetensors")
    if metrics is not None:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def _needs_args(guide) -> bool:
    return getattr(guide, "prototype_trace", None) is None and getattr(guide, "_specs", None) is None


def read_run_config(run_dir) -> TrainConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a blob_pyro run folder (no config.json)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{path} is not valid JSON: {err}") from err
    return TrainConfig.from_dict(data.get("config", data), source=f"key in {path}:")


def load_run(run_dir, *, dataset: str | None = None, data_dir: str | None = None, device: str | None = None) -> Run:
    """Restore model, guide and posterior from a run directory (and the eval split when ``dataset``/``data_dir`` allow)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if device is not None:
        cfg.device = device
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunError(f"{adapter} has no adapter_config.json; the run did not finish or the folder is damaged")
    _check_adapter(adapter, cfg)
    try:
        state = load_file(str(run_dir / "posterior.safetensors"))
    except FileNotFoundError as err:
        raise RunError(f"{run_dir / 'posterior.safetensors'} is missing") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise RunError(f"{run_dir / 'posterior.safetensors'} is corrupted: {str(err).splitlines()[0]}") from err
    set_seed(cfg.seed)
    pyro.clear_param_store()
    model = build_model(cfg, adapter_dir=adapter)
    guide = make_guide(cfg.guide, model, eps=cfg.eps, std_param=cfg.std_param, rank=cfg.guide_rank)
    with torch.no_grad():
        guide(model.example_batch())  # set up lazy guides and register their parameters
    pyro.clear_param_store()  # the param store would otherwise win over the loaded values
    missing = set(guide.state_dict()) - set(state)
    extra = set(state) - set(guide.state_dict())
    if missing or extra:
        raise RunError(f"posterior.safetensors does not fit this model: missing {sorted(missing)[:3]}, "
                       f"unexpected {sorted(extra)[:3]}")
    device_ = next(model.network.parameters()).device
    guide.load_state_dict({k: v.to(device_) for k, v in state.items()})
    eval_split = None
    if dataset is not None or data_dir is not None:
        eval_split = load_split(dataset or cfg.dataset, "eval", data_dir or cfg.data_dir, limit=cfg.eval_limit)
    return Run(cfg, model, guide, None, eval_split)


def _check_adapter(adapter: Path, cfg: TrainConfig) -> None:
    from .backbone import resolve_model

    try:
        acfg = json.loads((adapter / "adapter_config.json").read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{adapter / 'adapter_config.json'} is not valid JSON") from err
    base = acfg.get("base_model_name_or_path")
    if base and base not in (cfg.model, resolve_model(cfg.model)):
        raise RunError(f"the adapter in {adapter} was made for base model {base!r}, not {cfg.model!r}")
    if acfg.get("r") != cfg.lora_r:
        raise RunError(f"the adapter in {adapter} has rank r={acfg.get('r')}, the run config says {cfg.lora_r}")
    if cfg.target_modules and sorted(acfg.get("target_modules") or []) != sorted(cfg.target_modules):
        raise RunError(f"the adapter in {adapter} targets {acfg.get('target_modules')}, the run config says {cfg.target_modules}")


# ---- train and evaluate --------------------------------------------------------------------
def evaluate(run: Run, data=None, *, num_samples: int | None = None, progress: bool = True) -> dict:
    from .metrics import compute_metrics
    from .predictive import predict

    cfg = run.config
    data = data if data is not None else run.eval
    s = cfg.num_samples if num_samples is None else num_samples
    out = predict(run.model, run.guide, data, num_samples=s, batch_size=cfg.eval_batch_size,
                  use_flipout=cfg.flipout, flipout_per=cfg.flipout_per, sample_batched=cfg.sample_batched,
                  progress=progress, autocast_dtype=torch.bfloat16 if cfg.bf16 else None)
    metrics = compute_metrics(out.probs, out.labels)
    metrics.update(dataset=data.dataset, split=data.split, num_samples=s, num_examples=len(data))
    return metrics


def train_run(cfg: TrainConfig, out_dir, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Train and evaluate ``cfg`` into ``out_dir``; returns the metrics."""
    from .infer import fit

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RunError(f"output folder {out} exists and is not empty (pass --overwrite to replace it)")
    run = build(cfg)
    cfg = run.config
    if out.exists() and overwrite:
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps({"config": cfg.to_dict(), "versions": _versions()}, indent=2) + "\n")
    log_path = out / "train_log.jsonl"
    with open(log_path, "w") as log_file:
        def on_step(record, state):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

        fit(run.model, run.guide, run.train, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr,
            scale_lr=cfg.scale_lr, warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay, elbo=cfg.elbo,
            kl_schedule=cfg.kl_schedule, kl_multiplier=cfg.kl_multiplier, gamma=cfg.gamma,
            use_flipout=cfg.flipout, flipout_per=cfg.flipout_per, preset=cfg.preset, kl_lr=cfg.kl_lr,
            seed=cfg.seed, progress=progress, autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
            callback=on_step)
    metrics = evaluate(run, progress=progress)
    save_run(out, run, metrics=metrics)
    return metrics
