"""Compare finished runs of one activation cache (SPEC 6, `make compare`).

    python -m jax_sae.compare RUN [RUN ...] [--out DIR]

Reads each run folder written by train.py (`config.json`, `final_info.json`, `metrics.jsonl`; see
`jax_sae.runs`) and writes to DIR (default `runs/compare`):

* `comparison.md`  - one row per run: variant, the hyper-parameters that differ between runs that
  have them, L0, explained variance (SAEBench's definition, see jax_sae/evaluate.py), MSE per
  token, dead fraction (held-out fast evaluation, else the last logged training interval, marked
  "train"), final training loss, and the headline SAEBench metrics (`SAEBENCH_COLUMNS`) of runs
  that have them;
* `comparison.json` - the same rows, machine-readable;
* `comparison.png` - L0 against explained variance, and the training curves overlaid.

Runs of different caches measure different data: they are refused (one-line error, exit 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from jax_sae import runs

FAST_METRICS = {
    "l0": "l0",
    "explained_variance": "explained_variance",
    "mse": "mse_per_token",
    "dead_frac": "dead_frac",
}
"""Table column -> key in the fast evaluation (definitions: jax_sae/evaluate.py)."""
TRAIN_METRICS = {"l0": "l0", "explained_variance": "explained_variance", "mse": "recon"}
"""Fallback without a fast evaluation: the last logged training interval."""
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
CURVES = (
    ("loss", "training loss", "log"),
    ("l0", "L0", "linear"),
    ("explained_variance", "explained variance (train)", "linear"),
)


class CompareError(ValueError):
    """A run folder cannot be compared; the message names it and the fix."""


def read_run(path: Path) -> dict[str, Any]:
    """The parts of one run folder the comparison needs."""
    config_file = path / runs.CONFIG
    if not config_file.is_file():
        raise CompareError(f"{path} is not a run folder (no {runs.CONFIG}); pass runs/<name>")
    try:
        config = runs.read_json(config_file)
        info = runs.read_json(path / runs.FINAL_INFO) if (path / runs.FINAL_INFO).is_file() else {}
    except json.JSONDecodeError as error:
        raise CompareError(f"{path}: unreadable JSON ({error}); rerun or remove it") from None
    entry = info.get(f"training results for layer {config.get('layer')}", {})
    return {
        "name": path.name,
        "path": path,
        "config": config,
        "final_info": entry.get("final_info", {}),
        "fast_eval": entry.get(runs.FAST_EVAL_KEY) or {},
        "saebench": {**info, **entry},
        "records": runs.MetricsLog(path / runs.METRICS).read(),
    }


def check_same_cache(loaded: list[dict]) -> None:
    hashes = {run["name"]: run["config"].get("cache_manifest_sha256") for run in loaded}
    if len(set(hashes.values())) > 1:
        listed = ", ".join(f"{name} ({h and h[:12]})" for name, h in hashes.items())
        raise CompareError(
            f"runs come from different activation caches: {listed}; compare runs of one cache"
        )


def differing_hparams(loaded: list[dict]) -> list[str]:
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


def summarise(run: dict, differing: list[str]) -> dict[str, Any]:
    """One table row."""
    settings = run["config"].get("hparams", {}) | _sizes(run["config"])
    row: dict[str, Any] = {
        "run": run["name"],
        "variant": run["config"].get("variant"),
        "hparams": ", ".join(f"{k}={settings[k]}" for k in differing if k in settings),
    }
    fast, last = run["fast_eval"], (run["records"] or [{}])[-1]
    for column, key in FAST_METRICS.items():
        if key in fast:
            row[column] = fast[key]
        elif column in TRAIN_METRICS and TRAIN_METRICS[column] in last:
            row[column] = last[TRAIN_METRICS[column]]
        elif column in last:
            row[column] = last[column]
        else:
            row[column] = None
    row["metrics_from"] = "held-out" if fast else "train"
    row["final_loss"] = run["final_info"].get("final_loss", last.get("loss"))
    for column, (key, metric) in SAEBENCH_COLUMNS.items():
        row[column] = saebench_metric(run["saebench"], key, metric)
    return row


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict]) -> str:
    columns = [c for c in rows[0] if any(row[c] is not None for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_plot(loaded: list[dict], rows: list[dict], out: Path) -> Path:
    """L0 vs explained variance (one point per run), and the training curves overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(CURVES), figsize=(5 * (1 + len(CURVES)), 4))
    scatter = axes[0]
    for row in rows:
        if row["l0"] is not None and row["explained_variance"] is not None:
            scatter.scatter(row["l0"], row["explained_variance"])
            scatter.annotate(row["run"], (row["l0"], row["explained_variance"]), fontsize=8)
    scatter.set(xlabel="L0", ylabel="explained variance", title="sparsity vs reconstruction")
    scatter.grid(alpha=0.3)
    for ax, (key, label, scale) in zip(axes[1:], CURVES, strict=True):
        for run in loaded:
            points = [(r["tokens"], r[key]) for r in run["records"] if key in r and "tokens" in r]
            if points:
                tokens, values = zip(*points, strict=True)
                ax.plot(tokens, values, label=run["name"])
        positive = all(v > 0 for line in ax.get_lines() for v in line.get_ydata())
        ax.set(xlabel="training tokens", ylabel=label, yscale=scale if positive else "linear")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(run_dirs: list[Path], out: Path) -> list[dict]:
    """Write comparison.md/.json/.png for `run_dirs` into `out`; returns the table rows."""
    if not run_dirs:
        raise CompareError("no runs given; pass one or more run folders (runs/<name>)")
    loaded = [read_run(Path(path)) for path in run_dirs]
    check_same_cache(loaded)
    differing = differing_hparams(loaded)
    rows = [summarise(run, differing) for run in loaded]
    out.mkdir(parents=True, exist_ok=True)
    cache = loaded[0]["config"].get("cache", "?")
    header = f"# Comparison of {len(rows)} runs on cache `{cache}`\n\n"
    (out / "comparison.md").write_text(header + markdown_table(rows))
    runs.write_json(out / "comparison.json", rows)
    comparison_plot(loaded, rows, out)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<name>)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    args = parser.parse_args(argv)
    try:
        rows = compare(args.runs, args.out)
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(rows), end="")
    print(f"wrote {args.out / 'comparison.md'} and comparison.png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
