"""Orthogonality of the instantaneously most co-active latent pairs, `pair_ortho`.

ReLU SAE + L1 plus, with unit decoder rows d_i:

    s_ij   = mean_batch h_i h_j   (i < j; no gradient: selection and weights are constants)
    S      = the K pairs with the largest s_ij, K = max(min_pairs, floor(rho * F (F - 1) / 2)),
             capped at F (F - 1) / 2
    L_pair = tau * N * sum_{(i, j) in S} t_ij |d_i . d_j|,      N = 1 / F

with t_ij = 1 (`tau_mode=fixed`) or t_ij = 1 + s_ij / max s (`tau_mode=adaptive`, max over all
pairs i < j, i.e. the first selected score; the ratio is 0 when max s <= 0).

Normalisation: with N = 1/F the term is the mean over latents of the overlap each latent has
with its selected partners, so tau keeps its meaning across F (a mean over the K selected pairs
would shrink like 1 / F^2). The default tau is calibrated on normalised inputs to a
decoder-gradient share of 2% to 30% at initialisation (measurement in docs/variants.md).

`score_ema=true` selects on an exponential moving average of the scores instead (state
`pair_scores` [F, F], decay `score_ema_decay` 0.95, starting at 0 and updated before the
selection; the zero-start bias is a common factor, which changes neither the selection nor
s / max s). Opt-in: the state is 4 F^2 bytes (1 GiB at F = 16384, 16 GiB at F = 65536).

Selection (`blockwise.top_upper_pairs`): s is computed in b x b tiles (b = `block_size`)
on or above the diagonal, whose candidates go to a buffer that is cut back to the top K. Peak
memory, float32: 4 (F B + b^2 + 3 (K + 32 * 4096) + 2 PAIR_CHUNK d + F d) bytes beyond the
forward pass (transposed codes, a tile, the candidate buffer, gathered decoder rows, gradient).
`topk_method=exact` uses `lax.top_k` (ties go to earlier tiles, then row-major); `approx` uses
`lax.approx_max_k` per tile. The default is `exact` for F <= 16384 and `approx` above, resolved
when the variant is built so the run config records the method that ran; `auto` applies the same
rule at trace time. Cost: the scores take F^2 B flops, F / (10 d) times the flops of the whole
ReLU-SAE step (0.7x at F 16384, d 2304), in tiles that XLA:CPU runs at about half the
efficiency of the encoder matmul: this, not the selection, is the overhead.

`select_every` = n > 1 selects afresh only on steps 0, n, 2n, ... and penalises the stored
selection (state `pair_prev_rows`/`pair_prev_cols`/`pair_prev_scores`, [K]) in between, so the
F^2 B score flops are paid once per n steps; the penalty and its gradient (K pairs x d) are
computed every step on the current decoder. The stored set is at most n - 1 steps old; how much
the set moves in n steps is what `pair_jaccard` reports at the fresh steps (docs/variants.md).
With `score_ema` the EMA is still updated every step; only the selection waits.

Stability: the metric `pair_jaccard` = |S_t & S_prev| / |S_t | S_prev|, S_prev the selection the
step started from: the previous step's with select_every 1, the one n steps back at a fresh step
otherwise (1 on steps that reuse it; 0 at step 0, which has none). Other metrics: `pair_ortho` =
L_pair / tau and `pair_score_max` = max s of the selection in use.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jax_sae.model import blockwise
from jax_sae.model.architectures import matmul
from jax_sae.model.losses import LossContext, LossTerm, TermOutput

TAU_DEFAULT = 60.0
"""Calibrated at the default sizes on normalised inputs (module docstring, docs/variants.md): a
decoder-gradient share of 0.18 at initialisation on `standard`'s base (encoder_init_scale 0.1).
It was 6000 on the template's init, whose reconstruction starts ~18x the input's energy and so
gives the reconstruction gradient ~100x the weight it has at the small tied init."""
SCORES_KEY = "pair_scores"
PREV_ROWS_KEY = "pair_prev_rows"
PREV_COLS_KEY = "pair_prev_cols"
PREV_SCORES_KEY = "pair_prev_scores"
EXACT_MAX_LATENTS = 16384
"""Largest F for which `topk_method` defaults to exact."""
PAIR_CHUNK = 8192
"""Selected pairs whose decoder rows are gathered at once ([PAIR_CHUNK, d] twice)."""


def n_selected(d_sae: int, rho: float, min_pairs: int) -> int:
    """K = max(min_pairs, floor(rho * F (F - 1) / 2)), capped at the number of pairs."""
    total = blockwise.n_upper_pairs(d_sae)
    return min(total, max(min_pairs, int(rho * total)))


def resolve_method(method: str, d_sae: int) -> str:
    if method == "auto":
        return "exact" if d_sae <= EXACT_MAX_LATENTS else "approx"
    return method


def selected_pairs_sum(
    w_dec: jax.Array, args: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """(sum_p coef_p |d_{rows_p} . d_{cols_p}|, its gradient w.r.t. w_dec), in chunks of pairs."""
    rows, cols, coef = args
    n_chunks = blockwise.n_blocks(rows.shape[0], PAIR_CHUNK)
    pad = n_chunks * PAIR_CHUNK - rows.shape[0]
    rows, cols, coef = (
        jnp.pad(a, (0, pad)).reshape(n_chunks, -1) for a in (rows, cols, coef)
    )  # padded pairs (0, 0) have coef 0

    def chunk_sum(grad, chunk):
        r, c, weight = chunk
        d_r, d_c = w_dec[r], w_dec[c]
        dot = jnp.sum(d_r * d_c, axis=1)
        scale = (weight * jnp.sign(dot))[:, None]
        grad = grad.at[r].add(scale * d_c).at[c].add(scale * d_r)
        return grad, jnp.sum(weight * jnp.abs(dot))

    grad, values = lax.scan(chunk_sum, jnp.zeros_like(w_dec), (rows, cols, coef))
    return jnp.sum(values), grad


def jaccard(rows: jax.Array, cols: jax.Array, prev_rows: jax.Array, prev_cols: jax.Array):
    """|A & B| / |A | B| of two sets of K distinct pairs (0 when B is the initial -1 filler)."""
    sorted_rows, sorted_cols = lax.sort(
        (jnp.concatenate([rows, prev_rows]), jnp.concatenate([cols, prev_cols])), num_keys=2
    )
    same = (sorted_rows[1:] == sorted_rows[:-1]) & (sorted_cols[1:] == sorted_cols[:-1])
    common = jnp.sum(same, dtype=jnp.float32)
    value = common / (2 * rows.shape[0] - common)
    return jnp.where(prev_rows[0] < 0, 0.0, value)


def update_scores(
    scores: jax.Array, codes_t: jax.Array, decay: float, block: int, compute_dtype
) -> jax.Array:
    """EMA of h^T h / B over the full [F, F] state, block by block (no second F x F temporary).
    `codes_t` is h^T [F, B]: row gathers of it keep the matmuls in XLA:CPU's fast layout."""
    n_latents, n_tokens = codes_t.shape

    def block_update(start):
        rows, _ = blockwise.block_rows(start, block, n_latents)
        batch = matmul(codes_t[rows], codes_t.T, compute_dtype) / n_tokens
        return decay * scores[rows] + (1.0 - decay) * batch

    return blockwise.unblock(blockwise.map_blocks(block_update, n_latents, block), n_latents)


