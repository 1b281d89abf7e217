"""training_curves: which panels a record set yields, their y scales, and every point drawn."""

import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from jax_sae.report.plots import (
    MARKER_LIMIT,
    curve_panels,
    draw_panel,
    metric_series,
    training_curves,
)


def records(n: int = 20, l0_start: float = 2000.0) -> list[dict]:
    """A metrics.jsonl with every kind of key the trainer logs (two loss terms: l1, aux)."""
    out = []
    for i in range(1, n + 1):
        out.append(
            {
                "step": 10 * i,
                "tokens": 10_240 * i,
                "loss": 2.0 / i + 0.1,
                "recon": 1.5 / i + 0.05,
                "l0": l0_start / i + 30,
                "dead_frac": 0.01 * i,
                "explained_variance": 1 - 1 / (i + 1),
                "grad_norm": 5.0 / i,
                "lr": 3e-4 * min(1.0, i / 5),
                "loss/l1": 40.0 / i,
                "loss/aux": 0.2 + 0.01 * i,
                "rate_bin_3": 0.5,  # a term diagnostic: not a loss, not on the term panel
                "grad_share/l1": 0.3,
                "grad_share/aux": 0.01,
            }
        )
    return out


def test_every_logged_metric_gets_its_panel(tmp_path):
    panels = curve_panels(records())
    assert [p.title for p in panels] == [
        "loss",
        "per-term losses",
        "L0",
        "dead fraction",
        "explained variance (training batches)",
        "learning rate schedule",
        "gradient norm (before clipping)",
        "gradient share per term",
    ]
    by_title = {p.title: p for p in panels}
    assert list(by_title["loss"].series) == ["total", "reconstruction"]
    assert list(by_title["per-term losses"].series) == ["aux", "l1"]
    assert list(by_title["gradient share per term"].series) == ["aux", "l1"]
    scales = {p.title: p.yscale for p in panels}
    assert scales["loss"] == scales["gradient norm (before clipping)"] == "log"
    assert scales["per-term losses"] == scales["gradient share per term"] == "log"
    assert scales["learning rate schedule"] == scales["dead fraction"] == "linear"
    tokens, lr = by_title["learning rate schedule"].series["lr"]
    assert len(tokens) == 20 and lr[-1] == pytest.approx(3e-4)
    path = training_curves(records(), tmp_path, title="standard, layer 1")
    assert path == tmp_path / "training_curves.png" and path.stat().st_size > 0


def test_absent_metrics_leave_their_panels_out(tmp_path):
    minimal = [{k: r[k] for k in ("step", "tokens", "loss", "recon")} for r in records()]
    assert [p.title for p in curve_panels(minimal)] == ["loss"]
    assert training_curves(minimal, tmp_path).exists()
    assert training_curves([{"step": 1, "tokens": 8}], tmp_path) is None


def test_log_scales_only_where_the_values_allow():
    by_title = {p.title: p for p in curve_panels(records(l0_start=2000.0))}
    assert by_title["L0"].yscale == "log"  # 2030 down to 130
    by_title = {p.title: p for p in curve_panels(records(l0_start=20.0))}
    assert by_title["L0"].yscale == "linear"  # 50 down to 31
    with_zero = records()
    with_zero[0]["loss/aux"] = 0.0
    assert {p.title: p for p in curve_panels(with_zero)}["per-term losses"].yscale == "linear"


def test_null_and_non_finite_values_are_skipped():
    logged = records(3)
    logged[0]["loss"], logged[1]["loss"] = None, math.inf  # metrics.jsonl writes NaN as null
    tokens, values = metric_series(logged, "loss")
    np.testing.assert_array_equal(tokens, [30_720])
    np.testing.assert_allclose(values, [logged[2]["loss"]])


@pytest.mark.parametrize(("n", "marker"), [(50, "."), (MARKER_LIMIT + 1, "None")])
def test_the_line_joins_every_point_and_markers_go_when_crowded(n, marker):
    panel = curve_panels(records(n))[0]
    fig, ax = plt.subplots()
    draw_panel(ax, panel)
    assert [len(line.get_xdata()) for line in ax.lines] == [n, n]
    assert {line.get_marker() for line in ax.lines} == {marker}
    plt.close(fig)


def test_term_lines_are_named_even_alone():
    one_term = [{k: v for k, v in r.items() if "aux" not in k} for r in records()]
    legends = {p.title: p.legend for p in curve_panels(one_term)}
    assert legends["per-term losses"] and legends["gradient share per term"] and legends["loss"]
    assert not legends["L0"] and not legends["learning rate schedule"]
