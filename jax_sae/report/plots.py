"""Per-run PNGs: training curves for every run, plus plots a variant registers.

A research variant adds its own figure with::

    from jax_sae.report.plots import RunView, register_plot

    @register_plot("freq")
    def firing_rates(run: RunView, out_dir: Path) -> None:
        ...  # read run.params / run.state / run.eval / run.heldout(), save out_dir / "x.png"

Every run gets ``training_curves.png`` (against training tokens: loss and reconstruction, each
loss term's metrics, L0, dead fraction, explained variance, learning rate, gradient norm and each
term's gradient share) and ``firing_rate_hist.png`` (held-out firing rates).
``train.py`` calls ``write_plots`` once at the end of a run; every registered function for the
run's variant is called with the same ``RunView``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402

from jax_sae.model.losses import freq  # noqa: E402
from jax_sae.report import figures  # noqa: E402


@dataclass(frozen=True)
class RunView:
    """What a plot may read about a finished run (numpy arrays, no device state)."""

    variant: Any  # jax_sae.model.variants.Variant
    params: dict[str, np.ndarray]  # trained parameters (training space: scaled inputs)
    state: dict[str, np.ndarray]  # final regulariser state
    records: list[dict]  # metrics.jsonl
    eval: dict | None  # fast-eval results incl. feature_density [F]; None without held-out data
    heldout: Callable[[], Iterator[np.ndarray]]  # held-out raw activations in cache order
    norm_scale: float
    title: str  # e.g. "standard, layer 12, d_sae 16384"


PlotFn = Callable[[RunView, Path], None]
VARIANT_PLOTS: dict[str, list[PlotFn]] = {}


def register_plot(*variants: str) -> Callable[[PlotFn], PlotFn]:
    """Decorator: call ``fn(run, out_dir)`` at the end of every run of these variants."""

    def register(fn: PlotFn) -> PlotFn:
        for name in variants:
            VARIANT_PLOTS.setdefault(name, []).append(fn)
        return fn

    return register


GRAD_SHARE_PREFIX = "grad_share/"
TERM_LOSS_PREFIX = "loss/"
MARKER_LIMIT = 400
"""Above this many logged points markers merge into a band; the line still joins every point."""


@dataclass(frozen=True)
class CurvePanel:
    """One panel of ``training_curves.png``: named (tokens, values) lines on a decided y scale."""

    title: str
    ylabel: str
    yscale: str  # "log" or "linear"
    series: dict[str, tuple[np.ndarray, np.ndarray]]
    legend: bool  # the line names say something the title does not (several lines, or term names)
    explained_variance: bool = False  # y from max(lowest, figures.EV_FLOOR) to 1


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, values) of one logged metric, finite values only (metrics.jsonl stores a
    non-finite value as null)."""
    points = [
        (r["tokens"], r[key]) for r in records if is_number(r.get(key)) and np.isfinite(r[key])
    ]
    return tuple(np.array(points, np.float64).T) if points else (np.zeros(0), np.zeros(0))


def term_keys(records: list[dict]) -> list[str]:
    """The keys of what each loss term adds to the loss (``loss/l1``, ``loss/aux``; logged by
    ``Variant.loss``); a term's other diagnostics stay in metrics.jsonl, off this panel."""
    return sorted(
        {key for r in records for key, value in r.items() if key.startswith(TERM_LOSS_PREFIX)}
    )


def y_scale(series: dict[str, tuple[np.ndarray, np.ndarray]], rule: str) -> str:
    """``rule`` "log": log if every value is positive; "auto": log if they also span more than a
    decade (L0 from thousands at init to tens); "linear": linear."""
    values = np.concatenate([values for _, values in series.values()])
    if rule == "linear" or not (values > 0).all():
        return "linear"
    return "log" if rule == "log" or values.max() > 10 * values.min() else "linear"


def curve_panels(records: list[dict]) -> list[CurvePanel]:
    """The panels ``training_curves`` draws, in order; a panel without logged values is left out."""
    terms = {key.removeprefix(TERM_LOSS_PREFIX): key for key in term_keys(records)}
    shares = sorted({k for r in records for k in r if k.startswith(GRAD_SHARE_PREFIX)})
    named = {"per-term losses", "gradient share per term"}  # lines named after loss terms
    specs = [  # title, y label, y scale rule, {line label: record key}
        ("loss", "loss per token", "auto", {"total": "loss", "reconstruction": "recon"}),
        ("per-term losses", "added to the loss (with its coefficient)", "auto", terms),
        ("L0", "active latents per token", "auto", {"L0": "l0"}),
        ("dead fraction", "fraction of latents", "linear", {"dead": "dead_frac"}),
        (
            "explained variance (training batches)",
            "1 - FVU",
            "ev",
            {"explained variance": "explained_variance"},
        ),
        ("learning rate schedule", "learning rate", "linear", {"lr": "lr"}),
        ("gradient norm (before clipping)", "L2 norm", "auto", {"gradient norm": "grad_norm"}),
        (
            "gradient share per term",
            "|grad of term| / |grad of rest|",
            "log",
            {k.removeprefix(GRAD_SHARE_PREFIX): k for k in shares},
        ),
    ]
    panels = []
    for title, ylabel, rule, keys in specs:
        series = {label: metric_series(records, key) for label, key in keys.items()}
        series = {label: points for label, points in series.items() if len(points[0])}
        if series:
            legend = len(series) > 1 or title in named
            scale = "linear" if rule == "ev" else y_scale(series, rule)
            panels.append(CurvePanel(title, ylabel, scale, series, legend, rule == "ev"))
    return panels


