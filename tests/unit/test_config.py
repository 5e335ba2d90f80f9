"""blob_pyro.config: one documented field per setting, flat or nested, checked types and ranges, resolve()."""

import dataclasses
import json

import pytest

from blob_pyro.config import (
    SECTIONS,
    AdapterConfig,
    BayesConfig,
    ConfigError,
    FitConfig,
    PredictConfig,
    RunConfig,
    RuntimeConfig,
    read_config_file,
)
from blob_pyro.methods import METHODS


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_every_setting_has_a_unique_flat_name_and_help():
    fields = RunConfig.fields()
    per_class = sum(len(dataclasses.fields(k)) for k in SECTIONS.values())
    top = [f for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    assert len(fields) == per_class + len(top)  # no name appears in two sections
    for name, (section, f, _) in fields.items():
        assert f.metadata.get("help"), name
        assert section is None or section in SECTIONS
    assert RunConfig.field_names() == list(fields)
    assert fields["lr"][0] == "fit" and fields["guide"][0] == "bayes" and fields["model"][0] is None
    assert SECTIONS == {"adapter": AdapterConfig, "bayes": BayesConfig, "fit": FitConfig, "predict": PredictConfig,
                        "runtime": RuntimeConfig}


def test_flat_nested_and_mixed_dicts_give_the_same_config():
    flat = RunConfig.from_dict({"lr": 0.01, "guide": "lowrank", "lora_r": 4, "device": "cpu", "num_samples": 3,
                                "dataset": "arc_easy"})
    nested = RunConfig.from_dict({"fit": {"lr": 0.01}, "bayes": {"guide": "lowrank"}, "adapter": {"lora_r": 4},
                                  "runtime": {"device": "cpu"}, "predict": {"num_samples": 3}, "dataset": "arc_easy"})
    mixed = RunConfig.from_dict({"fit": {"lr": 0.01}, "guide": "lowrank", "lora_r": 4, "runtime": {"device": "cpu"},
                                 "num_samples": 3, "dataset": "arc_easy"})
    assert flat == nested == mixed
    assert flat.fit.lr == 0.01 and flat.bayes.guide == "lowrank" and flat.get("lora_r") == 4
    assert RunConfig.from_dict(flat.to_dict()) == flat == RunConfig.from_dict(flat.flat_dict())
    assert json.loads(json.dumps(flat.to_dict()))["fit"]["lr"] == 0.01


def test_replace_and_get():
    cfg = RunConfig()
    new = cfg.replace(lr=0.5, method="mle")
    assert (new.fit.lr, new.method) == (0.5, "mle") and cfg.fit.lr == 1e-3  # a copy
    assert new.get("lr") == 0.5 and new.flat_dict()["method"] == "mle"
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        cfg.replace(lrr=0.5)


@pytest.mark.parametrize("data, needle", [
    ({"prior_scal": 0.1}, "did you mean 'prior_scale'"),
    ({"bayesian_facter": "A"}, "did you mean 'bayesian_factor'"),
    ({"fit": {"lrr": 0.1}}, "did you mean 'lr'"),
    ({"fit": {"prior_scale": 0.1}}, "section 'fit'"),
    ({"zzz_totally_unknown": 1}, "'zzz_totally_unknown'"),
])
def test_unknown_keys_are_refused_with_the_closest_name(data, needle):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    msg = _one_line(err)
    assert msg.startswith("unknown") and needle in msg


def test_a_configuration_must_be_a_mapping():
    with pytest.raises(ConfigError, match="mapping"):
        RunConfig.from_dict(["lr", 1])


@pytest.mark.parametrize("data, needle", [
    ({"lora_r": "eight"}, "lora_r must be of type int; got 'eight'"),
    ({"lora_r": 8.5}, "lora_r"), ({"lr": True}, "lr"), ({"flipout": "yes"}, "flipout"),
    ({"target_modules": "query"}, "target_modules"), ({"target_modules": [1, 2]}, "target_modules"),
    ({"guide": "os.system"}, "guide must be one of blob, lowrank, auto_normal, auto_delta; got 'os.system'"),
    ({"prior": "os.system"}, "prior must be one of"), ({"method": "os.system"}, "method must be one of"),
    ({"std_param": "exp"}, "std_param must be one of"), ({"preset": "fast"}, "preset must be one of paper"),
    ({"prior_scale": 0}, "prior_scale must be a finite number > 0"), ({"prior_scale": float("nan")}, "prior_scale"),
    ({"eps": -1}, "eps must be a finite number > 0"), ({"eps": float("inf")}, "eps"),
    ({"scale_lr": 0}, "scale_lr"), ({"lr": -1e-3}, "lr must be"),
    ({"max_steps": 0}, "max_steps must be > 0"), ({"batch_size": -1}, "batch_size"),
    ({"num_particles": 0}, "num_particles"), ({"guide_rank": 0}, "guide_rank"),
    ({"num_samples": -1}, "num_samples must be >= 0"), ({"checkpoint_every": -2}, "checkpoint_every"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"), ({"warmup_ratio": 1.5}, "warmup_ratio"),
    ({"kl_multiplier": -1.0}, "kl_multiplier"),
    ({"load_in_8bit": True, "load_in_4bit": True}, "load_in_8bit and load_in_4bit exclude each other"),
    ({"method": "blob", "from_run": "runs/map"}, "method=blob trains its own (drop from_run)"),
    ({"kl_cycle": 0}, "kl_cycle must be >= 1"),
    ({"kl_cycle": 25, "kl_schedule": "standard"}, "kl_cycle sets the cycle of kl_schedule=blob"),
    ({"kl_cycle": 25, "method": "mle"}, "kl_cycle sets the cycle of kl_schedule=blob; got kl_schedule=fixed"),
    ({"method": "temperature", "from_run": "runs/mle"}, "method=temperature trains its own"),
])
def test_bad_values_are_one_line_errors_naming_the_setting(data, needle):
    cfg = RunConfig.from_dict(data)  # construction takes anything; validate (and so resolve) checks
    with pytest.raises(ConfigError) as err:
        cfg.resolve()
    assert needle in _one_line(err)


def test_ints_count_as_floats_and_none_means_not_set():
    cfg = RunConfig.from_dict({"lr": 1, "prior_scale": 1, "eps": None, "num_samples": None}).validate()
    assert cfg.fit.lr == 1 and cfg.bayes.eps is None


def test_resolve_fills_what_is_not_set_and_is_idempotent():
    cfg = RunConfig()
    assert (cfg.bayes.guide, cfg.fit.objective, cfg.predict.num_samples) == (None, None, None)
    resolved = cfg.resolve()
    assert resolved is not cfg and cfg.bayes.guide is None  # resolve returns a new config
    expected = {"bayesian_factor": "B", "prior": "normal", "guide": "blob", "eps": 0.2, "objective": "elbo",
                "kl_schedule": "blob", "kl_multiplier": 1.0, "num_samples": 10, "lora_dropout": 0.0}
    assert {k: resolved.get(k) for k in expected} == expected
    for name, (_, f, _) in RunConfig.fields().items():
        if "unset" in f.metadata:
            assert resolved.get(name) is not None, name
    assert resolved.resolve() == resolved
    # the paper preset keeps the official eps; an explicit eps wins over either default
    assert RunConfig.from_dict({"preset": "paper"}).resolve().bayes.eps == 0.05
    assert RunConfig.from_dict({"preset": "paper", "eps": 0.1}).resolve().bayes.eps == 0.1


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("preset", [None, "paper"])
def test_resolve_is_idempotent_for_every_method_and_preset(method, preset):
    cfg = RunConfig.from_dict({"method": method, "preset": preset})
    if preset is not None and method != "blob":
        with pytest.raises(ConfigError):
            cfg.resolve()
        return
    once = cfg.resolve()
    assert once.resolve() == once and RunConfig.from_dict(once.to_dict()).resolve() == once


def test_predict_kwargs_are_predicts_arguments():
    cfg = RunConfig.from_dict({"num_samples": 4, "eval_batch_size": 8, "sample_batched": True})
    assert cfg.predict.kwargs() == {"num_samples": 4, "batch_size": 8, "sample_batched": True}


def test_from_file_json_and_yaml_with_overrides(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"fit": {"lr": 0.01}, "guide": "lowrank"}))
    (tmp_path / "b.yaml").write_text("fit:\n  lr: 0.01\nguide: lowrank\n")
    a = RunConfig.from_file(tmp_path / "a.json", overrides={"seed": 2})
    b = RunConfig.from_file(tmp_path / "b.yaml", overrides={"seed": 2})
    assert a == b and (a.fit.lr, a.bayes.guide, a.fit.seed) == (0.01, "lowrank", 2)


@pytest.mark.parametrize("name, text, needle", [
    ("missing.json", None, "does not exist"),
    ("bad.json", "{lr: 1", "cannot parse"),
    ("bad.yaml", "lr: [1", "cannot parse"),
    ("list.json", "[1, 2]", "must hold a mapping"),
])
def test_config_file_problems_are_one_line(tmp_path, name, text, needle):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    msg = _one_line(err)
    assert needle in msg and str(path) in msg


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("prior_scal: 0.1\n")
    with pytest.raises(ConfigError) as err:
        RunConfig.from_file(path)
    msg = _one_line(err)
    assert str(path) in msg and "'prior_scal'" in msg and "did you mean 'prior_scale'" in msg


def test_flat_settings_flattens_sections_and_refuses_unknown_names():
    assert RunConfig.flat_settings({"fit": {"lr": 0.1}, "method": "map", "num_samples": 3}) == {
        "lr": 0.1, "method": "map", "num_samples": 3}
    with pytest.raises(ConfigError, match="max_stepz"):
        RunConfig.flat_settings({"fit": {"max_stepz": 3}})
    assert RunConfig.from_dict({"method": "laplace", "from_run": "runs/map"}).resolve().from_run == "runs/map"
