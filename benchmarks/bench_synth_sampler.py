"""SynthSAEBench-16k: our on-device sampler against SAELens's, and against what a step consumes.

    python benchmarks/bench_synth_sampler.py [--world DIR] [--saelens-samples 8192] [--rounds 7]

1. Builds the world if it is missing (``python -m synth.synthsaebench``, evaluation venv) and
   reports the build time.
2. SAELens's sampler (``SyntheticModel.sample_with_features``, batches of 4096) draws
   ``--saelens-samples`` samples of it in the evaluation venv: samples/s, and the statistics of
   ``synth.sampler_stats``.
3. Ours (``jax_sae.data.synthetic.draw``, batches of 1024) and one BatchTopK training step
   (width 4096, k 25, batch 1024: the published protocol's step), timed alternately over
   ``--rounds`` rounds; medians. Goal: the sampler at least 2x the samples/s the step consumes.
4. The equivalence check at 16k: our statistics of 65536 samples against SAELens's.

Prints a markdown section for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jax_sae.data.synthetic import WORLD_JSON, WORLD_TABLES, load_world  # noqa: E402
from jax_sae.model.variants import make_variant  # noqa: E402
from jax_sae.training.optim import make_optimizer  # noqa: E402
from jax_sae.training.step import make_train_step  # noqa: E402
from synth.sampler_stats import CodeStats, correlated_pairs, differences  # noqa: E402

EVAL_PYTHON = REPO / ".venv-eval" / "bin" / "python"
BATCH, WIDTH, K = 1024, 4096, 25
WORLD_16K = "activations_cache/worlds/synthsaebench-16k"


def eval_run(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(EVAL_PYTHON), "-m", "synth.synthsaebench", *args], cwd=REPO, check=True)
    return time.perf_counter() - started


def timed(fn, *args) -> float:
    started = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=Path, default=REPO / WORLD_16K)
    parser.add_argument("--saelens-samples", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    print(f"Load average before: {os.getloadavg()}")
    build = None
    if not (args.world / WORLD_JSON).exists():
        build = eval_run("--out", str(args.world))
    world = load_world(args.world)

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "saelens.npz"
        eval_run("--out", str(args.world), "--stats", str(file), "--samples",
                 str(args.saelens_samples))  # fmt: skip
        theirs = dict(np.load(file))
    saelens_rate = args.saelens_samples / float(theirs["seconds"])

    variant = make_variant("batchtopk", world.d_model, WIDTH, k=K)
    optimizer = make_optimizer(lr=3e-4, warmup_steps=0)
    step = make_train_step(variant, optimizer)
    params = variant.init_params(jax.random.key(0))
    opt_state, reg_state = optimizer.init(params), variant.init_state()
    x = world.draw(jax.random.key(0), BATCH)[0]
    draw_times, step_times = [], []
    for index in range(args.rounds + 1):
        key = jax.random.key(index)
        draw_time = timed(lambda k: world.draw(k, BATCH)[0], key)
        started = time.perf_counter()
        params, opt_state, reg_state, metrics = step(
            params, opt_state, reg_state, {"x": x}, jnp.int32(index)
        )
        jax.block_until_ready(params)
        if index:  # the first round compiles
            draw_times.append(draw_time)
            step_times.append(time.perf_counter() - started)
    ours_rate = BATCH / statistics.median(draw_times)
    step_rate = BATCH / statistics.median(step_times)

    tables = load_file(args.world / WORLD_TABLES)
    stats = CodeStats(correlated_pairs(tables["correlation_factor"], tables["parent"]),
                      tables["parent"], tables["group_members"])  # fmt: skip
    for index in range(64):
        stats.add(np.asarray(world.draw(jax.random.fold_in(jax.random.key(7), index), BATCH)[1]))
    ours = stats.arrays()
    found = differences(theirs, ours)
    l0_theirs, l0_ours = theirs["l0"][0] / theirs["n"], ours["l0"][0] / ours["n"]

    print(f"\n### SynthSAEBench-16k sampler ({jax.devices()[0].device_kind})\n")
    if build is not None:
        print(f"World built (SAELens config classes, our orthogonalisation): {build:.0f} s.\n")
    print("| what | samples/s | vs the step |")
    print("|---|---|---|")
    print(
        f"| SAELens `sample_with_features` (batches of 4096, {args.saelens_samples} samples) "
        f"| {saelens_rate:,.0f} | {saelens_rate / step_rate:.2f}x |"
    )
    print(
        f"| ours, `jax_sae.data.synthetic.draw` (batches of {BATCH}) | {ours_rate:,.0f} "
        f"| {ours_rate / step_rate:.2f}x |"
    )
    print(
        f"| BatchTopK step, width {WIDTH}, k {K}, batch {BATCH} (consumes) | {step_rate:,.0f} | 1 |"
    )
    print(
        f"\nOurs / SAELens: {ours_rate / saelens_rate:.0f}x. Medians of {args.rounds} "
        "alternating rounds (sampler, step)."
    )
    print(
        f"\nEquivalence at 16k ({int(ours['n'])} of ours against {int(theirs['n'])} of "
        f"SAELens's): true L0 {l0_ours:.2f} vs {l0_theirs:.2f}; "
        + ("no statistic differs beyond 5 standard errors." if not found else "; ".join(found))
    )
    print(f"\nLoad average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
