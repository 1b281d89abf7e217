"""Parameter initialisers for the SAE architectures."""

import jax
import jax.numpy as jnp
import numpy as np

kaiming_uniform = jax.nn.initializers.kaiming_uniform()
"""He/kaiming-uniform with fan-in = the input axis (d for `W_enc [d, F]`): U(+-sqrt(6 / d))."""


def unit_rows(x: jax.Array) -> jax.Array:
    """Scale each row (last axis) of `x` to unit L2 norm; all-zero rows stay zero."""
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, jnp.finfo(x.dtype).tiny)


def unit_rows_kaiming(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Decoder init: kaiming-uniform, then rows normalised."""
    return unit_rows(kaiming_uniform(key, shape, dtype))


def unit_rows_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Decoder init of the TopK family: isotropic random directions (normalised Gaussian rows)."""
    return unit_rows(jax.random.normal(key, shape, dtype))


def geometric_median(
    points: np.ndarray, max_iter: int = 100, rtol: float = 1e-6, eps: float = 1e-8
) -> np.ndarray:
    """Geometric median of the rows of `points` [n, d] by Weiszfeld iterations, in float64.

    The TopK family initialises `b_dec` here (Gao et al. 2024): unlike the mean, the median is not
    dragged by the few very-high-norm tokens of a residual stream. `eps` keeps the weights finite
    when an iterate lands on a data point.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty [n, d] array, got {points.shape}")
    median = points.mean(axis=0)
    for _ in range(max_iter):
        weights = 1.0 / np.maximum(np.linalg.norm(points - median, axis=1), eps)
        new = weights @ points / weights.sum()
        step = np.linalg.norm(new - median)
        median = new
        if step <= rtol * max(float(np.linalg.norm(median)), eps):
            break
    return median.astype(np.float32)
