"""SynthSAEBench-16k: every architecture at L0 25, beside the published table and SAELens's trainer.

    python benchmarks/synthsaebench.py [--budget cpu|full|small] [--arms a,b] [--seeds 3]

The world is SynthSAEBench-16k (`synth.synthsaebench`, SAELens's config classes with the published
settings). Every architecture trains at the target L0 - TopK-family arms through k, JumpReLU
through its target_l0, L1 arms over a vmapped lambda sweep read at the target by interpolation in
log L0 - and is scored by `synth.evaluate`: SAELens's `eval_sae_on_synthetic_data` (MCC, per-latent
F1 with precision and recall, uniqueness, explained variance, dead latents) plus feature recovery
beside a random decoder's (the chance line) and the corrected absorption. BatchTopK is also trained
by SAELens's own trainer on the same batches (`saelens_synth_worker.py`), over --seeds seeds.

Budgets (`BUDGETS`): `cpu` (default) draws one cache of the world with the on-device sampler and
trains every arm on it; `full` is the published protocol for a GPU (200M fresh samples per SAE
drawn on the device, L0 grid 15-45, SAELens's evaluation on 1M fresh samples); `small` is a
1024-feature world for the test suite. Writes `benchmarks/SYNTHSAEBENCH.md` (cpu, full) and
`synthsaebench.png` beside it; every number in them is computed here. Runs resume where they
stopped (each is an ordinary run folder).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

import train  # noqa: E402
from benchmarks.synth_bench import (  # noqa: E402
    EVAL_PYTHON,
    RESULT_KEY,
    default_lambda,
    eval_env,
    lookup,
    read_info,
    score,
    scored,
    sparsity_sets,
)
from jax_sae.data.cache import ActivationCache  # noqa: E402
from jax_sae.data.loader import BatchPlan, heldout_start, make_chunks  # noqa: E402
from synth.make_world import heldout_offset  # noqa: E402

PUBLISHED = {
    "standard": (0.604, 0.556, 0.765),
    "batchtopk": (0.757, 0.732, 0.792),
    "jumprelu": (0.753, 0.732, 0.795),
    "matryoshka": (0.793, 0.879, 0.779),
    "matching pursuit": (0.693, 0.446, 0.835),
}
"""(MCC, F1, explained variance) at width 4096, L0 25, 200M samples: Chanin et al. 2026,
"SynthSAEBench" (arXiv 2602.14687), as quoted in SAELens's SynthSAEBench docs."""
PUBLISHED_L0 = 25
SAELENS_LR = 3e-4  # SyntheticSAERunnerConfig's default, the published protocol's
SAELENS_DEAD_WINDOW = 1000  # SyntheticSAERunnerConfig's dead_feature_window default
WORLD_16K = REPO / "activations_cache" / "worlds" / "synthsaebench-16k"
SMALL_HIDDEN = 256
"""The small budget's world: SynthSAEBench shrunk to 1024 features in 256 dimensions (in 64, as
the sampler tests use it, even the true dictionary cannot select k = true L0 features well)."""
SEED_SPREAD = 2.0  # a difference counts beyond this many seed standard deviations
MIN_DIFFERENCE = 0.005  # and beyond this, whatever the seeds' spread (a metric can sit at 0)


@dataclass(frozen=True)
class Budget:
    name: str
    width: int
    samples: int  # training samples per SAE
    batch_size: int
    lr: float
    l0_grid: tuple[int, ...]  # empty: the world's own true L0 (small worlds)
    lambda_scales: tuple[float, ...]  # L1 arms: lambda = default x these, one vmapped sweep
    eval_samples: int
    cache_tokens: int  # the drawn cache: training rows + held-out tail (full: held-out only)
    small_world: bool = False

    @property
    def trains_on_cache(self) -> bool:
        return self.name != "full"


