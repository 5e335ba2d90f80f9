"""blob_pyro.plots: each plot function draws something checkable on small seeded inputs, headless (Agg)."""

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from blob_pyro.metrics import expected_calibration_error, reliability_bins  # noqa: E402
from blob_pyro.plots import (  # noqa: E402
    confidence_histogram,
    plot_importance_ratios,
    plot_metric_comparison,
    plot_posterior_std,
    plot_prior_vs_posterior,
    plot_training_trace,
    reliability_diagram,
    risk_coverage_plot,
    save_figure,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _probs(n=200, k=4, scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * scale
    labels = torch.where(torch.rand(n, generator=g) < 0.7, logits.argmax(1), torch.randint(0, k, (n,), generator=g))
    return torch.softmax(logits, 1), labels


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_reliability_diagram_bars_title_and_band(tmp_path):
    probs, labels = _probs()
    rb = reliability_bins(probs, labels)
    ece = expected_calibration_error(probs, labels)
    n_bins = 15
    band = {"lower": np.clip(rb["accuracy"] - 0.1, 0, 1), "upper": np.clip(rb["accuracy"] + 0.1, 0, 1)}
    ax = reliability_diagram(probs, labels, n_bins=n_bins, band=band, label="BLoB")
    assert len(_bars(ax)) == int((rb["count"] > 0).sum())
    heights = sorted(p.get_height() for p in _bars(ax))
    assert np.allclose(heights, sorted(rb["accuracy"][rb["count"] > 0]))
    assert f"{ece:.4f}" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("BLoB" in t and f"{100 * ece:.2f}" in t for t in legend)
    assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 1  # the shaded band
    out = save_figure(ax.figure, tmp_path / "sub" / "rel.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reliability_diagram_overlay_and_saturated_bin():
    probs, labels = _probs(scale=1.0, seed=1)
    ax = reliability_diagram(probs, labels, kind="line", label="run A")
    probs2 = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.3, 0.7]])
    ax = reliability_diagram(probs2, torch.tensor([1, 0, 1]), kind="line", label="run B", ax=ax)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum("perfect calibration" in t for t in texts) == 1  # diagonal drawn once
    assert any("run A" in t for t in texts) and any("run B" in t for t in texts)
    assert any("conf = 1.0 (n=1)" in t for t in texts)
    assert len(_bars(ax)) == 0


def test_risk_coverage_plot_draws_the_curve_the_best_ranking_and_overlays(tmp_path):
    from blob_pyro.uncertainty import aurc, risk_coverage_curve

    probs, labels = _probs(n=50, seed=3)
    ax = risk_coverage_plot(probs, labels, label="run A")
    coverage, risk = risk_coverage_curve(probs, labels)
    curve = [line for line in ax.lines if line.get_label().startswith("run A")]
    assert len(curve) == 1 and curve[0].get_label() == f"run A (AURC {aurc(probs, labels):.3f})"
    np.testing.assert_allclose(curve[0].get_xdata(), coverage.numpy())
    np.testing.assert_allclose(curve[0].get_ydata(), risk.numpy())
    best = [line for line in ax.lines if line.get_label() == "best ranking"]
    errors = round(float(risk[-1]) * 50)
    assert len(best) == 1 and float(best[0].get_ydata()[-1]) == pytest.approx(errors / 50)
    assert float(np.count_nonzero(best[0].get_ydata() == 0)) == 50 - errors  # right answers first: no risk
    risk_coverage_plot(*_probs(n=30, seed=4), ax=ax, label="run B")
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sum(t == "best ranking" for t in texts) == 1 and any(t.startswith("run B (AURC") for t in texts)
    assert save_figure(ax, tmp_path / "rc.png").read_bytes()[:4] == b"\x89PNG"


def test_reliability_diagram_rejects_bad_band():
    probs, labels = _probs(n=20)
    with pytest.raises(ValueError, match="n_bins"):
        reliability_diagram(probs, labels, band={"lower": np.zeros(3), "upper": np.ones(3)})
    with pytest.raises(ValueError, match="band"):
        reliability_diagram(probs, labels, band={"lo": np.zeros(15)})


