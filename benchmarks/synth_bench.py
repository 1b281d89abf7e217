"""Each research idea against its baseline, on the synthetic world built for it.

    python benchmarks/synth_bench.py [--seeds 3] [--quick] [--out benchmarks/out/synth]

Builds the `hierarchy`, `temporal` and `zipf` worlds (`synth.make_world`, in `.venv-eval`), trains
every comparison below with `train.py` at the defaults (sizes adapt to the world's d), scores each
run with `synth.evaluate` (SAELens's synthetic eval plus absorption, adjacent-token stability,
firing-rate spread and co-firing decoder overlap on the held-out tokens), and writes
`benchmarks/SYNTH.md` and `benchmarks/synth_pareto.png`.

Matched L0: TopK-family ideas are compared with `topk` at the same d_sae and k (L0 is k by
construction); ReLU ideas with `standard` trained at 0.5x, 1x and 2x its default lambda, whose
metric is interpolated (linearly in log L0) at the idea's L0, and reported only inside that
range. Every run is a normal run folder: the bench resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402

import train  # noqa: E402
from jax_sae.export.saelens import export_run  # noqa: E402
from jax_sae.model.defaults import adapt_hparams  # noqa: E402

EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"
RESULT_KEY = "synthetic evaluation results"
LAMBDA_SCALES = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Metric:
    key: str  # path in the synthetic results, "/"-separated
    label: str
    better: str  # "lower" or "higher"


@dataclass(frozen=True)
class Comparison:
    idea: str
    baseline: str
    world: str
    metric: Metric
    extra: tuple[Metric, ...] = field(default=())


ABSORPTION = Metric("absorption/mean", "absorption rate", "lower")
OVERLAP = Metric("cofiring_decoder_cos", "co-firing decoder |cos|", "lower")
MCC = Metric("saelens/mcc", "MCC (feature recovery)", "higher")
JACCARD = Metric("adjacent_jaccard/sae", "adjacent-token Jaccard", "higher")
SPREAD = Metric("firing_rate_spread/sae/std_log10_rate", "std log10 firing rate", "lower")
DOMINANT = Metric("firing_rate_spread/sae/frac_above_10x_median", "latents > 10x median", "lower")

COMPARISONS = (
    Comparison("hier_ortho", "topk", "hierarchy", ABSORPTION, (OVERLAP, MCC)),
    Comparison("two_level", "topk", "hierarchy", ABSORPTION, (OVERLAP, MCC)),
    Comparison("pair_ortho", "standard", "hierarchy", OVERLAP, (ABSORPTION, MCC)),
    Comparison("temporal", "standard", "temporal", JACCARD, (MCC,)),
    Comparison("freq", "standard", "zipf", SPREAD, (DOMINANT, MCC)),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "synth")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2**19, help="world size (tokens)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs over the world")
    p.add_argument("--samples", type=int, default=16384, help="SAELens synthetic-eval samples")
    p.add_argument("--quick", action="store_true", help="1 seed, 1/4 of the tokens: smoke run")
    p.add_argument("--report", type=Path, default=REPO / "benchmarks" / "SYNTH.md")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.tokens, args.epochs = 1, args.tokens // 4, 1
        args.out = args.out / "quick"
    return args


def eval_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    return env | {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}


def build_world(world: str, args: argparse.Namespace) -> Path:
    out = args.out / "worlds" / world
    if (out / "ground_truth.safetensors").exists():
        return out
    cmd = [str(EVAL_PYTHON), "-m", "synth.make_world", "--world", world, "--out", str(out)]
    cmd += ["--d-model", str(args.d_model), "--features", str(args.features)]
    cmd += ["--tokens", str(args.tokens)] + (["--resume"] if out.exists() else [])
    subprocess.run(cmd, cwd=REPO, env=eval_env(), check=True)
    return out


@dataclass(frozen=True)
class Run:
    world: str
    variant: str
    seed: int
    sets: tuple[tuple[str, object], ...] = ()

    @property
    def name(self) -> str:
        tag = "_".join(f"{k}{v}" for k, v in self.sets)
        return f"{self.world}/{self.variant}{'_' + tag if tag else ''}_s{self.seed}"


def runs_of(comparison: Comparison, args: argparse.Namespace) -> dict:
    """{"idea": [...], "baseline": [...], "matched": [...]} runs of one comparison."""
    seeds = range(args.seeds)
    idea = [Run(comparison.world, comparison.idea, s) for s in seeds]
    base = [Run(comparison.world, comparison.baseline, s) for s in seeds]
    if comparison.baseline == "topk":
        steps = args.tokens // 2048
        sizes = adapt_hparams(comparison.idea, args.d_model, steps=steps, batch_size=2048,
                              overrides={})  # fmt: skip
        k = sizes.overrides.get("k") or sizes.overrides["k_b"] + sizes.overrides["k_c"]
        sets = (("d_sae", sizes.d_sae), ("k", k))
        matched = [Run(comparison.world, "topk", s, sets) for s in seeds]
    else:
        matched = [
            Run(comparison.world, "standard", s, (("lambda", round(0.04 * scale, 4)),))
            for s in seeds
            for scale in LAMBDA_SCALES
        ]
    return {"idea": idea, "baseline": base, "matched": matched}


def train_run(run: Run, world_dir: Path, args: argparse.Namespace) -> Path:
    folder = args.out / "runs" / run.name
    if (folder / "final_info.json").exists():
        return folder
    argv = ["--cache", str(world_dir), "--layer", "0", "--variant", run.variant, "--out",
            str(folder), "--seed", str(run.seed), "--resume", "--log-every", "64",
            "--tokens", str(args.epochs * args.tokens)]  # fmt: skip
    for key, value in run.sets:
        argv += ["--set", f"{key}={value}"]
    if train.main(argv) != 0:
        raise SystemExit(f"error: training {run.name} failed")
    return folder


EVAL_SCRIPT = """
import sys
from pathlib import Path
from synth.evaluate import evaluate_run
samples = int(sys.argv[1])
for run in sys.argv[2:]:
    evaluate_run(Path(run), None, samples, "cpu")
    print("scored", run, flush=True)
