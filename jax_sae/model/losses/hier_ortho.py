"""Co-firing-weighted decoder orthogonality of `hier_ortho` (formula and options: docs/variants.md).

TopK SAE + AuxK plus, with unit decoder rows d_i, F latents and chance rate p = k / F,

    L_ortho = lambda_2 / F * sum_{i != j} w_ij |d_i . d_j|
    c_ij = (n_ij + a) / (p n_j + a),   w_ij = min(max(c_ij, c_ji), c_max)

over pairs that co-fire (n_ij co-firings, n_j firings, a = `prior_cofirings`; no gradient
through w). Options: `competition` (max, directional, geometric), `counts` (batch, ema),
`ortho_target` (decoder, activations).

Computation: w_ij = 0 unless i and j fire together, so the default (decoder, batch counts) sums
over each token's k active latents, B k^2 pairs in chunks of `token_chunk` tokens, instead of all
F^2 pairs; the other options visit all pairs in blocks of `block_size` rows, never building an
F x F temporary (memory formulas in docs/variants.md).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jax_sae.model import blockwise, sparse
from jax_sae.model.activations import topk
from jax_sae.model.architectures import Forward, SparseForward, matmul
from jax_sae.model.losses import LossContext, LossTerm, TermOutput

LAMBDA_2_DEFAULT = 3.0
"""Calibrated at the default sizes on normalised inputs (docs/variants.md)."""
COFIRE_KEY = "cofire_ema"
FIRE_KEY = "fire_ema"


def ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """a / b, with 0 where b = 0 (then a = 0 too: co-firing <= firing)."""
    positive = b > 0
    return jnp.where(positive, a / jnp.where(positive, b, 1.0), 0.0)


def competition_weights(
    n_pair: jax.Array,
    n_row: jax.Array,
    n_col: jax.Array,
    chance: float,
    c_max: float,
    mode: str,
    prior: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Pair weights w_ij and gradient shares gamma_ij (module docstring), broadcast elementwise.

    `n_pair` co-firing of row latent i and column latent j, `n_row` firing of i, `n_col` of j,
    `prior` the smoothing pseudo-co-firings a. Pairs that never co-fire get weight 0.
    The gradient of a pair's term |d_i . d_j| w.r.t. d_i is gamma_ij w_ij sign(d_i . d_j) d_j:
    gamma = 2 is the true gradient of the symmetric sum; directional gives it to the rarer row
    only (2 where n_i <= n_j, else 0).
    """

    def smoothed(reference: jax.Array) -> jax.Array:
        return ratio(n_pair + prior, chance * reference + prior)

    if mode == "geometric":
        weight = smoothed(jnp.sqrt(n_row * n_col))
    else:
        weight = jnp.maximum(smoothed(n_col), smoothed(n_row))
    weight = jnp.where(n_pair > 0, jnp.minimum(weight, c_max), 0.0)
    if mode == "directional":
        return weight, jnp.where(n_row <= n_col, 2.0, 0.0)
    return weight, jnp.full_like(weight, 2.0)


