"""blob_pyro.config: one documented field per setting, flat or nested, checked types and ranges, resolve()."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

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
from blob_pyro.infer import fit
from blob_pyro.methods import METHODS
from blob_pyro.predictive import predict

from .tiny import store_snapshot, tiny_examples, tiny_run


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
    ({"compile": True, "gradient_checkpointing": True}, "compile and gradient_checkpointing exclude each other"),
    ({"compile": True, "load_in_8bit": True}, "compile is not supported with load_in_8bit/load_in_4bit"),
    ({"compile": "yes"}, "compile must be of type bool"),
    ({"compile_cpp_wrapper": True}, "compile_cpp_wrapper sets how compile=true compiles; set compile=true"),
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


# ---- the settings a run does not read --------------------------------------------------------------------------
_POINT = {"eps", "std_param", "guide_rank", "scale_lr"}  # what a point estimate (auto_delta) leaves unread
_DEFAULT = {"prior_df", "cloze_norm"}  # unread under the default prior (normal) and head (auto)


@pytest.mark.parametrize("settings, unread", [
    ({"method": "mle"}, _POINT | _DEFAULT | {"gamma", "kl_cycle", "kl_lr"}),
    ({"method": "map"}, _POINT | _DEFAULT | {"gamma", "kl_cycle", "kl_multiplier", "kl_lr"}),
    ({"method": "blob"}, _DEFAULT | {"guide_rank", "kl_multiplier", "kl_lr"}),
    ({"method": "blob", "kl_schedule": "fixed"}, _DEFAULT | {"guide_rank", "gamma", "kl_cycle", "kl_lr"}),
    ({"method": "blob", "kl_cycle": 50}, _DEFAULT | {"guide_rank", "gamma", "kl_multiplier", "kl_lr"}),
    ({"method": "blob", "guide": "lowrank"}, _DEFAULT | {"kl_multiplier", "kl_lr"}),
    ({"method": "blob", "preset": "paper"}, _DEFAULT | {"guide_rank", "kl_multiplier", "scale_lr", "elbo",
                                                        "num_particles", "weight_decay"}),
    ({"method": "bbb"}, _DEFAULT | {"std_param", "guide_rank", "gamma", "kl_cycle", "kl_multiplier", "kl_lr"}),
    ({"method": "blob", "prior": "student_t", "head": "cloze"}, {"guide_rank", "kl_multiplier", "kl_lr"}),
])
def test_unread_settings_of_resolved_configs(settings, unread):
    assert RunConfig.from_dict(settings).resolve().unread_settings() == unread
    assert unread <= set(RunConfig.fields())


def test_unread_settings_needs_a_resolved_config():
    with pytest.raises(ValueError, match="resolve"):
        RunConfig.from_dict({"method": "mle"}).unread_settings()


def test_the_unread_rules_know_every_choice_they_test():
    """UNREAD_WHEN's conditions name guides, KL schedules, objectives, priors and heads: a new one must be placed."""
    from blob_pyro.backbone import CAUSAL, ENCODER_HEADS, head_kind_for
    from blob_pyro.config import OBJECTIVES, UNREAD_WHEN
    from blob_pyro.guides import GUIDES
    from blob_pyro.heads import HEADS
    from blob_pyro.kl import KL_SCHEDULES
    from blob_pyro.priors import PRIORS

    assert set(GUIDES) == {"blob", "lowrank", "auto_normal", "auto_delta"}
    assert set(KL_SCHEDULES) == {"blob", "standard", "fixed"} and set(OBJECTIVES) == {"elbo", "paper"}
    assert set(PRIORS) == {"normal", "laplace", "student_t"}
    assert set(HEADS) == {"causal_lm", "cloze", "multiple_choice", "sequence_classification"}
    # head=auto never means cloze, so cloze_norm is unread under it
    assert {head_kind_for(SimpleNamespace(model_type=t)) for t in ("bert", "llama", "gpt2")} == {CAUSAL, ENCODER_HEADS[0]}
    assert all(name in RunConfig.fields() for rule in UNREAD_WHEN for name in rule.settings)


def _outputs(settings: dict):
    """What a 3-step run of ``settings`` on the tiny network produces: its resolved config, every param-store
    tensor, the predictive probabilities and draws' logits, and the training log (bar the wall clock)."""
    cfg = RunConfig.from_dict({"lr": 3e-2, "max_steps": 3, "batch_size": 4, "seed": 1, "num_samples": 2,
                               **settings}).resolve()
    run = tiny_run(cfg, num_data=8)
    examples = tiny_examples(8, seed=3)
    log = fit(run.model, run.guide, examples, cfg.fit, progress=False)
    params = store_snapshot()
    torch.manual_seed(5)
    pred = predict(run.model, run.guide, examples, num_samples=2, keep_draws=True, progress=False)
    return cfg, params, (pred.probs, pred.logits), [{k: v for k, v in r.items() if k != "seconds"} for r in log]


def _same(a, b) -> bool:
    (_, pa, (qa, la), loga), (_, pb, (qb, lb), logb) = a, b
    return (pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa) and torch.equal(qa, qb)
            and torch.equal(la, lb) and loga == logb)


