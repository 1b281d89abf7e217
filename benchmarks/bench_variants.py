"""Regularisation overhead: step time of each research variant relative to its base architecture.

    python benchmarks/bench_variants.py [--quick] [--d-in 2304] [--d-sae 16384] [--batch 2048]
        [--only pair_ortho] [--set select_every=1]

Every variant of `BASES` that the registry has (others are listed as missing) runs through the
real jitted train step (`make_train_step` + `make_optimizer`) at the same shapes as its base, and
shares with the base every hyper-parameter both have (e.g. `k`). Base and variant steps are
timed alternately, so a busy machine slows both alike; the ratio of the medians is reported
against the target of `TARGETS`. A variant with a periodic cost (pair_ortho's `select_every` n)
is timed over whole periods (steps rounded up to a multiple of n) and compared by mean step
time, since a median would skip the expensive steps. `--set name=value` overrides a
hyper-parameter of the variants measured. Prints a markdown table (and `--json PATH` writes the
numbers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_sae.model.variants import TRAINING_HPARAMS, VARIANTS, make_variant  # noqa: E402
from jax_sae.training.optim import make_optimizer  # noqa: E402
from jax_sae.training.step import make_train_step  # noqa: E402

BASES = {
    "freq": "standard",
    "temporal": "standard",
    "pair_ortho": "standard",
    "hier_ortho": "topk",
    "two_level": "topk",
}
TARGETS = {"freq": 1.05, "temporal": 1.3, "pair_ortho": 2.0, "hier_ortho": 2.0}
"""Largest acceptable step-time ratio; variants without one are measured for information."""


def make_batch(keys: tuple[str, ...], batch: int, d_in: int, seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    arrays = {
        "x": rng.normal(size=(batch, d_in)).astype(np.float32),
        "x_prev": rng.normal(size=(batch, d_in)).astype(np.float32),
        "seq_start": rng.random(batch) < 1 / 128,
    }
    return {key: jnp.asarray(arrays[key]) for key in keys}


class Stepper:
    """One variant's train step with its own parameters, optimizer and regulariser state."""

    def __init__(self, variant, batch_size: int) -> None:
        opt = make_optimizer(lr=1e-4, warmup_steps=10)
        self.step_fn = make_train_step(variant, opt)
        self.params = variant.init_params(jax.random.key(0))
        self.opt_state = opt.init(self.params)
        self.state = variant.init_state()
        self.batch = make_batch(variant.batch_keys, batch_size, variant.d_in, 0)
        self.count = 0

    def step(self) -> float:
        """Seconds for one step (results fetched, so the time includes the whole step)."""
        start = time.perf_counter()
        self.params, self.opt_state, self.state, metrics = self.step_fn(
            self.params, self.opt_state, self.state, self.batch, jnp.int32(self.count)
        )
        jax.block_until_ready(metrics)
        self.count += 1
        return time.perf_counter() - start


def paired_variants(name: str, d_in: int, d_sae: int, overrides: dict | None = None):
    """(variant, its base) at the same shapes, the base taking the variant's shared hparams."""
    variant = make_variant(name, d_in, d_sae, **(overrides or {}))
    base_defaults = make_variant(BASES[name], d_in, d_sae).hparams
    shared = {
        key: value
        for key, value in variant.hparams.items()
        if key in base_defaults and key not in TRAINING_HPARAMS and key != "lr"
    }
    return variant, make_variant(BASES[name], d_in, d_sae, **shared)


def measure(name: str, args: argparse.Namespace) -> dict:
    variant, base = paired_variants(name, args.d_in, args.d_sae, args.set)
    period = variant.hparams.get("select_every", 1)
    steps = -(-args.steps // period) * period
    steppers = {"base": Stepper(base, args.batch), "variant": Stepper(variant, args.batch)}
    for stepper in steppers.values():  # compile + first run
        for _ in range(args.warmup):
            stepper.step()
    times = {"base": [], "variant": []}
    for _ in range(steps):
        for key in ("base", "variant"):
            times[key].append(steppers[key].step())
    statistic = statistics.median if period == 1 else statistics.mean
    base_s, variant_s = statistic(times["base"]), statistic(times["variant"])
    target = TARGETS.get(name)
    ratio = variant_s / base_s
    return {
        "variant": name,
        "base": BASES[name],
        "base_s": base_s,
        "variant_s": variant_s,
        "ratio": ratio,
        "target": target,
        "ok": None if target is None else ratio <= target,
        "shared_hparams": {k: base.hparams[k] for k in base.hparams if k in variant.hparams},
        "steps": steps,
        "statistic": statistic.__name__,
        "select_every": period,
    }


def table(results: list[dict], missing: list[str], args: argparse.Namespace) -> str:
    lines = [
        f"d_in {args.d_in}, d_sae {args.d_sae}, batch {args.batch}, median of {args.steps} "
        f"alternating steps (mean over whole periods for a periodic cost), "
        f"{jax.default_backend()} ({jax.device_count()} device(s))",
        "",
        "| variant | base | base s/step | variant s/step | ratio | target | meets target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        target = "-" if r["target"] is None else f"<= {r['target']}"
        ok = "info" if r["ok"] is None else ("yes" if r["ok"] else "NO")
        lines.append(
            f"| {r['variant']} | {r['base']} | {r['base_s']:.3f} | {r['variant_s']:.3f} "
            f"| {r['ratio']:.2f}x | {target} | {ok} |"
        )
    lines += [f"| {name} | {BASES[name]} | - | - | - | - | not registered |" for name in missing]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run")
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation)")
    parser.add_argument("--only", nargs="*", help="measure these variants only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="NAME=VALUE", help="override variant hparams"
    )
    args = parser.parse_args(argv)
    args.set = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    if args.quick:
        args.d_in, args.d_sae, args.batch, args.steps = 64, 512, 256, 3
    names = [n for n in BASES if not args.only or n in args.only]
    missing = [n for n in names if n not in VARIANTS]
    results = []
    for name in names:
        if name in VARIANTS:
            results.append(measure(name, args))
            print(f"{name}: {results[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    print(table(results, missing, args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