class PairOrthogonality(LossTerm):
    NAME = "pair_ortho"
    ACTS_ON = ("W_dec",)
    D_IN_SCALED = ("tau",)
    HPARAMS = {
        "tau": TAU_DEFAULT,
        "tau_mode": "fixed",
        "rho": 0.001,
        "min_pairs": 10,
        "score_ema": False,
        "score_ema_decay": 0.95,
        "topk_method": lambda d_in, d_sae: resolve_method("auto", d_sae),
        "block_size": 1024,
        "select_every": 4,
    }
    HPARAM_DOCS = {
        "tau": "weight of (1/F) sum t_ij |d_i . d_j| over the selected pairs; scales with d_in",
        "tau_mode": "pair weight t: fixed = 1; adaptive = 1 + s_ij / max s",
        "rho": "fraction of all latent pairs penalised: the top by s_ij = mean_batch h_i h_j",
        "min_pairs": "least number of pairs penalised, whatever rho",
        "score_ema": "select pairs on an EMA of s_ij instead of this batch's (F x F state)",
        "score_ema_decay": "per-step EMA decay of the pair scores (score_ema only)",
        "topk_method": "pair selection: lax.top_k or lax.approx_max_k; auto: exact to F 16384",
        "block_size": "tile size b of the blockwise pair scores (b x b tiles); memory",
        "select_every": "select the pairs every n steps, penalise the stored set in between",
    }
    CHOICES = {"tau_mode": ("fixed", "adaptive"), "topk_method": ("exact", "approx", "auto")}

    def check_hparams(self, hparams, d_in, d_sae):
        if d_sae < 2:
            raise ValueError(f"pair_ortho needs d_sae >= 2 (pairs of latents), got {d_sae}")
        if hparams["tau"] < 0:
            raise ValueError(f"tau must be >= 0, got {hparams['tau']}")
        if not 0 <= hparams["rho"] <= 1:
            raise ValueError(f"rho must be in [0, 1], got {hparams['rho']}")
        if hparams["min_pairs"] < 1:
            raise ValueError(f"min_pairs must be >= 1, got {hparams['min_pairs']}")
        if not 0 <= hparams["score_ema_decay"] < 1:
            raise ValueError(f"score_ema_decay must be in [0, 1), got {hparams['score_ema_decay']}")
        if hparams["block_size"] < 1:
            raise ValueError(f"block_size must be >= 1, got {hparams['block_size']}")
        if hparams["select_every"] < 1:
            raise ValueError(f"select_every must be an integer >= 1, got {hparams['select_every']}")

    def init_state(self, d_in, d_sae, hparams):
        k = n_selected(d_sae, hparams["rho"], hparams["min_pairs"])
        state = {
            PREV_ROWS_KEY: jnp.full((k,), -1, jnp.int32),
            PREV_COLS_KEY: jnp.full((k,), -1, jnp.int32),
            PREV_SCORES_KEY: jnp.zeros((k,), jnp.float32),
        }
        if hparams["score_ema"]:
            state[SCORES_KEY] = jnp.zeros((d_sae, d_sae), jnp.float32)
        return state

    def __call__(self, ctx: LossContext, state) -> TermOutput:
        hp = ctx.hparams
        dtype = ctx.model.compute_dtype
        codes_t = lax.stop_gradient(ctx.fwd.h).T  # [F, B]: latents' rows, see update_scores
        n_latents, n_tokens = codes_t.shape
        block = hp["block_size"]
        k = n_selected(n_latents, hp["rho"], hp["min_pairs"])
        new_state = {}
        if hp["score_ema"]:
            scores = update_scores(state[SCORES_KEY], codes_t, hp["score_ema_decay"], block, dtype)
            new_state[SCORES_KEY] = scores

            def tile(row0, col0):
                rows, _ = blockwise.block_rows(row0, block, n_latents)
                cols, _ = blockwise.block_rows(col0, block, n_latents)
                return scores[rows][:, cols]

        else:

            def tile(row0, col0):
                rows, _ = blockwise.block_rows(row0, block, n_latents)
                cols, _ = blockwise.block_rows(col0, block, n_latents)
                return matmul(codes_t[rows], codes_t[cols].T, dtype) / n_tokens

        method = resolve_method(hp["topk_method"], n_latents)

        def fresh() -> blockwise.TopPairs:
            return blockwise.top_upper_pairs(tile, n_latents, k, block, method)

        previous = blockwise.TopPairs(
            state[PREV_SCORES_KEY], state[PREV_ROWS_KEY], state[PREV_COLS_KEY]
        )
        if hp["select_every"] == 1:
            top = fresh()
        else:
            # a predicate of the step alone stays a branch under a sweep's vmap
            top = lax.cond(ctx.step % hp["select_every"] == 0, fresh, lambda: previous)
        top_score = top.values[0]
        if hp["tau_mode"] == "adaptive":
            relative = jnp.where(
                top_score > 0, top.values / jnp.where(top_score > 0, top_score, 1), 0
            )
            weight = 1.0 + relative
        else:
            weight = jnp.ones_like(top.values)
        args = (top.rows, top.cols, weight / n_latents)
        penalty = blockwise.value_with_gradient(selected_pairs_sum, ctx.params["W_dec"], args)
        new_state[PREV_ROWS_KEY], new_state[PREV_COLS_KEY] = top.rows, top.cols
        new_state[PREV_SCORES_KEY] = top.values
        metrics = {
            "pair_ortho": lax.stop_gradient(penalty),
            "pair_jaccard": jaccard(top.rows, top.cols, state[PREV_ROWS_KEY], state[PREV_COLS_KEY]),
            "pair_score_max": top_score,
        }
        return TermOutput(hp["tau"] * penalty, new_state, metrics)