def test_confidence_histogram():
    probs, labels = _probs()
    ax = confidence_histogram(probs, n_bins=10, labels=labels)
    bars = _bars(ax)
    assert len(bars) == 10
    assert sum(b.get_height() for b in bars) == pytest.approx(1.0)
    assert len(ax.lines) == 2  # mean confidence and accuracy
    fig, ax2 = plt.subplots()
    assert confidence_histogram(probs.numpy(), ax=ax2) is ax2
    assert len(_bars(ax2)) == 15


def test_plot_training_trace_from_records_and_file(tmp_path):
    records = [
        {"step": s, "loss": 10.0 / s, "nll": 0.7 - 0.01 * s, "kl": 1500.0 * 0.5**s, "kl_weight": 0.01 * s,
         "lr": {"loc": 1e-4, "scale": 1e-3}, "seconds": 0.5}
        for s in range(1, 21)
    ]
    fig = plot_training_trace(records, keys=("loss", "nll", "kl", "kl_weight", "missing", "lr"))
    assert len(fig.axes) == 5  # "missing" skipped
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "nll", "kl", "kl_weight", "lr"]
    assert fig.axes[2].get_yscale() == "log"  # KL spans many decades
    assert len(fig.axes[4].lines) == 2  # lr dict -> one line per parameter group
    x, y = fig.axes[0].lines[0].get_data()
    assert list(x) == list(range(1, 21)) and y[0] == pytest.approx(10.0)
    path = tmp_path / "train_log.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:5]) + "\n")
    fig2 = plot_training_trace(path)
    assert len(fig2.axes) == 4
    with pytest.raises(ValueError, match="none of the keys"):
        plot_training_trace(records, keys=("nope",))


def test_plot_posterior_std_labels_and_groups():
    g = torch.Generator().manual_seed(0)
    stds = {}
    for layer in (0, 3):
        for mod in ("query", "value"):
            for fac in ("lora_A", "lora_B"):
                stds[f"base_model.model.encoder.layer.{layer}.attention.self.{mod}.{fac}"] = (
                    torch.rand(8, 16, generator=g) * 0.01
                )
    stds["base_model.model.classifier.lora_A"] = np.full((4, 2), 0.02)
    ax = plot_posterior_std(stds)
    bars = _bars(ax)
    assert len(bars) == len(stds)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "L3 query B" in labels and "L0 value A" in labels and "classifier A" in labels
    # grouped by factor: all A bars before all B bars, colored per factor
    first_b = next(i for i, s in enumerate(labels) if s.endswith(" B"))
    assert all(s.endswith(" A") for s in labels[:first_b]) and all(s.endswith(" B") for s in labels[first_b:])
    assert bars[0].get_facecolor() != bars[-1].get_facecolor()
    key = "base_model.model.encoder.layer.3.attention.self.query.lora_B"
    bar = bars[labels.index("L3 query B")]
    assert bar.get_height() == pytest.approx(float(stds[key].mean()), rel=1e-6)
    ax2 = plot_posterior_std(stds, whiskers="percentile")
    assert len(_bars(ax2)) == len(stds)


