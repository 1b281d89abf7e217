"""Matryoshka reconstruction (Bussmann et al. 2025): every nested prefix of the dictionary
reconstructs x on its own.

The latents are ordered and grouped into prefixes of widths m_1 < m_2 < ... < m_K = F. With the
code h of the whole dictionary (the BatchTopK selection is unchanged),

    x_hat_i = sum_{j < m_i} h_j W_dec[j] + b_dec            (b_dec in every prefix)
    L_matryoshka = sum_{i < K} L_recon(x, x_hat_i)

The full-width term L_recon(x, x_hat_K) is the reconstruction loss every variant has, so the
variant's loss is the sum over all K prefixes, each weighted 1, plus AuxK: SAELens's
`MatryoshkaBatchTopKTrainingSAE` (summed, not averaged). Why: early latents must reconstruct x
without help from later ones, so general features settle in the small prefixes instead of being
split up and absorbed by more specific later latents (Bussmann et al.).

`matryoshka_widths` gives the prefixes either as fractions of d_sae ending at 1 (the default,
1/32, 1/8, 1/2, 1: 128, 512, 2048, 4096 latents at d_sae 4096; fractions follow an adapted d_sae)
or as latent counts ending at d_sae.

Cost: one partial decode per group of latents [m_{i-1}, m_i), accumulated, never K full decodes.
Dense path: `h[:, m_{i-1}:m_i] @ W_dec[m_{i-1}:m_i]` for the K - 1 inner groups, together
[B, m_{K-1}] x [m_{K-1}, d]. Sparse path: the forward's selected pairs (`SparseForward`) are
decoded once more, pair p into row `rows[p] (K - 1) + group(cols[p])` (pairs of the last group
weigh 0): the cost of one sparse decode, with no second selection and no second encoder backward,
since the gradient reaches the same differentiable `values`.
"""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jax_sae.model import sparse
from jax_sae.model.architectures import SparseForward, matmul
from jax_sae.model.losses import LossContext, LossTerm, TermOutput, recon

DEFAULT_WIDTHS = (1 / 32, 1 / 8, 1 / 2, 1.0)
"""Prefix widths as fractions of d_sae: 128, 512, 2048, 4096 latents at d_sae 4096."""


def prefix_widths(widths: Sequence[Any], d_sae: int) -> tuple[int, ...]:
    """The latent counts m_1 < ... < m_K = d_sae that `matryoshka_widths` stands for: all ints
    are latent counts, otherwise fractions of d_sae rounded to the nearest latent. ValueError
    (one line, naming the fix) for anything else."""
    fix = (
        "give increasing fractions of d_sae ending at 1 (e.g. [0.03125, 0.125, 0.5, 1]) or "
        f"increasing latent counts ending at d_sae={d_sae}"
    )
    given = f"matryoshka_widths={list(widths)!r}"
    if not widths:
        raise ValueError(f"{given} is not a non-empty list of numbers: {fix}")
    if any(isinstance(w, bool) or not isinstance(w, int | float) for w in widths):
        raise ValueError(f"{given} holds a value that is not a number: {fix}")
    if all(isinstance(w, int) for w in widths):
        counts = tuple(int(w) for w in widths)
        if counts[-1] != d_sae:
            raise ValueError(f"{given}: the last width must be d_sae={d_sae}; {fix}")
    else:
        if not all(0 < w <= 1 for w in widths) or widths[-1] != 1:
            raise ValueError(f"{given}: fractions must lie in (0, 1] and end at 1; {fix}")
        counts = tuple(round(w * d_sae) for w in widths)
    if counts[0] < 1:
        raise ValueError(
            f"{given}: the first prefix has {counts[0]} latents at d_sae={d_sae}; give a larger "
            "first width (each prefix needs at least 1 latent)"
        )
    if any(a >= b for a, b in zip(counts[:-1], counts[1:], strict=True)):
        raise ValueError(
            f"{given} gives prefixes of {list(counts)} latents at d_sae={d_sae}, not strictly "
            f"increasing; {fix}"
        )
    return counts


def dense_group_decodes(
    h: jax.Array, w_dec: jax.Array, ends: tuple[int, ...], compute_dtype: Any
) -> list[jax.Array]:
    """`h[:, a:b] @ W_dec[a:b]` for the groups [0, ends[0]), [ends[0], ends[1]), ... ([B, d])."""
    starts = (0, *ends[:-1])
    return [matmul(h[:, a:b], w_dec[a:b], compute_dtype) for a, b in zip(starts, ends, strict=True)]


def sparse_group_decodes(
    values: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    w_dec: jax.Array,
    ends: tuple[int, ...],
    n_rows: int,
    compute_dtype: Any,
) -> list[jax.Array]:
    """`dense_group_decodes` of the sparse code h[rows, cols] = values, in one pass over the
    pairs: pair p goes to output row `rows[p] * G + group(cols[p])`; pairs beyond the last end
    get weight 0."""
    n_groups = len(ends)
    group = jnp.searchsorted(jnp.asarray(ends, cols.dtype), cols, side="right")
    weights = jnp.where(group < n_groups, values, 0.0)
    out_ids = rows * n_groups + jnp.minimum(group, n_groups - 1)
    decoded = sparse.decode(weights, out_ids, cols, w_dec, n_rows * n_groups, compute_dtype)
    by_group = decoded.reshape(n_rows, n_groups, -1)
    return [by_group[:, g] for g in range(n_groups)]


class MatryoshkaReconstruction(LossTerm):
    NAME = "matryoshka"
    ACTS_ON = ("W_dec", "W_enc")
    HPARAMS = {"matryoshka_widths": DEFAULT_WIDTHS}
    HPARAM_DOCS = {
        "matryoshka_widths": "nested prefixes that each reconstruct x: d_sae fractions or counts",
    }

    def check_hparams(self, hparams, d_in, d_sae):
        prefix_widths(hparams["matryoshka_widths"], d_sae)

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        ends = prefix_widths(ctx.hparams["matryoshka_widths"], ctx.model.d_sae)[:-1]
        if not ends:  # one level: plain BatchTopK
            zero = jnp.zeros((), jnp.float32)
            return TermOutput(zero, {}, {"matryoshka": zero})
        groups = self.group_decodes(ctx, ends)
        x_hat = ctx.params["b_dec"]
        total = jnp.zeros((), jnp.float32)
        metrics = {}
        for end, part in zip(ends, groups, strict=True):
            x_hat = x_hat + part
            loss = recon.reconstruction_loss(ctx.x, x_hat, ctx.hparams["recon"])
            total = total + loss
            metrics[f"recon/{end}"] = lax.stop_gradient(loss)
        metrics["matryoshka"] = lax.stop_gradient(total)
        return TermOutput(total, {}, metrics)

    @staticmethod
    def group_decodes(ctx: LossContext, ends: tuple[int, ...]) -> list[jax.Array]:
        """The inner groups' partial decodes of this batch's code: from the forward's selected
        pairs on the sparse path, from dense slices of h otherwise."""
        fwd, w_dec, compute_dtype = ctx.fwd, ctx.params["W_dec"], ctx.model.compute_dtype
        if isinstance(fwd, SparseForward):
            return sparse_group_decodes(
                fwd.values, fwd.rows, fwd.cols, w_dec, ends, ctx.x.shape[0], compute_dtype
            )
        return dense_group_decodes(fwd.h, w_dec, ends, compute_dtype)
