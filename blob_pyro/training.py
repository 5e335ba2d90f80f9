"""Build, train, evaluate, save and load a run: the glue between config, model, guide and files.

::

    cfg = RunConfig.from_dict({"model": "minilm", "dataset": "arc_easy", "data_dir": "../shared/data"})
    run = build(cfg)                      # model, guide, train/eval splits (cfg resolved: run.config)
    train_run(cfg, "runs/wg")            # writes config.json, train_log.jsonl, adapter/, posterior.safetensors, metrics.json
    resume_run("runs/wg")                # after a crash or Ctrl-C: continue from checkpoint.safetensors
    run = load_run("runs/wg")            # restores model, guide and posterior
    metrics = evaluate(run)               # predict with run.config.predict, then compute_metrics

A run directory::

    config.json               everything needed to reproduce (settings, versions, git commit, CPU kernel level)
    train_log.jsonl           one JSON record per step
    checkpoint.safetensors    resumable training state (--checkpoint-every K, Ctrl-C; see blob_pyro.checkpoint)
    adapter/                  vanilla PEFT adapter holding the posterior mean (PeftModel.from_pretrained)
    posterior.safetensors     the guide's variational parameters
    temperature.json          method=temperature: the fitted T and the held-out training examples it was fitted on
    tfb.json                  method=tfb: the searched sigma, the anchor training examples, their NLL at 0 and sigma, the trace
    laplace.json              method=laplace: the prior precision found, its marginal-likelihood trace, the hessian
                              structure, the predictive (glm | sample), time and memory (posterior.safetensors then
                              holds MAP point and precision)
    predictions.safetensors   the eval split's labels (N,), probs (N, K) and per-draw logits (S, N, K)
    member0/ ... member<K-1>/ method=ensemble: one run folder per member (predictions.safetensors: their average,
                              member_logits (K, N, K))
    metrics.json              accuracy, ece, nll, brier + dataset, split, num_samples
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import torch

from .config import PredictConfig, RunConfig
from .data import dataset_info, load_eval, load_splits
from .errors import ConfigError, HeadError, RunError, TrainingError
from .guides import make_guide
from .heads import CausalLMHead, ClozeHead, MultipleChoiceHead, SequenceClassificationHead
from .io import atomic_dir, atomic_save_safetensors, atomic_write_text
from .lora import attach_variants, inject_lora
from .model import BlobModel
from .optim import register_parameters
from .priors import make_prior

__all__ = ["Run", "build", "from_run_config", "check_from_run", "post_fit", "evaluate", "metrics_of", "predict_split",
           "output_problem",
           "build_model", "retarget_head", "train_run", "resume_run", "TrainingInterrupted",
           "load_run", "save_run", "read_run_config", "run_versions", "set_seed", "pick_device", "eval_split_of",
           "PREDICTIONS"]


@dataclass
class Run:
    """A built run: the resolved config, the Pyro model and guide, and the data splits (when loaded)."""

    config: RunConfig
    model: BlobModel
    guide: object
    train: object = None
    eval: object = None
    held_out: object = None  # method=temperature: the training examples held out to fit T (never trained on)
    calibration: dict | None = None  # method=temperature: what temperature.json holds (T, the held-out slice)
    members: list | None = None  # method=ensemble: the members' Runs (model and guide are then None)
    anchor: object = None  # method=tfb: the training examples (trained on) the sigma search scores
    tfb: dict | None = None  # method=tfb: what tfb.json holds (sigma, the anchor set, the search)
    laplace: dict | None = None  # method=laplace: what laplace.json holds (guide is then the LaplaceGuide)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda if present, else cpu; under a multi-process launcher ``cuda`` means ``cuda:LOCAL_RANK``."""
    from .distributed import device_for

    return device_for(name)


def _make_head(kind: str, tokenizer, num_classes: int, option_words, max_length: int, cloze_norm: str = "none"):
    if kind == "causal_lm":
        return CausalLMHead(tokenizer, option_words, max_length)
    if kind == "cloze":
        return ClozeHead(tokenizer, num_classes, max_length, norm=cloze_norm)
    if kind == "multiple_choice":
        return MultipleChoiceHead(tokenizer, num_classes, max_length)
    return SequenceClassificationHead(tokenizer, num_classes, max_length)


