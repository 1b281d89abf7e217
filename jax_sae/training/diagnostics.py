"""Regulariser diagnostics: does each loss term actually move the weights it is meant to move?

For every term with a loss, on the parameters it acts on
(`LossTerm.ACTS_ON`: the decoder for the orthogonality terms and AuxK, the encoder for sparsity
and temporal terms, the threshold for JumpReLU's L0 penalty),

    grad_share/<term> = ||grad_W(L) - grad_W(L without the term)|| / ||grad_W(L without the term)||

A share of 1e-6 means the term is inert whatever its formula says; a share of 10 means it
dominates its weights. Costs one gradient plus one per term, so the trainer evaluates it every
log interval, outside the jitted training step.
"""

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jax_sae.model.architectures import Params, State
from jax_sae.model.variants import Variant

GradShares = Callable[[Params, State, Mapping[str, jax.Array], jax.Array], dict[str, jax.Array]]


def _norm(grads: Params, names: tuple[str, ...]) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(grads[name])) for name in names))


def diagnosed_terms(variant: Variant) -> tuple[Any, ...]:
    """The variant's terms that add a loss on some parameters (and so have a share)."""
    return tuple(term for term in variant.spec.terms if term.ACTS_ON)


def make_grad_shares(variant: Variant, compute_dtype: Any = jnp.float32) -> GradShares:
    """Jitted `shares(params, state, batch, step) -> {"grad_share/<term>": scalar}`."""
    return jax.jit(grad_shares_body(variant, compute_dtype))


def grad_shares_body(variant: Variant, compute_dtype: Any = jnp.float32) -> GradShares:
    """`make_grad_shares` before jit, to compose with `jax.vmap` (sweeps)."""
    terms = diagnosed_terms(variant)

    def gradient(params, state, batch, step, skip: frozenset[str]) -> Params:
        def total(p):
            return variant.loss(
                p, state, batch, step, compute_dtype=compute_dtype, skip_terms=skip
            )[0]

        return jax.grad(total)(params)

    def shares(params, state, batch, step):
        full = gradient(params, state, batch, step, frozenset())
        out = {}
        for term in terms:
            without = gradient(params, state, batch, step, frozenset({term.NAME}))
            names = tuple(name for name in term.ACTS_ON if name in params)
            difference = {name: full[name] - without[name] for name in names}
            base = _norm(without, names)
            out[f"grad_share/{term.NAME}"] = _norm(difference, names) / jnp.maximum(
                base, jnp.finfo(jnp.float32).tiny
            )
        return out

    return shares
