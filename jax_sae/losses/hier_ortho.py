"""Hierarchical competition-weighted orthogonality of `hier_ortho` (SPEC 3.6).

TopK SAE + AuxK plus, with unit decoder rows d_i and F latents,

    L_ortho = lambda_2 / (F (F - 1)) * sum_{i != j} w_ij |d_i . d_j|

Co-firing statistics of the batch, M = 1[h > 0] [B, F]: n_ij = (M^T M)_ij, n_j = n_jj.
    c_ij = (n_ij / n_j) / (k / F)    (0 where n_j = 0; equal to the SPEC's n_ij / max(n_j, 1),
                                      since n_ij <= n_j): how much more often i fires when j
                                      fires than chance
    w_ij = min(max(c_ij, c_ji), c_max),   diagonal excluded, no gradient through w.

`competition` (which weights, and which latent of a pair gets the gradient):
  max (default)  as above; d_i gets the true gradient 2 sum_j w_ij sign(d_i . d_j) d_j.
  directional    same loss value; a pair with c_ij > c_ji sends its whole gradient to i, i.e. the
                 pair's term is |d_i . stopgrad(d_j)| (d_i gets what max mode gives it, d_j gets
                 nothing). c_ij / c_ji = n_i / n_j, so the latent that gets the gradient is the one
                 that fires MORE often, the parent of a child that fires only with it. Ties
                 (c_ij = c_ji, i.e. n_i = n_j, frequent with integer counts) carry no direction:
                 both rows get the max-mode gradient.
  symmetric      c_ij = n_ij / min(n_i, n_j) / (k / F) (0 where the minimum is 0) and
                 w_ij = min(c_ij, c_max). Note n_ij / min(n_i, n_j) = max(n_ij / n_j, n_ij / n_i),
                 so these weights equal max mode's exactly (tested): the SPEC's ablation is not
                 a different model as written.

`counts`:
  batch (default)  n from this batch only.
  ema              state `cofire_rate` [F, F] and `fire_rate` [F], exponential moving averages
                   (decay `counts_decay`, 0.99) of n_ij / B and n_j / B, both starting at 0 and
                   updated before the loss; c uses them in place of n. The common zero-start bias
                   factor (1 - decay^t) cancels in the ratio n_ij / n_j, so no bias correction is
                   needed, and decay 0 reproduces `batch` exactly. Opt-in because the F x F state
                   is unavoidable: 4 F^2 bytes (1.3 GiB at F = 18432, 16 GiB at F = 65536), and
                   since every pair that co-fired recently has a weight, the penalty visits all
                   F^2 pairs: O(F^2 (B + d)) flops per step.

`ortho_target`:
  decoder (default)  the penalty above.
  activations        the reference code's penalty on the Gram matrix of the activations,
                     A = h^T h / B, squared, diagonal included:
                     L = lambda_2 / F^2 * sum_{i, j} w_ij A_ij^2 with w_ii = min(c_ii, c_max).
                     Kept to reproduce the old runs only; the gradient reaches the encoder.

Computation. The default (decoder, batch counts) never visits all F^2 pairs: w_ij = 0 unless i and
j fire together on some token, so

    sum_{i != j} w_ij |d_i . d_j| = sum_b sum_{i != j active on b} (w_ij / n_ij) |d_i . d_j|,

and a TopK token has at most k active latents: B k^2 pairs in chunks of c = `token_chunk`
tokens, each chunk gathering its tokens' decoder rows [c, k, d] and firing columns [c, k, B] for
the Gram and co-firing products: O(B k^2 (2 d + B)) flops with the gradient instead of
O(F^2 (2 d + B)) (9x fewer at F 16384, k 120, d 2304, B 2048). Peak memory, float32:
4 (c k (d + B) + 3 c k^2 + F d + F B) bytes (chunk operands, pair tiles, gradient, firing mask).
Latents tied with the k-th largest pre-activation beyond k (probability zero) are not enumerated.
The other options visit all F^2 pairs in blocks of b = `block_size` rows: peak memory
4 (4 b F + b d + F d) bytes beyond the inputs (a block's Gram/co-firing/weight tiles, its
gradient rows, the gradient), plus the F x F state for `counts=ema`; never an F x F temporary.
Decoder penalties compute value and gradient in one pass (`blockwise.value_with_gradient`).
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jax_sae import blockwise
from jax_sae.losses import LossContext, LossTerm, TermOutput
from jax_sae.models import matmul

COFIRE_KEY = "cofire_rate"
FIRE_KEY = "fire_rate"


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
) -> tuple[jax.Array, jax.Array]:
    """Pair weights w_ij and gradient shares gamma_ij (module docstring), broadcast elementwise.

    `n_pair` co-firing of row latent i and column latent j, `n_row` firing of i, `n_col` of j.
    The gradient of a pair's term |d_i . d_j| w.r.t. d_i is gamma_ij w_ij sign(d_i . d_j) d_j:
    gamma = 2 is the true gradient of the symmetric sum; directional uses 2 or 0.
    """
    c_ij = ratio(n_pair, n_col) / chance
    c_ji = ratio(n_pair, n_row) / chance
    if mode == "symmetric":
        weight = jnp.minimum(ratio(n_pair, jnp.minimum(n_row, n_col)) / chance, c_max)
    else:
        weight = jnp.minimum(jnp.maximum(c_ij, c_ji), c_max)
    if mode == "directional":
        return weight, jnp.where(c_ij >= c_ji, 2.0, 0.0)
    return weight, jnp.full_like(weight, 2.0)


def token_pair_decoder_sum(
    w_dec: jax.Array,
    args: tuple[jax.Array, jax.Array, jax.Array, jax.Array],
    *,
    chance: float,
    c_max: float,
    mode: str,
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
            n_pair, n[:, :, None], n[:, None, :], chance, c_max, mode
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
            n_pair, fire[rows][:, None], fire[None, :], chance, c_max, mode
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
            n_pair, fire[rows][:, None], fire[None, :], chance, c_max, mode
        )
        weight = jnp.where(real[:, None], weight, 0.0)
        # value w A^2; gradient (row side only) gamma w d(A^2)
        return jnp.sum(weight * (fixed**2 + gamma * (gram**2 - fixed**2)))

    return jnp.sum(blockwise.map_blocks(block_sum, n_latents, block))


def update_rates(
    cofire: jax.Array, fire: jax.Array, fires_t: jax.Array, decay: float, block: int, compute_dtype
) -> tuple[jax.Array, jax.Array]:
    """EMA of n_ij / B and n_j / B (module docstring) from the [F, B] transposed firing mask, the
    F x F part block by block."""
    n_latents, n_tokens = fires_t.shape

    def block_update(start):
        rows, _ = blockwise.block_rows(start, block, n_latents)
        batch = pair_count_rows(fires_t, rows, "batch", compute_dtype)
        return decay * cofire[rows] + (1.0 - decay) * batch / n_tokens

    new_cofire = blockwise.unblock(blockwise.map_blocks(block_update, n_latents, block), n_latents)
    new_fire = decay * fire + (1.0 - decay) * jnp.sum(fires_t, axis=1) / n_tokens
    return new_cofire, new_fire


class HierarchicalOrthogonality(LossTerm):
    HPARAMS = {
        "lambda_2": 0.01,
        "c_max": 10.0,
        "competition": "max",
        "counts": "batch",
        "counts_decay": 0.99,
        "ortho_target": "decoder",
        "block_size": 1024,
        "token_chunk": 64,
    }
    CHOICES = {
        "competition": ("max", "directional", "symmetric"),
        "counts": ("batch", "ema"),
        "ortho_target": ("decoder", "activations"),
    }

    def check_hparams(self, hparams, d_in, d_sae):
        if d_sae < 2:
            raise ValueError(f"hier_ortho needs d_sae >= 2 (pairs of latents), got {d_sae}")
        for name in ("lambda_2", "c_max"):
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
            "compute_dtype": dtype,
        }
        if hp["counts"] == "ema":
            cofire, fire = update_rates(
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
            if hp["counts"] == "batch":
                pre = lax.stop_gradient(ctx.fwd.pre)
                active = lax.top_k(pre, hp["k"])[1]
                valid = jnp.take_along_axis(fires, active, axis=1) > 0
                fn = partial(token_pair_decoder_sum, token_chunk=hp["token_chunk"], **options)
                args = (active, valid, fires_t, fire)
            else:
                fn, args = partial(block_decoder_sum, **block_options), (fire, source)
            total = blockwise.value_with_gradient(fn, ctx.params["W_dec"], args)
            ortho = total / (n_latents * (n_latents - 1))
        return TermOutput(hp["lambda_2"] * ortho, new_state, {"ortho": lax.stop_gradient(ortho)})
