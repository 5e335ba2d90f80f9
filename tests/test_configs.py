"""The committed grid files load and every one of their cells is a valid TrainConfig (no data or training needed)."""

from pathlib import Path

import pytest

from blob_pyro import bench

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json"))


def test_there_are_committed_grids():
    assert {p.stem for p in CONFIGS} >= {"bench_cpu", "ood_cpu", "ablations_cpu", "long_budget_cpu", "ood_long_cpu",
                                         "bench_gpu_llama2_7b"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_grid_file_loads_and_every_cell_validates(path, tmp_path):
    grid = bench.load_grid(path, data_dir=str(tmp_path), output_dir=tmp_path / "out")
    cells = bench.cells_of(grid)
    assert len(cells) == len(grid.entries) * len(grid.datasets) * len(grid.seeds) > 0
    for cell in cells:
        for cfg in cell.member_configs(grid.base):
            assert cfg.dataset == cell.dataset and cfg.data_dir == str(tmp_path)


def test_cpu_protocol_is_the_issue_grid(tmp_path):
    grid = bench.load_grid(Path(CONFIGS[0]).parent / "bench_cpu.json", data_dir=str(tmp_path))
    assert [e.name for e in grid.entries] == ["mle", "map", "mcdropout", "ensemble", "bbb", "blob"]
    assert grid.datasets == ["winogrande_s", "arc_easy", "arc_challenge", "openbookqa"] and grid.seeds == [1, 2, 3]
    configs = [cfg for cell in bench.cells_of(grid) for cfg in cell.member_configs(grid.base)]
    assert {(c.max_steps, c.batch_size, c.model) for c in configs} == {(250, 4, "minilm")}  # one budget for all


def test_long_budget_variants_change_one_thing(tmp_path):
    grid = bench.load_grid(Path(CONFIGS[0]).parent / "long_budget_cpu.json", data_dir=str(tmp_path),
                           datasets=["openbookqa"])
    by_name = {c.entry.name: c.member_configs(grid.base)[0] for c in bench.cells_of(grid)}
    ref = by_name["blob"]
    assert ref.max_steps == 2000
    assert by_name["blob_klstd"].kl_schedule == "standard" != ref.kl_schedule
    assert by_name["blob_factorA"].bayesian_factor == "A" != ref.bayesian_factor
    assert by_name["blob_klstd_prior0.05"].prior_scale == 0.05 != ref.prior_scale


def test_ood_long_reuses_the_long_budget_cells(tmp_path):
    """ood_long_cpu promises to evaluate the step-budget check's OpenBookQA runs: same folders, same settings."""
    load = lambda name: bench.load_grid(Path(CONFIGS[0]).parent / name, data_dir=str(tmp_path),  # noqa: E731
                                        output_dir=tmp_path / "out", datasets=["openbookqa"], methods=["mle", "blob"])
    ood, long = load("ood_long_cpu.json"), load("long_budget_cpu.json")
    assert ood.ood_datasets[:2] == ["arc_challenge", "arc_easy"]
    pairs = list(zip(bench.cells_of(ood), bench.cells_of(long), strict=True))
    assert len(pairs) == 6
    for a, b in pairs:
        assert a.dir == b.dir and a.member_configs(ood.base) == b.member_configs(long.base)
