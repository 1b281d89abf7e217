"""A stand-in trainer for tests/test_stream.py: a few hundred SGD steps on a StreamingLoader's
batches with a checkpoint every ``EVERY`` steps, after which it releases shards, and a resume
from that checkpoint. The final weights depend on every batch in order, so equal weights mean
equal batches.

    python tests/stream_consumer.py CACHE RUN_DIR STEPS
"""

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jax_sae.data.loader import norm_scale  # noqa: E402
from jax_sae.data.stream import Producer, StreamCache, StreamingLoader  # noqa: E402
from jax_sae.util.files import write_json_atomic  # noqa: E402

LAYER = 2
BATCH = 32
WINDOW = 3
SEED = 5
EVAL_TOKENS = 500
EVERY = 4
CHECKPOINT = "checkpoint.npz"
FINAL = "final.npz"


@jax.jit
def sgd_step(w: jax.Array, x: jax.Array, x_prev: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ w)
    return w + 1e-3 * (x.T @ h + x_prev.T @ h) / x.shape[0]


def save_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_stream(cache: Path, producer: Producer | None = None, **kw) -> StreamingLoader:
    stream = StreamCache(cache, producer, poll_s=0.02)
    return StreamingLoader(
        stream,
        LAYER,
        batch_size=BATCH,
        seed=SEED,
        window=WINDOW,
        eval_tokens=EVAL_TOKENS,
        batch_keys=("x", "x_prev", "seq_start"),
        scale=norm_scale(stream, LAYER),
        **kw,
    )


def train(cache: Path, run: Path, steps: int, producer: Producer | None = None) -> list[str]:
    """Train (or resume) to ``steps``; returns the hash of each batch this call read."""
    loader = open_stream(cache, producer)
    w = jnp.asarray(loader.sample(64)[:16].T * 0.1)  # what a fresh run starts from
    start = 0
    if (run / CHECKPOINT).exists():
        saved = np.load(run / CHECKPOINT)
        w, start = jnp.asarray(saved["w"]), int(saved["step"])
    hashes = []
    with loader.batches(start, steps, convert_on_device=False) as batches:
        for step in range(start, steps):
            batch = next(batches)
            hashes.append(
                hashlib.sha256(
                    np.asarray(batch["x"]).tobytes() + np.asarray(batch["x_prev"]).tobytes()
                ).hexdigest()
            )
            w = sgd_step(w, batch["x"], batch["x_prev"])
            if (step + 1) % EVERY == 0 or step + 1 == steps:
                save_atomic(run / CHECKPOINT, w=np.asarray(w), step=np.int64(step + 1))
                loader.release_before(step + 1)
    heldout = sum(float(np.abs(np.tanh(x @ np.asarray(w))).sum()) for x in loader.heldout(100))
    save_atomic(run / FINAL, w=np.asarray(w), heldout=np.float64(heldout))
    write_json_atomic(run / "shards_seen.json", loader.record(steps))
    return hashes


if __name__ == "__main__":
    cache_dir, run_dir, n_steps = sys.argv[1:]
    train(Path(cache_dir), Path(run_dir), int(n_steps))
