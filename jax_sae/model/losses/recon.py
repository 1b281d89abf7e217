"""Reconstruction loss, common to every variant.

`squared` (default): mean_batch ||x - x_hat||_2^2, the squared error summed over d.
`l2norm`: mean_batch ||x - x_hat||_2, an alternative reconstruction objective.
"""

import jax
import jax.numpy as jnp

HPARAMS = {"recon": "squared"}
HPARAM_DOCS = {
    "recon": "reconstruction loss: squared = mean_batch ||x - x_hat||^2; l2norm: not squared",
}
CHOICES = {"recon": ("squared", "l2norm")}


def reconstruction_loss(x: jax.Array, x_hat: jax.Array, kind: str) -> jax.Array:
    """The batch's reconstruction loss of `kind` ("squared" or "l2norm", module docstring)."""
    squared_norm = jnp.sum(jnp.square(x - x_hat), axis=-1)
    if kind == "squared":
        return jnp.mean(squared_norm)
    # The clamp keeps the gradient of the norm finite for an exactly reconstructed token.
    return jnp.mean(jnp.sqrt(jnp.maximum(squared_norm, jnp.finfo(squared_norm.dtype).tiny)))


def explained_variance(x: jax.Array, x_hat: jax.Array) -> jax.Array:
    """Batch explained variance: 1 - sum ||x - x_hat||^2 / sum ||x - mean_batch(x)||^2."""
    residual = jnp.sum(jnp.square(x - x_hat))
    total = jnp.sum(jnp.square(x - jnp.mean(x, axis=0)))
    return 1.0 - residual / total
