"""Run configuration: one dataclass per concern, composed into :class:`RunConfig`; every field documented.

::

    cfg = RunConfig.from_dict({"model": "minilm", "dataset": "arc_easy", "method": "mle", "max_steps": 200})
    cfg = RunConfig.from_file("configs/run.json", overrides={"seed": 2})    # unknown keys are refused
    cfg = cfg.resolve()            # the method / preset applied and checked (ConfigError on a conflict)
    cfg.fit.lr, cfg.bayes.guide    # sections: adapter, bayes, fit, predict, runtime
    json.dumps(cfg.to_dict())      # nested; from_dict reads nested or flat keys
    RunConfig.from_dict({"method": "mle"}).resolve().unread_settings()   # {"eps", "std_param", "guide_rank", ...}

Field names are unique across sections, so a flat key (``"lr"``) or flag (``--lr``) names exactly one
setting. Settings a method or preset decides default to ``None`` ("not set"); :meth:`RunConfig.resolve`
fills them from the method (:mod:`blob_pyro.methods`), then from the defaults below, and refuses an
explicit setting that contradicts the method with one line naming both. Some settings are read only under a
condition (``eps`` by a guide with a spread, ``kl_lr`` by ``objective=paper``): :data:`UNREAD_WHEN` lists them
and :meth:`RunConfig.unread_settings` names those a resolved config leaves unread, so that comparing two runs
(the benchmark runner resuming a grid) can leave them out.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .guides import DEFAULT_EPS, GUIDES
from .heads import HEADS
from .kl import KL_SCHEDULES
from .methods import FROM_RUN_SOURCES, METHODS, PRESETS, apply_method
from .priors import PRIORS

__all__ = ["AdapterConfig", "BayesConfig", "FitConfig", "PredictConfig", "RuntimeConfig", "RunConfig",
           "ConfigError", "read_config_file", "SECTIONS", "with_defaults", "Unread", "UNREAD_WHEN"]

OBJECTIVES = ("elbo", "paper")


def _f(default, help: str, *, choices=None, unset=None):
    """A field with its help text; ``choices`` (the allowed values), ``unset`` (the value ``None`` stands for)."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if unset is not None:
        meta["unset"] = unset
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AdapterConfig:
    """The LoRA adapter PEFT injects into the frozen backbone."""

    target_modules: Optional[list] = _f(None, "LoRA targets (default: q_proj,v_proj,lm_head for Llama-style; "
                                              "query,value for BERT-style)")
    lora_r: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: Optional[float] = _f(None, "LoRA dropout (default 0; mcdropout: 0.1)", unset=0.0)


@dataclass
class BayesConfig:
    """The probabilistic model over the LoRA factors and its variational family."""

    bayesian_factor: Optional[str] = _f(None, "which LoRA factor is Bayesian: B (default), A (the paper) or both",
                                        choices=("A", "B", "both"), unset="B")
    prior: Optional[str] = _f(None, "prior family (default normal)", choices=tuple(PRIORS), unset="normal")
    prior_scale: float = _f(0.2, "prior scale (a std for normal; BLoB's beta)")
    prior_df: float = _f(3.0, "Student-t degrees of freedom")
    guide: Optional[str] = _f(None, "variational family (default blob)", choices=GUIDES, unset="blob")
    guide_rank: int = _f(2, "rank k of the lowrank guide")
    eps: Optional[float] = _f(None, f"BLoB's eps: rho ~ U(eps/sqrt2, eps), initial std = rho^2 (default {DEFAULT_EPS}; "
                                    f"the paper's 0.05 with preset=paper)", unset=DEFAULT_EPS)
    std_param: str = _f("square", "std parameterisation: square (rho^2) | softplus", choices=("square", "softplus"))
    flipout: bool = _f(True, "Flipout in training and prediction (off: one weight draw per batch)")
    flipout_per: str = _f("token", "token (the paper) | sequence", choices=("token", "sequence"))


