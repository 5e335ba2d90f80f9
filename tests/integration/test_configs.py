"""The committed grid files load and every one of their cells resolves to a valid RunConfig (no data or training
needed), with the settings each grid promises."""

from pathlib import Path

import pytest

from benchmarks.runner.grid import BenchError, cells_of, load_grid, run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.json"))


def test_there_are_committed_grids():
    assert {p.stem for p in CONFIGS} >= {"bench_cpu", "ood_cpu", "ablations_cpu", "long_budget_cpu", "ood_long_cpu",
                                         "bench_gpu_llama2_7b"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_grid_file_loads_and_every_cell_validates(path, tmp_path):
    grid = load_grid(path, data_dir=str(tmp_path), output_dir=tmp_path / "out")
    cells = cells_of(grid)
    assert len(cells) == len(grid.entries) * len(grid.datasets) * len(grid.seeds) > 0
    for cell in cells:
        for cfg in cell.member_configs(grid.base):
            assert cfg.dataset == cell.dataset and cfg.data_dir == str(tmp_path)


def test_cpu_protocol_is_the_issue_grid(tmp_path):
    grid = load_grid(Path(CONFIGS[0]).parent / "bench_cpu.json", data_dir=str(tmp_path))
    assert [e.name for e in grid.entries] == ["mle", "map", "mcdropout", "ensemble", "bbb", "blob"]
    assert grid.datasets == ["winogrande_s", "arc_easy", "arc_challenge", "openbookqa"] and grid.seeds == [1, 2, 3]
    configs = [cfg for cell in cells_of(grid) for cfg in cell.member_configs(grid.base)]
    assert {(c.fit.max_steps, c.fit.batch_size, c.model) for c in configs} == {(250, 4, "minilm")}  # one budget for all


def test_main_protocol_is_one_budget_in_the_over_fitting_regime(tmp_path):
    grid = load_grid(Path(CONFIGS[0]).parent / "main_cpu.json", data_dir=str(tmp_path))
    assert [e.name for e in grid.entries] == ["mle", "map", "mcdropout", "ensemble", "bbb", "blob", "temperature",
                                              "laplace", "tfb", "blob_klstd"]
    assert grid.datasets == ["arc_easy", "arc_challenge", "openbookqa", "winogrande_s"] and grid.seeds == [1, 2, 3]
    configs = [cfg for cell in cells_of(grid) for cfg in cell.member_configs(grid.base)]
    assert {(c.fit.max_steps, c.fit.batch_size, c.train_limit, c.fit.lr, c.holdout) for c in configs} == {
        (300, 8, 400, 2e-3, None)}  # one budget for every row; evaluated on dev, not on a held-out slice
    blob = next(e for e in grid.entries if e.name == "blob")
    assert blob.predict == {"blob": None, "blob_mean": 0}  # BLoB N=10 and N=0 from one run
    # the post-hoc rows start from the mle cells (no second training), Laplace with KFAC as Laplace-LoRA and its
    # linearised predictive's 1000 logit draws (the base's 10 would be Monte Carlo noise, docs/methods.md)
    by_name = {e.name: e for e in grid.entries}
    assert by_name["laplace"].source == by_name["tfb"].source == "mle"
    assert by_name["laplace"].overrides == {"laplace_hessian": "kfac", "num_samples": 1000}
    cell = next(c for c in cells_of(grid) if c.entry.name == "laplace")
    assert cell.member_configs(grid.base)[0].from_run == str(cell.dir.parent.parent / "mle" / cell.dir.name)


def test_main_ood_grid_reuses_the_main_grids_openbookqa_runs(tmp_path):
    main = load_grid(Path(CONFIGS[0]).parent / "main_cpu.json", data_dir=str(tmp_path))
    ood = load_grid(Path(CONFIGS[0]).parent / "main_ood_cpu.json", data_dir=str(tmp_path))
    assert ood.output_dir == main.output_dir and ood.datasets == ["openbookqa"]
    assert ood.ood_datasets[:2] == ["arc_challenge", "arc_easy"]
    cells = {c.dir: c.member_configs(main.base) for c in cells_of(main) if c.dataset == "openbookqa"}
    for cell in cells_of(ood):  # the same folders with the same settings: finished cells are reused, not retrained
        assert [c.to_dict() for c in cell.member_configs(ood.base)] == [c.to_dict() for c in cells[cell.dir]]


def test_long_budget_variants_change_one_thing(tmp_path):
    grid = load_grid(Path(CONFIGS[0]).parent / "long_budget_cpu.json", data_dir=str(tmp_path),
                           datasets=["openbookqa"])
    by_name = {c.entry.name: c.member_configs(grid.base)[0] for c in cells_of(grid)}
    ref = by_name["blob"]
    assert ref.fit.max_steps == 2000
    assert by_name["blob_klstd"].fit.kl_schedule == "standard" != ref.fit.kl_schedule
    assert by_name["blob_factorA"].bayes.bayesian_factor == "A" != ref.bayes.bayesian_factor
    assert by_name["blob_klstd_prior0.05"].bayes.prior_scale == 0.05 != ref.bayes.prior_scale
    for name, cfg in by_name.items():  # one thing changed: every other setting is the blob row's
        if cfg.method != "blob":
            continue
        changed = {k for k, v in cfg.flat_dict().items() if v != ref.get(k)}
        assert changed <= {"kl_schedule", "bayesian_factor", "prior_scale"}, (name, changed)


def test_ood_long_reuses_the_long_budget_cells(tmp_path):
    """ood_long_cpu promises to evaluate the step-budget check's OpenBookQA runs: same folders, same settings."""
    load = lambda name: load_grid(Path(CONFIGS[0]).parent / name, data_dir=str(tmp_path),  # noqa: E731
                                        output_dir=tmp_path / "out", datasets=["openbookqa"], methods=["mle", "blob"])
    ood, long = load("ood_long_cpu.json"), load("long_budget_cpu.json")
    assert ood.ood_datasets[:2] == ["arc_challenge", "arc_easy"]
    pairs = list(zip(cells_of(ood), cells_of(long), strict=True))
    assert len(pairs) == 6
    for a, b in pairs:
        assert a.dir == b.dir and a.member_configs(ood.base) == b.member_configs(long.base)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.stem in ("bench_cpu", "bench_gpu_llama2_7b")],
                         ids=lambda p: p.stem)