BUDGETS = {
    "cpu": Budget("cpu", 4096, 2**18, 1024, 3e-3, (25,), (0.5, 1.0, 2.0), 16384, 589824),
    "full": Budget("full", 4096, 200_000_000, 1024, SAELENS_LR, (15, 20, 25, 30, 35, 40, 45),
                   (0.25, 0.5, 1.0, 2.0, 4.0, 8.0), 1_000_000, 655360),
    "small": Budget("small", 1024, 2**16, 128, 3e-3, (), (0.5, 1.0, 2.0), 16384, 2**16 + 16384,
                    small_world=True),
}  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One architecture of the table. `sparsity`: how it is put at the target L0 - "k" (k = L0),
    "target" (JumpReLU's target_l0) or "l1" (a lambda sweep read at the target); `sweep`: a
    research coefficient swept at the target L0 as multiples of its default, in one vmapped run."""

    variant: str
    role: str  # "baseline" or "idea"
    sparsity: str
    sweep: tuple[str, tuple[float, ...]] | None = None


ARMS = (
    Arm("standard", "baseline", "l1"),
    Arm("topk", "baseline", "k"),
    Arm("batchtopk", "baseline", "k"),
    Arm("jumprelu", "baseline", "target"),
    Arm("matryoshka", "baseline", "k"),
    Arm("hier_ortho", "idea", "k", ("lambda_2", (0.25, 1.0, 4.0))),
    Arm("two_level", "idea", "k"),
    Arm("pair_ortho", "idea", "l1"),
    Arm("freq", "idea", "l1"),
)
"""temporal is left out: SynthSAEBench samples are independent, there is no previous token."""
PRIORITY = ("batchtopk", "matryoshka", "hier_ortho", "two_level", "topk", "freq", "jumprelu",
            "standard", "pair_ortho")  # fmt: skip
"""Training order, each arm scored as it finishes: the research question's arms first, cheap
before costly (pair_ortho's pair scores make it the slowest), so that an interrupted run already
answers most of it (`--report-only` writes the report from whatever is finished)."""

METRICS = {  # column label: path in the synthetic results
    "L0": "saelens/sae_l0",
    "MCC": "saelens/mcc",
    "F1": "saelens/classification/f1_score",
    "precision": "saelens/classification/precision",
    "recall": "saelens/classification/recall",
    "uniqueness": "saelens/uniqueness",
    "EV": "saelens/explained_variance",
    "dead": "saelens/dead_latents",
    "recovered": "feature_recovery/recovered/sae",
    "absorption": "absorption/rate",
    "child recall": "absorption/child_recall",
}
HIGHER = ("MCC", "F1", "precision", "recall", "uniqueness", "EV", "recovered", "child recall")
JUDGED = ("MCC", "F1", "recovered", "absorption")  # the research question's metrics
BASELINES_OF_IDEAS = ("topk", "batchtopk", "matryoshka")
"""What each idea is judged against: the issue's BatchTopK and Matryoshka, and TopK, the base of
hier_ortho and two_level (like them, exactly k latents per sample at inference; BatchTopK and
Matryoshka infer through a JumpReLU threshold, at a lower L0 after a short run)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    p.add_argument("--arms", help="comma-separated variants (default: every arm)")
    p.add_argument("--seeds", type=int, default=3, help="BatchTopK seeds, ours and SAELens's")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the report from the runs already finished and scored",
    )
    p.add_argument("--out", type=Path, help="default: benchmarks/out/synthsaebench/<budget>")
    p.add_argument(
        "--report",
        type=Path,
        help="default: benchmarks/SYNTHSAEBENCH.md (small: <out>/SYNTHSAEBENCH.md)",
    )
    args = p.parse_args(argv)  # fmt: skip
    args.budget = BUDGETS[args.budget]
    names = [a.variant for a in ARMS]
    chosen = args.arms.split(",") if args.arms else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(names)}")
    args.arms = tuple(a for a in ARMS if a.variant in chosen)
    args.out = args.out or REPO / "benchmarks" / "out" / "synthsaebench" / args.budget.name
    if args.report is None:
        small = args.budget.small_world
        args.report = (args.out if small else REPO / "benchmarks") / "SYNTHSAEBENCH.md"
    return args


def run_python(python: Path, *argv: str) -> None:
    subprocess.run([str(python), *argv], cwd=REPO, env=eval_env(), check=True)


def build_world(args: argparse.Namespace) -> Path:
    """The world folder (SAELens's config classes, in .venv-eval); built once."""
    world = args.out / "world" if args.budget.small_world else WORLD_16K
    if not (world / "world.json").is_file():
        flags = ["--small", "--hidden", str(SMALL_HIDDEN)] if args.budget.small_world else []
        run_python(EVAL_PYTHON, "-m", "synth.synthsaebench", "--out", str(world), *flags)
    return world