def draw_panel(ax: plt.Axes, panel: CurvePanel) -> None:
    """One line per series through every logged point, each point marked while they stay apart."""
    for label, (tokens, values) in panel.series.items():
        marker = "." if len(tokens) <= MARKER_LIMIT else None
        ax.plot(tokens, values, marker=marker, markersize=3, linewidth=1, label=label)
    ax.set(title=panel.title, ylabel=panel.ylabel, yscale=panel.yscale)
    ax.title.set_fontsize(10)
    if panel.explained_variance:
        values = np.concatenate([values for _, values in panel.series.values()])
        figures.show_explained_variance(ax, values.tolist())
    elif panel.yscale == "linear":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    else:  # plain numbers (150, 0.003), not 1.5 x 10^2, never running together
        figures.readable_log_axis(ax.yaxis)
    ax.xaxis.set_major_locator(MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.grid(alpha=0.3)
    if panel.legend:
        ax.legend(fontsize=7, ncol=1 + len(panel.series) // 5)


def training_curves(records: list[dict], out_dir: Path, title: str = "") -> Path | None:
    """``training_curves.png``: the panels of ``curve_panels`` against training tokens, two
    columns; the gradient shares (``jax_sae.training.diagnostics``) on a log scale show an inert
    term at a glance. Returns None when no metric was logged."""
    fig = training_curves_figure(records, title)
    if fig is None:
        return None
    path = out_dir / "training_curves.png"
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def training_curves_figure(records: list[dict], title: str = "") -> Any:
    """The figure ``training_curves`` saves (None when no metric was logged)."""
    panels = curve_panels(records)
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 2.8 * rows), squeeze=False, layout="constrained", dpi=150
    )
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        draw_panel(ax, panels[i])
        if i + cols >= len(panels):  # lowest panel of its column
            ax.set_xlabel("training tokens")
    fig.suptitle(title or "training curves")
    return fig


