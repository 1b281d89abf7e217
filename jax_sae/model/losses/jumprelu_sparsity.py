"""L0 sparsity penalty of the JumpReLU SAE (Rajamanoharan et al. 2024).

L0     = mean_batch sum_i H(pre_i - theta_i)
L_sp   = sparsity_penalty * (L0 / target_l0 - 1)^2   when target_l0 is set (default 20)
       = sparsity_penalty * L0                       when target_l0 is None
added  = min(1, step / sparsity_warmup_steps) * L_sp  (linear warm-up from 0)

Straight-through gradient of H with the rectangle kernel K of width `bandwidth` (0.1):
d/dtheta_i = -(1 / bandwidth) K((pre_i - theta_i) / bandwidth) and, with `l0_grad_to_pre`
(default), d/dpre_i = +(1 / bandwidth) K(...), so the penalty also lowers W_enc and b_enc
(Anthropic's 2025 recipe; `activations.heaviside`).

*Why these defaults* (`sparsity_penalty` 100, `bandwidth` 0.1, `l0_grad_to_pre` true): with
penalty 1, bandwidth 0.001 and the gradient to theta only, the penalty reaches theta through a
kernel 0.001 wide while the reconstruction gradient raises the pre-activations through W_enc and
b_enc. On the d-64 `basic` world (1024 features; F 1792, target 20, batches of 2048) L0 then ran
away: 17, 22, 28, 28, 29, 31, 35, 43, 53, 59 after 128, 256, ..., 1280 steps. With the penalty
and kernel alone (100, 0.1) it went 17, 22, 25, 23, 22, 22, 22, 22, 22, 22 (up to 24% off); with
the pre-activation gradient as well it stays at 19.9-20.8 over the same 1280 steps
(docs/variants.md; tests/test_baselines_learn.py).
"""

import jax.numpy as jnp

from jax_sae.model.activations import heaviside
from jax_sae.model.losses import LossContext, LossTerm, TermOutput


def sparsity_scale(step, warmup_steps: int):
    """Linear warm-up factor of the sparsity penalty: step / warmup_steps, capped at 1."""
    if warmup_steps == 0:
        return jnp.ones((), jnp.float32)
    return jnp.minimum(1.0, step.astype(jnp.float32) / warmup_steps)


class JumpReLUSparsity(LossTerm):
    NAME = "sparsity"
    ACTS_ON = ("threshold",)
    HPARAMS = {
        "sparsity_penalty": 100.0,
        "target_l0": 20.0,
        "sparsity_warmup_steps": 2000,
        "l0_grad_to_pre": True,
    }
    HPARAM_DOCS = {
        "sparsity_penalty": "weight of the L0 penalty (L0 / target_l0 - 1)^2, or of L0 itself",
        "target_l0": "active latents per token the L0 penalty steers to; None: penalise L0 itself",
        "sparsity_warmup_steps": "steps over which the L0 penalty's weight rises linearly from 0",
        "l0_grad_to_pre": "the L0 penalty's pseudo-gradient also reaches pre (W_enc, b_enc); "
        "false: theta only",
    }
    NULLABLE = frozenset({"target_l0"})

    def check_hparams(self, hparams, d_in, d_sae):
        if hparams["target_l0"] is not None and hparams["target_l0"] <= 0:
            raise ValueError(f"target_l0 must be > 0 or None, got {hparams['target_l0']}")
        if hparams["sparsity_warmup_steps"] < 0:
            raise ValueError(
                f"sparsity_warmup_steps must be >= 0, got {hparams['sparsity_warmup_steps']}"
            )

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        hp = ctx.hparams
        theta = ctx.params["threshold"]
        fired = heaviside(ctx.fwd.pre, theta, hp["bandwidth"], hp["l0_grad_to_pre"])
        l0 = jnp.mean(jnp.sum(fired, axis=-1))
        target = hp["target_l0"]
        sparsity = l0 if target is None else jnp.square(l0 / target - 1.0)
        scale = sparsity_scale(ctx.step, hp["sparsity_warmup_steps"])
        return TermOutput(hp["sparsity_penalty"] * scale * sparsity, {}, {"sparsity": sparsity})
