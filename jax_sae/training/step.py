"""The jit-compiled, pure training step."""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jax_sae.model.architectures import Params, State
from jax_sae.model.variants import Variant

TrainStep = Callable[
    [Params, optax.OptState, State, Mapping[str, jax.Array], jax.Array],
    tuple[Params, optax.OptState, State, dict[str, jax.Array]],
]


def make_train_step(
    v: Variant, opt: optax.GradientTransformation, compute_dtype: Any = jnp.float32
) -> TrainStep:
    """`step_fn(params, opt_state, reg_state, batch, step) -> (params, opt_state, reg_state,
    metrics)`, jitted, donating params, optimizer state and regulariser state (update in place).

    `step` is the 0-based update index as an int32 array (a Python int would retrace per value).
    Metrics are device scalars: `v.loss`'s plus `grad_norm`; fetch them every N steps, and stop
    when `loss` is not finite. Parameters and optimizer state stay float32 whatever
    `compute_dtype` the matmuls use (see `jax_sae.model.architectures`).
    """

    return jax.jit(train_step_body(v, opt, compute_dtype), donate_argnums=(0, 1, 2))


def train_step_body(
    v: Variant, opt: optax.GradientTransformation, compute_dtype: Any = jnp.float32
) -> TrainStep:
    """The step of `make_train_step` before jit, to compose with `jax.vmap` (sweeps). Metrics
    stay device scalars (or [N] under vmap)."""

    def step_fn(params, opt_state, reg_state, batch, step):
        grad_fn = jax.value_and_grad(v.loss, has_aux=True)
        (_, (reg_state, metrics)), grads = grad_fn(
            params, reg_state, batch, step, compute_dtype=compute_dtype
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, reg_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step_fn