def firing_rate_histogram(density: np.ndarray, out_dir: Path) -> Path:
    """log10 firing rate of each latent on held-out tokens; dead latents counted apart."""
    alive = density[density > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(alive):
        ax.hist(np.log10(alive), bins=50)
    ax.set(
        xlabel="log10 firing rate (held-out tokens)",
        ylabel="latents",
        title=f"{len(density) - len(alive)} of {len(density)} latents never fire",
    )
    fig.tight_layout()
    path = out_dir / "firing_rate_hist.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(run: RunView, out_dir: Path) -> list[Path]:
    """All plots of a run into ``out_dir``; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = training_curves(run.records, out_dir, title=run.title)
    written = [curves] if curves else []
    if run.eval is not None:
        written.append(firing_rate_histogram(run.eval["feature_density"], out_dir))
    before = set(out_dir.glob("*.png"))
    for plot in VARIANT_PLOTS.get(run.variant.name, []):
        plot(run, out_dir)
    return written + sorted(set(out_dir.glob("*.png")) - before)


# --- research variants ---------------------------------------------------------------------------


@register_plot("freq")
def freq_firing_rates(run: RunView, out_dir: Path) -> None:
    """``freq_firing_rates.png``: the final EMA firing rate f that weighted the penalty, as a log10
    histogram, and the logged decade histogram of f over training."""
    rate = np.asarray(run.state[freq.STATE_KEY], np.float64)
    fired = rate[rate > 0]
    fig, (hist, over_time) = plt.subplots(1, 2, figsize=(12, 4))
    if len(fired):
        hist.hist(np.log10(fired), bins=50)
    hist.set(
        xlabel="log10 EMA firing rate f (end of training)",
        ylabel="latents",
        title=f"{len(rate) - len(fired)} of {len(rate)} latents have f = 0",
    )
    series = [metric_series(run.records, key) for key in freq.RATE_BINS]
    edges = [f"1e{e}" for e in freq.RATE_DECADES]
    between = [f"{a} to {b}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
    labels = [f"f < {edges[0]}", *between, f"f >= {edges[-1]}"]
    if all(len(tokens) for tokens, _ in series):
        over_time.stackplot(series[0][0], *[values for _, values in series], labels=labels)
        over_time.legend(loc="upper left", fontsize=7)
    over_time.set(xlabel="training tokens", ylabel="fraction of latents", ylim=(0, 1))
    over_time.set_title("EMA firing rate f by decade over training")
    fig.suptitle(run.title)
    fig.tight_layout()
    fig.savefig(out_dir / "freq_firing_rates.png", dpi=100)
    plt.close(fig)


@register_plot("temporal")
def temporal_stability(run: RunView, out_dir: Path) -> None:
    """``temporal_stability.png``: adjacent-token stability of the training batches (mean Jaccard
    of the two tokens' active sets, fraction of latents active on both) and the adaptive weight a
    against training tokens."""
    panels = {
        "temporal_jaccard": "Jaccard(active_t, active_t-1)",
        "temporal_both_active": "fraction of latents\nactive on both",
        "adaptive_weight": "adaptive weight a",
    }
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.2 * len(panels)), sharex=True)
    for ax, (key, label) in zip(axes, panels.items(), strict=True):
        ax.plot(*metric_series(run.records, key))
        ax.set(ylabel=label)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("training tokens")
    fig.suptitle(f"{run.title}: adjacent-token stability")
    fig.tight_layout()
    fig.savefig(out_dir / "temporal_stability.png", dpi=100)
    plt.close(fig)


PAIR_SAMPLE_LATENTS = 2048
"""Decoder cosines are drawn for a fixed random sample of this many latents (F^2 is too many)."""
PAIR_TOKENS = 8192
"""Held-out tokens encoded for the co-firing panel."""
PAIR_CURVES = {"hier_ortho": ("ortho", "ortho penalty"), "pair_ortho": ("pair_jaccard", "Jaccard")}


def sampled_decoder_cosines(w_dec: np.ndarray, n: int = PAIR_SAMPLE_LATENTS) -> np.ndarray:
    """Off-diagonal cosines d_i . d_j among a fixed random sample of latents (rows unit-norm)."""
    rows = np.asarray(w_dec, np.float64)
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    if len(rows) > n:
        rows = rows[np.sort(np.random.default_rng(0).choice(len(rows), n, replace=False))]
    return (rows @ rows.T)[np.triu_indices(len(rows), 1)]


def heldout_firing(run: RunView, n_tokens: int = PAIR_TOKENS) -> np.ndarray | None:
    """[n, F] bool firing of the first held-out tokens, or None without held-out data."""
    masks, seen = [], 0
    for x in run.heldout():
        h = np.asarray(run.variant.encode(run.params, np.asarray(x) * run.norm_scale))
        masks.append(h[: n_tokens - seen] > 0)
        seen += len(masks[-1])
        if seen >= n_tokens:
            break
    return np.concatenate(masks) if masks else None


@register_plot("hier_ortho", "pair_ortho")
def pair_structure(run: RunView, out_dir: Path) -> None:
    """``pair_structure.png``: histogram of decoder cosine similarities; for the most
    frequent latents on held-out tokens, co-firing lift n_ij N / (n_i n_j) against |d_i . d_j|
    (the pairs the regulariser targets should sit low on the cosine axis); and the variant's
    regulariser metric over training."""
    cos = sampled_decoder_cosines(run.params["W_dec"])
    fig, (hist, lift_ax, curve) = plt.subplots(1, 3, figsize=(16, 4))
    hist.hist(cos, bins=100, log=True)
    hist.set(xlabel="decoder cosine d_i . d_j", ylabel="pairs (log)")
    hist.set_title(f"{min(len(run.params['W_dec']), PAIR_SAMPLE_LATENTS)} latents sampled")
    fires = heldout_firing(run)
    if fires is not None and fires.any():
        counts = fires.sum(0)
        top = np.argsort(-counts, kind="stable")[: min(256, int((counts > 0).sum()))]
        m = fires[:, top].astype(np.float64)
        pair_counts = m.T @ m
        i, j = np.triu_indices(len(top), 1)
        lift = pair_counts[i, j] * len(m) / (counts[top][i] * counts[top][j])
        rows = np.asarray(run.params["W_dec"], np.float64)[top]
        rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        together = lift > 0
        lift_ax.scatter(lift[together], np.abs(rows @ rows.T)[i, j][together], s=3, alpha=0.4)
        lift_ax.set_xscale("log")
        lift_ax.set_title(f"{len(top)} most frequent latents, {len(m)} held-out tokens")
    lift_ax.set(xlabel="co-firing lift n_ij N / (n_i n_j)", ylabel="|d_i . d_j|")
    key, label = PAIR_CURVES[run.variant.name]
    curve.plot(*metric_series(run.records, key))
    curve.set(xlabel="training tokens", ylabel=label)
    curve.grid(alpha=0.3)
    fig.suptitle(run.title)
    fig.tight_layout()
    fig.savefig(out_dir / "pair_structure.png", dpi=100)
    plt.close(fig)
