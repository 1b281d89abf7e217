"""Optimizer of every variant: Adam with warm-up and unit-norm decoder rows.

`make_optimizer` returns one optax chain:

1. `project_decoder_grads`: remove from each row of a decoder gradient its component parallel to
   the row, so that a small step moves along the unit sphere rather than changing the norm;
   then, if `grad_clip_norm` is set, scale the gradient to at most that global L2 norm (off by
   default: in `benchmarks/bench_peers.py` clipping at 1.0, as SAELens and dictionary_learning
   do, lowered our held-out explained variance);
2. Adam (`adam_b1` 0.9, `adam_b2` 0.999, `adam_eps` 1e-8; `make_optimizer`'s b1, b2, eps);
3. the learning-rate schedule (`make_schedule`);
4. `renormalize_decoder_rows`: turn the update into one that lands on unit-norm rows,
   `update <- normalise_rows(param + update) - param`;
5. `clamp_thresholds`: JumpReLU thresholds (parameters named `threshold`) stay >= 0.

Step 4 is part of the chain (not a separate call after `optax.apply_updates`) so that any plain
optax loop keeps the decoder normalised. Decoder = every parameter whose name starts with
`W_dec`, shape [..., F, d]; rows are the last axis (norm over d, one per latent), never the
other axis (each input dimension across latents), which would not make the dictionary unit-norm.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from jax_sae.model.init import unit_rows
from jax_sae.model.variants import DECAYS

DECODER_PREFIX = "W_dec"
THRESHOLD = "threshold"


def _is_decoder(name: str) -> bool:
    return name.startswith(DECODER_PREFIX)


def _require_params(params, what: str) -> Mapping[str, jax.Array]:
    if params is None:
        raise ValueError(f"{what} needs the parameters: call opt.update(grads, state, params)")
    return params


def remove_parallel_component(grad: jax.Array, rows: jax.Array) -> jax.Array:
    """`grad - (<grad_i, row_i> / |row_i|^2) row_i` for every row i (last axis)."""
    dot = jnp.sum(grad * rows, axis=-1, keepdims=True)
    norm_sq = jnp.sum(rows * rows, axis=-1, keepdims=True)
    return grad - dot / jnp.maximum(norm_sq, jnp.finfo(norm_sq.dtype).tiny) * rows


def project_decoder_grads() -> optax.GradientTransformation:
    """Remove each decoder row's gradient component parallel to the row."""

    def update_fn(updates, state, params=None):
        params = _require_params(params, "project_decoder_grads")
        projected = {
            name: remove_parallel_component(u, params[name]) if _is_decoder(name) else u
            for name, u in updates.items()
        }
        return projected, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def renormalize_decoder_rows() -> optax.GradientTransformation:
    """Change decoder updates so that `param + update` has unit-norm rows."""

    def update_fn(updates, state, params=None):
        params = _require_params(params, "renormalize_decoder_rows")
        renormalized = {
            name: unit_rows(params[name] + u) - params[name] if _is_decoder(name) else u
            for name, u in updates.items()
        }
        return renormalized, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clamp_thresholds() -> optax.GradientTransformation:
    """Change threshold updates so that `param + update >= 0` (JumpReLU's raw theta)."""

    def update_fn(updates, state, params=None):
        params = _require_params(params, "clamp_thresholds")
        clamped = {
            name: jnp.maximum(params[name] + u, 0.0) - params[name] if name == THRESHOLD else u
            for name, u in updates.items()
        }
        return clamped, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_schedule(
    lr: float, warmup_steps: int, total_steps: int | None = None, decay: str = "constant"
) -> optax.Schedule:
    """Learning rate of update number t = 0, 1, ...:

        lr * min(1, (t + 1) / warmup_steps) * decay(p),  p = clip((t - warmup) / (total - warmup))

    with decay(p) = 1 (`constant`), (1 + cos(pi p)) / 2 (`cosine`) or 1 - p (`linear`), reaching
    0 at t = total_steps. The `+ 1` makes the first update use lr / warmup_steps rather than
    wasting it at lr 0.
    """
    if decay not in DECAYS:
        raise ValueError(f"unknown lr decay {decay!r}; valid: {', '.join(DECAYS)}")
    traced = isinstance(lr, jax.Array)  # a sweep's lr, one per member: checked before tracing
    if (not traced and lr <= 0) or warmup_steps < 0:
        raise ValueError(f"need lr > 0 and warmup_steps >= 0, got lr={lr}, {warmup_steps=}")
    if decay != "constant" and (total_steps is None or total_steps <= warmup_steps):
        raise ValueError(
            f"decay={decay} needs total_steps > warmup_steps ({warmup_steps}), got {total_steps}"
        )

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum(1.0, (t + 1) / warmup_steps) if warmup_steps else 1.0
        if decay == "constant":
            return lr * warm
        progress = jnp.clip((t - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
        if decay == "cosine":
            return lr * warm * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return lr * warm * (1 - progress)

    return schedule


def _check_adam(b1: float, b2: float, eps: float) -> None:
    """ValueError naming the hyper-parameter for Adam settings that cannot train (a decay rate of
    1 never forgets, eps 0 divides by zero); a sweep's traced values were checked per member."""
    for name, value in (("adam_b1", b1), ("adam_b2", b2)):
        if not isinstance(value, jax.Array) and not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if not isinstance(eps, jax.Array) and not eps > 0:
        raise ValueError(f"adam_eps must be > 0, got {eps}")


def make_optimizer(
    *,
    lr: float,
    warmup_steps: int,
    total_steps: int | None = None,
    decay: str = "constant",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    grad_clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """The SAE optimizer described in the module docstring."""
    # its default (None) gives the registry no type to check a --set value against
    numeric = isinstance(grad_clip_norm, int | float) and not isinstance(grad_clip_norm, bool)
    if grad_clip_norm is not None and not (numeric and grad_clip_norm > 0):
        raise ValueError(f"grad_clip_norm must be > 0 or None, got {grad_clip_norm!r}")
    _check_adam(b1, b2, eps)
    clip = [] if grad_clip_norm is None else [optax.clip_by_global_norm(grad_clip_norm)]
    return optax.chain(
        project_decoder_grads(),
        *clip,
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(make_schedule(lr, warmup_steps, total_steps, decay)),
        renormalize_decoder_rows(),
        clamp_thresholds(),
    )
