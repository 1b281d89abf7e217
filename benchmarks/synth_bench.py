"""The research ideas against baselines that learn, at a working point of worlds built for them.

    python benchmarks/synth_bench.py [--seeds 3] [--quick] [--out benchmarks/out/synth]

Builds the `hierarchy`, `temporal` and `zipf` worlds (`synth.make_world`, in `.venv-eval`), trains
every arm below with `train.py`, scores each run with `synth.evaluate` (SAELens's synthetic eval
plus the ground-truth metrics of `synth.metrics`) and writes `benchmarks/SYNTH.md` and
`benchmarks/synth_pareto.png`. Every number in them comes from this script.

The working point lets every arm learn: the dictionary is as wide as the world has true features,
and L0 sits at the world's true L0 (the mean number of active true features per token, read from
its ground truth). TopK-family arms get k = round(true L0); ReLU arms train at their own default
lambda, and `standard` also at 0.5x and 2x it, so that a ReLU idea is compared with `standard`
interpolated (linearly in log L0) at the idea's L0 - only inside that grid. All arms of a study
have the same width, so MCC and recovery are comparable; each is printed beside a random unit
decoder's score (the chance line). A study whose baseline is within CHANCE_MARGIN of the chance
MCC is not judged. Structure metrics are scored as the distance to the ground truth's own value.
Every run is a normal run folder: the bench resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

import train  # noqa: E402
from jax_sae.export.saelens import export_run  # noqa: E402
from jax_sae.model.variants import make_variant  # noqa: E402

EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"
RESULT_KEY = "synthetic evaluation results"
LAMBDA_SCALES = (0.5, 1.0, 2.0)
CHANCE_MARGIN = 0.1
"""A baseline must beat the chance MCC by this much for its study to be judged."""
CONCEPT_SHARE = 0.1
"""two_level's share of k spent on concept latents (its defaults: k_c 32 of 320)."""


@dataclass(frozen=True)
class Metric:
    key: str  # "/"-separated path in the run's results ("l0", "ev" or the synthetic results)
    label: str
    better: str = ""  # "lower", "higher" or "" (not judged)
    chance: str = ""  # path of the chance line's value, if any
    truth: str = ""  # path of the ground truth's own value, if any


L0 = Metric("l0", "L0")
EV = Metric("ev", "EV (1-FVU)", "higher")
MCC = Metric("feature_recovery/mcc/sae", "MCC", "higher", chance="feature_recovery/mcc/chance")
RECOVERED = Metric(
    "feature_recovery/recovered/sae", "recovered (|cos| > 0.9)", "higher",
    chance="feature_recovery/recovered/chance",
)  # fmt: skip
ABSORPTION = Metric("absorption/rate", "absorption", "lower")
CHILD_RECALL = Metric("absorption/child_recall", "child recall", "higher")
SAEBENCH_ABSORPTION = Metric(
    "absorption/saebench_full/rate", "absorption (SAEBench-style)", "lower"
)
OVERLAP = Metric(
    "cofiring_decoder_cos/distance", "co-firing |cos|: distance to truth", "lower",
    truth="cofiring_decoder_cos/ground_truth",
)  # fmt: skip
JACCARD = Metric(
    "adjacent_jaccard/distance", "adjacent Jaccard: distance to truth", "lower",
    truth="adjacent_jaccard/ground_truth",
)  # fmt: skip
SPREAD = Metric(
    "firing_rate_spread/std_log10_rate/distance", "std log10 rate: distance to truth", "lower",
    truth="firing_rate_spread/std_log10_rate/ground_truth",
)  # fmt: skip


@dataclass(frozen=True)
class Study:
    name: str
    world: str
    family: str  # "topk": every arm at k = true L0; "l1": lambda grid of `standard`
    baselines: tuple[str, ...]
    ideas: tuple[str, ...]
    metric: Metric  # what the ideas exist to move
    extra: tuple[Metric, ...]


