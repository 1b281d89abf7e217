"""AuxK auxiliary loss of the TopK family (Gao et al. 2024).

Dead latents (see `losses.dead`) get a gradient by reconstructing what the live ones miss:

    e     = x - stop_gradient(x_hat)                    main residual, a fixed target
    e_hat = relu(topk_{k_aux}(pre restricted to dead latents)) @ W_dec      (no b_dec)
    L_aux = V_x * sum_b ||e_b - e_hat_b||^2 / sum_b ||e_b - mean_b(e)||^2
    V_x   = stop_gradient(mean_b ||x_b - mean_b(x)||^2)

sparsify trains FVU + alpha_aux * (aux error / variance of e); our reconstruction loss is the
squared error itself (FVU * V_x), so L_aux carries the same factor V_x and alpha_aux keeps Gao's
meaning (1/32). Without it AuxK would be d_in-fold weaker than Gao's on normalised inputs
(E||x||^2 = d_in): 2304x at Gemma's width.
When fewer than k_aux latents are dead only the dead ones are used; when none is dead L_aux is 0
and its work is skipped (`lax.cond`); with alpha_aux = 0 (a Python number) the term is not even
traced. The loss added is `alpha_aux * L_aux`.

Cost: the k_aux dead latents per token are chosen with a top-k, their pre-activations
read with `selected_pre` (a gather, so the sparse path's gradients stay sparse) and decoded with a
gather of their W_dec rows (`sparse.decode`, B x k_aux x d, chunked); never a dense
[B, F] x [F, d] product.
"""

from collections.abc import Callable
from numbers import Number

import jax
import jax.numpy as jnp
from jax import lax

from jax_sae.model import sparse
from jax_sae.model.activations import topk
from jax_sae.model.losses import LossContext, LossTerm, TermOutput

PreAt = Callable[[jax.Array, jax.Array], jax.Array]


def auxk_loss(
    x: jax.Array,
    x_hat: jax.Array,
    pre: jax.Array,
    dead: jax.Array,
    w_dec: jax.Array,
    k_aux: int,
    compute_dtype=jnp.float32,
    pre_at: PreAt | None = None,
    replicated_dictionary: bool = False,
) -> jax.Array:
    """L_aux as defined in the module docstring; 0 when no latent is dead.

    `pre_at(rows, cols)` gives the differentiable pre-activations at those pairs (default
    `pre[rows, cols]`); selection reads `pre` without gradient. `replicated_dictionary`: `w_dec`
    is not split over a mesh's `model` axis (`sparse.decode`'s `replicated_table`).
    """
    pre_at = pre_at or (lambda rows, cols: pre[rows, cols])
    dead = jnp.asarray(dead)

    def normalised_aux_error() -> jax.Array:
        candidates = jnp.where(dead, lax.stop_gradient(pre), -jnp.inf)
        best, chosen = topk(candidates, k_aux)
        rows, cols = sparse.per_row_pairs(chosen)
        is_dead = best.reshape(-1) > -jnp.inf  # fewer than k_aux dead: the rest are live ones
        values = jnp.where(is_dead, jax.nn.relu(pre_at(rows, cols)), 0.0)
        e = x - lax.stop_gradient(x_hat)
        e_hat = sparse.decode(
            values, rows, cols, w_dec, x.shape[0], compute_dtype, True, replicated_dictionary
        )
        error = jnp.sum(jnp.square(e - e_hat))
        variance = jnp.sum(jnp.square(e - jnp.mean(e, axis=0)))
        x_variance = lax.stop_gradient(jnp.mean(jnp.sum(jnp.square(x - jnp.mean(x, 0)), -1)))
        return x_variance * error / jnp.maximum(variance, jnp.finfo(variance.dtype).tiny)

    return lax.cond(jnp.any(dead), normalised_aux_error, lambda: jnp.zeros((), jnp.float32))


class AuxK(LossTerm):
    NAME = "aux"
    ACTS_ON = ("W_dec",)
    HPARAMS = {"k_aux": lambda d_in, d_sae: d_in // 2, "alpha_aux": 1 / 32}
    HPARAM_DOCS = {
        "k_aux": "dead latents per token (largest pre-activations) that reconstruct the residual",
        "alpha_aux": "weight of the AuxK loss (residual error / residual variance); 0: off",
    }

    def check_hparams(self, hparams, d_in, d_sae):
        if not 1 <= hparams["k_aux"] <= d_sae:
            raise ValueError(
                f"k_aux={hparams['k_aux']} must be in [1, d_sae={d_sae}]: set a smaller k_aux"
            )
        if hparams["alpha_aux"] < 0:
            raise ValueError(f"alpha_aux must be >= 0, got {hparams['alpha_aux']}")

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        alpha = ctx.hparams["alpha_aux"]
        if isinstance(alpha, Number) and alpha == 0:
            zero = jnp.zeros((), jnp.float32)
            return TermOutput(zero, {}, {"aux": zero})
        model, variables = ctx.model, {"params": ctx.params}

        def pre_at(rows, cols):
            return model.apply(variables, ctx.x, ctx.fwd.pre, rows, cols, method=model.selected_pre)

        aux = auxk_loss(
            ctx.x,
            ctx.fwd.x_hat,
            ctx.fwd.pre,
            ctx.dead,
            ctx.params["W_dec"],
            ctx.hparams["k_aux"],
            model.compute_dtype,
            pre_at,
        )
        return TermOutput(alpha * aux, {}, {"aux": aux})