@dataclass
class FitConfig:
    """How :func:`blob_pyro.fit` optimises the guide (and the deterministic parameters)."""

    max_steps: int = _f(200, "training steps")
    batch_size: int = _f(16, "examples per step and process (K processes: K x batch_size per step)")
    lr: float = _f(1e-3, "learning rate of means and deterministic parameters (AdamW)")
    scale_lr: Optional[float] = _f(None, "learning rate of the guide's scale parameters (default: lr)")
    warmup_ratio: float = _f(0.06, "linear warm-up share of max_steps, then linear decay to 0")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    objective: Optional[str] = _f(None, "elbo: one AdamW step on the KL-weighted ELBO (default) | paper: AdamW on "
                                        "the NLL, then SGD(kl_lr) on the weighted KL", choices=OBJECTIVES,
                                  unset="elbo")
    elbo: str = _f("trace", "trace (Trace_ELBO, MC KL) | meanfield (TraceMeanField_ELBO, analytic KL)",
                   choices=("trace", "meanfield"))
    num_particles: int = _f(1, "ELBO particles per step (posterior draws per step)")
    kl_schedule: Optional[str] = _f(None, "KL weight per step: blob (BLoB's re-weighting, default) | standard (1/N) "
                                          "| fixed (kl_multiplier / N)", choices=tuple(KL_SCHEDULES), unset="blob")
    kl_multiplier: Optional[float] = _f(None, "KL multiplier for kl_schedule=fixed (default 1)", unset=1.0)
    gamma: float = _f(8.0, "gamma of BLoB's dataset rescaling")
    kl_cycle: Optional[int] = _f(None, "kl_schedule=blob: steps per re-weighting cycle M (default: the official dataset "
                                       "rescaling, int(100 N^(pi/gamma) / (processes x batch_size)); the official code "
                                       "without --bayes-datasetrescaling uses the steps per epoch)")
    kl_lr: float = _f(0.01, "objective=paper: SGD learning rate of the KL step")
    seed: int = _f(0, "random seed (data order, initialisation, draws)")


