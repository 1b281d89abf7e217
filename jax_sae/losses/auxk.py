"""AuxK auxiliary loss of the TopK family (Gao et al. 2024, SPEC 3.2).

Dead latents (see `losses.dead`) get a gradient by reconstructing what the live ones miss:

    e     = x - stop_gradient(x_hat)                    main residual, a fixed target
    e_hat = relu(topk_{k_aux}(pre restricted to dead latents)) @ W_dec      (no b_dec)
    L_aux = sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2

The normalisation by the batch variance of e makes L_aux scale-free (about 1 for e_hat = 0).
When fewer than k_aux latents are dead only the dead ones are used; when none is dead L_aux is 0
and its matmuls are skipped (`lax.cond`). The loss added is `alpha_aux * L_aux`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jax_sae.activations import topk_relu
from jax_sae.losses import LossContext, LossTerm, TermOutput
from jax_sae.models import matmul


def auxk_loss(
    x: jax.Array,
    x_hat: jax.Array,
    pre: jax.Array,
    dead: jax.Array,
    w_dec: jax.Array,
    k_aux: int,
    compute_dtype=jnp.float32,
) -> jax.Array:
    """L_aux as defined in the module docstring; 0 when no latent is dead."""

    def normalised_aux_error() -> jax.Array:
        h_aux = topk_relu(jnp.where(dead, pre, -jnp.inf), k_aux)
        e = x - lax.stop_gradient(x_hat)
        e_hat = matmul(h_aux, w_dec, compute_dtype)
        error = jnp.sum(jnp.square(e - e_hat))
        variance = jnp.sum(jnp.square(e - jnp.mean(e, axis=0)))
        return error / jnp.maximum(variance, jnp.finfo(variance.dtype).tiny)

    return lax.cond(jnp.any(dead), normalised_aux_error, lambda: jnp.zeros((), jnp.float32))


class AuxK(LossTerm):
    NAME = "aux"
    ACTS_ON = ("W_dec",)
    HPARAMS = {"k_aux": lambda d_in, d_sae: d_in // 2, "alpha_aux": 1 / 32}

    def check_hparams(self, hparams, d_in, d_sae):
        if not 1 <= hparams["k_aux"] <= d_sae:
            raise ValueError(
                f"k_aux={hparams['k_aux']} must be in [1, d_sae={d_sae}]: set a smaller k_aux"
            )
        if hparams["alpha_aux"] < 0:
            raise ValueError(f"alpha_aux must be >= 0, got {hparams['alpha_aux']}")

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        aux = auxk_loss(
            ctx.x,
            ctx.fwd.x_hat,
            ctx.fwd.pre,
            ctx.dead,
            ctx.params["W_dec"],
            ctx.hparams["k_aux"],
            ctx.model.compute_dtype,
        )
        return TermOutput(ctx.hparams["alpha_aux"] * aux, {}, {"aux": aux})