def test_plot_prior_vs_posterior():
    rng_before = torch.get_rng_state()
    entries = {
        "L0 query A[0,0]": (torch.distributions.Normal(0.0, 0.2), (0.05, 0.01)),
        "L3 value A[1,2]": (torch.distributions.Laplace(torch.tensor([0.0]), torch.tensor([0.1])),
                            (torch.tensor(-0.1), torch.tensor(0.03))),
        "custom": (lambda x: np.exp(-0.5 * x**2) / np.sqrt(2 * np.pi), (0.0, 0.5)),
    }
    fig = plot_prior_vs_posterior(entries)
    assert torch.equal(torch.get_rng_state(), rng_before)  # plotting does not consume the global RNG
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    prior_line, post_line = ax.lines[0], ax.lines[1]
    assert prior_line.get_ydata().max() == pytest.approx(1 / (0.2 * np.sqrt(2 * np.pi)), rel=1e-3)
    assert post_line.get_ydata().max() == pytest.approx(1 / (0.01 * np.sqrt(2 * np.pi)), rel=1e-3)
    assert ax.get_title() == "L0 query A[0,0]"
    with pytest.raises(ValueError, match="scale > 0"):
        plot_prior_vs_posterior({"bad": (torch.distributions.Normal(0.0, 1.0), (0.0, 0.0))})
    with pytest.raises(ValueError, match="scalar"):
        plot_prior_vs_posterior({"vec": (torch.distributions.Normal(torch.zeros(3), 1.0), (0.0, 1.0))})


def test_plot_metric_comparison_and_save(tmp_path):
    results = {
        "MAP": {"accuracy": 0.70, "ece": 0.15, "nll": 1.2},
        "MCD": {"accuracy": 0.71, "ece": 0.12, "nll": 1.0, "ece_std": 0.01},
        "BLoB": {"accuracy": [0.72, 0.73, 0.71], "ece": [0.05, 0.04, 0.06], "nll": 0.6},
        "partial": {"accuracy": 0.69},
    }
    fig = plot_metric_comparison(results, percent=True)
    assert len(fig.axes) == 3
    counts = [len(_bars(ax)) for ax in fig.axes]
    assert counts == [4, 3, 3]
    acc_heights = [b.get_height() for b in _bars(fig.axes[0])]
    assert acc_heights[2] == pytest.approx(72.0)
    assert fig.axes[1].get_title() == "ece (%)" and fig.axes[2].get_title() == "nll"
    out = save_figure(fig, tmp_path / "a" / "b" / "cmp.png")
    assert out.is_file() and out.stat().st_size > 1000
    assert not plt.fignum_exists(fig.number)  # save_figure closes it


def test_plot_importance_ratios():
    ax = plot_importance_ratios(np.array([0.0, -1.0, -30.0, 2.0]), khat=1.2)
    ys = ax.lines[0].get_ydata()
    assert np.all(np.diff(ys) <= 0) and np.isclose(ys.sum(), 1.0)  # sorted, normalised weights
    assert "k̂ = 1.20" in ax.get_title()
    with pytest.raises(ValueError):
        plot_importance_ratios(np.array([np.nan]))


def test_plot_ppc_statistics_and_the_reliability_band():
    from blob_pyro.plots import plot_ppc_statistics
    from blob_pyro.ppc import check_predictive

    g = torch.Generator().manual_seed(0)
    true_logits = 2.0 * torch.randn(100, 3, generator=g)
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g).squeeze(1)
    logits = true_logits[None] + 0.1 * torch.randn(20, 100, 3, generator=g)
    y_rep = torch.multinomial(torch.softmax(logits, -1).reshape(-1, 3), 1, generator=g).reshape(20, 100)
    res = check_predictive(logits, labels, y_rep)
    fig = plot_ppc_statistics(res)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == len(res.statistics) and visible[0].get_title().startswith("accuracy\np = ")
    plt.close(fig)
    # the band covers every non-empty bin over its whole width, an isolated bin and a run's last bin included
    lower, upper = np.full(15, np.nan), np.full(15, np.nan)
    lower[[7, 8, 12]], upper[[7, 8, 12]] = 0.3, 0.9
    ax = reliability_diagram(res.probs, res.labels, band={"lower": lower, "upper": upper})
    band = [c for c in ax.collections if c.get_label() == "predictive band"][0]
    xs = np.concatenate([p.vertices[:, 0] for p in band.get_paths()])
    edges = np.linspace(0, 1, 16)
    for lo_edge, hi_edge in ((edges[7], edges[9]), (edges[12], edges[13])):
        assert np.isclose(xs, lo_edge).any() and np.isclose(xs, hi_edge).any()
    assert not np.isclose(xs, edges[10]).any()  # no band over empty bins