def build_model(cfg: RunConfig, *, num_data: int = 1, adapter_dir: str | os.PathLike | None = None) -> BlobModel:
    """The Pyro model for a resolved ``cfg`` (fresh LoRA, or the adapter in ``adapter_dir``)."""
    from .backbone import ENCODER_HEADS, default_targets, load_backbone

    ad, bayes, rt = cfg.adapter, cfg.bayes, cfg.runtime
    num_classes, option_words = dataset_info(cfg.dataset)
    device = pick_device(rt.device)
    quantised = rt.load_in_8bit or rt.load_in_4bit
    hf_model, tokenizer, kind = load_backbone(
        cfg.model, num_classes=num_classes, head=cfg.head, trust_remote_code=rt.trust_remote_code,
        load_in_8bit=rt.load_in_8bit, load_in_4bit=rt.load_in_4bit, device=device if quantised else None)
    targets = list(ad.target_modules) if ad.target_modules else default_targets(hf_model.config)
    modules_to_save = ["classifier"] if kind in ENCODER_HEADS else None
    if adapter_dir is None:
        network = inject_lora(hf_model, targets, r=ad.lora_r, lora_alpha=ad.lora_alpha,
                              lora_dropout=ad.lora_dropout, modules_to_save=modules_to_save)
    else:
        from peft import PeftModel

        try:
            network = PeftModel.from_pretrained(hf_model, str(adapter_dir), is_trainable=True)
        except Exception as err:  # damaged or foreign adapter files: PEFT/safetensors raise many types
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RunError(f"cannot load the adapter in {adapter_dir}: {msg}") from err
        attach_variants(network)
    if not quantised:  # bitsandbytes models are placed at load time and refuse .to()
        network.to(device)
    if rt.gradient_checkpointing:
        from .backbone import enable_gradient_checkpointing

        enable_gradient_checkpointing(network)
    head = _make_head(kind, tokenizer, num_classes, option_words, cfg.max_length, cfg.cloze_norm)
    prior = make_prior(bayes.prior, bayes.prior_scale, **({"df": bayes.prior_df} if bayes.prior == "student_t" else {}))
    model = BlobModel(network, head, bayesian_factor=bayes.bayesian_factor, prior=prior, num_data=num_data,
                      flipout=bayes.flipout_per if bayes.flipout else None)
    if rt.compile:
        model.compile_network(**({"options": {"cpp_wrapper": True}} if rt.compile_cpp_wrapper else {}))
    return model


def retarget_head(model: BlobModel, dataset: str) -> None:
    """Point ``model``'s head at another dataset's options (same backbone, LoRA and tokenizer), e.g. to evaluate
    a run out of distribution.

    A causal-LM head then scores ``dataset``'s option words and a multiple-choice head its number of options; a
    classifier head keeps its K trained classes, so a dataset with another K is refused (HeadError).
    """
    num_classes, option_words = dataset_info(dataset)
    head = model.head
    if head.kind == "sequence_classification":
        if head.num_classes != num_classes:
            raise HeadError(f"a {head.num_classes}-way classifier head cannot score {dataset} ({num_classes} options)")
        return
    model.head = _make_head(head.kind, head.tokenizer, num_classes, option_words, head.max_length,
                            getattr(head, "norm", "none"))


def _make_guide(cfg: RunConfig, model: BlobModel):
    b = cfg.bayes
    return make_guide(b.guide, model, eps=b.eps, std_param=b.std_param, rank=b.guide_rank)


# what a post-hoc run (from_run) may set for itself: where and how it predicts, never what was trained
_FROM_RUN_FREE = {"method", "preset", "from_run", "data_dir", "eval_limit", "device", "bf16", "gradient_checkpointing",
                  "compile", "compile_cpp_wrapper", "trust_remote_code", "checkpoint_every"} | {
                      f.name for f in dataclasses.fields(PredictConfig)}


def from_run_config(settings: dict) -> RunConfig:
    """The resolved settings of a post-hoc run on a finished one: ``settings`` (flat, with ``method`` and
    ``from_run``) over the settings stored in ``from_run``'s config.json.

    ::

        cfg = from_run_config({"method": "laplace", "from_run": "runs/map", "laplace_hessian": "diag"})
        train_run(cfg, "runs/map_laplace")        # no training: the Laplace fit around runs/map's point

    What the source trained (backbone, data, adapter, steps, seed...) comes from the source; ``settings`` may
    repeat it but not change it. They may set how the new run predicts (``num_samples``, ``eval_limit``...), where
    (``device``, ``data_dir``) and the post-hoc method's own settings (``laplace_hessian``...); the settings either
    method implies (factor A for ``tfb``) are the new method's. ConfigError/RunError (one line): a method without
    a post-hoc step, an unfinished or foreign source, a source of a method the post-hoc one cannot start from
    (:data:`~blob_pyro.methods.FROM_RUN_SOURCES`), a training setting that differs from the source's.
    """
    from .methods import OWN_SETTINGS

    given = RunConfig.from_dict(settings).validate()  # refuses from_run with a method that trains its own
    if given.from_run is None:
        raise ConfigError("from_run_config needs from_run, the finished run folder to start from")
    source = read_run_config(given.from_run)
    implied = _implied(source.method, given.method)
    data = {k: v for k, v in source.flat_dict().items() if k not in implied and k not in OWN_SETTINGS}
    data.update(settings)
    cfg = RunConfig.from_dict(data).resolve()
    check_from_run(cfg)
    return cfg