def build_cache(world: Path, args: argparse.Namespace) -> Path:
    """A cache drawn from the world by the on-device sampler, with its held-out true codes."""
    cache = args.out / "cache"
    if not (cache / "ground_truth.safetensors").is_file():
        from synth.world_cache import write_world_cache

        write_world_cache(world, cache, args.budget.cache_tokens, resume=cache.exists())
    return cache


def true_l0(cache: Path) -> float:
    from safetensors.numpy import load_file

    indptr = load_file(cache / "ground_truth.safetensors")["heldout_indptr"]
    return float(np.mean(np.diff(indptr)))


def train_arm(arm: Arm, l0: int, seed: int, world: Path, cache: Path, args) -> list[Path]:
    """Train one arm at target L0 `l0`; the run folders it made (one per sweep member)."""
    budget = args.budget
    folder = arm_folder(arm, l0, seed, args)
    argv = ["--cache", str(cache if budget.trains_on_cache else world), "--layer", "0",
            "--variant", arm.variant, "--out", str(folder), "--seed", str(seed),
            "--batch-size", str(budget.batch_size), "--tokens", str(budget.samples),
            "--set", f"d_sae={budget.width}", "--set", f"lr={budget.lr}",
            "--resume-if-exists"]  # fmt: skip
    if budget.trains_on_cache:  # hold out exactly the tail whose true codes are stored
        argv += ["--eval-tokens", str(budget.cache_tokens - heldout_offset(budget.cache_tokens, 1))]
    d_in = ActivationCache(cache).d_model
    sets: dict[str, object] = {}
    sweep: tuple[str, list[float]] | None = None
    if arm.sparsity == "k":
        sets |= dict(sparsity_sets(arm.variant, l0))
    elif arm.sparsity == "target":
        sets["target_l0"] = l0
    else:
        name, value = default_lambda(arm.variant, d_in, budget.width)
        sweep = (name, [round(value * s, 6) for s in budget.lambda_scales])
    if arm.sweep is not None:
        name, scales = arm.sweep
        value = adapted_default(arm.variant, name, d_in, budget)
        sweep = (name, [round(value * s, 6) for s in scales])
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    if sweep is not None:
        argv += ["--sweep", f"{sweep[0]}=" + ",".join(map(str, sweep[1]))]
    finished = all((f / "final_info.json").exists() for f in members(folder))
    if not finished and train.main(argv) != 0:
        raise SystemExit(f"error: training {folder} failed")
    return members(folder)


def arm_folder(arm: Arm, l0: int, seed: int, args: argparse.Namespace) -> Path:
    return args.out / "runs" / f"L{l0}" / f"{arm.variant}_s{seed}"


def scored_members(folder: Path) -> list[Path] | None:
    """The run folders of a finished and scored run or sweep; None if any is not."""
    runs = members(folder)
    done = all((f / "final_info.json").exists() and scored(f) for f in runs)
    return runs if done else None


def members(folder: Path) -> list[Path]:
    """The run folders of a run or a sweep folder."""
    if not (folder / "sweep.json").exists():
        return [folder]
    record = json.loads((folder / "sweep.json").read_text())
    return [folder / m["folder"] for m in record["members"]]


def adapted_default(variant: str, key: str, d_in: int, budget: Budget) -> float:
    """The value of `key` a run of this variant gets when it is not set (defaults adapt to d_in)."""
    from jax_sae.model.defaults import adapt_hparams, defaults_at

    steps = budget.samples // budget.batch_size
    adapted = adapt_hparams(
        variant, d_in, steps=steps, batch_size=budget.batch_size, overrides={}, d_sae=budget.width
    )
    value = adapted.overrides.get(key, defaults_at(variant, d_in, budget.width)[key])
    return float(value)