"""


def score(folders: list[Path], samples: int) -> None:
    todo = [f for f in folders if RESULT_KEY not in json.dumps(read_info(f))]
    for folder in todo:
        export_run(folder, force=True)
    if todo:
        cmd = [str(EVAL_PYTHON), "-c", EVAL_SCRIPT, str(samples), *map(str, todo)]
        subprocess.run(cmd, cwd=REPO, env=eval_env(), check=True)


def read_info(folder: Path) -> dict:
    info = json.loads((folder / "final_info.json").read_text())
    return next(iter(info.values()))


def lookup(tree: dict, path: str) -> float | None:
    for part in path.split("/"):
        if not isinstance(tree, dict) or tree.get(part) is None:
            return None
        tree = tree[part]
    return float(tree)


def run_metrics(folder: Path, metrics: tuple[Metric, ...]) -> dict[str, float | None]:
    info = read_info(folder)
    fast, synthetic = info["fast evaluation results"], info[RESULT_KEY]
    values = {"l0": fast["l0"], "ev": fast["explained_variance_pooled"]}
    return values | {m.key: lookup(synthetic, m.key) for m in metrics}


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    real = [v for v in values if v is not None]
    return (float(np.mean(real)), float(np.std(real))) if real else None


def fmt(stat: tuple[float, float] | None) -> str:
    return "n/a" if stat is None else f"{stat[0]:.4g} ± {stat[1]:.2g}"


def interpolate_at(l0: float, grid: list[dict], key: str) -> float | None:
    """The baseline grid's seed-mean `key` at L0 `l0`, linear in log L0; None outside it."""
    by_lambda: dict[float, list[dict]] = {}
    for row in grid:
        by_lambda.setdefault(row["lambda"], []).append(row)
    points = sorted(
        (np.log(np.mean([r["l0"] for r in rows])), np.mean([r[key] for r in rows]))
        for rows in by_lambda.values()
        if all(r[key] is not None for r in rows)
    )
    if len(points) < 2 or not points[0][0] <= np.log(l0) <= points[-1][0]:
        return None
    xs, ys = zip(*points, strict=True)
    return float(np.interp(np.log(l0), xs, ys))


def verdict(idea: float | None, base: float | None, metric: Metric) -> str:
    if idea is None or base is None:
        return "n/a"
    if idea == base:
        return "same"
    better = idea < base if metric.better == "lower" else idea > base
    change = f" ({(idea - base) / abs(base):+.0%})" if base else ""
    return f"{'better' if better else 'worse'}{change}"


def compare(comparison: Comparison, folders: dict[str, list[tuple[Run, Path]]]) -> dict:
    metrics = (comparison.metric, *comparison.extra)
    rows = {
        group: [run_metrics(folder, metrics) | {"lambda": dict(run.sets).get("lambda")}
                for run, folder in items]
        for group, items in folders.items()
    }  # fmt: skip
    return {"comparison": comparison, "rows": rows, "metrics": metrics}


L0_ROW = Metric("l0", "L0", "")
EV_ROW = Metric("ev", "EV (1-FVU)", "higher")