def token_pair_decoder_sum(
    w_dec: jax.Array,
    args: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    chance: float,
    c_max: float,
    mode: str,
    prior: float,
    token_chunk: int,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """(sum_{i != j} w_ij |d_i . d_j|, its gradient w.r.t. w_dec) from batch counts, by
    enumerating the active pairs of each token (module docstring).

    args: `active` [B, k] int32 latent indices per token, `valid` [B, k] bool (the latent fired),
    `fires_t` [F, B] 1[h > 0] transposed, `counts` [F] n_j.
    """
    active, valid, fires_t, counts = args
    n_tokens, k = active.shape
    n_chunks = blockwise.n_blocks(n_tokens, token_chunk)
    pad = n_chunks * token_chunk - n_tokens
    active = jnp.pad(active, ((0, pad), (0, 0))).reshape(n_chunks, token_chunk, k)
    valid = jnp.pad(valid, ((0, pad), (0, 0))).reshape(n_chunks, token_chunk, k)
    off_diagonal = ~jnp.eye(k, dtype=bool)

    def chunk_sum(grad, chunk):
        idx, ok = chunk
        rows = w_dec[idx]  # [c, k, d]
        gram = blockwise.einsum("cpd,cqd->cpq", rows, rows, compute_dtype)
        fires = fires_t[idx]  # [c, k, B]
        n_pair = blockwise.einsum("cpb,cqb->cpq", fires, fires, compute_dtype)
        n = counts[idx]
        weight, gamma = competition_weights(
            n_pair, n[:, :, None], n[:, None, :], chance, c_max, mode, prior
        )
        pair = ok[:, :, None] & ok[:, None, :] & off_diagonal
        per_token = jnp.where(pair, weight / jnp.maximum(n_pair, 1.0), 0.0)
        value = jnp.sum(per_token * jnp.abs(gram))
        coef = per_token * gamma * jnp.sign(gram)
        grad_rows = blockwise.einsum("cpq,cqd->cpd", coef, rows, compute_dtype)
        grad = grad.at[idx.reshape(-1)].add(grad_rows.reshape(-1, w_dec.shape[1]))
        return grad, value

    grad, values = lax.scan(chunk_sum, jnp.zeros_like(w_dec), (active, valid))
    return jnp.sum(values), grad


def pair_count_rows(
    source: jax.Array, rows: jax.Array, counts: str, compute_dtype=jnp.float32
) -> jax.Array:
    """[len(rows), F] co-firing statistics of the row latents with every latent: rows of M^T M
    from the transposed [F, B] firing mask (`counts="batch"`; row gathers of M^T keep the matmul
    in the layout XLA:CPU runs fast, gathered columns of M ran 8x slower), or rows of the [F, F]
    EMA state (`"ema"`)."""
    if counts == "batch":
        return matmul(source[rows], source.T, compute_dtype)
    return source[rows]


def block_decoder_sum(
    w_dec: jax.Array,
    args: tuple[jax.Array, jax.Array],
    *,
    counts: str,
    chance: float,
    c_max: float,
    mode: str,
    prior: float,
    block: int,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    """Same as `token_pair_decoder_sum` for any co-firing statistics, over all F^2 pairs by
    blocks of `block` rows. args: firing statistics [F] and their `pair_count_rows` source."""
    fire, source = args
    n_latents = w_dec.shape[0]

    def block_sum(start):
        rows, real = blockwise.block_rows(start, block, n_latents)
        d_rows = w_dec[rows]
        gram = matmul(d_rows, w_dec.T, compute_dtype)  # [block, F]
        n_pair = pair_count_rows(source, rows, counts, compute_dtype)
        weight, gamma = competition_weights(
            n_pair, fire[rows][:, None], fire[None, :], chance, c_max, mode, prior
        )
        keep = real[:, None] & (rows[:, None] != jnp.arange(n_latents)[None, :])
        weight = jnp.where(keep, weight, 0.0)
        grad_rows = matmul(weight * gamma * jnp.sign(gram), w_dec, compute_dtype)
        return jnp.sum(weight * jnp.abs(gram)), grad_rows

    values, grads = blockwise.map_blocks(block_sum, n_latents, block)
    return jnp.sum(values), blockwise.unblock(grads, n_latents)


def activation_gram_sum(
    h: jax.Array,
    fire: jax.Array,
    source: jax.Array,
    *,
    counts: str,
    chance: float,
    c_max: float,
    mode: str,
    prior: float,
    block: int,
    compute_dtype=jnp.float32,
) -> jax.Array:
    """sum_{i, j} w_ij A_ij^2, A = h^T h / B, diagonal included (the reference penalty); by blocks
    of rows, differentiable w.r.t. h. Each block's A rows see a stop-gradient h on the column
    side; the row side gets gamma times its share, which for gamma = 2 is the true gradient."""
    n_tokens, n_latents = h.shape
    h_fixed, h_t = lax.stop_gradient(h), h.T

    @jax.checkpoint  # recompute each block in the backward pass instead of keeping F x F
    def block_sum(start):
        rows, real = blockwise.block_rows(start, block, n_latents)
        gram = matmul(h_t[rows], h_fixed, compute_dtype) / n_tokens  # [block, F]
        fixed = lax.stop_gradient(gram)
        n_pair = pair_count_rows(source, rows, counts, compute_dtype)
        weight, gamma = competition_weights(
            n_pair, fire[rows][:, None], fire[None, :], chance, c_max, mode, prior
        )
        weight = jnp.where(real[:, None], weight, 0.0)
        # value w A^2; gradient (row side only) gamma w d(A^2)
        return jnp.sum(weight * (fixed**2 + gamma * (gram**2 - fixed**2)))

    return jnp.sum(blockwise.map_blocks(block_sum, n_latents, block))


def update_counts(
    cofire: jax.Array, fire: jax.Array, fires_t: jax.Array, decay: float, block: int, compute_dtype
) -> tuple[jax.Array, jax.Array]:
    """EMA of the batch counts n_ij and n_j (module docstring) from the [F, B] transposed firing
    mask, the F x F part block by block."""
    n_latents = fires_t.shape[0]

    def block_update(start):
        rows, _ = blockwise.block_rows(start, block, n_latents)
        batch = pair_count_rows(fires_t, rows, "batch", compute_dtype)
        return decay * cofire[rows] + (1.0 - decay) * batch

    new_cofire = blockwise.unblock(blockwise.map_blocks(block_update, n_latents, block), n_latents)
    new_fire = decay * fire + (1.0 - decay) * jnp.sum(fires_t, axis=1)
    return new_cofire, new_fire


def active_latents(fwd: Forward, fires: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Each token's k largest pre-activations [B, k] and whether they fired: the sparse path's
    own selection (no second top-k), or a top-k of the dense path's pre-activations."""
    if isinstance(fwd, SparseForward):
        active = fwd.cols.reshape(-1, k)
        return active, (lax.stop_gradient(fwd.values) > 0).reshape(active.shape)
    active = topk(lax.stop_gradient(fwd.pre), k)[1]
    at_active = sparse.gather_pairs(fires, *sparse.per_row_pairs(active))
    return active, at_active.reshape(active.shape) > 0


class HierarchicalOrthogonality(LossTerm):
    NAME = "hier_ortho"
    ACTS_ON = ("W_dec",)
    D_IN_SCALED = ("lambda_2",)
    HPARAMS = {
        "lambda_2": LAMBDA_2_DEFAULT,
        "c_max": 10.0,
        "prior_cofirings": 0.25,
        "competition": "max",
        "counts": "batch",
        "counts_decay": 0.99,
        "ortho_target": "decoder",
        "block_size": 1024,
        "token_chunk": 64,
    }
    HPARAM_DOCS = {
        "lambda_2": "weight of (1/F) sum w_ij |d_i . d_j| over co-firing pairs; scales with d_in",
        "c_max": "cap on the pair weight w_ij (co-firing relative to chance)",
        "prior_cofirings": "smoothing a in c_ij = (n_ij + a) / (p n_j + a), in co-firings; 0: raw",
        "competition": "max: max(c_ij, c_ji); directional: gradient to the rarer only; "
        "geometric: by sqrt(n_i n_j)",
        "counts": "co-firing counts: batch = this batch; ema = moving average (F x F state)",
        "counts_decay": "per-step EMA decay of the co-firing counts (counts=ema only)",
        "ortho_target": "decoder: penalise |d_i . d_j|; activations: the reference's h^T h penalty",
        "block_size": "latent rows per block on the all-pairs paths (ema, activations); memory",
        "token_chunk": "tokens per chunk when enumerating co-active pairs (default path); memory",
    }
    CHOICES = {
        "competition": ("max", "directional", "geometric"),
        "counts": ("batch", "ema"),
        "ortho_target": ("decoder", "activations"),
    }

    def check_hparams(self, hparams, d_in, d_sae):
        if d_sae < 2:
            raise ValueError(f"hier_ortho needs d_sae >= 2 (pairs of latents), got {d_sae}")
        for name in ("lambda_2", "c_max", "prior_cofirings"):
            if hparams[name] < 0:
                raise ValueError(f"{name} must be >= 0, got {hparams[name]}")
        if not 0 <= hparams["counts_decay"] < 1:
            raise ValueError(f"counts_decay must be in [0, 1), got {hparams['counts_decay']}")
        for name in ("block_size", "token_chunk"):
            if hparams[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {hparams[name]}")

    def init_state(self, d_in, d_sae, hparams):
        if hparams["counts"] != "ema":
            return {}
        return {
            COFIRE_KEY: jnp.zeros((d_sae, d_sae), jnp.float32),
            FIRE_KEY: jnp.zeros((d_sae,), jnp.float32),
        }

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        hp = ctx.hparams
        dtype = ctx.model.compute_dtype
        h = ctx.fwd.h
        n_latents = h.shape[1]
        fires = (lax.stop_gradient(h) > 0).astype(jnp.float32)
        fires_t = fires.T
        options = {
            "chance": hp["k"] / n_latents,
            "c_max": hp["c_max"],
            "mode": hp["competition"],
            "prior": hp["prior_cofirings"],
            "compute_dtype": dtype,
        }
        if hp["counts"] == "ema":
            cofire, fire = update_counts(
                state[COFIRE_KEY],
                state[FIRE_KEY],
                fires_t,
                hp["counts_decay"],
                hp["block_size"],
                dtype,
            )
            new_state, source = {COFIRE_KEY: cofire, FIRE_KEY: fire}, cofire
        else:
            new_state, fire, source = {}, jnp.sum(fires, axis=0), fires_t
        block_options = {"counts": hp["counts"], "block": hp["block_size"], **options}

        if hp["ortho_target"] == "activations":
            ortho = activation_gram_sum(h, fire, source, **block_options) / n_latents**2
        else:
            args: tuple[jax.Array, ...]  # the pair scheme's inputs; no gradient flows to them
            if hp["counts"] == "batch":
                active, valid = active_latents(ctx.fwd, fires, hp["k"])
                fn = partial(token_pair_decoder_sum, token_chunk=hp["token_chunk"], **options)
                args = (active, valid, fires_t, fire)
            else:
                fn, args = partial(block_decoder_sum, **block_options), (fire, source)
            total = blockwise.value_with_gradient(fn, ctx.params["W_dec"], args)
            ortho = total / n_latents
        return TermOutput(hp["lambda_2"] * ortho, new_state, {"ortho": lax.stop_gradient(ortho)})
