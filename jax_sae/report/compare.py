"""Compare finished runs of one activation cache (`make compare`), and report sweeps.

    python -m jax_sae.report.compare RUN [RUN ...] [--out DIR] [--allow-mismatch]

Reads each run folder written by train.py (`config.json`, `final_info.json`, `metrics.jsonl`; see
`jax_sae.report.runs`) and writes to DIR (default `runs/compare`):

* `comparison.md`  - one row per run: variant, the hyper-parameters that differ between runs that
  have them (3 significant digits: `lr=0.00113`), L0, the explained variance "EV (1 - FVU)" =
  1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2 on the held-out tokens (fast
  evaluation, jax_sae/report/evaluate.py), MSE per token, dead fraction, final training loss, and
  the SAEBench and synthetic-world metrics of runs that have them; beside SAEBench's own numbers,
  "EV (SAEBench formula)", SAEBench's explained-variance formula on the same held-out tokens
  (it exceeds 1 on large activations: not a headline). A run without a fast evaluation shows its
  last logged training interval instead (`metrics_from` "train"), its explained variance in its
  own column, "EV (train batches)", never under the held-out header;
* `comparison.json` - the same rows, machine-readable;
* `comparison.png` - the training curves overlaid, one legend below them;
* `pareto.png`     - L0 (log) against each quality metric, one colour per variant, the variant's
  Pareto frontier as a step line, the runs named beside their points where there is room
  (`pareto_panels` says which panels).

Runs of different caches measure different data: they are refused. Runs that differ in training
tokens, input normalisation, layer or held-out evaluation tokens (`CONSISTENCY_KEYS`) are refused
too unless --allow-mismatch is given; then the table flags them in its `mismatch` column, the plot
draws them hollow and the markdown says so at the top. Errors are one line, exit status 2.

`write_sweep_report` writes the same table and plot for the members of one sweep.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from jax_sae.report import runs
from jax_sae.util.cli import OneLineParser
from jax_sae.util.files import DamagedFileError

FAST_METRICS = {
    "l0": "l0",
    "ev": "explained_variance_pooled",
    "mse": "mse_per_token",
    "dead_frac": "dead_frac",
}
"""Table column -> key in the fast evaluation (definitions: jax_sae/report/evaluate.py). The
explained variance is read under the name every run has had for 1 - FVU."""
SAEBENCH_FORMULA_KEYS = ("explained_variance_saebench", "explained_variance")
"""Where the fast evaluation holds SAEBench's explained-variance formula: its own name, or, in
runs evaluated before the headline became 1 - FVU (no `explained_variance_saebench`), the plain
name."""
TRAIN_METRICS = {
    "l0": "l0",
    "ev_train_batches": "explained_variance",
    "mse": "recon",
    "dead_frac": "dead_frac",
}
"""Fallback without a fast evaluation: the last logged training interval. Its explained variance
is pooled per training batch, another definition: it gets its own column."""
MEASURES = ("l0", "ev", "ev_train_batches", "mse", "dead_frac")
SAEBENCH_COLUMNS = {
    "ce_loss_score": ("core evaluation results", "ce_loss_score"),
    "kl_div_score": ("core evaluation results", "kl_div_score"),
    "core_explained_variance": ("core evaluation results", "explained_variance"),
    "core_l0": ("core evaluation results", "l0"),
    "absorption": ("absorption evaluation results", "mean_absorption_fraction_score"),
    "sparse_probing_top1": ("sparse probing evaluation results", "sae_top_1_test_accuracy"),
    "scr_20": ("scr evaluation results", "scr_metric_threshold_20"),
    "tpp_20": ("tpp evaluation results", "tpp_threshold_20_total_metric"),
    "unlearning": ("unlearning evaluation results", "unlearning_score"),
    "autointerp": ("autointerp evaluation results", "autointerp_score"),
}
"""Column -> (final_info.json key of the SAEBench result, metric inside `eval_result_metrics`)."""
SYNTHETIC_KEY = "synthetic evaluation results"
"""Where `python -m synth.evaluate` merges its results (inside the layer's training entry)."""
SYNTHETIC_COLUMNS = {
    "synth_mcc": ("saelens", "mcc"),
    "synth_absorption": ("absorption", "rate"),
}
"""Column -> path of the metric inside the synthetic results (MCC is the headline)."""
HEADERS = {
    "l0": "L0",
    "ev": "EV (1 - FVU)",
    "ev_train_batches": "EV (train batches)",
    "ev_saebench_formula": "EV (SAEBench formula)",
    "core_explained_variance": "EV (SAEBench core)",
    "synth_mcc": "MCC (synthetic)",
    "synth_absorption": "absorption (synthetic)",
}
"""Markdown headers of the columns whose key alone does not say which definition they use."""
DEFINITIONS = (
    "EV (1 - FVU) = 1 - sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2 on held-out cached "
    "tokens (jax_sae/report/evaluate.py): at most 1, 0 for predicting the mean. EV (train "
    "batches): the same on the last logged training interval, for runs without a fast "
    "evaluation. EV (SAEBench formula): SAEBench core's 1 - mean_t ||x_t - x_hat_t||^2 / (M - "
    "(M/d)^2), M = mean_t ||x_t||^2, on the same held-out tokens; it exceeds 1 when activations "
    "are large, so it is not the headline. EV (SAEBench core): SAEBench's own run of it.\n"
)
CONSISTENCY_KEYS = ("tokens", "normalize", "layer", "eval_tokens")
"""config.json entries that must agree for runs to be compared like for like."""
CURVES = (
    ("loss", "training loss", "log"),
    ("l0", "L0", "auto"),
    ("explained_variance", "EV (train batches)", "ev"),
)
"""comparison.png: (metrics.jsonl key, y label, y scale: log where positive, auto = log where
positive and spanning more than a decade, ev = explained-variance axis)."""


class ParetoPanel(NamedTuple):
    """One panel of pareto.png: row column `y` against row column `x` (log scale)."""

    x: str
    y: str
    x_label: str
    y_label: str
    higher_is_better: bool = True
    optional: bool = True
    explained_variance: bool = False  # y from max(lowest, EV_FLOOR) up; lower points on the floor


PANELS = (
    ParetoPanel(
        "l0", "ev", "L0", "explained variance (1 - FVU)", optional=False, explained_variance=True
    ),
    ParetoPanel(
        "l0", "ev_train_batches", "L0 (training)", "EV (train batches)", explained_variance=True
    ),
    ParetoPanel("core_l0", "ce_loss_score", "L0 (SAEBench core)", "CE loss score (SAEBench core)"),
    ParetoPanel("l0", "synth_mcc", "L0", "MCC (synthetic world)"),
)
"""Every panel pareto.png can have; an optional one only appears when some run has its metric.
FVU = 1 - EV would say the same as the EV panel: it has none of its own."""
LABEL_POINTS_UP_TO = 10
"""Runs named next to their points when there are at most this many (more would overlap)."""
MARKERS = "osD^vP*Xph"


class CompareError(ValueError):
    """A run folder cannot be compared; the message names it and the fix."""


def read_run(path: Path, name: str) -> dict[str, Any]:
    """The parts of one run folder the comparison needs; `name` labels it in tables and plots."""
    config_file = path / runs.CONFIG
    if not config_file.is_file():
        raise CompareError(f"{path} is not a run folder (no {runs.CONFIG}); pass runs/<name>")
    try:
        config = runs.read_json(config_file)
        info = runs.read_json(path / runs.FINAL_INFO) if (path / runs.FINAL_INFO).is_file() else {}
    except DamagedFileError as error:
        raise CompareError(str(error)) from None
    entry = info.get(f"training results for layer {config.get('layer')}", {})
    return {
        "name": name,
        "path": path,
        "config": config,
        "final_info": entry.get("final_info", {}),
        "fast_eval": entry.get(runs.FAST_EVAL_KEY) or {},
        "results": {**info, **entry},
        "records": runs.MetricsLog(path / runs.METRICS).read(),
    }


def run_names(paths: list[Path]) -> list[str]:
    """Folder names, or paths below the common parent where names repeat (`sweep_a/m0`)."""
    resolved = [Path(path).resolve() for path in paths]
    if len(set(resolved)) < len(resolved):
        twice = next(str(p) for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1)
        raise CompareError(f"run {twice} is given twice; pass each run folder once")
    names = [path.name for path in resolved]
    if len(set(names)) == len(names):
        return names
    parent = Path(os.path.commonpath(resolved))
    return [str(path.relative_to(parent)) for path in resolved]


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """`read_run` of each folder, named so that no two rows share a name."""
    paths = [Path(path) for path in run_dirs]
    return [read_run(path, name) for path, name in zip(paths, run_names(paths), strict=True)]


def check_same_cache(loaded: list[dict]) -> None:
    hashes = {run["name"]: run["config"].get("cache_manifest_sha256") for run in loaded}
    if len(set(hashes.values())) > 1:
        listed = ", ".join(f"{name} ({h and h[:12]})" for name, h in hashes.items())
        raise CompareError(
            f"runs come from different activation caches: {listed}; compare runs of one cache"
        )


def mismatches(loaded: list[dict]) -> dict[str, dict[str, Any]]:
    """For each `CONSISTENCY_KEYS` entry on which runs disagree: run name -> its value (None
    where the config lacks it)."""
    found = {}
    for key in CONSISTENCY_KEYS:
        values = {run["name"]: run["config"].get(key) for run in loaded}
        if len({json.dumps(value) for value in values.values()}) > 1:
            found[key] = values
    return found


def _shown(value: Any) -> str:
    return "unset" if value is None else json.dumps(value)


def _by_value(values: dict[str, Any]) -> tuple[str, dict[str, list[str]]]:
    """The most common value as shown (ties: the first run's), and the runs holding each one."""
    groups: dict[str, list[str]] = {}
    for name, value in values.items():
        groups.setdefault(_shown(value), []).append(name)
    return max(groups, key=lambda shown: len(groups[shown])), groups


def mismatch_summary(found: dict[str, dict[str, Any]]) -> str:
    """`tokens (c: 8192; a, b: 4096), ...`: the odd runs by name first, then the common value's
    (as "the other N" beyond a few, so a large sweep stays readable)."""
    parts = []
    for key, values in found.items():
        common, groups = _by_value(values)
        listed = [f"{', '.join(names)}: {v}" for v, names in groups.items() if v != common]
        names = groups[common]
        majority = ", ".join(names) if len(names) <= 3 else f"the other {len(names)}"
        parts.append(f"{key} ({'; '.join([*listed, f'{majority}: {common}'])})")
    return ", ".join(parts)


def mismatch_flags(found: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Per run, `key=value` for each key where it differs from the most common value, so the odd
    ones out are flagged rather than every run."""
    flags: dict[str, list[str]] = {}
    for key, values in found.items():
        common, groups = _by_value(values)
        odd = [
            (name, shown) for shown, names in groups.items() if shown != common for name in names
        ]
        for name, shown in odd:
            flags.setdefault(name, []).append(f"{key}={shown}")
    return {name: "; ".join(keys) for name, keys in flags.items()}


def check_consistency(loaded: list[dict], allow_mismatch: bool) -> dict[str, dict[str, Any]]:
    """Refuse runs of different caches, and (unless allowed) runs trained or evaluated on a
    different footing; returns the allowed mismatches."""
    check_same_cache(loaded)
    found = mismatches(loaded)
    if found and not allow_mismatch:
        raise CompareError(
            f"runs differ in {mismatch_summary(found)}; compare runs trained and evaluated alike, "
            "or pass --allow-mismatch to compare them flagged"
        )
    return found


def differing_hparam_names(loaded: list[dict]) -> list[str]:
    """Hyper-parameters (and d_sae, layer) that several runs have, with different values there.

    A key only one run has (e.g. `lambda_2` next to `topk` runs) is named by the variant column.
    """
    settings = [run["config"].get("hparams", {}) | _sizes(run["config"]) for run in loaded]
    differing = []
    for key in sorted(set().union(*settings)):
        values = [json.dumps(s[key], sort_keys=True) for s in settings if key in s]
        if len(values) > 1 and len(set(values)) > 1:
            differing.append(key)
    return differing


def _sizes(config: dict) -> dict[str, Any]:
    return {"d_sae": config.get("d_sae"), "layer": config.get("layer")}


def saebench_metric(results: dict, key: str, metric: str) -> float | None:
    """`metric` anywhere in `results[key]["eval_result_metrics"]` (SAEBench groups metrics)."""
    groups = results.get(key, {}).get("eval_result_metrics", {})
    for group in groups.values():
        if isinstance(group, dict) and isinstance(group.get(metric), int | float):
            return float(group[metric])
    return None


def nested_metric(results: dict, path: tuple[str, ...]) -> float | None:
    """The number at `path` inside nested dicts, None where any step is missing."""
    value: Any = results
    for step in path:
        value = value.get(step) if isinstance(value, dict) else None
    return float(value) if isinstance(value, int | float) else None


def measures(run: dict) -> dict[str, Any]:
    """The metric columns of one run, each explained-variance definition in its own column."""
    fast, last = run["fast_eval"], (run["records"] or [{}])[-1]
    source, keys = (fast, FAST_METRICS) if fast else (last, TRAIN_METRICS)
    row: dict[str, Any] = dict.fromkeys(MEASURES)
    row |= {column: source.get(key) for column, key in keys.items()}
    row["metrics_from"] = "held-out" if fast else "train"
    row["final_loss"] = run["final_info"].get("final_loss", last.get("loss"))
    formula = next((key for key in SAEBENCH_FORMULA_KEYS if key in fast), None)
    row["ev_saebench_formula"] = None if formula is None else fast[formula]
    for column, (key, metric) in SAEBENCH_COLUMNS.items():
        row[column] = saebench_metric(run["results"], key, metric)
    synthetic = run["results"].get(SYNTHETIC_KEY, {})
    for column, path in SYNTHETIC_COLUMNS.items():
        row[column] = nested_metric(synthetic, path)
    return row


SIGNIFICANT_DIGITS = 3
"""Hyper-parameter values in tables: `lr=0.00113`, not `lr=0.001131370849898476`."""


def setting_text(value: Any, digits: int = SIGNIFICANT_DIGITS) -> str:
    """A hyper-parameter value as a table shows it: floats to `digits` significant digits (plain
    up to 1e6: 1230, 0.00113, 1.13e-05), integers, strings and booleans as they are, lists item by
    item."""
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        shown = f"{value:.{digits}g}"
        if "e+" in shown and abs(value) < 1e6:  # 1.23e+03 -> 1230
            shown = f"{round(value, digits - 1 - math.floor(math.log10(abs(value)))):.0f}"
        return shown
    if isinstance(value, list | tuple):
        return "[" + ", ".join(setting_text(item, digits) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {setting_text(v, digits)}" for k, v in value.items()) + "}"
    return str(value)


def summarise(run: dict, differing: list[str], flags: dict[str, str]) -> dict[str, Any]:
    """One row of comparison.md."""
    settings = run["config"].get("hparams", {}) | _sizes(run["config"])
    shown = [f"{k}={setting_text(settings[k])}" for k in differing if k in settings]
    return {
        "run": run["name"],
        "variant": run["config"].get("variant"),
        "hparams": ", ".join(shown) or None,
        "mismatch": flags.get(run["name"]),
        **measures(run),
    }


def diverged_reason(run: dict) -> str | None:
    """Why the run was marked diverged (status.json), None when it was not."""
    status = runs.read_status(run["path"]) or {}
    if status.get("state") != runs.DIVERGED:
        return None
    return str(status.get("reason") or "no reason recorded")


def sweep_row(run: dict, flags: dict[str, str]) -> dict[str, Any]:
    """One row of sweep.md: the member and its swept values (config.json "sweep" -> "swept");
    a diverged member says so in the `diverged` column (absent when none did)."""
    swept = run["config"].get("sweep", {}).get("swept", {})
    return {
        "run": run["name"],
        "diverged": "yes" if diverged_reason(run) else None,
        "variant": run["config"].get("variant"),
        **{key: setting_text(value) for key, value in swept.items()},
        "mismatch": flags.get(run["name"]),
        **measures(run),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], headers: dict[str, str] = HEADERS) -> str:
    """Columns in order of first appearance, those empty in every row left out."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = [c for c in keys if any(row.get(c) is not None for row in rows)]
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mismatch_note(found: dict[str, dict[str, Any]]) -> str:
    """The warning atop a report of runs that are not like for like ("" when they are)."""
    if not found:
        return ""
    return (
        f"> **Not like for like** (--allow-mismatch): runs differ in {mismatch_summary(found)}. "
        "The odd ones out are named in the `mismatch` column and drawn hollow in pareto.png.\n\n"
    )


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (L0, quality) points, by increasing L0: no other point has
    L0 as low or lower and quality as high or higher (equal points are all kept)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    for i in order:
        if not front or points[i][1] > points[front[-1]][1] or points[i] == points[front[-1]]:
            front.append(i)
    return front


def _plottable(row: dict, panel: ParetoPanel) -> bool:
    x, y = row.get(panel.x), row.get(panel.y)
    if not (isinstance(x, int | float) and isinstance(y, int | float)):
        return False
    return math.isfinite(x) and math.isfinite(y) and x > 0


def pareto_panels(rows: list[dict]) -> list[ParetoPanel]:
    """The panels of pareto.png: EV (1 - FVU) always, the optional ones
    (training-batch EV, SAEBench CE loss score, synthetic MCC) where some run has a point."""
    return [p for p in PANELS if not p.optional or any(_plottable(r, p) for r in rows)]


def _variant_styles(rows: list[dict]) -> dict[Any, tuple[str, str]]:
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    return {v: (f"C{i % 10}", MARKERS[i % len(MARKERS)]) for i, v in enumerate(variants)}


PARETO_DPI = 200
CURVES_DPI = 120
LINESTYLES = ("-", "--", ":", "-.")
"""Line styles after the ten colours are used up (run i: colour i % 10, style i // 10)."""


def _draw_panel(
    ax: Any, panel: ParetoPanel, rows: list[dict], styles: dict
) -> list[tuple[float, float, str]]:
    """Each run as a point (hollow when mismatched), each variant's frontier as a step line.
    Returns (x, y, name) of each point as drawn, for `figures.place_point_labels`. On an
    explained-variance panel a run below `figures.EV_FLOOR` is drawn in a band under a dotted line
    at the floor (y tick "< floor") and its name carries its value."""
    from jax_sae.report import figures

    sign = 1.0 if panel.higher_is_better else -1.0
    drawn = [r for r in rows if _plottable(r, panel)]
    band = (
        _explained_variance_axis(ax, [r[panel.y] for r in drawn])
        if panel.explained_variance
        else None
    )
    points = []
    for variant, (colour, marker) in styles.items():
        mine = [r for r in drawn if r["variant"] == variant]
        if not mine:
            continue
        xs, ys = [r[panel.x] for r in mine], [r[panel.y] for r in mine]
        shown = [y if band is None or y >= figures.EV_FLOOR else band for y in ys]
        faces = ["none" if r.get("mismatch") else colour for r in mine]
        ax.scatter(xs, shown, marker=marker, s=36, zorder=3, facecolors=faces, edgecolors=colour)
        for row, x, y, at in zip(mine, xs, ys, shown, strict=True):
            points.append((x, at, row["run"] if at == y else f"{row['run']} ({y:.3g})"))
        front = pareto_front([(x, sign * y) for x, y in zip(xs, ys, strict=True)])
        if len(front) > 1:
            fx, fy = [xs[i] for i in front], [shown[i] for i in front]
            ax.step(fx, fy, where="post", color=colour, linewidth=1.3, alpha=0.8, zorder=2)
    ax.set(xscale="log", xlabel=f"{panel.x_label} (log)", ylabel=panel.y_label)
    figures.readable_log_axis(ax.xaxis)
    better = "higher" if panel.higher_is_better else "lower"
    ax.set_title(f"{better} is better", fontsize=9)
    ax.grid(alpha=0.3, which="both", linewidth=0.5)
    if not drawn:
        ax.text(0.5, 0.5, "no run has this metric", ha="center", transform=ax.transAxes)
    return points


def _explained_variance_axis(ax: Any, values: list[float]) -> float | None:
    """y limits from max(lowest, EV_FLOOR) to the highest value (at most 1); with values below
    the floor, a band under it for them: returns the band's y (None without such values)."""
    from matplotlib import ticker

    from jax_sae.report import figures

    low, high = figures.ev_limits(values, top=None)
    if not values or min(values) >= figures.EV_FLOOR:
        ax.set_ylim(low, high)
        return None
    span = high - figures.EV_FLOOR
    band = figures.EV_FLOOR - 0.08 * span
    ax.set_ylim(figures.EV_FLOOR - 0.14 * span, high)
    ax.axhline(figures.EV_FLOOR, color="0.5", linestyle=":", linewidth=0.8, zorder=1)
    ticks = list(ticker.MaxNLocator(5).tick_values(figures.EV_FLOOR, high))
    ticks = [t for t in ticks if figures.EV_FLOOR - 1e-9 <= t <= high]
    ax.yaxis.set_major_locator(ticker.FixedLocator([band, *ticks]))
    ax.yaxis.set_major_formatter(
        ticker.FuncFormatter(lambda v, _: f"< {figures.EV_FLOOR:g}" if v == band else f"{v:g}")
    )
    return band


def _variant_legend(fig: Any, rows: list[dict], styles: dict) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, marker=m, label=str(variant)) for variant, (c, m) in styles.items()
    ]
    if any(row.get("mismatch") for row in rows):
        handles.append(
            Line2D(
                [],
                [],
                color="gray",
                marker="o",
                markerfacecolor="none",
                linestyle="none",
                label="mismatch (see table)",
            )
        )
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 6),
        fontsize=8,
        title="variant (line: its Pareto frontier)",
        title_fontsize=8,
        frameon=False,
    )


