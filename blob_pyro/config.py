"""Run configuration: one dataclass, every field documented, JSON round trip, file + CLI overrides.

::

    cfg = TrainConfig(model="minilm", dataset="winogrande_s", max_steps=200)
    cfg = TrainConfig.from_file("configs/cpu.json", overrides={"seed": 2})   # unknown keys are refused
    cfg.validate()
    json.dumps(cfg.to_dict())
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["TrainConfig", "ConfigError", "METHODS", "PRESETS"]

METHODS = ("blob", "mle", "map", "mcdropout", "bbb")
PRESETS = ("paper",)
BBB_INIT_SCALE = 0.1
"""Initial std of every AutoNormal scale for ``method=bbb`` (Pyro's AutoNormal default)."""


class ConfigError(ValueError):
    """A bad setting (one-line message)."""


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to train
    model: str = _f("minilm", "Hugging Face hub id or local path of the frozen backbone; 'minilm' = offline MiniLM-L6")
    dataset: str = _f("winogrande_s", "benchmark name (winogrande_s, arc_easy, ..., mmlu_<subject>)")
    data_dir: Optional[str] = _f(None, "local benchmark folder laid out like shared/data (default: $BLOB_DATA_DIR, else the hub)")
    method: str = _f("blob", "blob | mle (plain LoRA) | map (Gaussian prior, point estimate) | mcdropout | bbb", choices=METHODS)
    preset: Optional[str] = _f(None, "'paper': the official optimisation (A factor, AdamW on NLL + SGD on KL)", choices=(None,) + PRESETS)
    head: str = _f("auto", "auto | causal_lm | multiple_choice | sequence_classification")
    # LoRA
    target_modules: Optional[list] = _f(None, "LoRA targets (default: q_proj,v_proj,lm_head for Llama-style; query,value for BERT-style)")
    lora_r: int = _f(8, "LoRA rank r")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "LoRA dropout (mcdropout uses 0.1)")
    # the probabilistic model
    bayesian_factor: str = _f("B", "which LoRA factor is Bayesian: B (default), A (the paper) or both", choices=("A", "B", "both"))
    prior: str = _f("normal", "prior family: normal | laplace | student_t", choices=("normal", "laplace", "student_t"))
    prior_scale: float = _f(0.2, "prior scale (a std for normal; BLoB's beta)")
    prior_df: float = _f(3.0, "Student-t degrees of freedom")
    guide: str = _f("blob", "blob | lowrank | auto_normal | auto_delta", choices=("blob", "lowrank", "auto_normal", "auto_delta"))
    guide_rank: int = _f(2, "rank k of the lowrank guide")
    eps: float = _f(0.05, "BLoB's eps: rho ~ U(eps/sqrt2, eps), initial std = rho^2")
    std_param: str = _f("square", "std parameterisation: square (rho^2) | softplus", choices=("square", "softplus"))
    # the objective
    elbo: str = _f("trace", "trace (Trace_ELBO, MC KL) | meanfield (TraceMeanField_ELBO, analytic KL)", choices=("trace", "meanfield"))
    kl_schedule: str = _f("blob", "blob (BLoB re-weighting) | standard (1/N per step) | fixed (kl_multiplier / N)", choices=("blob", "standard", "fixed"))
    kl_multiplier: float = _f(1.0, "KL multiplier for kl_schedule=fixed")
    gamma: float = _f(8.0, "gamma of BLoB's dataset rescaling")
    flipout: bool = _f(True, "Flipout in training and prediction (off: one weight draw per batch)")
    flipout_per: str = _f("token", "token (the paper) | sequence", choices=("token", "sequence"))
    # optimisation
    max_steps: int = _f(200, "training steps")
    batch_size: int = _f(16, "examples per step and process (K processes: K x batch_size per step)")
    lr: float = _f(1e-3, "learning rate of means and deterministic parameters (AdamW)")
    scale_lr: Optional[float] = _f(None, "learning rate of std parameters (default: lr)")
    warmup_ratio: float = _f(0.06, "linear warm-up share of max_steps")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay")
    kl_lr: float = _f(0.01, "paper preset: SGD learning rate of the KL step")
    max_length: int = _f(256, "max tokens per sequence")
    seed: int = _f(0, "random seed (data order, init, sampling)")
    train_limit: Optional[int] = _f(None, "use only the first N training examples")
    # evaluation
    num_samples: int = _f(10, "posterior draws at prediction (0 = posterior-mean weights)")
    eval_batch_size: int = _f(32, "batch size at prediction")
    eval_limit: Optional[int] = _f(None, "evaluate on the first N examples only")
    sample_batched: bool = _f(False, "evaluate all draws in one forward by repeating the batch")
    # runtime
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    bf16: bool = _f(False, "bf16 autocast for the backbone (GPU; on a CPU only with AVX512-BF16/AMX: 1.8x faster there, 5-7x slower where emulated)")
    load_in_8bit: bool = _f(False, "load the backbone in 8-bit (bitsandbytes; GPU, or CPU with bitsandbytes>=0.50)")
    load_in_4bit: bool = _f(False, "load the backbone in 4-bit (bitsandbytes; GPU, or CPU with bitsandbytes>=0.50)")
    gradient_checkpointing: bool = _f(False, "recompute the frozen backbone's block activations in backward (less memory, ~30% more compute)")
    trust_remote_code: bool = _f(False, "allow custom model code from the hub (off unless you ask)")
    checkpoint_every: int = _f(0, "write a resumable checkpoint every K steps (0: off)")

    # ---- derived settings ------------------------------------------------------------------
    def effective(self) -> "TrainConfig":
        """Apply the method and preset to the settings they imply (idempotent).

        - ``mle``: plain LoRA: AutoDelta point estimate, KL multiplier 0 (no prior), posterior-mean prediction.
        - ``map``: AutoDelta on *both* LoRA factors with the ``prior`` at the standard minibatch-ELBO weight
          1/N: for the Normal prior, L2 toward 0 with coefficient 1/(2·prior_scale²·N) per batch-mean NLL.
          The official code's MAP (AdamW ``weight_decay=1e-5``) is ``method=mle, weight_decay=1e-5``.
        - ``mcdropout``: as ``mle``, with LoRA dropout 0.1 (unless set) kept on at prediction, ``num_samples`` draws.
        - ``bbb``: Bayes-by-backprop on both factors with a standard (not BLoB) initialisation: AutoNormal,
          means at PEFT's init (A Kaiming-uniform, B zero), every scale at :data:`BBB_INIT_SCALE` (0.1, Pyro's
          AutoNormal default; the guide's init scale is eps², so eps is set to √0.1), standard ELBO (KL 1/N).
        - ``blob``: the settings as given (``preset="paper"``: A factor, BLoB guide, BLoB KL re-weighting).
        """
        cfg = dataclasses.replace(self)
        if cfg.preset == "paper":
            cfg.bayesian_factor, cfg.guide, cfg.kl_schedule, cfg.lr = "A", "blob", "blob", cfg.lr
        if cfg.method in ("mle", "map", "mcdropout"):
            cfg.guide = "auto_delta"
            if cfg.method in ("mle", "mcdropout"):
                cfg.kl_schedule, cfg.kl_multiplier = "fixed", 0.0
            else:
                cfg.bayesian_factor, cfg.kl_schedule = "both", "standard"
            if cfg.method == "mcdropout":
                cfg.lora_dropout = cfg.lora_dropout or 0.1
            else:
                cfg.num_samples = 0
        if cfg.method == "bbb":
            cfg.bayesian_factor, cfg.guide, cfg.kl_schedule = "both", "auto_normal", "standard"
            cfg.eps = math.sqrt(BBB_INIT_SCALE)
        return cfg

    # ---- validation --------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not _type_ok(getattr(self, f.name), hints[f.name]):
                raise ConfigError(f"{f.name} must be of type {_type_name(hints[f.name])}; got {getattr(self, f.name)!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(str(c) for c in choices)}; got {getattr(self, f.name)!r}")
        for name in ("prior_scale", "eps", "lr", "prior_df", "lora_alpha"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a finite number > 0; got {v!r}")
        if self.scale_lr is not None and (not math.isfinite(self.scale_lr) or self.scale_lr <= 0):
            raise ConfigError(f"scale_lr must be a finite number > 0; got {self.scale_lr!r}")
        for name in ("max_steps", "batch_size", "lora_r", "eval_batch_size", "max_length", "guide_rank"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0; got {self.num_samples}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1); got {self.lora_dropout}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0; got {self.checkpoint_every}")
        if self.kl_multiplier < 0 or not math.isfinite(self.kl_multiplier):
            raise ConfigError(f"kl_multiplier must be a finite number >= 0; got {self.kl_multiplier}")
        return self

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "config") -> "TrainConfig":
        names = cls.field_names()
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(f"unknown {source} key {key!r}{hint}")
        return cls(**data)

    @classmethod
    def from_file(cls, path, overrides: dict | None = None) -> "TrainConfig":
        data = read_config_file(path)
        data.update(overrides or {})
        return cls.from_dict(data, source=f"key in {path}:")


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