# (setting, two values, the settings under which it is unread / read)
_UNREAD = [
    ("guide_rank", 1, 3, {"method": "blob"}),
    ("guide_rank", 1, 3, {"method": "bbb"}),
    ("eps", 0.05, 0.3, {"method": "mle"}),
    ("eps", 0.05, 0.3, {"method": "map"}),
    ("std_param", "square", "softplus", {"method": "bbb"}),
    ("std_param", "square", "softplus", {"method": "mcdropout"}),
    ("scale_lr", 1e-3, 0.2, {"method": "mle"}),
    ("scale_lr", 1e-3, 0.2, {"preset": "paper"}),
    ("elbo", "trace", "meanfield", {"preset": "paper"}),
    ("num_particles", 1, 3, {"preset": "paper"}),
    ("weight_decay", 0.0, 0.5, {"preset": "paper"}),
    ("kl_lr", 1e-3, 0.5, {"method": "blob"}),
    ("gamma", 8.0, 2.0, {"method": "map"}),
    ("gamma", 8.0, 2.0, {"method": "blob", "kl_cycle": 2}),
    ("kl_multiplier", 0.5, 3.0, {"method": "blob"}),
    ("kl_multiplier", 0.5, 3.0, {"method": "map"}),
    ("prior_df", 3.0, 30.0, {"method": "blob", "prior": "laplace", "kl_schedule": "standard"}),
]
_READ = [
    ("guide_rank", 1, 3, {"guide": "lowrank"}),
    ("eps", 0.05, 0.3, {"method": "blob"}),
    ("eps", 0.05, 0.3, {"method": "bbb"}),
    ("std_param", "square", "softplus", {"method": "blob"}),
    ("scale_lr", 1e-3, 0.2, {"method": "blob"}),
    ("elbo", "trace", "meanfield", {"method": "blob", "kl_schedule": "standard"}),
    ("num_particles", 1, 3, {"method": "blob"}),
    ("weight_decay", 0.0, 0.5, {"method": "mle"}),
    ("kl_lr", 1e-3, 0.5, {"preset": "paper"}),
    ("gamma", 8.0, 2.0, {"method": "blob"}),  # the cycle M, so the logged KL weight
    ("kl_cycle", 2, 3, {"method": "blob"}),
    ("kl_multiplier", 0.5, 3.0, {"method": "blob", "kl_schedule": "fixed"}),
    ("prior_df", 3.0, 30.0, {"method": "blob", "prior": "student_t", "kl_schedule": "standard"}),
]


@pytest.mark.parametrize("name, a, b, settings", _UNREAD, ids=[f"{n}-{s}" for n, _, _, s in _UNREAD])
def test_an_unread_setting_changes_nothing_the_run_produces(name, a, b, settings):
    first, second = _outputs({**settings, name: a}), _outputs({**settings, name: b})
    assert name in first[0].unread_settings() and name in second[0].unread_settings()
    assert first[0].get(name) != second[0].get(name)
    assert _same(first, second)


@pytest.mark.parametrize("name, a, b, settings", _READ, ids=[f"{n}-{s}" for n, _, _, s in _READ])
def test_a_read_setting_changes_what_the_run_produces(name, a, b, settings):
    first, second = _outputs({**settings, name: a}), _outputs({**settings, name: b})
    assert name not in first[0].unread_settings() | second[0].unread_settings()
    assert not _same(first, second)


def test_kl_cycle_has_no_second_value_where_it_is_unread():
    assert "kl_cycle" in RunConfig.from_dict({"method": "map"}).resolve().unread_settings()
    with pytest.raises(ConfigError, match="kl_cycle"):  # so a stored and a wanted config cannot differ in it there
        RunConfig.from_dict({"method": "map", "kl_cycle": 2}).resolve()


def test_the_prior_of_a_point_estimate_without_kl_is_read_by_its_logged_kl():
    """mle trains at KL weight 0, so its parameters ignore the prior, but its log records -log p(point): the prior
    is listed as read (a cell whose log would differ is not reused)."""
    first, second = _outputs({"method": "mle", "prior_scale": 0.1}), _outputs({"method": "mle", "prior_scale": 1.0})
    assert "prior_scale" not in first[0].unread_settings() and "prior" not in first[0].unread_settings()
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1]) and torch.equal(first[2][0], second[2][0])
    assert [r["kl"] for r in first[3]] != [r["kl"] for r in second[3]]
    assert [r["loss"] for r in first[3]] == [r["loss"] for r in second[3]]


@pytest.mark.parametrize("kind", ["causal_lm", "multiple_choice", "sequence_classification", "cloze"])
def test_cloze_norm_is_read_by_the_cloze_head_alone(kind):
    """training._make_head passes cloze_norm to ClozeHead only: every other head is the same under any norm."""
    from blob_pyro.training import _make_head

    from .test_heads import TinyCausalLM, _examples
    from .tiny import word_tokenizer

    heads = [_make_head(kind, word_tokenizer(), 5, ("A", "B"), 32, norm) for norm in ("none", "chars")]
    unread = "cloze_norm" in RunConfig.from_dict({"head": kind}).resolve().unread_settings()
    assert unread == (kind != "cloze")
    assert (heads[0].to_config() == heads[1].to_config()) == unread
    if kind in ("causal_lm", "cloze"):  # the same network's scores
        scores = [h.logits(TinyCausalLM(), h.collate(_examples(counts=(5, 5)))) for h in heads]
        assert torch.equal(*scores) == unread
