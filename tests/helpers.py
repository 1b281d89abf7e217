"""Test helpers shared by the variant tests: tolerant comparison, the NumPy backward pass of a
ReLU SAE, a short real training run, and in-place damage to a cache."""

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jax_sae.data.cache import MANIFEST, STORAGE_DTYPES, scan_array, shard_file
from jax_sae.training.optim import make_optimizer
from jax_sae.training.step import make_train_step
from jax_sae.util.files import write_json_atomic


def assert_close(actual, expected, rtol: float = 2e-5, what: str = "") -> None:
    """float32 JAX against a float64 reference: relative to the reference's largest entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def relu_sae_gradients(p: dict, x: np.ndarray, ref: dict, penalty_grad_h: np.ndarray) -> dict:
    """Analytic gradients of mean ||x - x_hat||^2 + penalty for a ReLU SAE (notation of
    docs/variants.md).

    ``ref`` holds the forward values ``pre``, ``h`` and ``x_hat``; ``penalty_grad_h`` is the
    gradient of the regularisers with respect to h, with whatever the formula holds constant
    (stop-gradients) already treated as constant by the caller.
    """
    n = x.shape[0]
    g_xhat = -2.0 / n * (x - ref["x_hat"])
    g_pre = (g_xhat @ p["W_dec"].T + penalty_grad_h) * (ref["pre"] > 0)
    return {
        "W_enc": (x - p["b_dec"]).T @ g_pre,
        "b_enc": g_pre.sum(axis=0),
        "W_dec": ref["h"].T @ g_xhat,
        "b_dec": g_xhat.sum(axis=0) - p["W_enc"] @ g_pre.sum(axis=0),
    }


def train_briefly(
    variant, params: dict, next_batch: Callable[[int], dict], held_out: dict, steps: int = 60
) -> tuple[float, float, dict, dict, dict]:
    """Run the real jitted train step; returns (loss before, loss after, params, state, metrics)."""
    opt = make_optimizer(lr=variant.hparams["lr"], warmup_steps=variant.hparams["warmup_steps"])
    step_fn = make_train_step(variant, opt)
    loss_fn = jax.jit(variant.loss)
    before, _ = loss_fn(params, variant.init_state(), held_out, 0)
    opt_state, state, metrics = opt.init(params), variant.init_state(), {}
    for step in range(steps):
        params, opt_state, state, metrics = step_fn(
            params, opt_state, state, next_batch(step), jnp.int32(step)
        )
    after, _ = loss_fn(params, variant.init_state(), held_out, 0)
    return float(before), float(after), params, state, metrics


def poke_cache(
    cache: Path, kind: str, row: int, value: float, column: int = 0, keep_checksum: bool = False
) -> Path:
    """Overwrite one stored value of cache row ``row`` in place; returns the shard file.

    ``keep_checksum`` recomputes the manifest's CRC32, as a cache written by a tool that never
    checked its values would have it (the damage is then visible only in the values).
    """
    manifest = json.loads((cache / MANIFEST).read_text())
    offsets = np.cumsum([0] + [s["n_tokens"] for s in manifest["shards"]])
    position = int(np.searchsorted(offsets, row, side="right")) - 1
    shard = manifest["shards"][position]
    file = cache / shard_file(kind, shard["index"])
    array = np.load(file, mmap_mode="r+")
    if kind.startswith("L"):
        array = array.view(STORAGE_DTYPES[manifest["dtype"]])
        array[row - offsets[position], column] = value
    else:
        array[row - offsets[position]] = value
    array.flush()
    if keep_checksum:
        shard["crc32"][kind] = scan_array(array, check_finite=False)[0]
        write_json_atomic(cache / MANIFEST, manifest)
    return file