STUDIES = (
    Study("absorption", "hierarchy", "topk", ("topk", "batchtopk", "matryoshka"),
          ("hier_ortho", "two_level"), ABSORPTION,
          (CHILD_RECALL, SAEBENCH_ABSORPTION, OVERLAP, MCC, RECOVERED)),
    Study("decoder overlap", "hierarchy", "l1", ("standard",), ("pair_ortho",), OVERLAP,
          (ABSORPTION, CHILD_RECALL, MCC, RECOVERED)),
    Study("token stability", "temporal", "l1", ("standard",), ("temporal",), JACCARD,
          (MCC, RECOVERED)),
    Study("firing-rate spread", "zipf", "l1", ("standard",), ("freq",), SPREAD, (MCC, RECOVERED)),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "synth")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256,
                   help="world dimension; at 64 with 1024 features BatchTopK's selection fails "
                   "even for the true dictionary (`selection_recall` in SYNTH.md)")  # fmt: skip
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=2**19, help="world size (tokens)")
    p.add_argument("--epochs", type=int, default=4, help="training epochs over the world")
    p.add_argument("--samples", type=int, default=16384, help="SAELens synthetic-eval samples")
    p.add_argument("--quick", action="store_true", help="1 seed, 1/4 of the tokens: smoke run")
    p.add_argument("--report", type=Path, default=REPO / "benchmarks" / "SYNTH.md")
    p.add_argument("--study", action="append", choices=[s.name for s in STUDIES],
                   help="run only this study (repeatable; default: all)")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.tokens, args.epochs = 1, args.tokens // 4, 1
        args.out = args.out / "quick"
    args.out = args.out / f"d{args.d_model}_F{args.features}"  # worlds and runs of this size
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


def true_l0(world_dir: Path) -> float:
    """Mean number of active true features per held-out token of the world."""
    indptr = load_file(world_dir / "ground_truth.safetensors")["heldout_indptr"]
    return float(np.mean(np.diff(indptr)))


SELECTION_DIMS = (64, 128, 256, 768)
"""Dimensions at which `selection_recall` places the world's true codes."""


def selection_recall(world_dir: Path, k: int, d: int, tokens: int = 8192) -> dict[str, float]:
    """Support recall of the two TopK selection rules when the dictionary is the truth itself.

    The world's held-out true codes are decoded with random unit features in dimension d and
    encoded with those features as a tied encoder; k latents per token (TopK) or k x tokens over
    the batch (BatchTopK) are kept. The fraction of true (token, feature) pairs kept measures how
    well each rule can work at that dimension, before any training: interference between
    features grows like 1 / sqrt(d) and batch selection ranks it across tokens of any norm."""
    truth = load_file(world_dir / "ground_truth.safetensors")
    indptr = truth["heldout_indptr"][: tokens + 1]
    n_features = len(truth["firing_probabilities"])
    codes = np.zeros((tokens, n_features))
    rows = np.repeat(np.arange(tokens), np.diff(indptr))
    codes[rows, truth["heldout_indices"][: indptr[-1]]] = truth["heldout_values"][: indptr[-1]]
    features = np.random.default_rng(0).normal(size=(n_features, d))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    pre = (codes @ features) @ features.T
    per_token = pre >= np.sort(pre, axis=1)[:, -k : -k + 1 or None]
    acts = np.maximum(pre, 0)
    batch = acts >= np.sort(acts.ravel())[-k * tokens]
    active = codes > 0
    return {rule: float((kept & active).sum() / active.sum())
            for rule, kept in (("topk", per_token & (acts > 0)), ("batchtopk", batch))}  # fmt: skip


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


def sparsity_sets(variant: str, k: int) -> tuple[tuple[str, object], ...]:
    """The settings that put a TopK-family variant at L0 k."""
    if variant == "two_level":
        k_c = max(1, round(CONCEPT_SHARE * k))
        return (("k_c", k_c), ("k_b", k - k_c))
    return (("k", k),)


def default_lambda(variant: str, d: int, width: int) -> tuple[str, float]:
    """The variant's L1 coefficient: its name and default."""
    hparams = make_variant(variant, d, width).hparams
    name = "lambda_1" if "lambda_1" in hparams else "lambda"
    return name, float(hparams[name])


def arms_of(study: Study, k: int, args: argparse.Namespace) -> dict[str, list[Run]]:
    """{arm label: runs over seeds}; ReLU baselines also at LAMBDA_SCALES of their default."""
    seeds, arms = range(args.seeds), {}
    for variant in (*study.baselines, *study.ideas):
        if study.family == "topk":
            arms[variant] = [Run(study.world, variant, s, sparsity_sets(variant, k)) for s in seeds]
        elif variant in study.ideas:
            arms[variant] = [Run(study.world, variant, s) for s in seeds]
        else:
            name, value = default_lambda(variant, args.d_model, args.features)
            for scale in LAMBDA_SCALES:
                sets = () if scale == 1.0 else ((name, round(value * scale, 6)),)
                arms[f"{variant} {scale:g}x lambda"] = [
                    Run(study.world, variant, s, sets) for s in seeds
                ]
    return arms