def matched_baseline(result: dict, key: str, idea_l0: float | None) -> float | None:
    """The baseline's value at the idea's L0 (see the module docstring)."""
    c, rows = result["comparison"], result["rows"]
    if c.baseline == "topk":
        matched = mean_std([r[key] for r in rows["matched"]])
        return matched[0] if matched else None
    return None if idea_l0 is None else interpolate_at(idea_l0, rows["matched"], key)


def table(results: list[dict]) -> str:
    lines = [
        "| idea vs baseline (world) | metric | idea (defaults) | baseline (defaults) | "
        "baseline at matched L0 | idea vs matched |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        c, rows = result["comparison"], result["rows"]
        idea_l0 = mean_std([r["l0"] for r in rows["idea"]])
        for metric in (L0_ROW, EV_ROW, *result["metrics"]):
            idea = mean_std([r[metric.key] for r in rows["idea"]])
            base = mean_std([r[metric.key] for r in rows["baseline"]])
            matched = matched_baseline(result, metric.key, idea_l0[0] if idea_l0 else None)
            judged = verdict(idea[0] if idea else None, matched, metric) if metric.better else ""
            bold = "**" if metric is c.metric else ""
            lines.append(
                f"| {c.idea} vs {c.baseline} ({c.world}) | {bold}{metric.label}{bold} | "
                f"{fmt(idea)} | {fmt(base)} | "
                f"{'n/a (outside grid)' if matched is None else f'{matched:.4g}'} | {judged} |"
            )
    return "\n".join(lines)


def pareto_plot(results: list[dict], path: Path) -> None:
    """One row per comparison: EV vs L0 and the idea's metric vs L0, every run a point, the
    baseline grid's seed means joined as its frontier."""
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, result in zip(axes, results, strict=True):
        c, rows = result["comparison"], result["rows"]
        panels = (("ev", "explained variance (1-FVU)"), (c.metric.key, c.metric.label))
        for ax, (key, label) in zip(row, panels, strict=True):
            for group, style in (("matched", "o"), ("baseline", "s"), ("idea", "*")):
                points = [(r["l0"], r[key]) for r in rows[group] if r[key] is not None]
                if not points:
                    continue
                name = c.idea if group == "idea" else f"{c.baseline} ({group})"
                ax.scatter(*zip(*points, strict=True), marker=style, s=60 if style == "*" else 25,
                           label=name, alpha=0.8)  # fmt: skip
            frontier = sorted(
                (np.mean([r["l0"] for r in rows["matched"] if r["lambda"] == lam]),
                 np.mean([r[key] for r in rows["matched"] if r["lambda"] == lam]))
                for lam in {r["lambda"] for r in rows["matched"]}
                if all(r[key] is not None for r in rows["matched"] if r["lambda"] == lam)
            )  # fmt: skip
            if len(frontier) > 1:
                ax.plot(
                    *zip(*frontier, strict=True), "--", color="gray", label=f"{c.baseline} frontier"
                )
            ax.set(xscale="log", xlabel="L0 (active latents per token)", ylabel=label,
                   title=f"{c.idea} vs {c.baseline}, {c.world} world")  # fmt: skip
            ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not EVAL_PYTHON.exists():
        raise SystemExit("error: .venv-eval is missing; run `make setup-eval` first")
    worlds = {c.world: build_world(c.world, args) for c in COMPARISONS}
    plans = {c: runs_of(c, args) for c in COMPARISONS}
    folders = {
        c: {group: [(run, train_run(run, worlds[c.world], args)) for run in runs]
            for group, runs in plan.items()}
        for c, plan in plans.items()
    }  # fmt: skip
    score(sorted({f for groups in folders.values() for items in groups.values()
                  for _, f in items}), args.samples)  # fmt: skip
    results = [compare(c, folders[c]) for c in COMPARISONS]
    plot = args.report.with_name("synth_pareto.png")
    pareto_plot(results, plot)
    args.report.write_text(report(args, results, plot))
    print(args.report.read_text())
    return 0


def report(args: argparse.Namespace, results: list[dict], plot: Path) -> str:
    command = "python benchmarks/synth_bench.py" + (" --quick" if args.quick else "")
    return f"""# Research ideas on ground-truth worlds (`make synth-bench`)

Command: `{command}` (seeds {args.seeds}; worlds d {args.d_model}, {args.features} features,
{args.tokens} tokens, {args.epochs} epochs; every variant at its defaults, sizes adapted to d).
Values are mean ± std over seeds. Bold: the metric the idea exists to move. "matched L0": `topk`
at the idea's d_sae and k, or `standard`'s lambda grid interpolated at the idea's L0.

{table(results)}

![Pareto]({plot.name})
"""


if __name__ == "__main__":
    sys.exit(main())
