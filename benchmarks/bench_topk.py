"""Top-k selection primitives on this backend, as ratios in one run.

    python benchmarks/bench_topk.py [--B 2048] [--F 12288] [--k 32] [--rounds 5]

Each candidate returns the k-th largest value of each row of a [B, F] float32 array (what
`topk_relu` needs) or, for `batch`, the (k B)-th largest of the whole array (BatchTopK):

* `top_k min`: `lax.top_k(p, k)[0].min(-1)`
* `top_k [:, -1]`: `lax.top_k(p, k)[0][:, -1]` (the same value, another XLA:CPU lowering)
* `approx_max_k`: `lax.approx_max_k(p, k)[0].min(-1)` (recall 0.95 target; exact on CPU)
* `kth_largest`: the 32-pass bitwise search in `jax_sae.model.activations`
* `topk`: what the library uses (`jax_sae.model.activations.topk`, i.e. `top_k min`)

Each is jitted alone; median of interleaved rounds; the ratio is against `topk` (per row) and
`batch_kth_largest` (batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_sae.model import activations  # noqa: E402


def candidates(k: int) -> dict[str, object]:
    return {
        "top_k min": lambda p: lax.top_k(p, k)[0].min(-1),
        "top_k [:, -1]": lambda p: lax.top_k(p, k)[0][:, -1],
        "approx_max_k": lambda p: lax.approx_max_k(p, k)[0].min(-1),
        "kth_largest": lambda p: activations.kth_largest(p, k),
        "topk": lambda p: activations.topk(p, k)[0].min(-1),
    }


def batch_candidates(n_keep: int) -> dict[str, object]:
    return {
        "batch: top_k min (flat)": lambda p: lax.top_k(p.reshape(-1), n_keep)[0].min(),
        "batch: kth_largest (flat)": lambda p: activations.kth_largest(p.reshape(-1), n_keep),
        "batch: batch_kth_largest": lambda p: activations.batch_kth_largest(p, n_keep),
    }


def median_times(fns: dict[str, object], x: jax.Array, rounds: int) -> dict[str, float]:
    jitted = {name: jax.jit(fn) for name, fn in fns.items()}
    reference = None
    for name, fn in jitted.items():  # compile, and check that all agree
        value = np.asarray(fn(x))
        reference = value if reference is None else reference
        np.testing.assert_array_equal(value, reference, err_msg=name)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in jitted.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(x))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=2048)
    parser.add_argument("--F", type=int, default=12288)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    x = jax.random.normal(jax.random.key(0), (args.B, args.F), jnp.float32)
    print(f"backend {jax.default_backend()}, [B, F] = [{args.B}, {args.F}], k {args.k}\n")
    print("| selection | s (median) | / topk |\n|---|---|---|")
    per_row = median_times(candidates(args.k), x, args.rounds)
    for name, t in per_row.items():
        print(f"| {name} | {t:.4f} | {t / per_row['topk']:.2f} |")
    per_batch = median_times(batch_candidates(args.k * args.B), jax.nn.relu(x), args.rounds)
    base = per_batch["batch: batch_kth_largest"]
    for name, t in per_batch.items():
        print(f"| {name} | {t:.4f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