def train_run(run: Run, world_dir: Path, args: argparse.Namespace) -> Path:
    folder = args.out / "runs" / run.name
    if (folder / "final_info.json").exists():
        return folder
    argv = ["--cache", str(world_dir), "--layer", "0", "--variant", run.variant, "--out",
            str(folder), "--seed", str(run.seed), "--resume-if-exists", "--log-every", "64",
            "--set", f"d_sae={args.features}",
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
samples, world, heldout = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "heldout"
for run in sys.argv[4:]:
    evaluate_run(Path(run), Path(world) if world else None, samples, "cpu", heldout)
    print("scored", run, flush=True)
"""


def scored(folder: Path) -> bool:
    """Whether the run has results of the current metrics (feature_recovery is their mark)."""
    return "feature_recovery" in read_info(folder).get(RESULT_KEY, {})


def score(
    folders: list[Path], samples: int, world: Path | None = None, heldout: bool = False
) -> None:
    """Export and score (`synth.evaluate`, in `.venv-eval`) every run not scored yet; `world`:
    the world cache, if not the runs' own; `heldout`: SAELens's evaluation on its samples."""
    todo = [f for f in folders if not scored(f)]
    for folder in todo:
        export_run(folder, force=True)
    if todo:
        cmd = [str(EVAL_PYTHON), "-c", EVAL_SCRIPT, str(samples), str(world or ""),
               "heldout" if heldout else "drawn", *map(str, todo)]  # fmt: skip
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


def raw_key(m: Metric) -> str:
    """Path of the SAE's own value of a metric scored as a distance to the truth ("" if none):
    plotted, and interpolated along a baseline's lambda grid before the distance is taken (the
    distance is not linear in L0 where the grid crosses the truth's value)."""
    return m.truth.rsplit("/", 1)[0] + "/sae" if m.truth else ""


def run_values(folder: Path, metrics: tuple[Metric, ...]) -> dict[str, float | None]:
    """Every value the report needs from one run: the metrics, their chance lines and truths."""
    info = read_info(folder)
    fast, synthetic = info["fast evaluation results"], info[RESULT_KEY]
    values: dict[str, float | None] = {"l0": fast["l0"], "ev": fast["explained_variance_pooled"]}
    for m in metrics:
        for path in (m.key, m.chance, m.truth, raw_key(m)):
            if path and path not in values:
                values[path] = lookup(synthetic, path)
    return values


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    real = [v for v in values if v is not None]
    return (float(np.mean(real)), float(np.std(real))) if real else None


def fmt(stat: tuple[float, float] | None) -> str:
    return "n/a" if stat is None else f"{stat[0]:.3g} ± {stat[1]:.1g}"


def arm_stat(rows: list[dict], key: str) -> tuple[float, float] | None:
    return mean_std([r[key] for r in rows])


def interpolate_at(l0: float, grid: list[list[dict]], key: str) -> float | None:
    """The lambda grid's seed-mean `key` at L0 `l0`, linear in log L0; None outside the grid."""
    points = sorted(
        (np.log(np.mean([r["l0"] for r in rows])), np.mean([r[key] for r in rows]))
        for rows in grid
        if rows and all(r[key] is not None for r in rows)
    )
    if len(points) < 2 or not points[0][0] <= np.log(l0) <= points[-1][0]:
        return None
    xs, ys = zip(*points, strict=True)
    return float(np.interp(np.log(l0), xs, ys))


def baseline_arms(study: Study, rows: dict[str, list[dict]]) -> dict[str, list[list[dict]]]:
    """{baseline variant: its arms' rows} - one arm for TopK-family baselines, the grid for ReLU."""
    return {
        b: [r for label, r in rows.items() if label == b or label.startswith(f"{b} ")]
        for b in study.baselines
    }


def baseline_value(study: Study, grid: list[list[dict]], key: str, idea_l0: float) -> float | None:
    """The baseline's seed mean of `key`: the single arm (TopK family, same k) or the lambda grid
    interpolated at the idea's L0 (ReLU)."""
    if study.family == "topk":
        stat = arm_stat(grid[0], key)
        return stat[0] if stat else None
    return interpolate_at(idea_l0, grid, key)


def learns(grid: list[list[dict]]) -> bool:
    """Whether a baseline beats the chance MCC by CHANCE_MARGIN in every arm."""
    for rows in grid:
        mcc, chance = arm_stat(rows, MCC.key), arm_stat(rows, MCC.chance)
        if mcc is None or chance is None or mcc[0] - chance[0] < CHANCE_MARGIN:
            return False
    return True


def change(idea: tuple[float, float] | None, base: float | None, spread: float, m: Metric) -> str:
    """The idea's difference to the baseline, judged against twice the seeds' spread."""
    if idea is None or base is None:
        return "n/a"
    delta = idea[0] - base
    if abs(delta) <= 2 * spread:
        return f"{delta:+.3g} (within seed spread)"
    better = delta < 0 if m.better == "lower" else delta > 0
    return f"{delta:+.3g} ({'better' if better else 'worse'})"


def study_table(study: Study, rows: dict[str, list[dict]]) -> str:
    metrics = (L0, EV, study.metric, *study.extra)
    anchors, first = [], next(iter(rows.values()))
    for m in metrics:
        if m.chance:
            anchors.append(f"{m.label} chance {fmt(arm_stat(first, m.chance))}")
        if m.truth:
            anchors.append(
                f"{m.truth.split('/')[0]} of the ground truth {fmt(arm_stat(first, m.truth))}"
            )
    head = "| arm | " + " | ".join(
        f"**{m.label}**" if m is study.metric else m.label for m in metrics
    )
    lines = [head + " |", "|---" * (len(metrics) + 1) + "|"]
    for label, arm_rows in rows.items():
        cells = " | ".join(fmt(arm_stat(arm_rows, m.key)) for m in metrics)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines) + "\n\nAnchors: " + "; ".join(anchors) + ".\n"