def saelens_batchtopk(
    seed: int, l0: int, ours: Path, cache: Path, args: argparse.Namespace, matched: bool
) -> dict | None:
    """SAELens's BatchTopK through its own trainer: on the batches our run `ours` drew (cached
    budgets) or on SAELens's own sampler (full). `matched`: its dead-latent window (SAELens's
    default 1000 steps) set to the one our run used, so that AuxK acts as early in both."""
    budget = args.budget
    name = f"batchtopk{'_dead_window_matched' if matched else ''}_s{seed}"
    out = args.out / "saelens" / f"L{l0}" / name
    result = out / "result.json"
    if args.report_only:
        return json.loads(result.read_text()) if result.exists() else None
    if not result.exists():
        out.mkdir(parents=True, exist_ok=True)
        argv = ["--out", str(out), "--world-cache", str(cache), "--width", str(budget.width),
                "--k", str(l0), "--seed", str(seed), "--lr", str(budget.lr),
                "--batch-size", str(budget.batch_size),
                "--eval-samples", str(budget.eval_samples)]  # fmt: skip
        if matched:
            argv += ["--dead-window", str(dead_window_steps(ours))]
        if budget.trains_on_cache:
            np.save(out / "batches.npy", batch_order(ours, cache))
            argv += ["--batches", str(out / "batches.npy")]
        else:
            argv += ["--samples", str(budget.samples)]
        run_python(EVAL_PYTHON, str(REPO / "benchmarks" / "saelens_synth_worker.py"), *argv)
    return json.loads(result.read_text())


def dead_window_steps(run: Path) -> int:
    """Our run's dead-latent window in steps (its `dead_tokens` over its batch size)."""
    config = json.loads((run / "config.json").read_text())
    info = read_info(run)["config"]
    return max(1, int(info["hparams"]["dead_tokens"]) // int(config["batch_size"]))


def batch_order(run: Path, cache: Path) -> np.ndarray:
    """[steps, batch] cache rows of every batch run `run` trained on (its loader's plan)."""
    config = json.loads((run / "config.json").read_text())
    store = ActivationCache(cache)
    chunks = make_chunks(
        store.shard_sizes, heldout_start(store, config["eval_tokens"]),
        config["loader"]["chunk_tokens"],
    )  # fmt: skip
    plan = BatchPlan(chunks, batch_size=config["batch_size"], seed=config["data_seed"],
                     buffer_chunks=config["loader"]["buffer_chunks"])  # fmt: skip
    return np.stack([plan.batch_indices(step) for step in range(config["steps"])])


def values(tree: dict) -> dict[str, float | None]:
    return {label: lookup(tree, path) for label, path in METRICS.items()}


def run_row(folder: Path) -> dict[str, float | None]:
    """A trained run's metrics, its chance MCC and its training samples/s."""
    synthetic = read_info(folder)[RESULT_KEY]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records[1:] if "tokens_per_s" in r]  # [0]: compile
    row = values(synthetic) | {"chance MCC": lookup(synthetic, "feature_recovery/mcc/chance")}
    return row | {"samples/s": float(np.median(speeds)) if speeds else None}


def saelens_row(result: dict) -> dict[str, float | None]:
    """A SAELens-trained SAE's metrics and training samples/s (saelens_synth_worker.py)."""
    return values(result["synthetic"]) | {"chance MCC": None, "samples/s": result["samples_per_s"]}


def at_l0(rows: list[dict], l0: float) -> dict[str, float | None] | None:
    """A sweep's metrics interpolated at L0 `l0`, linear in log L0 between the two members around
    it; None when no two members bracket it."""
    points = sorted((r["L0"], r) for r in rows if r["L0"])
    for (l0_a, a), (l0_b, b) in zip(points, points[1:], strict=False):
        if l0_a <= l0 <= l0_b:
            t = (np.log(l0) - np.log(l0_a)) / (np.log(l0_b) - np.log(l0_a))
            row = {key: None if a[key] is None or b[key] is None
                   else float(a[key] + t * (b[key] - a[key])) for key in a}  # fmt: skip
            return row | {"L0": float(l0)}
    return None


def seed_stats(rows: list[dict]) -> dict[str, tuple[float, float] | None]:
    """Mean and sample std over seeds of every key (std 0 for one seed)."""
    out: dict[str, tuple[float, float] | None] = {}
    for key in rows[0]:
        real = [r[key] for r in rows if r[key] is not None]
        std = float(np.std(real, ddof=1)) if len(real) > 1 else 0.0
        out[key] = (float(np.mean(real)), std) if real else None
    return out


@dataclass
class Results:
    """Everything the report shows."""

    budget: Budget
    targets: tuple[int, ...]
    true_l0: float
    rows: dict[tuple[str, int], list[dict]]  # (variant, target L0) -> a row per member (seed 0)
    ours: list[dict]  # side-by-side: our BatchTopK, a row per seed
    theirs: list[dict]  # SAELens's BatchTopK, a row per seed
    matched: list[dict]  # the same with its dead-latent window set to ours
    ours_dead_window: int  # our BatchTopK's dead-latent window in steps
    side_l0: int


