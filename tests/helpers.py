"""Test helpers shared by the variant tests: tolerant comparison, the NumPy backward pass of a
ReLU SAE, and a short real training run."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jax_sae.optim import make_optimizer
from jax_sae.train_step import make_train_step


def assert_close(actual, expected, rtol: float = 2e-5, what: str = "") -> None:
    """float32 JAX against a float64 reference: relative to the reference's largest entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def relu_sae_gradients(p: dict, x: np.ndarray, ref: dict, penalty_grad_h: np.ndarray) -> dict:
    """Analytic gradients of mean ||x - x_hat||^2 + penalty for a ReLU SAE (SPEC 3 notation).

    ``ref`` holds the forward values ``pre``, ``h`` and ``x_hat``; ``penalty_grad_h`` is the
    gradient of the regularisers with respect to h, with whatever the SPEC holds constant
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