def _wrapped(title: str, width_in: float, fontsize: float) -> str:
    """`title` broken into lines that fit `width_in` inches at `fontsize`."""
    import textwrap

    limit = max(20, int(width_in * 72 / (0.62 * fontsize)))
    return textwrap.fill(title, limit, break_on_hyphens=False)


def pareto_figure(rows: list[dict], title: str) -> Any:
    """L0 (log) against each panel's metric, per variant, with its Pareto frontier; the runs are
    named beside their points (up to `LABEL_POINTS_UP_TO` runs, where there is room). Returns the
    matplotlib figure (Agg), not yet saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jax_sae.report import figures

    panels = pareto_panels(rows)
    styles = _variant_styles(rows)
    width = max(4.4 * len(panels) + 0.4, 6.0)
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(width, 4.6),
        layout="constrained",
        squeeze=False,
        dpi=PARETO_DPI,
    )
    points = [_draw_panel(ax, p, rows, styles) for ax, p in zip(axes[0], panels, strict=True)]
    _variant_legend(fig, rows, styles)
    fig.suptitle(_wrapped(title, width, 10), fontsize=10)
    figures.freeze_layout(fig)
    if len(rows) <= LABEL_POINTS_UP_TO:
        for ax, mine in zip(axes[0], points, strict=True):
            figures.place_point_labels(ax, mine)
    return fig


def pareto_plot(rows: list[dict], path: Path, title: str) -> Path:
    """`pareto_figure` saved to `path`."""
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows, title)
    fig.savefig(path, dpi=PARETO_DPI)
    plt.close(fig)
    return path


def curves_figure(loaded: list[dict]) -> Any:
    """The training curves of every run overlaid (comparison.png), one legend below: loss and L0
    on log scales where the values allow, the training-batch explained variance from
    max(lowest, EV_FLOOR) to 1. Returns the matplotlib figure (Agg), not yet saved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    from jax_sae.report import figures

    width = 4.5 * len(CURVES)
    names = [run["name"] for run in loaded]
    column_pt = 0.6 * 8 * max(len(name) for name in names) + 36
    ncol = max(1, min(len(names), int(width * 72 // column_pt)))
    legend_in = 0.25 * -(-len(names) // ncol)
    fig, axes = plt.subplots(
        1, len(CURVES), figsize=(width, 3.6 + legend_in), layout="constrained", dpi=CURVES_DPI
    )
    lines: dict[str, Any] = {}
    for ax, (key, label, scale) in zip(axes, CURVES, strict=True):
        values: list[float] = []
        for i, run in enumerate(loaded):
            points = [
                (r["tokens"], r[key])
                for r in run["records"]
                if isinstance(r.get(key), int | float) and math.isfinite(r[key]) and "tokens" in r
            ]
            if points:
                tokens, ys = zip(*points, strict=True)
                style = {"color": f"C{i % 10}", "linestyle": LINESTYLES[i // 10 % len(LINESTYLES)]}
                lines[run["name"]] = ax.plot(tokens, ys, linewidth=1.2, **style)[0]
                values += ys
        ax.set(xlabel="training tokens", ylabel=label)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]))
        ax.xaxis.set_major_formatter(ticker.EngFormatter(sep=""))
        ax.grid(alpha=0.3)
        if not values:
            ax.text(0.5, 0.5, "no run logged this", ha="center", transform=ax.transAxes)
        elif scale == "ev":
            figures.show_explained_variance(ax, values)
        elif min(values) > 0 and (scale == "log" or max(values) > 10 * min(values)):
            ax.set_yscale("log")
            figures.readable_log_axis(ax.yaxis)
    ordered = [name for name in names if name in lines]
    fig.legend(
        [lines[name] for name in ordered],
        ordered,
        loc="outside lower center",
        ncol=ncol,
        fontsize=8,
        frameon=False,
    )
    return fig


def curves_plot(loaded: list[dict], out: Path) -> Path:
    """`curves_figure` saved as `out/comparison.png`."""
    import matplotlib.pyplot as plt

    fig = curves_figure(loaded)
    path = out / "comparison.png"
    fig.savefig(path, dpi=CURVES_DPI)
    plt.close(fig)
    return path


def check_out(out: Path) -> None:
    """The output folder must be a folder of its own, not a file and not a run folder (whose
    files a later export or resume treats as the run's)."""
    if out.exists() and not out.is_dir():
        raise CompareError(
            f"--out {out} is a file, not a folder; choose a folder, e.g. runs/compare"
        )
    if (out / runs.CONFIG).is_file():
        raise CompareError(
            f"--out {out} is a run folder; write the comparison elsewhere, e.g. runs/compare"
        )


def compare(run_dirs: list[Path], out: Path, *, allow_mismatch: bool = False) -> list[dict]:
    """Write comparison.md/.json/.png and pareto.png for `run_dirs` into `out`; returns the
    table rows."""
    if not run_dirs:
        raise CompareError("no runs given; pass one or more run folders (runs/<name>)")
    check_out(out)
    loaded = load_runs(run_dirs)
    found = check_consistency(loaded, allow_mismatch)
    flags = mismatch_flags(found)
    differing = differing_hparam_names(loaded)
    rows = [summarise(run, differing, flags) for run in loaded]
    out.mkdir(parents=True, exist_ok=True)
    cache = loaded[0]["config"].get("cache", "?")
    header = f"# Comparison of {len(rows)} runs on cache `{cache}`\n\n{mismatch_note(found)}"
    body = f"{markdown_table(rows)}\n{DEFINITIONS}\n![Pareto frontiers](pareto.png)\n"
    (out / "comparison.md").write_text(header + body)
    runs.write_json(out / "comparison.json", rows)
    curves_plot(loaded, out)
    pareto_plot(rows, out / "pareto.png", f"Pareto frontiers: {len(rows)} runs on cache {cache}")
    return rows


def write_sweep_report(sweep_dir: Path, member_dirs: list[Path]) -> Path:
    """`sweep_dir/sweep.md` (one row per member with its swept values) and `sweep_dir/pareto.png`;
    returns the markdown's path. Members share cache and tokens by construction: a mismatch is
    flagged, not refused, so a finished sweep always gets its report."""
    sweep_dir = Path(sweep_dir)
    if not member_dirs:
        raise CompareError(f"sweep {sweep_dir} has no members to report")
    loaded = load_runs(member_dirs)
    found = check_consistency(loaded, allow_mismatch=True)
    flags = mismatch_flags(found)
    rows = [sweep_row(run, flags) for run in loaded]
    config = loaded[0]["config"]
    name = config.get("sweep", {}).get("name") or sweep_dir.name
    cache = config.get("cache", "?")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    header = f"# Sweep `{name}`: {len(rows)} members on cache `{cache}`\n\n{mismatch_note(found)}"
    diverged = {run["name"]: diverged_reason(run) for run in loaded}
    diverged = {member: reason for member, reason in diverged.items() if reason}
    if diverged:
        listed = "; ".join(f"`{member}`: {reason}" for member, reason in diverged.items())
        header += (
            f"> **{len(diverged)} of {len(rows)} members diverged** (marked in the `diverged` "
            f"column; their numbers are not those of a trained SAE): {listed}\n\n"
        )
    table = markdown_table(rows, HEADERS | {"run": "member"})
    path = sweep_dir / "sweep.md"
    path.write_text(f"{header}{table}\n{DEFINITIONS}\n![Pareto frontiers](pareto.png)\n")
    pareto_plot(
        rows, sweep_dir / "pareto.png", f"Pareto frontiers: sweep {name}, {len(rows)} members"
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="compare runs that differ in tokens, normalize, layer or eval_tokens, flagged",
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return int(exit_.code or 0)
    try:
        rows = compare(args.runs, args.out, allow_mismatch=args.allow_mismatch)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows), end="")
    written = "comparison.md, comparison.json, comparison.png and pareto.png"
    print(f"wrote {written} in {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