@dataclass
class PredictConfig:
    """How :func:`blob_pyro.predict` forms the posterior predictive."""

    num_samples: Optional[int] = _f(None, "posterior draws at prediction (0 = posterior-mean weights; default 10, "
                                          "point estimates 0)", unset=10)
    eval_batch_size: int = _f(32, "batch size at prediction")
    sample_batched: bool = _f(False, "evaluate all draws in one forward by repeating the batch (needs Flipout)")
    ece_bins: int = _f(15, "equal-width confidence bins of the ECE (15 as in BLoB); every metrics table prints it")

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`blob_pyro.predict` these settings stand for."""
        return {"num_samples": self.num_samples, "batch_size": self.eval_batch_size,
                "sample_batched": self.sample_batched}


@dataclass
class RuntimeConfig:
    """Where and how the computation runs; does not change the model or the method."""

    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    bf16: bool = _f(False, "bf16 autocast for the backbone (GPU; on a CPU only with AVX512-BF16/AMX, emulated "
                           "and slow elsewhere)")
    load_in_8bit: bool = _f(False, "load the backbone in 8-bit (bitsandbytes)")
    load_in_4bit: bool = _f(False, "load the backbone in 4-bit (bitsandbytes)")
    gradient_checkpointing: bool = _f(False, "recompute the frozen backbone's block activations in backward")
    compile: bool = _f(False, "torch.compile the network (backbone, LoRA, Flipout) and the latent densities (Pyro stays "
                              "eager): fewer operators per step, a compile per new batch shape")
    compile_cpp_wrapper: bool = _f(False, "with compile: Inductor's C++ wrapper around the compiled kernels (the same "
                                          "numbers, less Python per call; compiles take longer)")
    trust_remote_code: bool = _f(False, "allow custom model code from the hub (off unless you ask)")
    checkpoint_every: int = _f(0, "write a resumable checkpoint every K steps (0: off)")

    def autocast_dtype(self):
        """The dtype ``fit`` and ``predict`` autocast the network to (``torch.bfloat16`` with ``bf16``), or None."""
        import torch

        return torch.bfloat16 if self.bf16 else None


SECTIONS = {"adapter": AdapterConfig, "bayes": BayesConfig, "fit": FitConfig, "predict": PredictConfig,
            "runtime": RuntimeConfig}


@dataclass
class RunConfig:
    """Everything a run needs: what to train on, the method, and one section per concern."""

    model: str = _f("minilm", "Hugging Face hub id or local path of the frozen backbone; 'minilm' = offline "
                              "MiniLM-L6; 'gguf:PATH' = a GGUF file; 'smollm2' = SmolLM2-135M-Instruct's GGUF")
    dataset: str = _f("winogrande_s", "benchmark name (winogrande_s, arc_easy, ..., mmlu_<subject>)")
    data_dir: Optional[str] = _f(None, "local benchmark folder laid out like shared/data (default: $BLOB_DATA_DIR, "
                                       "else the hub)")
    head: str = _f("auto", "how logits are read: auto | " + " | ".join(HEADS), choices=("auto",) + tuple(HEADS))
    cloze_norm: str = _f("none", "head cloze only: divide each option's summed log-probability by none | chars (its "
                                 "text's length, lm-evaluation-harness acc_norm) | tokens", choices=HEADS["cloze"].NORMS)
    max_length: int = _f(256, "max tokens per sequence")
    train_limit: Optional[int] = _f(None, "use only the first N training examples")
    eval_limit: Optional[int] = _f(None, "evaluate on the first N examples only")
    holdout: Optional[int] = _f(None, "evaluate on the last N examples of the training split, never trained on, "
                                      "instead of the dev split (choose budgets and recipes without dev)")
    method: str = _f("blob", "blob | mle (plain LoRA) | map | mcdropout | bbb | ensemble | temperature | tfb | laplace: a "
                             "preset of the settings it implies (docs/methods.md)", choices=tuple(METHODS))
    ensemble_size: Optional[int] = _f(None, "method=ensemble: number K >= 2 of mle members (default 3)")
    calibration_fraction: Optional[float] = _f(None, "method=temperature: share of the training split held out "
                                                     "(chosen by the seed, not trained on) to fit T (default 0.1)")
    tfb_threshold: Optional[float] = _f(None, "method=tfb: largest allowed change of the anchor set's mean NLL (nats, "
                                              "against the trained weights' own answers) at the searched sigma "
                                              "(default 0.01)")
    tfb_anchor_size: Optional[int] = _f(None, "method=tfb: training examples (chosen by the seed, trained on; never dev) "
                                              "the sigma search scores (default: 500, or the whole split if smaller)")
    tfb_search_steps: Optional[int] = _f(None, "method=tfb: bisection steps of the sigma search (default 10)")
    tfb_sigma_max: Optional[float] = _f(None, "method=tfb: upper end of the sigma search, tried first (default 0.2, "
                                              "the official --bayes-beta)")
    laplace_hessian: Optional[str] = _f(None, "method=laplace: the GGN's structure, diag | full | kfac (full: at most "
                                              "8192 parameters; kfac: H (x) Q per LoRA factor, KFAC-expand over "
                                              "tokens, batches of batch_size; default diag)",
                                        choices=(None, "diag", "full", "kfac"))
    laplace_subset: Optional[str] = _f(None, "method=laplace: which LoRA factors, all | last_layer (those of the last "
                                             "LoRA module; default all)", choices=(None, "all", "last_layer"))
    laplace_predictive: Optional[str] = _f(None, "method=laplace: how it predicts, glm (the network linearised at the "
                                                 "MAP: num_samples draws of the logits from N(f, J Sigma J^T), as "
                                                 "Laplace-LoRA) | sample (the network run on num_samples weight "
                                                 "draws); default glm", choices=(None, "glm", "sample"))
    from_run: Optional[str] = _f(None, "method=laplace | tfb: a finished mle or map run folder whose trained point "
                                       "the post-hoc step starts from instead of training; the training settings "
                                       "are that run's")
    preset: Optional[str] = _f(None, "'paper': the official optimisation (A factor, AdamW on NLL + SGD on KL)",
                               choices=(None, *PRESETS))
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    bayes: BayesConfig = field(default_factory=BayesConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # ---- names -----------------------------------------------------------------------------
    @classmethod
    def fields(cls) -> dict[str, tuple[Optional[str], dataclasses.Field, Any]]:
        """Flat name -> (section or None, dataclass field, type hint), for every setting."""
        return dict(_fields_of(cls))

    @classmethod
    def field_names(cls) -> list[str]:
        return list(cls.fields())

    def get(self, name: str) -> Any:
        section = self.fields()[name][0]
        return getattr(getattr(self, section) if section else self, name)

    def replace(self, **settings) -> RunConfig:
        """A copy with flat ``settings`` changed (unknown names are refused)."""
        data = self.flat_dict()
        _check_names(settings, "setting")
        data.update(settings)
        return RunConfig.from_dict(data)

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested: top-level settings plus one dict per section."""
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict:
        return {name: self.get(name) for name in self.fields()}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "setting") -> RunConfig:
        """Build from flat keys (``{"lr": 1e-3}``), nested sections (``{"fit": {"lr": 1e-3}}``) or both."""
        flat = cls.flat_settings(data, source=source)
        spec = cls.fields()
        top = {n: v for n, v in flat.items() if spec[n][0] is None}
        sections = {s: k(**{n: v for n, v in flat.items() if spec[n][0] == s}) for s, k in SECTIONS.items()}
        return cls(**top, **sections)

    @classmethod
    def flat_settings(cls, data: dict, *, source: str = "setting") -> dict[str, Any]:
        """The settings in ``data`` (flat keys, nested sections or both) by their flat names; unknown names refused."""
        if not isinstance(data, dict):
            raise ConfigError(f"a configuration must be a mapping of settings, got {type(data).__name__}")
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in SECTIONS and isinstance(value, dict):
                own = {f.name for f in dataclasses.fields(SECTIONS[key])}
                for sub, v in value.items():
                    if sub not in own:
                        _check_names({sub: v}, f"{source} in section {key!r}:", own)
                    flat[sub] = v
            else:
                flat[key] = value
        _check_names(flat, source)
        return flat

    @classmethod
    def from_file(cls, path, overrides: dict | None = None) -> RunConfig:
        data = read_config_file(path)
        cfg = cls.from_dict(data, source=f"key in {path}:")
        return cfg.replace(**overrides) if overrides else cfg

    # ---- validation and the method -----------------------------------------------------------
    def validate(self) -> RunConfig:
        """Check types, choices and ranges of every setting (``None`` allowed where it means "not set")."""
        for name, (_, f, hint) in self.fields().items():
            value = self.get(name)
            if not _type_ok(value, hint):
                raise ConfigError(f"{name} must be of type {_type_name(hint)}; got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(str(c) for c in choices if c is not None)}; "
                                  f"got {value!r}")
        for name in ("prior_scale", "lr", "prior_df", "lora_alpha", "eps", "scale_lr"):
            v = self.get(name)
            if v is not None and (not math.isfinite(v) or v <= 0):
                raise ConfigError(f"{name} must be a finite number > 0; got {v!r}")
        for name in ("max_steps", "batch_size", "lora_r", "eval_batch_size", "max_length", "guide_rank",
                     "num_particles", "ece_bins"):
            if int(self.get(name)) <= 0:
                raise ConfigError(f"{name} must be > 0; got {self.get(name)}")
        for name in ("num_samples", "checkpoint_every", "train_limit", "eval_limit", "holdout"):
            v = self.get(name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0; got {v}")
        if self.adapter.lora_dropout is not None and not 0 <= self.adapter.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1); got {self.adapter.lora_dropout}")
        if self.fit.kl_cycle is not None:
            if self.fit.kl_cycle < 1:
                raise ConfigError(f"kl_cycle must be >= 1; got {self.fit.kl_cycle}")
            if self.fit.kl_schedule not in (None, "blob"):
                raise ConfigError(f"kl_cycle sets the cycle of kl_schedule=blob; got kl_schedule={self.fit.kl_schedule}")
        km = self.fit.kl_multiplier
        if km is not None and (km < 0 or not math.isfinite(km)):
            raise ConfigError(f"kl_multiplier must be a finite number >= 0; got {km}")
        if not 0 <= self.fit.warmup_ratio <= 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1]; got {self.fit.warmup_ratio}")
        if self.from_run is not None and self.method not in FROM_RUN_SOURCES:
            raise ConfigError(f"from_run applies a post-hoc method ({', '.join(FROM_RUN_SOURCES)}) to a finished run; "
                              f"method={self.method} trains its own (drop from_run)")
        if self.runtime.load_in_8bit and self.runtime.load_in_4bit:
            raise ConfigError("load_in_8bit and load_in_4bit exclude each other; choose one")
        if self.runtime.compile_cpp_wrapper and not self.runtime.compile:
            raise ConfigError("compile_cpp_wrapper sets how compile=true compiles; set compile=true or leave it off")
        if self.runtime.compile and self.runtime.gradient_checkpointing:
            raise ConfigError("compile and gradient_checkpointing exclude each other: checkpointed blocks replay "
                              "Flipout's signs from Python; choose one")
        if self.runtime.compile and (self.runtime.load_in_8bit or self.runtime.load_in_4bit):
            raise ConfigError("compile is not supported with load_in_8bit/load_in_4bit backbones; choose one")
        return self

    def resolve(self) -> RunConfig:
        """The method and preset applied: every "not set" field filled, conflicts refused (one line).

        Idempotent: a resolved config resolves to itself.
        """
        self.validate()
        cfg = RunConfig.from_dict(apply_method(self.flat_dict(), self.method, self.preset))
        sections = {s: with_defaults(getattr(cfg, s)) for s in SECTIONS}
        return dataclasses.replace(with_defaults(cfg), **sections).validate()

    def unread_settings(self) -> set[str]:
        """The flat names of the settings this *resolved* config's run never reads (:data:`UNREAD_WHEN`): changing
        one of them changes no trained parameter, prediction or log line of the run.

        ::

            RunConfig.from_dict({"method": "mle"}).resolve().unread_settings()
            # {'eps', 'std_param', 'guide_rank', 'scale_lr', 'gamma', 'kl_cycle', 'kl_lr', 'prior_df', 'cloze_norm'}
        """
        if None in (self.bayes.guide, self.bayes.prior, self.fit.objective, self.fit.kl_schedule):
            raise ValueError("unread_settings needs a resolved config (RunConfig.resolve())")
        return {name for rule in UNREAD_WHEN if rule.when(self) for name in rule.settings}