def arm_row(arm: Arm, rows: list[dict], l0: int, budget: Budget) -> tuple[dict | None, str]:
    """The arm's row at target L0 `l0`, and how it was read."""
    if arm.sparsity == "l1":
        row = at_l0(rows, l0)
        scales = "/".join(f"{s:g}" for s in budget.lambda_scales)
        if row is None:
            reached = ", ".join(f"{r['L0']:.1f}" for r in rows if r["L0"])
            return None, f"lambda x {scales} of the default reached L0 {reached}: not bracketed"
        return row, f"lambda x {scales} of the default, read at L0 {l0}"
    if arm.sweep is not None:
        return rows[arm.sweep[1].index(1.0)], f"k {l0}, default {arm.sweep[0]}"
    return rows[0], f"target_l0 {l0}" if arm.sparsity == "target" else f"k {l0}"


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.{digits}f}"


def fmt_stat(stat: tuple[float, float] | None) -> str:
    return "n/a" if stat is None else f"{fmt(stat[0])} ± {fmt(stat[1])}"


def main_table(results: Results, l0: int) -> str:
    columns = list(METRICS)
    lines = ["| architecture | read as | " + " | ".join(columns) + " | published MCC / F1 / EV |",
             "|---" * (len(columns) + 3) + "|"]  # fmt: skip
    for arm in ARMS:
        rows = results.rows.get((arm.variant, l0))
        if rows is None:
            continue
        row, how = arm_row(arm, rows, l0, results.budget)
        if arm.variant == "batchtopk" and results.ours and l0 == results.side_l0:
            stats = seed_stats(results.ours)
            cells = [fmt_stat(stats[c]) for c in columns]
            how += f", {len(results.ours)} seeds"
        else:
            cells = [fmt(row[c]) if row else "n/a" for c in columns]
        published = PUBLISHED.get(arm.variant) if l0 == PUBLISHED_L0 else None
        pub = " / ".join(fmt(v) for v in published) if published else ""
        lines.append(f"| {arm.variant} ({arm.role}) | {how} | {' | '.join(cells)} | {pub} |")
    if l0 == PUBLISHED_L0:
        mp = " / ".join(fmt(v) for v in PUBLISHED["matching pursuit"])
        empty = " | ".join([""] * len(columns))
        lines.append(f"| matching pursuit (not ours) | | {empty} | {mp} |")
    return "\n".join(lines)


