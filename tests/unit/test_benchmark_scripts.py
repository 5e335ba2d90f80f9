"""The small measurement scripts in benchmarks/ refuse bad input with one line and exit status 2, writing nothing."""

import json

import pytest


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_zero_shot_refuses_an_unknown_dataset_and_a_missing_grid(tmp_path, capsys):
    from benchmarks.zero_shot import main

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"name": "g", "base": {"model": "minilm"}, "methods": ["mle"],
                                "datasets": ["arc_easy"], "seeds": [1]}))
    out = tmp_path / "out.json"
    assert main([str(grid), "--dataset", "nosuch", "--out", str(out)]) == 2
    assert _one_line(capsys).startswith("zero_shot.py: unknown dataset 'nosuch'")
    assert main([str(tmp_path / "absent.json"), "--dataset", "arc_easy", "--out", str(out)]) == 2
    assert "absent.json" in _one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("method", [None, "mle"])
def test_laplace_glm_samples_refuses_a_folder_that_is_not_a_laplace_run(tmp_path, capsys, method):
    from benchmarks.laplace_glm_samples import main
    from blob_pyro.config import RunConfig

    run = tmp_path / "run"
    if method:
        run.mkdir()
        (run / "config.json").write_text(json.dumps(RunConfig.from_dict({"method": method}).resolve().to_dict()))
    out = tmp_path / "out.json"
    assert main(["--run", str(run), "--out", str(out)]) == 2
    assert ("is not a method=laplace run" if method else "does not exist") in _one_line(capsys)
    assert not out.exists()


def test_step_phases_refuses_no_rounds(tmp_path, capsys):
    from benchmarks.step_phases import main

    assert main(["--rounds", "0", "--out", str(tmp_path / "out")]) == 2
    assert _one_line(capsys).startswith("step_phases.py: --rounds must be >= 1")
    assert not (tmp_path / "out").exists()


def test_step_phases_clock_times_wrapped_calls_and_puts_them_back():
    import time
    import types

    from benchmarks.step_phases import Clock, phases_of

    owner = types.SimpleNamespace(work=lambda n: sum(range(n)))
    original = owner.work
    clock = Clock()
    clock.wrap(owner, "work", "backward")
    t0 = time.process_time()
    assert owner.work(200_000) == sum(range(200_000))
    outside = time.process_time() - t0
    assert 0 < clock.spent["backward"] <= outside
    clock.restore()
    assert owner.work is original
    clock.reset()
    assert not clock.spent
    # the traces hold the network: the Pyro part is what is left of them; the rest is what no phase holds
    phases = phases_of({"traces": 5.0, "network": 3.0, "backward": 2.0, "densities": 0.5}, 12.0)
    assert phases == {"network": 3.0, "pyro traces": 2.0, "densities": 0.5, "logged kl": 0.0, "backward": 2.0,
                      "optimizer": 0.0, "zero_grad": 0.0, "rest": 4.5}
    assert phases_of({"network": 1.0, "optimizer": 0.25}, 2.0)["pyro traces"] == 0.0  # plain PyTorch: no traces