def _implied(*methods: str) -> set:
    from .methods import METHODS

    return {k for m in methods if m in METHODS for k in (*METHODS[m].requires, *METHODS[m].defaults)}


def check_from_run(cfg: RunConfig) -> None:
    """Refuse (one line) a post-hoc ``cfg`` whose ``from_run`` is unfinished, of a method it cannot start from, or
    trained with other settings than ``cfg`` has (see :func:`from_run_config`; settings neither run reads,
    :meth:`~blob_pyro.config.RunConfig.unread_settings`, may differ); nothing if ``from_run`` is unset."""
    from .methods import FROM_RUN_SOURCES, OWN_SETTINGS

    if cfg.from_run is None:
        return
    source_dir = Path(cfg.from_run)
    source = read_run_config(source_dir)
    if source.method not in FROM_RUN_SOURCES[cfg.method]:
        raise RunError(f"method={cfg.method} starts from a {' or '.join(FROM_RUN_SOURCES[cfg.method])} run; "
                       f"{source_dir} is a method={source.method} run")
    if not (source_dir / "metrics.json").is_file() or not (source_dir / "adapter" / "adapter_config.json").is_file():
        raise RunError(f"{source_dir} did not finish (no metrics.json or adapter/); finish it with blob-pyro train "
                       f"--resume {source_dir}")
    free = _FROM_RUN_FREE | _implied(source.method, cfg.method) | {k for k, m in OWN_SETTINGS.items() if m == cfg.method}
    free |= source.unread_settings() & cfg.unread_settings()  # e.g. eps: the source's point estimate never read it
    for key, value in source.flat_dict().items():
        if key not in free and cfg.get(key) != value:
            raise ConfigError(f"from_run takes what was trained from {source_dir}: {key}={value!r} there; got "
                              f"{key}={cfg.get(key)!r} (drop it)")


def build(cfg: RunConfig, *, with_data: bool = True, num_data: int | None = None) -> Run:
    """Seeded construction of data, model and guide; ``run.config`` is ``cfg`` resolved (see RunConfig.resolve).

    ``with_data=False`` loads no dataset; the model's plate size is then ``num_data`` (the size of the training
    data you will pass to :func:`~blob_pyro.fit`; 1 if not given).
    """
    cfg = cfg.resolve()
    set_seed(cfg.fit.seed)
    pyro.clear_param_store()
    train = eval_split = held_out = anchor = None
    if with_data:
        train, eval_split = load_splits(cfg.dataset, cfg.data_dir, train_limit=cfg.train_limit,
                                        eval_limit=cfg.eval_limit, holdout=cfg.holdout)
        if cfg.method == "temperature":  # the held-out slice leaves the training data before anything sees it
            from .temperature import calibration_split

            train, held_out = calibration_split(train, cfg.calibration_fraction, cfg.fit.seed)
        if len(train) < cfg.fit.batch_size:
            raise ConfigError(f"batch_size={cfg.fit.batch_size} is larger than the training split "
                              f"({len(train)} examples)")
        if cfg.method == "tfb":  # training examples the model is trained on too (the official anchor set)
            from .tfb import DEFAULT_ANCHOR_SIZE, anchor_split

            size = cfg.tfb_anchor_size if cfg.tfb_anchor_size is not None else min(DEFAULT_ANCHOR_SIZE, len(train))
            anchor = anchor_split(train, size, cfg.fit.seed)
    if train is not None and num_data is not None and num_data != len(train):
        raise ConfigError(f"num_data={num_data} but the training split has {len(train)} examples")
    check_from_run(cfg)
    adapter = Path(cfg.from_run) / "adapter" if cfg.from_run else None  # the trained point the post-hoc step starts from
    if adapter is not None:
        _check_adapter(adapter, cfg)
    model = build_model(cfg, num_data=len(train) if train is not None else (num_data or 1), adapter_dir=adapter)
    return Run(cfg, model, _make_guide(cfg, model), train, eval_split, held_out, anchor=anchor)


