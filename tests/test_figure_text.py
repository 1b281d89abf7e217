"""The report figures read well: rendered with Agg, no two drawn texts (tick labels, axis labels,
titles, legend entries, point names, notes) overlap, within one axes or across axes, and none
leaves the figure; every point is still plotted, every variant is in the legend, explained
variance axes are clipped to a readable range with the clipped start said in the panel."""

from __future__ import annotations

import math
from unittest import mock

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from jax_sae.report import compare, figures, plots  # noqa: E402

# --- the check --------------------------------------------------------------------------------


def drawn_texts(fig) -> list[tuple[Text, object]]:
    """Every visible, non-empty text a render of `fig` draws, with its window extent from
    `fig.canvas.get_renderer()` (an annotation's letters, not its leader line)."""
    drawn: list[Text] = []
    draw = Text.draw

    def record(self, renderer):
        draw(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append(self)

    with mock.patch.object(Text, "draw", record):
        fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [(text, figures.text_extent(text, renderer)) for text in drawn]


def describe(text: Text) -> str:
    axes = text.axes.get_ylabel() or text.axes.get_title() if text.axes else "figure"
    return f"{text.get_text()!r} ({type(text).__name__} in {axes!r})"


def text_problems(fig) -> list[str]:
    """Pairs of drawn texts that overlap, and texts that leave the figure."""
    texts = drawn_texts(fig)
    frame = fig.bbox.padded(1)
    problems = [
        f"{describe(t)} leaves the figure"
        for t, box in texts
        if box.x0 < frame.x0 or box.y0 < frame.y0 or box.x1 > frame.x1 or box.y1 > frame.y1
    ]
    for i, (a, box_a) in enumerate(texts):
        for b, box_b in texts[i + 1 :]:
            if figures.overlaps(box_a, box_b):
                problems.append(f"{describe(a)} overlaps {describe(b)}")
    return problems


def assert_readable(fig) -> None:
    problems = text_problems(fig)
    plt.close(fig)
    assert not problems, "\n".join(problems)


def test_the_check_finds_overlapping_and_cut_texts():
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.text(0.5, 0.5, "a long label here", transform=ax.transAxes)
    ax.text(0.55, 0.51, "another label", transform=ax.transAxes)
    ax.text(0.99, 0.2, "past the right edge of the figure", transform=fig.transFigure)
    problems = text_problems(fig)
    plt.close(fig)
    assert any("'a long label here'" in p and "'another label'" in p for p in problems)
    assert any("leaves the figure" in p for p in problems)


def test_the_check_finds_tick_labels_that_run_together():
    """The old pareto ticks: every digit per decade on a narrow log axis ("90100")."""
    fig, ax = plt.subplots(figsize=(2.2, 2))
    ax.scatter([21, 95], [0.5, 0.6])
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=tuple(range(1, 10))))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    assert any("overlaps" in p for p in text_problems(fig))
    plt.close(fig)


# --- realistic data ----------------------------------------------------------------------------

LONG_NAMES = [
    "topk_L12_k64_lr0.00113_seed0_long_run_name",
    "batchtopk_L12_k64_lr0.00113_seed0",
    "jumprelu_L12_default_settings_bandwidth0.001",
    "matryoshka_L12_k64_groups_128_512_2048",
    "freq_L12_lambda3_target_rate_0.001",
]


def row(name, variant, l0, ev, **extra):
    return {"run": name, "variant": variant, "l0": l0, "ev": ev, "mismatch": None, **extra}


def sweep_rows(n=5, variant="standard", ev_top=0.97):
    """A sparsity sweep: L0 falling, EV falling with it (a frontier)."""
    return [
        row(
            f"standard_L12_sweep/lambda={1.5 * 2**i:g}_seed=0",
            variant,
            90 / (i + 1) ** 0.9,
            ev_top - 0.03 * i,
        )
        for i in range(n)
    ]


