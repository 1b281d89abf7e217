"""Dead-latent tracking, common to every variant.

State `tokens_since_fired [F]`: tokens seen since each latent last fired (h > 0). Float32 on
purpose: it never overflows (int32 would after 2^31 tokens) and stays exact while below 2^24
tokens, or below 2^35 when the batch size is a power of two; beyond that, rounding of a count
that is already far past any sensible `dead_tokens` does not matter. A latent is dead once the
count reaches `dead_tokens` (10M by default, as in Gao et al. 2024).
"""

import jax
import jax.numpy as jnp

HPARAMS = {"dead_tokens": 10_000_000}
HPARAM_DOCS = {
    "dead_tokens": "a latent that has not fired for this many training tokens counts as dead "
    "(AuxK revives it)",
}
STATE_KEY = "tokens_since_fired"


def check_hparams(hparams, d_in: int, d_sae: int) -> None:
    if hparams["dead_tokens"] < 1:
        raise ValueError(f"dead_tokens must be >= 1, got {hparams['dead_tokens']}")


def init_state(d_sae: int) -> dict[str, jax.Array]:
    return {STATE_KEY: jnp.zeros((d_sae,), jnp.float32)}


def update(tokens_since_fired: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Count this batch's tokens; reset latents that fired. Returns (new counts, fired [F])."""
    fired = jnp.any(h > 0, axis=0)
    n_tokens = h.shape[0]
    return jnp.where(fired, 0.0, tokens_since_fired + n_tokens), fired


def dead_mask(tokens_since_fired: jax.Array, dead_tokens: int) -> jax.Array:
    return tokens_since_fired >= dead_tokens