def post_fit(run: Run) -> None:
    """The post-hoc step of a method, after :func:`~blob_pyro.infer.fit` and before prediction (a no-op for most).

    ``method=temperature``: fit T on ``run.held_out`` (:func:`blob_pyro.temperature.calibrate`), set
    ``run.model.temperature`` and ``run.calibration``.

    ``method=tfb``: search sigma on ``run.anchor`` (:func:`blob_pyro.tfb.bayesianize`), replace ``run.guide`` (the
    trained point estimate) by the TFB guide and set ``run.tfb``.

    ``method=laplace``: fit the Laplace posterior around the MAP point on ``run.train``
    (:func:`blob_pyro.laplace.fit_laplace`), replace ``run.guide`` by it and set ``run.laplace``.
    """
    if run.config.method == "tfb":
        _post_fit_tfb(run)
        return
    if run.config.method == "laplace":
        from .laplace import fit_laplace

        if run.train is None:
            raise ConfigError("method=laplace fits its posterior on the training split; build the run with its data")
        result = fit_laplace(run.model, run.guide, run.train, hessian=run.config.laplace_hessian,
                             subset=run.config.laplace_subset, batch_size=run.config.fit.batch_size,
                             predictive=run.config.laplace_predictive)
        run.guide, run.laplace = result.guide, result.info
        return
    if run.config.method != "temperature":
        return
    from .temperature import calibrate

    if run.held_out is None:
        raise ConfigError("method=temperature needs the held-out training slice; build the run with its data")
    run.calibration = calibrate(run.model, run.guide, run.held_out, batch_size=run.config.predict.eval_batch_size,
                                autocast_dtype=run.config.runtime.autocast_dtype())


def _post_fit_tfb(run: Run) -> None:
    from .tfb import bayesianize

    cfg = run.config
    if run.anchor is None:
        raise ConfigError("method=tfb needs its anchor set of training examples; build the run with its data")
    record = bayesianize(run.model, run.guide, run.anchor, threshold=cfg.tfb_threshold, sigma_max=cfg.tfb_sigma_max,
                         steps=cfg.tfb_search_steps, num_samples=cfg.predict.num_samples, seed=cfg.fit.seed,
                         batch_size=cfg.predict.eval_batch_size, autocast_dtype=cfg.runtime.autocast_dtype())
    run.guide = record.pop("guide")
    run.tfb = record


PREDICTIONS = "predictions.safetensors"

# ---- files ---------------------------------------------------------------------------------
def run_versions() -> dict:
    """Library versions, git commit and the compute a run used.

    ``cpu_capability`` is the SIMD level torch dispatches its CPU kernels to ("AVX512", "AVX2", ...): the same
    seed and settings give bit-identical results only on the same level, since the kernels round differently
    (docs/numerics.md).
    """
    import peft
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "pyro": pyro.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
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


