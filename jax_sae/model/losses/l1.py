"""L1 sparsity penalty of the `standard` SAE: lambda * mean_batch sum_i |h_i|."""

import jax.numpy as jnp

from jax_sae.model.losses import LossContext, LossTerm, TermOutput
from jax_sae.model.losses.jumprelu_sparsity import sparsity_scale


class L1Penalty(LossTerm):
    """`coefficient` names lambda's hyper-parameter: `temporal` calls it lambda_1."""

    NAME = "l1"
    ACTS_ON = ("W_enc", "b_enc")

    def __init__(self, coefficient: str = "lambda", default: float = 3.0) -> None:
        self.coefficient = coefficient
        self.HPARAMS = {coefficient: default, "sparsity_warmup_steps": 1000}
        self.HPARAM_DOCS = {
            coefficient: f"L1 coefficient: adds {coefficient} * mean_batch sum_i |h_i| to the loss",
            "sparsity_warmup_steps": "steps over which the L1 coefficient rises linearly from 0",
        }

    def check_hparams(self, hparams, d_in, d_sae):
        if hparams[self.coefficient] < 0:
            raise ValueError(f"{self.coefficient} must be >= 0, got {hparams[self.coefficient]}")

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        l1 = jnp.mean(jnp.sum(jnp.abs(ctx.fwd.h), axis=-1))
        scale = sparsity_scale(ctx.step, ctx.hparams["sparsity_warmup_steps"])
        return TermOutput(ctx.hparams[self.coefficient] * scale * l1, {}, {"l1": l1})
