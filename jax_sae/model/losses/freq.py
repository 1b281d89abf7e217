"""Frequency-weighted L1 penalty of the `freq` SAE.

State `firing_rate` f in [0, 1]^F, an EMA of how often each latent fires. Each step, BEFORE the
penalty is computed, with m = `rate_decay` and f = 0 at the start:

    r_i = mean_batch 1[h_i > 0]          f <- m f + (1 - m) r         (no gradient through f)
    lambda(t) * mean_batch sum_i (1 + alpha * w_i) |h_i|
        = lambda(t) * L1  (losses/l1.py, the `l1` term)
          + lambda(t) * alpha * mean_batch sum_i w_i |h_i|

with w_i = f_i / mean_j f_j (`freq_norm=mean`, the default) or w = f (`freq_norm=none`), and
lambda(t) the `l1` term's coefficient with its linear warm-up over `sparsity_warmup_steps`.
Latents that fire often pay more per unit of activation, which pushes towards rarer, more
specific latents. The sum runs over latents (a mean over them would make the penalty F times
weaker, too weak to sparsify). This file is the second summand, the frequency weighting that is
the idea; the variant pairs it with the plain L1 term, so the diagnostics report the share of
each (`grad_share/l1`, `grad_share/freq`).

*Why `freq_norm=mean` is the default*: with w = f the weighting adds alpha * f to each latent's
L1 weight, 0.25% for a latent firing on 0.5% of tokens at alpha 0.5: inert at the firing rates
of a sparse code. Normalised, the latent of average rate pays 1 + alpha, one firing 10x as often
as the average 1 + 10 alpha.

`freq_norm=mean` when every f is 0 (only possible before any latent has fired): the normalised
rates are defined as 0, so the penalty is the plain L1 penalty, as it is for f = 0 without the
normalisation.

Metrics: `freq_l1` (weighted, before lambda; the `l1` term logs the unweighted one),
`firing_rate_mean/max`, and the fraction of latents in each decade of f (`RATE_BINS`), so that
the firing-rate histogram over training is in the metrics log (`jax_sae.report.plots` draws it).
"""

import jax
import jax.numpy as jnp

from jax_sae.model.losses import LossContext, LossTerm, TermOutput
from jax_sae.model.losses.jumprelu_sparsity import sparsity_scale

STATE_KEY = "firing_rate"
RATE_DECADES = (-5, -4, -3, -2, -1)
"""Bin edges (log10 f) of the logged firing-rate histogram; f = 0 falls in the lowest bin."""
RATE_BINS = (
    "rate_below_1e-5",
    "rate_1e-5_to_1e-4",
    "rate_1e-4_to_1e-3",
    "rate_1e-3_to_1e-2",
    "rate_1e-2_to_1e-1",
    "rate_above_1e-1",
)
"""Metric names: fraction of latents whose EMA firing rate lies in each bin of `RATE_DECADES`."""


def update_firing_rate(rate: jax.Array, h: jax.Array, decay: float) -> jax.Array:
    """`m f + (1 - m) r` with r the fraction of this batch's tokens on which each latent fired."""
    fired = jnp.mean(jax.lax.stop_gradient(h) > 0, axis=0, dtype=jnp.float32)
    return decay * rate + (1.0 - decay) * fired


def normalised_rate(rate: jax.Array, freq_norm: str) -> jax.Array:
    """The rate that scales the penalty: f itself, or f / mean(f) (0 where every f is 0)."""
    if freq_norm == "none":
        return rate
    mean = jnp.mean(rate)
    return jnp.where(mean > 0, rate / jnp.where(mean > 0, mean, 1.0), 0.0)


def rate_histogram(rate: jax.Array) -> dict[str, jax.Array]:
    """Fraction of latents per bin of `RATE_DECADES` (keys `RATE_BINS`)."""
    edges = jnp.asarray([10.0**e for e in RATE_DECADES], jnp.float32)
    bins = jnp.searchsorted(edges, rate, side="right")  # 0 .. len(edges)
    counts = jnp.zeros(len(RATE_BINS), jnp.float32).at[bins].add(1.0)
    return dict(zip(RATE_BINS, counts / rate.shape[0], strict=True))


class FrequencyWeighting(LossTerm):
    """Reads `lambda` of the `l1` term it is paired with."""

    NAME = "freq"
    ACTS_ON = ("W_enc", "b_enc")
    HPARAMS = {"alpha": 0.5, "rate_decay": 0.99, "freq_norm": "mean"}
    HPARAM_DOCS = {
        "alpha": "frequency weight: each latent pays lambda * (1 + alpha * w_i) per unit of |h_i|",
        "rate_decay": "per-step EMA decay m of each latent's firing rate f (fraction of tokens)",
        "freq_norm": "weight w: mean = f / mean(f) over latents; none = f (inert at sparse rates)",
    }
    CHOICES = {"freq_norm": ("none", "mean")}

    def check_hparams(self, hparams, d_in, d_sae):
        if hparams["alpha"] < 0:
            raise ValueError(f"alpha must be >= 0, got {hparams['alpha']}")
        if not 0 <= hparams["rate_decay"] < 1:
            raise ValueError(f"rate_decay must be in [0, 1), got {hparams['rate_decay']}")

    def init_state(self, d_in, d_sae, hparams):
        return {STATE_KEY: jnp.zeros((d_sae,), jnp.float32)}

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        hp = ctx.hparams
        rate = update_firing_rate(state[STATE_KEY], ctx.fwd.h, hp["rate_decay"])
        extra = hp["alpha"] * normalised_rate(rate, hp["freq_norm"])
        magnitude = jnp.abs(ctx.fwd.h)
        weighted_extra = jnp.mean(jnp.sum(magnitude * extra, axis=-1))  # elementwise: exact f32
        l1 = jnp.mean(jnp.sum(jax.lax.stop_gradient(magnitude), axis=-1))
        metrics = {
            "freq_l1": l1 + jax.lax.stop_gradient(weighted_extra),
            "firing_rate_mean": jnp.mean(rate),
            "firing_rate_max": jnp.max(rate),
            **rate_histogram(rate),
        }
        scale = sparsity_scale(ctx.step, hp["sparsity_warmup_steps"])  # the l1 term's warm-up
        return TermOutput(hp["lambda"] * scale * weighted_extra, {STATE_KEY: rate}, metrics)