@dataclass(frozen=True)
class Unread:
    """``settings`` a run does not read when ``when(resolved config)`` holds; ``condition`` says it in words and
    ``read_by`` names the code that reads them otherwise (where to look when that code changes)."""

    settings: tuple[str, ...]
    when: Callable[[RunConfig], bool]
    condition: str
    read_by: str


UNREAD_WHEN = (
    Unread(("guide_rank",), lambda c: c.bayes.guide != "lowrank", "guide is not lowrank",
           "guides.make_guide (the lowrank branch alone passes rank)"),
    Unread(("eps",), lambda c: c.bayes.guide == "auto_delta", "guide=auto_delta (a point estimate)",
           "guides.make_guide (blob, lowrank: rho's init; auto_normal: init_scale); tfb's guide takes its own default "
           "and overwrites rho, laplace builds its own"),
    Unread(("std_param",), lambda c: c.bayes.guide in ("auto_delta", "auto_normal"), "guide is auto_delta or "
           "auto_normal", "guides.make_guide (the BlobGuide branches alone); tfb's guide fixes std_param=square"),
    Unread(("scale_lr",), lambda c: c.bayes.guide == "auto_delta" or c.fit.objective == "paper",
           "guide=auto_delta (no scale parameters) or objective=paper",
           "infer.ElboStep (its scale group, dropped when empty); PaperStep steps rho by SGD at kl_lr"),
    Unread(("elbo", "num_particles", "weight_decay"), lambda c: c.fit.objective == "paper", "objective=paper",
           "infer.ElboStep; PaperStep takes one draw and its AdamW has weight_decay=0"),
    Unread(("kl_lr",), lambda c: c.fit.objective != "paper", "objective is not paper", "infer.PaperStep"),
    Unread(("kl_cycle",), lambda c: c.fit.kl_schedule != "blob", "kl_schedule is not blob",
           "kl.BlobKLSchedule via infer.fit's make_kl_schedule"),
    Unread(("gamma",), lambda c: c.fit.kl_schedule != "blob" or c.fit.kl_cycle is not None,
           "kl_schedule is not blob, or kl_cycle sets the cycle", "kl.BlobKLSchedule (only without a cycle)"),
    Unread(("kl_multiplier",), lambda c: c.fit.kl_schedule != "fixed", "kl_schedule is not fixed",
           "kl.FixedKL via infer.fit's make_kl_schedule"),
    Unread(("prior_df",), lambda c: c.bayes.prior != "student_t", "prior is not student_t",
           "training.build_model (make_prior's df for student_t alone)"),
    Unread(("cloze_norm",), lambda c: c.head != "cloze", "head is not cloze (auto picks causal_lm or multiple_choice)",
           "training._make_head (ClozeHead alone)"),
)
"""The settings read only under a condition on the resolved config, each with that condition (derived from the code
that reads it; a setting is listed only where no output of the run, its training log included, depends on it).

Not listed, although a point estimate's training does not depend on them: ``prior``, ``prior_scale`` (and
``prior_df``) under a KL weight of 0 (``mle``, ``mcdropout``, ``ensemble``, ``temperature``, ``tfb``): the logged KL
is -log p(point) under the prior."""