def test_base_settings_a_method_decides_keep_the_methods_default(path, tmp_path):
    """base is every method's setting except where the method has a default of its own: the point estimates keep
    their posterior-mean prediction (N = 0) under base's num_samples 10, mcdropout its dropout 0.1 under the
    Llama grid's base dropout 0, bbb its initial scale, as the rows of the committed results were computed."""
    grid = load_grid(path, data_dir=str(tmp_path), datasets=["arc_easy"], seeds=[1])
    assert grid.base["num_samples"] == 10
    first = {c.entry.name: c.member_configs(grid.base) for c in cells_of(grid)}
    samples = {name: {cfg.predict.num_samples for cfg in cfgs} for name, cfgs in first.items()}
    assert samples["mle"] == samples["map"] == samples["ensemble"] == {0}
    assert samples["mcdropout"] == samples["bbb"] == samples["blob"] == {10}
    assert first["mcdropout"][0].adapter.lora_dropout == 0.1
    assert {cfgs[0].adapter.lora_dropout for name, cfgs in first.items() if name != "mcdropout"} == {0.0}
    assert first["bbb"][0].bayes.eps ** 2 == pytest.approx(0.1)
    rows = {c.entry.name: c.member_rows(c.member_configs(grid.base)[0]) for c in cells_of(grid)}
    assert rows["mle"] == {"mle": 0} and rows["blob"] == {"blob": 10, "blob_mean": 0}


def test_an_entrys_overrides_are_explicit_and_conflicts_are_refused():
    base = {"model": "minilm", "num_samples": 10}
    assert run_config(base, {"num_samples": 5}, method="mle", dataset="arc_easy", seed=1).predict.num_samples == 5
    assert run_config(base, {}, method="mle", dataset="arc_easy", seed=1).predict.num_samples == 0
    with pytest.raises(BenchError, match="x: .*method=mle implies guide=auto_delta; got guide=lowrank"):
        run_config({**base, "guide": "lowrank"}, {}, method="mle", dataset="arc_easy", seed=1, where="x")
    with pytest.raises(BenchError, match="method=mcdropout needs lora_dropout > 0"):
        run_config(base, {"lora_dropout": 0.0}, method="mcdropout", dataset="arc_easy", seed=1)