def side_by_side(results: Results) -> str:
    """Our BatchTopK beside SAELens's (its defaults, and its dead-latent window set to ours): the
    seed means, and whether each difference is within SEED_SPREAD x the combined seed std."""
    ours = seed_stats(results.ours)
    peers = {"SAELens": seed_stats(results.theirs)}
    if results.matched:
        peers["SAELens, dead window = ours"] = seed_stats(results.matched)
    keys = ("MCC", "F1", "precision", "recall", "EV", "L0", "dead", "absorption", "samples/s")
    head = " | ".join(f"{name} | ours - {name}" for name in peers)
    lines = [f"| metric | ours (jax-sae-lab) | {head} |", "|---" * (2 + 2 * len(peers)) + "|"]
    for key in keys:
        a, cells = ours.get(key), []
        for stats in peers.values():
            b = stats.get(key)
            if a is None or b is None:
                cells += [fmt_stat(b), "n/a"]
                continue
            delta = a[0] - b[0]
            band = max(SEED_SPREAD * float(np.hypot(a[1], b[1])), MIN_DIFFERENCE)
            noisy = abs(delta) <= band
            mark = "" if key == "samples/s" else (" (within noise)" if noisy else " **(beyond)**")
            cells += [fmt_stat(b), f"{delta:+.3g}{mark}"]
        lines.append(f"| {key} | {fmt_stat(a)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_lines(results: Results, l0: int) -> list[str]:
    """Each research idea against BatchTopK and Matryoshka on the judged metrics; a difference
    counts beyond SEED_SPREAD x the std of our BatchTopK over seeds (the only noise measured)."""
    noise = seed_stats(results.ours) if len(results.ours) > 1 else {}
    readings = {}
    for arm in ARMS:
        rows = results.rows.get((arm.variant, l0))
        if rows is not None:
            readings[arm.variant] = arm_row(arm, rows, l0, results.budget)[0]
    out = []
    for arm in (a for a in ARMS if a.role == "idea" and a.variant in readings):
        for base in BASELINES_OF_IDEAS:
            idea, ref = readings[arm.variant], readings.get(base)
            if idea is None or ref is None:
                out.append(f"* `{arm.variant}` vs `{base}`: not judged (no reading at L0 {l0}).")
                continue
            parts = []
            for key in JUDGED:
                if idea[key] is None or ref[key] is None:
                    parts.append(f"{key} n/a")
                    continue
                delta = idea[key] - ref[key]
                spread = noise.get(key)
                band = max(SEED_SPREAD * spread[1] if spread else 0.0, MIN_DIFFERENCE)
                if abs(delta) <= band:
                    word = "same within seed noise"
                else:
                    better = delta > 0 if key in HIGHER else delta < 0
                    word = "better" if better else "worse"
                parts.append(f"{key} {delta:+.3f} ({word})")
            out.append(f"* `{arm.variant}` vs `{base}`: " + "; ".join(parts))
    return out


def sweep_tables(results: Results, l0: int) -> str:
    """Every member of each swept arm: the coefficient and its metrics."""
    parts = []
    for arm in ARMS:
        rows = results.rows.get((arm.variant, l0))
        if rows is None or len(rows) < 2:
            continue
        if arm.sweep is not None:
            key, scales = arm.sweep[0], arm.sweep[1]
        else:
            key, scales = "lambda", results.budget.lambda_scales
        columns = ("L0", "MCC", "F1", "EV", "recovered", "absorption", "dead")
        lines = [f"| {arm.variant}: {key} x default | " + " | ".join(columns) + " |",
                 "|---" * (len(columns) + 1) + "|"]  # fmt: skip
        lines += [f"| {scale:g} | " + " | ".join(fmt(r[c]) for c in columns) + " |"
                  for scale, r in zip(scales, rows, strict=True)]  # fmt: skip
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(results: Results, path: Path) -> None:
    """MCC and F1 against L0: one line per architecture (its L0 grid or its lambda sweep), the
    published points overlaid, the random decoder's MCC as the chance line."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    markers = "osD^v<>PX*"
    chance = [r["chance MCC"] for rows in results.rows.values() for r in rows if r["chance MCC"]]
    for ax, key in zip(axes, ("MCC", "F1"), strict=True):
        for i, arm in enumerate(ARMS):
            points = sorted(
                (r["L0"], r[key])
                for (variant, _), rows in results.rows.items() if variant == arm.variant
                for r in (rows if arm.sparsity == "l1" or arm.sweep is None else
                          [rows[arm.sweep[1].index(1.0)]])
                if r["L0"] and r[key] is not None
            )  # fmt: skip
            if points:
                ax.plot(*zip(*points, strict=True), marker=markers[i % len(markers)], ms=5,
                        lw=1.2, label=f"{arm.variant} (ours)")  # fmt: skip
        if results.budget.width == 4096:
            index = 0 if key == "MCC" else 1
            for name, published in PUBLISHED.items():
                ax.scatter(PUBLISHED_L0, published[index], marker="*", s=90, color="black",
                           zorder=5)  # fmt: skip
                ax.annotate(name, (PUBLISHED_L0, published[index]), fontsize=7,
                            xytext=(6, -3), textcoords="offset points")  # fmt: skip
            ax.scatter([], [], marker="*", color="black", label="published (200M samples)")
        if key == "MCC" and chance:
            ax.axhline(float(np.mean(chance)), ls="--", color="gray", lw=1,
                       label="random decoder (chance)")  # fmt: skip
        ax.axvline(results.true_l0, ls=":", color="gray", lw=1, label="true L0")
        ax.set(xscale="log", xlabel="L0 (active latents per sample)", ylabel=key,
               title=f"{key} against L0, width {results.budget.width}, "
               f"{results.budget.samples:,} samples ({results.budget.name} budget)")  # fmt: skip
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(results: Results, args: argparse.Namespace, plot_path: Path) -> str:
    b = results.budget
    command = f"python benchmarks/synthsaebench.py --budget {b.name} --seeds {args.seeds}"
    if len(args.arms) < len(ARMS):
        command += " --arms " + ",".join(a.variant for a in args.arms)
    load = os.getloadavg()[0]
    sections = []
    for l0 in results.targets:
        sections.append(f"## Every architecture at L0 {l0}\n\n{main_table(results, l0)}")
    missing = [a.variant for a in args.arms if not any(v == a.variant for v, _ in results.rows)]
    if missing:
        sections.append(
            f"Not finished when this report was written (`--report-only`): {', '.join(missing)}."
        )
    side, seeds = "", len(results.ours)
    steps = b.samples // b.batch_size
    reach = "never reaches" if steps <= SAELENS_DEAD_WINDOW else "reaches"
    window = results.ours_dead_window
    if results.ours and results.theirs:
        side = f"""## BatchTopK: ours beside SAELens's own trainer (L0 {results.side_l0})

Both on the same {b.samples:,} samples in the same batches of {b.batch_size} (SAELens's
`SAETrainer`, configured by `SyntheticSAERunnerConfig`, is fed the rows our loader drew for each
seed), lr {b.lr:g}, width {b.width}, k {results.side_l0}; mean ± std over {seeds} seeds.
A difference is within seed noise when it is at most {SEED_SPREAD:g} x the combined std. samples/s
is training alone (ours: the median logged interval after compilation; SAELens: `fit()`).
SAELens counts a latent dead after `dead_feature_window` = {SAELENS_DEAD_WINDOW} steps without
firing (its default); a run of {steps} steps {reach} that window, and its AuxK acts only on
latents counted dead. Our AuxK's window adapts to 10% of the run ({window} steps); the last
columns give SAELens that same window.

{side_by_side(results)}
"""
    research = "\n".join(
        f"### At L0 {l0}\n\n" + "\n".join(verdict_lines(results, l0)) for l0 in results.targets
    )
    sweeps = "\n\n".join(sweep_tables(results, l0) for l0 in results.targets)
    lr_note = (
        " (the published protocol's)" if b.lr == SAELENS_LR
        else f" (the published {SAELENS_LR:g} is for 195,312 steps)"
    )  # fmt: skip
    if b.trains_on_cache:
        data = (f"Every arm trains on one cache of {b.cache_tokens:,} samples drawn by the "
                "on-device sampler (equal in distribution to SAELens's: "
                "tests/test_synthsaebench.py); "
                "SAELens's evaluation reads its held-out tail")  # fmt: skip
    else:
        data = "Every arm draws fresh samples on the device; SAELens's evaluation draws its own"
    world = (f"a 1024-feature test world in {SMALL_HIDDEN} dimensions" if b.small_world
             else "SynthSAEBench-16k as built by `make synthsaebench-world`")  # fmt: skip
    chances = [r["chance MCC"] for rows in results.rows.values() for r in rows if r["chance MCC"]]
    chance = fmt(float(np.mean(chances))) if chances else "n/a"
    return f"""# SynthSAEBench-16k (`make synthsaebench`)

Command: `{command}`, {datetime.date.today()}, {platform.machine()} with {os.cpu_count()} CPU
cores, load {load:.1f} at the end. Every number here is written by that script.

**Budget `{b.name}`**: width {b.width}, {b.samples:,} training samples per SAE, batch
{b.batch_size} ({b.samples // b.batch_size:,} steps), lr {b.lr:g} for every architecture{lr_note},
all else at each variant's defaults. {data} ({b.eval_samples:,} samples at most).
The published numbers used 200,000,000 samples per SAE: at a smaller budget ours are not expected
to reach them, and the table says how far each architecture gets at this budget.
World: {world}, true L0
{results.true_l0:.1f} on the held-out samples.

Columns: SAELens's `eval_sae_on_synthetic_data` - MCC (Hungarian matching of decoder and true
directions by |cos|), per-latent F1 / precision / recall of each latent against its best-matching
true feature, uniqueness, EV (explained variance), dead latents, L0; and `synth.evaluate`'s
"recovered" (fraction of true features with a decoder row at |cos| > 0.9), "absorption" (among
samples where a child feature's latent fires, the fraction where its parent's latent is silent;
read it with child recall). Chance line: a random unit decoder of the same width has MCC
{chance}.

{(chr(10) * 2).join(sections)}

![MCC and F1 against L0]({plot_path.name})

{side}
## The research question

Does a research idea beat BatchTopK, or Matryoshka, at the published L0? Each idea at its defaults
(one seed) against each baseline, and against TopK, the base of hier_ortho and two_level; a
difference counts only beyond {SEED_SPREAD:g} x the std of our BatchTopK over seeds and beyond
{MIN_DIFFERENCE:g}. Read the L0 column beside it: BatchTopK and Matryoshka infer through a
threshold that this short run leaves high (L0 below 25), while TopK-based arms keep exactly k. A
swept arm's members isolate its term: same architecture, same L0, only the coefficient changes.
temporal does not apply: the samples are independent, no previous token.

{research}

### Sweeps (one vmapped run each)

{sweeps}
"""


def side_by_side_runs(
    l0: int, world: Path, cache: Path, args: argparse.Namespace
) -> tuple[list[Path], list[dict], list[dict]]:
    """Our BatchTopK over seeds (seed 0 is also the table's), scored; then SAELens's, with its
    defaults and with our dead-latent window. With --report-only, whatever is finished."""
    btk = next((a for a in args.arms if a.variant == "batchtopk"), None)
    if btk is None:
        return [], [], []
    if args.report_only:
        found = (scored_members(arm_folder(btk, l0, seed, args)) for seed in range(args.seeds))
        ours = [runs[0] for runs in found if runs]
    else:
        ours = [train_arm(btk, l0, seed, world, cache, args)[0] for seed in range(args.seeds)]
        score(ours, args.budget.eval_samples, world=cache, heldout=args.budget.trains_on_cache)
    peers = [
        [r for s, run in enumerate(ours) if (r := saelens_batchtopk(s, l0, run, cache, args, m))]
        for m in (False, True)
    ]
    return ours, peers[0], peers[1]


def arm_runs(
    targets: tuple[int, ...], world: Path, cache: Path, args: argparse.Namespace
) -> dict[tuple[str, int], list[Path]]:
    """{(variant, target L0): its run folders}, each arm trained and scored in PRIORITY order (an
    L1 arm's lambda sweep is one run, read at every target). With --report-only, whatever is
    finished and scored."""
    folders = {}
    for arm in sorted(args.arms, key=lambda a: PRIORITY.index(a.variant)):
        homes = {l0: targets[0] if arm.sparsity == "l1" else l0 for l0 in targets}
        if args.report_only:
            found = {l0: scored_members(arm_folder(arm, h, 0, args)) for l0, h in homes.items()}
            folders |= {(arm.variant, l0): runs for l0, runs in found.items() if runs}
            continue
        trained = {l0: train_arm(arm, h, 0, world, cache, args) for l0, h in homes.items()}
        folders |= {(arm.variant, l0): runs for l0, runs in trained.items()}
        runs = sorted({f for fs in trained.values() for f in fs})
        score(runs, args.budget.eval_samples, world=cache, heldout=args.budget.trains_on_cache)
    return folders


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not EVAL_PYTHON.exists():
        raise SystemExit("error: .venv-eval is missing; run `make setup-eval` first")
    budget = args.budget
    world = build_world(args)
    cache = build_cache(world, args)
    truth_l0 = true_l0(cache)
    targets = budget.l0_grid or (max(1, round(truth_l0)),)
    side_l0 = PUBLISHED_L0 if PUBLISHED_L0 in targets else targets[0]
    ours, theirs, matched = side_by_side_runs(side_l0, world, cache, args)
    folders = arm_runs(targets, world, cache, args)
    results = Results(
        budget, targets, truth_l0,
        rows={key: [run_row(f) for f in fs] for key, fs in folders.items()},
        ours=[run_row(f) for f in ours],
        theirs=[saelens_row(t) for t in theirs],
        matched=[saelens_row(t) for t in matched],
        ours_dead_window=dead_window_steps(ours[0]) if ours else 0,
        side_l0=side_l0,
    )  # fmt: skip
    args.report.parent.mkdir(parents=True, exist_ok=True)
    plot_path = args.report.with_name("synthsaebench.png")
    plot(results, plot_path)
    args.report.write_text(report(results, args, plot_path))
    record = {"rows": {f"{v}@{l0}": r for (v, l0), r in results.rows.items()},
              "ours": results.ours, "theirs": results.theirs, "matched": results.matched,
              "true_l0": truth_l0}  # fmt: skip
    args.report.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print(args.report.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