def with_defaults(settings):
    """A copy of a settings dataclass (a section or :class:`RunConfig`) with each "not set" field at its default."""
    unset = {f.name: f.metadata["unset"] for f in dataclasses.fields(settings)
             if getattr(settings, f.name) is None and "unset" in f.metadata}
    return dataclasses.replace(settings, **unset)


@functools.cache
def _fields_of(cls) -> tuple:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in SECTIONS:
            out.append((f.name, (None, f, hints[f.name])))
    for section, klass in SECTIONS.items():
        shints = typing.get_type_hints(klass)
        out += [(f.name, (section, f, shints[f.name])) for f in dataclasses.fields(klass)]
    return tuple(out)


def _check_names(data: dict, source: str, names=None) -> None:
    names = list(names if names is not None else RunConfig.fields())
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown {source} {key!r}{hint}")


def _type_ok(value, hint) -> bool:
    """Does ``value`` (from JSON, YAML or a flag) fit the field annotation ``hint``? (ints count as floats)."""
    if typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    if hint is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return {type(None): "null", list: "list of strings", float: "number"}.get(hint, getattr(hint, "__name__", str(hint)))


def read_config_file(path) -> dict[str, Any]:
    """The mapping in a JSON or YAML file (ConfigError, one line, if it is missing or malformed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # JSON or YAML syntax: report where
        raise ConfigError(f"cannot parse {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings")
    return data
