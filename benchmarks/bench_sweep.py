"""A sweep of N members against N single runs: step time, peak memory, end-to-end wall time.

    python benchmarks/bench_sweep.py [--d 768] [--d-sae 6144] [--members 2 4 8] [--rounds 3]

Each measurement runs in its own process (so peak RSS is its own): it opens the same synthetic
bfloat16 cache through the real Loader, builds the trainer's engine (`jax_sae.training.engine`:
plain for one run, vmapped for a sweep whose members differ in lambda) and times ``--steps``
steps after two warm-up steps. Processes are interleaved (1, 2, 4, 8, 1, 2, ...) so every
configuration sees the same machine load; the verdict per N is the median over rounds of

    sweep step time / (N x single-run step time)        (target <= 1.05)

A sweep reads each batch once for all members (one Loader per group), N single runs read it N
times. ``--end-to-end`` also times ``Trainer.fit`` for a 4-member sweep against the same four
single runs one after the other (compile, training, evaluation, plots included).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_verify import write_cache  # noqa: E402
from jax_sae.training import TrainConfig, Trainer  # noqa: E402
from jax_sae.training.engine import initial_state, make_engine, stack_members  # noqa: E402
from jax_sae.training.resolve import make_loader, open_cache, resolve_run  # noqa: E402

BATCH = 2048
LAMBDAS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def base_config(cache: Path, d_sae: int, steps: int, out: Path) -> TrainConfig:
    return TrainConfig(
        cache=str(cache),
        layer=0,
        variant="standard",
        hparams={"d_sae": d_sae, "warmup_steps": 2},
        steps=steps,
        batch_size=BATCH,
        eval_tokens=BATCH,
        checkpoint_every=10**9,
        out=str(out),
    )


def worker(cache: Path, d_sae: int, members: int, steps: int) -> dict:
    """Seconds per step of one engine of ``members`` SAEs (1: the plain single-run step)."""
    cfg = base_config(cache, d_sae, steps + 2, Path(tempfile.mkdtemp()))
    loader = make_loader(cfg, open_cache(cfg))
    variants = [
        resolve_run(cfg.replace(hparams={**cfg.hparams, "lambda": lam}), loader, Path(cfg.out))
        for lam in LAMBDAS[:members]
    ]
    engine = make_engine([r.variant for r in variants], steps + 2, "float32", members > 1)
    sample = loader.sample(BATCH)
    states = [initial_state(r.variant, 0, steps + 2, sample) for r in variants]
    state = stack_members(states, members > 1)
    times = []
    with loader.batches(0, steps + 2) as batches:
        for step, batch in enumerate(batches):
            start = time.perf_counter()
            state, metrics = engine.step(state, batch, jnp.int32(step))
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"members": members, "step_s": statistics.median(times[2:]), "peak_rss_mb": peak_mb}


def run_worker(cache: Path, d_sae: int, members: int, steps: int) -> dict:
    argv = [sys.executable, __file__, "--worker", str(members), "--cache", str(cache)]
    argv += ["--d-sae", str(d_sae), "--steps", str(steps)]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def end_to_end(cache: Path, d_sae: int, steps: int, tmp: Path) -> dict:
    """Trainer.fit of a 4-member sweep vs the four single runs one after the other."""
    lambdas = LAMBDAS[:4]
    start = time.perf_counter()
    for lam in lambdas:
        cfg = base_config(cache, d_sae, steps, tmp / f"single_{lam}")
        Trainer(cfg.replace(hparams={**cfg.hparams, "lambda": lam})).fit()
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    sweep = [f"lambda={','.join(map(str, lambdas))}"]
    Trainer(base_config(cache, d_sae, steps, tmp / "sweep").replace(sweep=sweep)).fit()
    swept = time.perf_counter() - start
    return {"sequential_s": sequential, "sweep_s": swept, "ratio": swept / sequential}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=6144)
    p.add_argument("--members", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--end-to-end", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.cache, args.d_sae, args.worker, args.steps)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        cache = write_cache(tmp / "cache", args.d, (args.steps + 4) * BATCH * 2 + BATCH)
        results: dict[int, list[dict]] = {n: [] for n in [1, *args.members]}
        for round_ in range(args.rounds):
            for n in results:
                results[n].append(run_worker(cache, args.d_sae, n, args.steps))
                print(f"round {round_ + 1}: {results[n][-1]}", file=sys.stderr)
        single = statistics.median(r["step_s"] for r in results[1])
        print(f"d_in {args.d}, d_sae {args.d_sae}, batch {BATCH}, standard; medians of")
        print(f"{args.rounds} interleaved rounds of {args.steps} timed steps\n")
        print("| members N | sweep step (s) | N x single step (s) | ratio | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        summary = {"single_step_s": single, "d": args.d, "d_sae": args.d_sae, "members": {}}
        for n, rows in results.items():
            step = statistics.median(r["step_s"] for r in rows)
            peak = max(r["peak_rss_mb"] for r in rows)
            ratio = step / (n * single)
            summary["members"][n] = {"step_s": step, "ratio": ratio, "peak_rss_mb": peak}
            print(f"| {n} | {step:.3f} | {n * single:.3f} | {ratio:.3f} | {peak:.0f} |")
        if args.end_to_end:
            summary["end_to_end"] = end_to_end(cache, args.d_sae, 20, tmp)
            e2e = summary["end_to_end"]
            print(
                f"\nTrainer.fit, 4 members x 20 steps: sweep {e2e['sweep_s']:.1f} s, four single "
                f"runs {e2e['sequential_s']:.1f} s, ratio {e2e['ratio']:.2f}"
            )
        if args.json:
            args.json.write_text(json.dumps(summary, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