def demo_rows():
    """What `make demo` compares: four variants and a five-member sweep, close together."""
    return [
        row(LONG_NAMES[0], "topk", 32.0, 0.91),
        row(LONG_NAMES[1], "batchtopk", 33.1, 0.915),
        row(LONG_NAMES[2], "jumprelu", 45.2, 0.905),
        row(LONG_NAMES[3], "matryoshka", 32.4, 0.88),
        *sweep_rows(),
    ]


def points_drawn(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections)


def legend_labels(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


PARETO_CASES = {
    "demo: 9 runs, long names, points close together": demo_rows(),
    "one run": [row(LONG_NAMES[0], "topk", 64.0, 0.93)],
    "L0 within a factor 1.3 (no log ticks fit)": [
        row(name, "topk", 31 + 2 * i, 0.9 + 0.01 * i) for i, name in enumerate(LONG_NAMES)
    ],
    "L0 over five decades": [
        row(name, "standard", 10.0 ** (i + 0.3), 0.5 + 0.1 * i) for i, name in enumerate(LONG_NAMES)
    ],
    "a diverged member far below the floor, and a mismatch": [
        *sweep_rows(4),
        row("standard_L12_sweep/lambda=0.01_seed=0", "standard", 1500.0, -2.7),
        row(LONG_NAMES[0], "topk", 30.0, 0.9, mismatch="tokens=8192"),
    ],
    "every optional panel": [
        {
            **r,
            "ev_train_batches": r["ev"] - 0.02,
            "core_l0": r["l0"] * 0.9,
            "ce_loss_score": 0.8 + r["ev"] / 10,
            "synth_mcc": r["ev"] - 0.2,
        }
        for r in demo_rows()
    ],
    "twelve runs: no names, colours repeat": [
        *sweep_rows(6),
        *[
            row(f"{v}_L12_seed{i}", v, 20.0 + 7 * i, 0.8 + 0.01 * i)
            for i, v in enumerate(
                ["topk", "batchtopk", "jumprelu", "freq", "temporal", "two_level"]
            )
        ],
    ],
}


@pytest.mark.parametrize("rows", PARETO_CASES.values(), ids=PARETO_CASES.keys())
def test_pareto_figure_reads_well_and_keeps_every_point(rows):
    fig = compare.pareto_figure(
        rows,
        f"Pareto frontiers: {len(rows)} runs on cache "
        "activations_cache/gemma-2-2b__pile-uncopyrighted__L12",
    )
    panels = compare.pareto_panels(rows)
    assert compare.ParetoPanel("l0", "fvu_pooled", "L0", "FVU (pooled)") not in panels
    assert [p.y for p in panels][0] == "ev"
    for ax, panel in zip(fig.axes, panels, strict=False):
        assert points_drawn(ax) == sum(compare._plottable(r, panel) for r in rows), panel.y
    variants = {r["variant"] for r in rows}
    assert variants <= set(legend_labels(fig))  # every variant (baselines included) is named
    assert fig.legends[0].get_window_extent().y1 < min(ax.get_window_extent().y0 for ax in fig.axes)
    assert_readable(fig)


def test_pareto_names_its_points_where_there_is_room():
    rows = demo_rows()
    fig = compare.pareto_figure(rows, "demo")
    named = {t.get_text() for t in fig.axes[0].texts}
    plt.close(fig)
    assert len(named) >= len(rows) - 1, named  # at most one left out for want of room
    assert named <= {r["run"] for r in rows}


def test_pareto_puts_a_run_below_the_floor_on_a_band_with_its_value():
    rows = PARETO_CASES["a diverged member far below the floor, and a mismatch"]
    fig = compare.pareto_figure(rows, "diverged")
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert figures.EV_FLOOR - 0.2 < low < figures.EV_FLOOR and high < 1.02
    names = [t.get_text() for t in ax.texts]
    ys = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
    plt.close(fig)
    assert min(ys) > low  # drawn inside the axes, on the band
    assert "standard_L12_sweep/lambda=0.01_seed=0 (-2.7)" in names


def realistic_records(seed: int, steps: int = 80, final_ev: float = 0.9) -> list[dict]:
    """metrics.jsonl of a run: EV from about -3.4 at initialisation, L0 from thousands down."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(1, steps + 1):
        t = i / steps
        ev = final_ev - (final_ev + 3.4) * math.exp(-8 * t) + 0.004 * rng.normal()
        out.append(
            {
                "step": 25 * i,
                "tokens": 4096 * 25 * i,
                "loss": 50 * math.exp(-6 * t) + 10 * (1 - final_ev),
                "recon": 40 * math.exp(-6 * t) + 9 * (1 - final_ev),
                "l0": 32 + 3000 * math.exp(-5 * t),
                "dead_frac": 0.3 * (1 - math.exp(-3 * t)),
                "explained_variance": ev,
                "lr": 0.001131370849898476 * min(1.0, 10 * t),
                "grad_norm": 3 * math.exp(-2 * t) + 0.1,
                "loss/aux": 0.01 + 0.05 * t,
                "loss/l1": 3.0 / i,
                "grad_share/aux": 0.02 + 0.01 * t,
                "grad_share/l1": 0.3,
            }
        )
    return out


@pytest.mark.parametrize("n_runs", [3, 12])
def test_comparison_curves_read_well_and_clip_explained_variance(n_runs):
    names = [*LONG_NAMES, *[f"standard_L12_sweep/lambda={2**i}_seed=0" for i in range(8)]]
    loaded = [
        {"name": names[i], "records": realistic_records(i, final_ev=0.85 + 0.01 * i)}
        for i in range(n_runs)
    ]
    fig = compare.curves_figure(loaded)
    loss_ax, l0_ax, ev_ax = fig.axes
    assert loss_ax.get_yscale() == "log" and l0_ax.get_yscale() == "log"  # L0: 3000 -> 32
    low, high = ev_ax.get_ylim()
    assert figures.EV_FLOOR - 0.1 < low < figures.EV_FLOOR + 1e-9 and 1.0 <= high < 1.1
    assert any("start of training off scale" in t.get_text() for t in ev_ax.texts)
    for ax in fig.axes:  # every logged point of every run is on its line
        assert [len(line.get_xdata()) for line in ax.lines] == [80] * n_runs
    assert legend_labels(fig) == names[:n_runs]  # one legend, below the panels
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert_readable(fig)


def test_explained_variance_that_stays_above_the_floor_is_not_clipped():
    fig, ax = plt.subplots()
    assert not figures.show_explained_variance(ax, [0.2, 0.5, 0.93])
    low, high = ax.get_ylim()
    plt.close(fig)
    assert low < 0.2 and 1.0 <= high < 1.1 and not ax.texts


def test_training_curves_read_well():
    fig = plots.training_curves_figure(
        realistic_records(0),
        "topk_L12_k64_lr0.00113_seed0_long_run_name: topk, layer 12, d_sae 16384",
    )
    by_title = {ax.get_title(): ax for ax in fig.axes}
    ev_ax = by_title["explained variance (training batches)"]
    assert ev_ax.get_ylim()[0] >= figures.EV_FLOOR - 0.1
    assert any("off scale" in t.get_text() for t in ev_ax.texts)
    assert_readable(fig)


@pytest.mark.parametrize(
    ("low", "high"), [(21, 95), (31, 39), (5, 5000), (0.02, 0.9), (1e-4, 30), (900, 1100)]
)
def test_log_ticks_are_plain_numbers_that_do_not_collide(low, high):
    fig, ax = plt.subplots(figsize=(3.2, 2.5), layout="constrained")
    ax.plot([low, high], [high, low])
    ax.set(xscale="log", yscale="log")
    figures.readable_log_axis(ax.xaxis)
    figures.readable_log_axis(ax.yaxis)
    fig.canvas.draw()
    shown = [t.get_text() for t in ax.xaxis.get_ticklabels() if t.get_text()]
    assert len(shown) >= 1 and all("$" not in label and "10^" not in label for label in shown)
    assert_readable(fig)
