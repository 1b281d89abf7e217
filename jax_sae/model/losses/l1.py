"""L1 sparsity penalty of the `standard` SAE: lambda * mean_batch sum_i |h_i|."""

import jax.numpy as jnp

from jax_sae.model.losses import LossContext, LossTerm, TermOutput


class L1Penalty(LossTerm):
    """`coefficient` names lambda's hyper-parameter: `temporal` calls it lambda_1."""

    NAME = "l1"
    ACTS_ON = ("W_enc", "b_enc")

    def __init__(self, coefficient: str = "lambda", default: float = 0.04) -> None:
        self.coefficient = coefficient
        self.HPARAMS = {coefficient: default}
        self.HPARAM_DOCS = {
            coefficient: f"L1 coefficient: adds {coefficient} * mean_batch sum_i |h_i| to the loss"
        }

    def check_hparams(self, hparams, d_in, d_sae):
        if hparams[self.coefficient] < 0:
            raise ValueError(f"{self.coefficient} must be >= 0, got {hparams[self.coefficient]}")

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        l1 = jnp.mean(jnp.sum(jnp.abs(ctx.fwd.h), axis=-1))
        return TermOutput(ctx.hparams[self.coefficient] * l1, {}, {"l1": l1})