def verdicts(study: Study, rows: dict[str, list[dict]]) -> list[str]:
    """One line per idea and baseline: the change of each judged metric."""
    judged = tuple(m for m in (study.metric, *study.extra, EV) if m.better)
    out = []
    for baseline, grid in baseline_arms(study, rows).items():
        if not learns(grid):
            out.append(
                f"* vs `{baseline}`: not judged - `{baseline}` is within {CHANCE_MARGIN} of the "
                "chance MCC (a baseline that learns nothing proves nothing)."
            )
            continue
        for idea in study.ideas:
            idea_l0 = arm_stat(rows[idea], "l0")
            assert idea_l0 is not None
            parts = []
            for m in judged:
                base = baseline_value(study, grid, m.key, idea_l0[0])
                if m.truth and base is not None:  # a distance: interpolate the value, not it
                    raw = baseline_value(study, grid, raw_key(m), idea_l0[0])
                    truth = arm_stat(rows[idea], m.truth)
                    base = None if raw is None or truth is None else abs(raw - truth[0])
                stat = arm_stat(rows[idea], m.key)
                spread = max([s[1] for s in (stat, *(arm_stat(g, m.key) for g in grid)) if s])
                parts.append(f"{m.label} {change(stat, base, spread, m)}")
            where = "same k" if study.family == "topk" else f"interpolated at L0 {idea_l0[0]:.3g}"
            out.append(f"* `{idea}` vs `{baseline}` ({where}): " + "; ".join(parts))
    return out


