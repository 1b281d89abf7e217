"""Inference threshold of BatchTopK: an EMA of the smallest activation kept per batch.

State `threshold` (float32 scalar, -1 = not set yet). Each step, with m = `threshold_decay`:
`t_min = min{h > 0}` over the batch; the first time `threshold <- t_min`, afterwards
`threshold <- m * threshold + (1 - m) * t_min`; unchanged if nothing fired. Adds 0 to the loss.
`models.BatchTopKSAE.activate` applies it at inference; the export is a JumpReLU with it.
"""

import jax.numpy as jnp
from jax import lax

from jax_sae.model.losses import LossContext, LossTerm, TermOutput


class BatchTopKThreshold(LossTerm):
    HPARAMS = {"threshold_decay": 0.99}
    HPARAM_DOCS = {
        "threshold_decay": "per-step EMA decay of the inference threshold (least kept activation)",
    }

    def check_hparams(self, hparams, d_in, d_sae):
        if not 0 <= hparams["threshold_decay"] < 1:
            raise ValueError(f"threshold_decay must be in [0, 1), got {hparams['threshold_decay']}")

    def init_state(self, d_in, d_sae, hparams):
        return {"threshold": jnp.full((), -1.0, jnp.float32)}

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        h = lax.stop_gradient(ctx.fwd.h)
        smallest_kept = jnp.min(jnp.where(h > 0, h, jnp.inf))
        old = state["threshold"]
        decay = ctx.hparams["threshold_decay"]
        ema = jnp.where(old < 0, smallest_kept, decay * old + (1 - decay) * smallest_kept)
        new = jnp.where(jnp.isfinite(smallest_kept), ema, old)
        return TermOutput(jnp.zeros((), jnp.float32), {"threshold": new}, {"threshold": new})