def save_run(out_dir, run: Run, *, metrics: dict | None = None, prediction=None) -> None:
    """Write adapter/ (posterior mean, vanilla PEFT) and posterior.safetensors; metrics.json if given; and
    ``prediction`` (a :class:`~blob_pyro.predictive.Prediction` of the eval split) as predictions.safetensors:
    ``labels`` (N,), ``probs`` (N, K) and, when kept, ``logits`` (S, N, K) of every draw."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, guide = run.model, run.guide
    model.write_factors(guide.median())
    with atomic_dir(out / "adapter") as tmp:
        # the frozen base's embedding / lm_head weights are not part of the adapter (PEFT copies them in
        # whenever lm_head is a LoRA target: Llama-2-7B's lm_head alone is 32 000 x 4 096 weights)
        model.network.save_pretrained(str(tmp), save_embedding_layers=False)
    meta = {"guide": type(guide).__name__, "bayesian_factor": model.bayesian_factor,
            "sites": json.dumps([s.name for s in model.sites])}
    atomic_save_safetensors(out / "posterior.safetensors", guide_state(guide), metadata=meta)
    if run.laplace is not None:
        from .laplace import LAPLACE_FILE

        atomic_write_text(out / LAPLACE_FILE, json.dumps(run.laplace, indent=2) + "\n")
    if run.calibration is not None:
        from .temperature import TEMPERATURE_FILE

        atomic_write_text(out / TEMPERATURE_FILE, json.dumps(run.calibration, indent=2) + "\n")
    if prediction is not None:
        tensors = {"labels": prediction.labels, "probs": prediction.probs.float()}
        if prediction.logits is not None:
            tensors["logits"] = prediction.logits.float()
        atomic_save_safetensors(out / PREDICTIONS, tensors)
    if run.tfb is not None:
        from .tfb import TFB_FILE

        atomic_write_text(out / TFB_FILE, json.dumps(run.tfb, indent=2) + "\n")
    if metrics is not None:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def read_run_config(run_dir) -> RunConfig:
    """The resolved configuration stored in ``run_dir/config.json`` (RunError, one line, if unusable)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunError(f"{run_dir} is not a blob_pyro run folder (no config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("config", data), dict):
        raise RunError(f"{path} does not hold a run configuration")
    try:
        return RunConfig.from_dict(data.get("config", data), source=f"key in {path}:").resolve()
    except (TypeError, ValueError) as err:  # a hand-edited or foreign config.json: refuse, never guess
        raise RunError(f"{path}: {err}") from err


def load_run(run_dir, *, dataset: str | None = None, data_dir: str | None = None, device: str | None = None,
             trust_remote_code: bool = False) -> Run:
    """Restore model, guide and posterior from a run directory (and the eval split when ``dataset``/``data_dir`` allow).

    Only safetensors and JSON files are read. ``trust_remote_code`` comes from the caller, never from the
    run's config.json.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    if cfg.method == "ensemble":
        from .ensemble import load_ensemble

        return load_ensemble(run_dir, dataset=dataset, data_dir=data_dir, device=device,
                             trust_remote_code=trust_remote_code)
    cfg.runtime.trust_remote_code = trust_remote_code
    if device is not None:
        cfg.runtime.device = device
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RunError(f"{adapter} has no adapter_config.json; the run did not finish or the folder is damaged")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise RunError(f"{adapter} has no adapter_model.safetensors (only safetensors weights are loaded)")
    _check_adapter(adapter, cfg)
    try:
        state = load_file(str(run_dir / "posterior.safetensors"))
    except FileNotFoundError as err:
        raise RunError(f"{run_dir / 'posterior.safetensors'} is missing") from err
    except (SafetensorError, OSError, ValueError) as err:
        raise RunError(f"{run_dir / 'posterior.safetensors'} is corrupted: {str(err).splitlines()[0]}") from err
    set_seed(cfg.fit.seed)
    pyro.clear_param_store()
    model = build_model(cfg, adapter_dir=adapter)
    tfb = laplace = None
    if cfg.method == "tfb":  # trained as a point estimate; the posterior is the TFB guide on A' (blob_pyro.tfb)
        from .tfb import read_record, tfb_guide

        tfb = read_record(run_dir)
        guide = tfb_guide(model, {s.name: torch.ones(s.shape[0]) for s in model.sites}, tfb["sigma"])
        with torch.no_grad():
            guide()
    elif cfg.method == "laplace":  # the saved guide is the Laplace posterior, not the MAP's AutoDelta
        from .laplace import placeholder_guide

        laplace = _read_laplace(run_dir)
        # a run from before laplace_predictive existed predicted with weight draws: its record says so by not saying
        cfg.laplace_predictive = laplace.get("predictive", "sample")
        guide = placeholder_guide(model, hessian=cfg.laplace_hessian, subset=cfg.laplace_subset,
                                  predictive=cfg.laplace_predictive)
    else:
        guide = _make_guide(cfg, model)
        with torch.no_grad():
            guide()  # Pyro's autoguides create their parameters at the first call
    pyro.clear_param_store()  # the param store would otherwise win over the loaded values
    missing = set(guide.state_dict()) - set(state)
    extra = set(state) - set(guide.state_dict())
    if missing or extra:
        raise RunError(f"posterior.safetensors does not fit this model (guide {cfg.bayes.guide}, bayesian factor "
                       f"{cfg.bayes.bayesian_factor}): missing {sorted(missing)[:1]}, unexpected {sorted(extra)[:1]}")
    device_ = next(model.network.parameters()).device
    guide.load_state_dict({k: v.to(device_) for k, v in state.items()})
    calibration = _read_temperature(run_dir) if cfg.method == "temperature" else None
    if calibration is not None:
        model.temperature = calibration["temperature"]
    eval_split = None
    if dataset is not None or data_dir is not None:
        eval_split = eval_split_of(cfg, dataset, data_dir)
    if dataset is not None and dataset != cfg.dataset:
        retarget_head(model, dataset)
    return Run(cfg, model, guide, None, eval_split, calibration=calibration, tfb=tfb, laplace=laplace)


def eval_split_of(cfg: RunConfig, dataset: str | None = None, data_dir: str | None = None):
    """The split a run of ``cfg`` is evaluated on: its own dataset's dev split, or the held-out end of its
    training split when ``cfg.holdout`` is set; another ``dataset`` (a shift) is always that dataset's dev split."""
    same = dataset in (None, cfg.dataset)
    return load_eval(dataset or cfg.dataset, data_dir or cfg.data_dir, eval_limit=cfg.eval_limit,
                     holdout=cfg.holdout if same else None)


def read_method_record(path: Path, key: str, *, method: str, keeps: str, holds: str) -> dict:
    """The JSON record a post-hoc method keeps in its run folder, whose ``key`` must be a finite number > 0.

    Every problem is a one-line RunError naming ``path``: missing (a ``method`` run ``keeps`` it there), not
    ``holds`` (unreadable, or without ``key``), or a ``key`` that is not finite and positive.
    """
    try:
        record = json.loads(path.read_text())
        value = float(record[key])
    except FileNotFoundError as err:
        raise RunError(f"{path} is missing: a method={method} run keeps {keeps} there") from err
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise RunError(f"{path} does not hold {holds}: {err}") from err
    if not (value > 0 and value < float("inf")):
        raise RunError(f"{path}: {key} must be a finite number > 0; got {value}")
    return record


def _read_temperature(run_dir: Path) -> dict:
    from .temperature import TEMPERATURE_FILE

    return read_method_record(run_dir / TEMPERATURE_FILE, "temperature", method="temperature",
                              keeps="its fitted T", holds="a temperature")


def _read_laplace(run_dir: Path) -> dict:
    from .laplace import LAPLACE_FILE

    return read_method_record(run_dir / LAPLACE_FILE, "prior_precision", method="laplace",
                              keeps="its Laplace fit", holds="a Laplace fit")


def _check_adapter(adapter: Path, cfg: RunConfig) -> None:
    from .backbone import resolve_model
    from .gguf_cache import is_gguf_model

    try:
        acfg = json.loads((adapter / "adapter_config.json").read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{adapter / 'adapter_config.json'} is not valid JSON") from err
    base = acfg.get("base_model_name_or_path")
    resolved = resolve_model(cfg.model) if base else None
    # a GGUF model's folder is named by the file's content hash: the same name under another cache root
    # ($BLOB_PYRO_CACHE changed since training) holds the same weights
    same_gguf = bool(base) and is_gguf_model(cfg.model) and Path(base).name == Path(resolved).name
    if base and base not in (cfg.model, resolved) and not same_gguf:
        raise RunError(f"the adapter in {adapter} was made for base model {base!r}, not {cfg.model!r}")
    if acfg.get("r") != cfg.adapter.lora_r:
        raise RunError(f"the adapter in {adapter} has rank r={acfg.get('r')}, the run config says "
                       f"{cfg.adapter.lora_r}")
    targets = cfg.adapter.target_modules
    if not targets:  # the run used the model's default targets
        from .backbone import default_targets, load_config

        targets = default_targets(load_config(cfg.model, trust_remote_code=cfg.runtime.trust_remote_code))
    if sorted(acfg.get("target_modules") or []) != sorted(targets):
        raise RunError(f"the adapter in {adapter} targets {acfg.get('target_modules')}, the run config says {targets}")


# ---- train and evaluate --------------------------------------------------------------------
def evaluate(run: Run, data=None, *, num_samples: int | None = None, progress: bool = True, ood_data=None) -> dict:
    """Metrics of the posterior predictive on ``data`` (default: the run's eval split).

    Under several processes each one predicts every K-th example and the predictions are gathered, so
    every process returns the metrics of the whole split.

    Returns accuracy, ece (over ``cfg.predict.ece_bins`` bins), nll, brier (:func:`~blob_pyro.metrics.compute_metrics`)
    and, from the same per-draw predictions, entropy, expected_entropy, mutual_information, aurc and accuracy_at_80
    (:func:`~blob_pyro.uncertainty.uncertainty_metrics`), with dataset, split, num_samples, num_examples, ece_bins.

    ``ood_data`` (a shifted split): also predict there and add ``"ood"``: its dataset, split and num_examples and
    the AUROCs of telling its examples from ``data``'s (:func:`~blob_pyro.uncertainty.ood_auroc`: ``auroc_max_prob``,
    ``auroc_entropy``, ``auroc_mutual_information``).
    """
    from .uncertainty import ood_auroc

    data = data if data is not None else run.eval
    out = predict_split(run, data, num_samples=num_samples, progress=progress)
    metrics = metrics_of(run, data, out, num_samples=num_samples)
    if ood_data is not None:
        models = [m.model for m in run.members] if run.members else [run.model]
        heads = [m.head for m in models]
        try:
            if ood_data.dataset != data.dataset:
                for m in models:
                    retarget_head(m, ood_data.dataset)
            shifted = predict_split(run, ood_data, num_samples=num_samples, progress=progress)
        finally:
            for m, head in zip(models, heads):
                m.head = head
        aurocs = ood_auroc(_draw_probs(out), _draw_probs(shifted))
        metrics["ood"] = {"dataset": ood_data.dataset, "split": ood_data.split, "num_examples": len(ood_data),
                          **{f"auroc_{k}": v for k, v in aurocs.items()}}
    return metrics


def metrics_of(run: Run, data, out, *, num_samples: int | None = None) -> dict:
    """The in-distribution part of :func:`evaluate` for a prediction ``out`` of ``run`` on ``data`` already made
    (:func:`predict_split`), so a caller that keeps the prediction does not predict twice."""
    from .metrics import compute_metrics
    from .uncertainty import uncertainty_metrics

    cfg = run.config
    bins = cfg.predict.ece_bins
    metrics = compute_metrics(out.probs, out.labels, n_bins=bins)
    metrics.update(uncertainty_metrics(_draw_probs(out), out.labels))
    s = num_samples if num_samples is not None else cfg.predict.num_samples
    metrics.update(dataset=data.dataset, split=data.split, num_samples=s, num_examples=len(data), ece_bins=bins)
    if cfg.method == "laplace":
        metrics["laplace_predictive"] = cfg.laplace_predictive
    return metrics


def _draw_probs(out) -> torch.Tensor:
    """(S, N, K) probabilities of a prediction's draws (without its logits, the average as one draw)."""
    return torch.softmax(out.logits.float(), dim=-1) if out.logits is not None else out.probs


def predict_split(run: Run, data=None, *, num_samples: int | None = None, progress: bool = True):
    """The :class:`~blob_pyro.predictive.Prediction` of ``run`` on ``data`` (default: the run's eval split) with its
    per-draw logits (S, N, K), with ``cfg.predict``'s settings; gathered in the examples' order under several
    processes; an ensemble's draws are its members."""
    from . import distributed
    from .predictive import predict

    cfg = run.config
    data = data if data is not None else run.eval
    kwargs = cfg.predict.kwargs()
    if num_samples is not None:
        kwargs["num_samples"] = num_samples
    examples = list(getattr(data, "examples", data))
    procs, rank = distributed.world_size(), distributed.rank()
    local = examples[rank::procs]
    if local and run.members:  # method=ensemble: the members' probabilities averaged
        from .ensemble import predict_members

        out = predict_members(run.members, local, **kwargs, progress=progress and rank == 0)
    elif local:
        out = predict(run.model, run.guide, local, **kwargs, progress=progress and rank == 0, keep_draws=True,
                      autocast_dtype=cfg.runtime.autocast_dtype())
    else:  # fewer examples than processes
        from .predictive import Prediction

        head = (run.members[0] if run.members else run).model.head
        out = Prediction(torch.empty(0, head.num_classes), torch.empty(0, dtype=torch.long))
    if procs > 1:
        parts = distributed.gather_objects((out.probs.cpu(), out.labels.cpu(), out.logits))
        probs = torch.empty(len(examples), out.probs.shape[-1], dtype=out.probs.dtype)
        labels = torch.empty(len(examples), dtype=out.labels.dtype)
        draws = next((d for _, _, d in parts if d is not None), None)
        logits = None if draws is None else torch.empty(draws.shape[0], len(examples), draws.shape[-1])
        for r, (p, y, d) in enumerate(parts):
            probs[r::procs], labels[r::procs] = p, y
            if logits is not None and d is not None:
                logits[:, r::procs] = d
        out.probs, out.labels, out.logits = probs, labels, logits
    return out


def train_run(cfg: RunConfig, out_dir, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Train and evaluate ``cfg`` into ``out_dir``; returns the metrics.

    An existing non-empty ``out_dir`` is refused unless ``overwrite``, and even then only a blob_pyro run
    folder (one with config.json) is replaced. Nothing on disk changes before the config, data and model
    have loaded.

    Under a multi-process launcher (``accelerate launch``, ``torchrun``) every process trains and
    evaluates; only rank 0 checks and writes ``out_dir``.
    """
    from . import distributed

    if cfg.resolve().method == "ensemble":  # K member runs in sub-folders, then their average
        from .ensemble import train_ensemble

        return train_ensemble(cfg, out_dir, progress=progress, overwrite=overwrite)
    distributed.init_from_env(cfg.runtime.device)
    main = distributed.is_main()
    out = Path(out_dir)
    problem = output_problem(out, overwrite) if main else None
    problem = distributed.broadcast_object(problem)
    if problem:
        raise RunError(problem)
    run = build(cfg)
    cfg = run.config
    if main:
        if out.exists() and overwrite:
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps({"config": cfg.to_dict(), "versions": run_versions()}, indent=2) + "\n")
        (out / "train_log.jsonl").write_text("")
    distributed.barrier()
    return _train_and_save(run, out, None, progress=progress)


def output_problem(out: Path, overwrite: bool) -> str | None:
    """Why ``out`` cannot become a new run folder (None if it can): non-empty without ``overwrite``, or not a run."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            return f"output folder {out} exists and is not empty (pass --overwrite to replace it)"
        if not (out / "config.json").is_file():
            return (f"output folder {out} is not a blob_pyro run folder (no config.json); "
                    f"refusing to delete it even with --overwrite")
    return None


def resume_run(out_dir, *, progress: bool = True, trust_remote_code: bool = False) -> dict:
    """Continue the run in ``out_dir`` from its last checkpoint (from step 0 if it has none); returns the metrics.

    Settings come from ``out_dir/config.json``; lines of train_log.jsonl after the checkpoint's step are
    dropped, then the log is appended to. On CPU the result equals an uninterrupted run's exactly.
    """
    from . import distributed
    from .checkpoint import CHECKPOINT, load_checkpoint

    out = Path(out_dir)
    cfg = read_run_config(out)
    if cfg.method == "ensemble":  # finished members are kept, an interrupted one resumes, missing ones train
        from .ensemble import train_ensemble

        return train_ensemble(cfg, out, progress=progress, resume=True, trust_remote_code=trust_remote_code)
    distributed.init_from_env(cfg.runtime.device)
    cfg.runtime.trust_remote_code = trust_remote_code  # never taken from a file
    if (out / "metrics.json").is_file():
        raise RunError(f"the run in {out} has already finished (metrics.json exists); nothing to resume")
    ckpt = load_checkpoint(out / CHECKPOINT) if (out / CHECKPOINT).is_file() else None
    if ckpt is not None and not 0 <= ckpt.step <= cfg.fit.max_steps:
        raise RunError(f"{out / CHECKPOINT} is at step {ckpt.step}, outside this run's 0..{cfg.fit.max_steps}")
    run = build(cfg)
    return _train_and_save(run, out, ckpt, progress=progress, resuming=True)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _train_and_save(run: Run, out: Path, ckpt, *, progress: bool, resuming: bool = False) -> dict:
    """Fit (from ``ckpt`` if given) with checkpoints and Ctrl-C handling, then evaluate and save."""
    from . import distributed
    from .checkpoint import CHECKPOINT, GracefulInterrupt, capture, restore_params, save_checkpoint
    from .infer import fit

    cfg = run.config
    main = distributed.is_main()  # only rank 0 writes; every process trains
    start, state = 0, None
    if ckpt is not None:
        register_parameters(run.model, run.guide)
        restore_params(ckpt)
        start, state = ckpt.step, {"optimizer_state": ckpt.optimizer, "rng_state": ckpt.rng}
    if resuming and main:  # only now that the checkpoint fits: drop what was logged after it
        _truncate_log(out / "train_log.jsonl", start)
    every = cfg.runtime.checkpoint_every
    last_saved = start if ckpt is not None else None  # step of the checkpoint on disk

    def checkpoint(step, optimizer_state):
        nonlocal last_saved
        if not main:  # every process holds the same parameters; rank 0 saves them
            last_saved = step
            return
        snapshot = capture(step, optimizer_state())
        bad = snapshot.nonfinite()
        if bad is not None:  # never replace a good checkpoint with a broken one
            kept = f"; the last good checkpoint (step {last_saved}) is kept" if last_saved is not None else ""
            raise TrainingError(f"non-finite value in {bad} after step {step}{kept}")
        save_checkpoint(out / CHECKPOINT, snapshot)
        last_saved = step

    last_state = {}

    def stop_now(step, optimizer_state):
        checkpoint(step, optimizer_state)
        raise TrainingInterrupted(f"interrupted after step {step}; checkpoint saved, continue with "
                                  f"blob-pyro train --resume {out}", 128 + (stop.signum or signal.SIGTERM))

    log_cm = open(out / "train_log.jsonl", "a") if main else contextlib.nullcontext()
    with log_cm as log_file, GracefulInterrupt() as stop:
        def on_step(record, fit_state):
            if main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            last_state.update(fit_state)
            step = fit_state["step"]
            # a signal may reach the processes at different steps: all stop at the first step any saw it
            if distributed.any_true(stop.signum is not None):
                stop_now(step, fit_state["optimizer_state"])
            if every and (step % every == 0 or step == cfg.fit.max_steps):
                checkpoint(step, fit_state["optimizer_state"])

        try:
            if cfg.from_run is None:  # a post-hoc run starts from from_run's trained point
                fit(run.model, run.guide, run.train, cfg.fit, autocast_dtype=cfg.runtime.autocast_dtype(),
                    progress=progress, start_step=start, state=state, callback=on_step)
        except TrainingError as err:
            if last_saved is not None and "checkpoint" not in str(err):
                raise TrainingError(f"{err}; the last good checkpoint (step {last_saved}) is kept") from err
            raise
        if distributed.any_true(stop.signum is not None) and last_state:  # the signal came after the last step
            stop_now(last_state["step"], last_state["optimizer_state"])
    post_fit(run)
    pred = predict_split(run, run.eval, progress=progress)  # one prediction: the metrics and the saved file
    metrics = metrics_of(run, run.eval, pred)
    if main:
        save_run(out, run, metrics=metrics, prediction=pred)
    distributed.barrier()
    return metrics


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps 1..step (dropping anything after, including a half-written line)."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not isinstance(record, dict) or not isinstance(record.get("step"), int) or record["step"] > step:
                break
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