def pareto_plot(results: list[tuple[Study, dict[str, list[dict]]]], path: Path) -> None:
    """One row per study: the idea's metric and MCC against L0, every run a point, the chance
    MCC and the ground truth's value as lines."""
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.4 * len(results)), squeeze=False)
    for row, (study, rows) in zip(axes, results, strict=True):
        raw = raw_key(study.metric)
        shown = Metric(raw, study.metric.label.split(":")[0], truth=study.metric.truth)
        panels = (shown if raw else study.metric, MCC)
        for ax, m in zip(row, panels, strict=True):
            for i, (label, arm_rows) in enumerate(rows.items()):
                points = [(r["l0"], r[m.key]) for r in arm_rows if r.get(m.key) is not None]
                if points:
                    ax.scatter(*zip(*points, strict=True), marker="os^Dv*P"[i % 7], s=30,
                               label=label, alpha=0.8)  # fmt: skip
            first = next(iter(rows.values()))
            for line, name in ((m.chance, "random decoder (chance)"), (m.truth, "ground truth")):
                value = arm_stat(first, line) if line else None
                if value:
                    ax.axhline(value[0], ls="--", color="gray", lw=1, label=name)
            ax.set(xscale="log", xlabel="L0 (active latents per token)", ylabel=m.label,
                   title=f"{study.name}: {study.world} world")  # fmt: skip
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
    studies = [s for s in STUDIES if not args.study or s.name in args.study]
    worlds = {s.world: build_world(s.world, args) for s in studies}
    true_l0s = {w: true_l0(d) for w, d in worlds.items()}
    plans = {s: arms_of(s, max(1, round(true_l0s[s.world])), args) for s in studies}
    folders = {
        s: {label: [train_run(r, worlds[s.world], args) for r in runs]
            for label, runs in arms.items()}
        for s, arms in plans.items()
    }  # fmt: skip
    every_run = {f for arms in folders.values() for fs in arms.values() for f in fs}
    score(sorted(every_run), args.samples)
    results = [
        (s, {label: [run_values(f, (s.metric, *s.extra, MCC)) for f in fs]
             for label, fs in arms.items()})
        for s, arms in folders.items()
    ]  # fmt: skip
    plot = args.report.with_name("synth_pareto.png")
    pareto_plot(results, plot)
    topk_worlds = {s.world for s in studies if s.family == "topk"}
    selection = {
        w: {d: selection_recall(worlds[w], max(1, round(true_l0s[w])), d) for d in SELECTION_DIMS}
        for w in sorted(topk_worlds)
    }
    args.report.write_text(report(args, results, true_l0s, plot, selection))
    print(args.report.read_text())
    return 0


def selection_table(selection: dict[str, dict[int, dict[str, float]]]) -> str:
    """Markdown table of `selection_recall` per world and dimension."""
    lines = ["| world | d | TopK recall | BatchTopK recall |", "|---|---|---|---|"]
    for world, by_d in selection.items():
        lines += [f"| {world} | {d} | {r['topk']:.3f} | {r['batchtopk']:.3f} |"
                  for d, r in by_d.items()]  # fmt: skip
    return "\n".join(lines)


def report(
    args: argparse.Namespace,
    results: list,
    true_l0s: dict[str, float],
    plot: Path,
    selection: dict[str, dict[int, dict[str, float]]],
) -> str:
    command = "python benchmarks/synth_bench.py" + (" --quick" if args.quick else "")
    command += "".join(f" --study '{name}'" for name in args.study or ())
    worlds = ", ".join(f"{w} {v:.2f}" for w, v in true_l0s.items())
    sections = []
    for study, rows in results:
        k = max(1, round(true_l0s[study.world]))
        point = f"k {k}" if study.family == "topk" else "ReLU arms at their default lambda"
        sections.append(
            f"## {study.name} ({study.world} world, width {args.features}, {point})\n\n"
            + study_table(study, rows)
            + "\n"
            + "\n".join(verdicts(study, rows))
        )
    return f"""# Research ideas on ground-truth worlds (`make synth-bench`)

Command: `{command}` (seeds {args.seeds}; worlds d {args.d_model}, {args.features} true features,
{args.tokens} tokens, {args.epochs} epochs). Working point: every dictionary {args.features} wide
(the number of true features); true L0 per world: {worlds}. Values are mean ± std over seeds; a
change counts only beyond twice the larger seed spread. MCC and recovery are compared only within a
study (equal width), beside a random unit decoder's score; structure metrics are the distance to
the ground truth's own value (lower is better). "absorption": among child tokens where the child's
latent fires, the fraction where the parent's latent is silent (read it with child recall).

{(chr(10) * 2).join(sections)}

## Why the worlds are {args.d_model}-dimensional

`selection_recall`: with the true dictionary as a tied encoder (no training), the fraction of the
true (token, feature) pairs that each TopK rule keeps at k = true L0, the world's codes placed in
d dimensions. Where BatchTopK's recall is below TopK's, interference between features (which
grows as d shrinks) outranks real features across tokens, and BatchTopK and Matryoshka cannot
learn the world - a property of the world, not of the trainer.

{selection_table(selection)}

![MCC and each idea's metric against L0]({plot.name})
"""


if __name__ == "__main__":
    sys.exit(main())
