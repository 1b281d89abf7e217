"""Feature-clamping interventions for the unlearning experiment, as pure functions.

The rule is SAEBench's `clamp_feature_activation` (`evals/unlearning/utils/intervention.py`,
`anthropic_clamp_resid_SAE_features`): encode the residual x, keep the SAE's error term, set each
selected latent to `-multiplier` on the tokens where it is active (code > 0) and leave it alone
elsewhere, then decode:

    codes   = encode(x)
    clamped = where(selected & (codes > 0), -multiplier, codes)
    x_out   = (x - decode(codes)) + decode(clamped)

SAEBench zeroes all codes of the BOS token first, which makes its residual pass unchanged; here a
row mask `untouched` [B] does that for any rows the caller names (`None`: every row is clamped).

For `two_level` the codes are the joint [h, g] of `Variant.encode` (F base latents, then F_c
concepts; base latent j is a child of concept j // (F / F_c)), and the selection says which
level `clamp` acts on: "base" (base latents j), "concepts" (concepts c) or "coordinated"
(concepts c together with all their children). Clamping follows the encoder's decisions: a
clamped concept's children keep the codes they were given, and an inactive latent is never
touched. Level "base" also serves every single-level variant, whose codes are just h.
`multiplier` is in the units of the codes of `params` (an exported SAE: raw activations).
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_sae.model.architectures import Params, TwoLevelSAE
from jax_sae.model.variants import Variant, VariantError


def clamp_active(codes: jax.Array, selected: jax.Array, multiplier: float) -> jax.Array:
    """`-multiplier` where a selected latent is active (code > 0); every other code unchanged."""
    return jnp.where(selected & (codes > 0), -jnp.asarray(multiplier, codes.dtype), codes)


def clamp_residual(
    variant: Variant,
    params: Params,
    x: jax.Array,
    selected: np.ndarray | jax.Array,
    multiplier: float,
    untouched: jax.Array | None = None,
    state: Any = None,
) -> jax.Array:
    """x with the selected latents clamped and the SAE error term kept (module docstring).

    `selected` [n_codes] bool over the latents of `variant.encode`; rows where `untouched` [B] is
    True come back exactly as given; `state` for variants whose inference reads it (BatchTopK).
    """
    codes = variant.encode(params, x, state)
    error = x - variant.decode(params, codes)
    out = error + variant.decode(params, clamp_active(codes, jnp.asarray(selected), multiplier))
    return out if untouched is None else jnp.where(untouched[:, None], x, out)


def _level_sizes(variant: Variant) -> tuple[int, int]:
    """(base latents F, concepts F_c); F_c = 0 for single-level variants."""
    is_two_level = issubclass(variant.spec.architecture, TwoLevelSAE)
    return variant.d_sae, variant.hparams["F_c"] if is_two_level else 0


def _mask(indices: Sequence[int], size: int, what: str) -> np.ndarray:
    flat = np.asarray(indices, dtype=np.int64).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= size):
        raise VariantError(f"{what} indices must be in [0, {size}), got {flat.tolist()}")
    mask = np.zeros(size, dtype=bool)
    mask[flat] = True
    return mask


def base_selection(variant: Variant, latents: Sequence[int]) -> np.ndarray:
    """Mask over the codes of `variant.encode` selecting base latents `latents`."""
    n_base, n_concepts = _level_sizes(variant)
    return np.concatenate([_mask(latents, n_base, "base latent"), np.zeros(n_concepts, bool)])


def concept_selection(
    variant: Variant, concepts: Sequence[int], with_children: bool = False
) -> np.ndarray:
    """Mask over the joint `two_level` code selecting concepts `concepts` (at F + c) and, if
    `with_children`, every base latent whose parent is one of them."""
    n_base, n_concepts = _level_sizes(variant)
    if n_concepts == 0:
        raise VariantError(
            f"variant {variant.name!r} has no concept level; clamp its base latents (level 'base')"
        )
    chosen = _mask(concepts, n_concepts, "concept")
    children = np.repeat(chosen, n_base // n_concepts) if with_children else np.zeros(n_base, bool)
    return np.concatenate([children, chosen])


LEVELS = ("base", "concepts", "coordinated")
"""What `clamp` clamps: base latents, concepts alone, or concepts with all their children."""


def clamp(
    variant: Variant,
    params: Params,
    x: jax.Array,
    level: str,
    indices: Sequence[int],
    multiplier: float,
    untouched: jax.Array | None = None,
) -> jax.Array:
    """SAEBench's `clamp_feature_activation` of `indices` at `level` (one of `LEVELS`): "base"
    clamps base latents (every variant), "concepts" the `two_level` concepts only, "coordinated"
    those concepts together with all their children."""
    if level == "base":
        selected = base_selection(variant, indices)
    elif level in ("concepts", "coordinated"):
        selected = concept_selection(variant, indices, with_children=level == "coordinated")
    else:
        raise VariantError(f"clamp level {level!r} is unknown; use one of {', '.join(LEVELS)}")
    return clamp_residual(variant, params, x, selected, multiplier, untouched)
