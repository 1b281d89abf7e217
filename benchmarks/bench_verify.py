"""Cost of checking every shard at training time (checksum + NaN/inf scan on first read).

    python benchmarks/bench_verify.py [--d 768] [--d-sae 768] [--tokens 262144] [--rounds 3]

Times one training epoch (the real Loader and jitted `standard` train step, as train.py runs them)
on a synthetic bfloat16 cache, with the reader's shard checks on and off, in interleaved rounds so
both see the same machine load; also times the checks alone (`ActivationCache.verify`). A narrow,
cheap SAE (d_sae = d) is the unfavourable case: the step is fast, so the fixed cost of reading
every byte once more weighs most. The verdict is the best-of-rounds epoch time with checks over
the one without (target <= 1.05); on a shared machine the checks' own time (``verify_alone_s``,
the same work the checked epoch does once per shard) over the epoch is the steadier number.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jax_sae.data.cache import ActivationCache, CacheWriter  # noqa: E402
from jax_sae.data.loader import Loader  # noqa: E402
from jax_sae.model.variants import make_variant  # noqa: E402
from jax_sae.training.optim import make_optimizer  # noqa: E402
from jax_sae.training.step import make_train_step  # noqa: E402

SHARD_TOKENS = 65_536
BATCH = 2048


def write_cache(path: Path, d: int, tokens: int) -> Path:
    rng = np.random.default_rng(0)
    writer = CacheWriter(
        path, layers=[0], d_model=d, dtype="bfloat16", settings={}, metadata={"model": "bench"}
    )
    for start in range(0, tokens, SHARD_TOKENS):
        n = min(SHARD_TOKENS, tokens - start)
        positions = np.arange(n) % 128 + 1
        writer.write_shard({0: rng.normal(size=(n, d)).astype(np.float32)}, positions, positions, 1)
    writer.finish()
    return path


def epoch_seconds(path: Path, check: bool, variant, step_fn, params, opt_state) -> float:
    """Open the cache afresh (so every shard is checked again) and train one epoch."""
    start = time.perf_counter()
    loader = Loader(ActivationCache(path, check_on_read=check), 0, batch_size=BATCH)
    steps = loader.n_train // BATCH
    state = variant.init_state()
    with loader.batches(0, steps) as batches:
        for step, batch in enumerate(batches):
            params, opt_state, state, metrics = step_fn(
                params, opt_state, state, batch, jnp.int32(step)
            )
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--d-sae", type=int, default=768)
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_verify_"))
    try:
        path = write_cache(tmp / "cache", args.d, args.tokens)
        variant = make_variant("standard", args.d, args.d_sae, warmup_steps=10)
        opt = make_optimizer(lr=variant.hparams["lr"], warmup_steps=10)
        # donated inputs: every epoch gets its own copies of the initial state
        init = variant.init_params(jax.random.PRNGKey(0))

        def run(check: bool) -> float:
            params = jax.tree.map(jnp.array, init)
            return epoch_seconds(path, check, variant, step_fn, params, opt.init(params))

        step_fn = make_train_step(variant, opt)
        run(False)  # compile
        rounds = {"checked": [], "unchecked": []}
        for _ in range(args.rounds):
            rounds["unchecked"].append(run(False))
            rounds["checked"].append(run(True))
        start = time.perf_counter()
        ActivationCache(path).verify()
        verify_s = time.perf_counter() - start
        cache_bytes = args.tokens * args.d * 2
        checked, unchecked = rounds["checked"], rounds["unchecked"]
        result = {
            "d": args.d,
            "d_sae": args.d_sae,
            "tokens": args.tokens,
            "batch": BATCH,
            "cache_MB": cache_bytes / 1e6,
            "epoch_s_unchecked": min(unchecked),
            "epoch_s_checked": min(checked),
            "ratio": min(checked) / min(unchecked),
            "ratio_of_medians": float(np.median(checked) / np.median(unchecked)),
            "verify_alone_s": verify_s,
            "verify_alone_over_epoch": verify_s / min(unchecked),
            "verify_GB_per_s": cache_bytes / verify_s / 1e9,
            "rounds": rounds,
        }
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
