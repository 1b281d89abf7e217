"""Concept-level dead tracking and AuxK of the `two_level` SAE.

`L = L_recon + AuxK on both levels`. The base level (F latents, `fwd.pre`/`fwd.h`) uses the
common dead tracking (`losses.dead`) and the ordinary `AuxK` term; its aux pre-activations are the
un-gated base ones, so a dead child is revived whatever its parent does. This term does the same
for the concept level (F_c latents, `fwd.pre_c`/`fwd.g`, decoder `W_dec_c`) with the same
`auxk_loss`, `dead_tokens` and `alpha_aux`; it uses min(k_aux, F_c) latents, since k_aux
(default d_in / 2) may exceed the number of concepts.

State `concept_tokens_since_fired [F_c]`. Metrics: `aux_c`, `dead_frac_c`, `l0_c`.
"""

import jax
import jax.numpy as jnp

from jax_sae.model.architectures import TwoLevelForward
from jax_sae.model.losses import LossContext, LossTerm, TermOutput
from jax_sae.model.losses import dead as dead_tracking
from jax_sae.model.losses.auxk import auxk_loss

STATE_KEY = "concept_tokens_since_fired"


class ConceptAuxK(LossTerm):
    """Needs the `TwoLevelSAE` architecture and the `AuxK` term (for `k_aux`, `alpha_aux`)."""

    NAME = "aux_c"
    ACTS_ON = ("W_dec_c",)

    def init_state(self, d_in, d_sae, hparams):
        return {STATE_KEY: jnp.zeros((hparams["F_c"],), jnp.float32)}

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        hp = ctx.hparams
        fwd = ctx.fwd
        assert isinstance(fwd, TwoLevelForward), "aux_c needs the two_level architecture"
        g = fwd.g
        counts, _ = dead_tracking.update(state[STATE_KEY], g)
        dead = dead_tracking.dead_mask(counts, hp["dead_tokens"])
        aux = auxk_loss(
            ctx.x,
            fwd.x_hat,
            fwd.pre_c,
            dead,
            ctx.params["W_dec_c"],
            min(hp["k_aux"], g.shape[-1]),
            ctx.model.compute_dtype,
            replicated_dictionary=True,  # the concept level is never split (parallel.layout)
        )
        metrics = {
            "aux_c": aux,
            "dead_frac_c": jnp.mean(dead, dtype=jnp.float32),
            "l0_c": jnp.mean(jnp.sum(jax.lax.stop_gradient(g) > 0, axis=-1, dtype=jnp.float32)),
        }
        return TermOutput(hp["alpha_aux"] * aux, {STATE_KEY: counts}, metrics)
