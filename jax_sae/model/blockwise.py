"""Products over pairs of latents (F x F) in bounded memory, for the pair regularisers.

`hier_ortho` and `pair_ortho` read statistics of every pair of the F latents:
decoder Gram entries d_i . d_j, co-firing counts (M^T M)_ij, pair scores (h^T h)_ij / B. One F x F
float32 matrix is 1 GiB at F = 16384 and 16 GiB at F = 65536, so nothing here materialises one:
the callers work on blocks of `block` rows (or `block x block` tiles) and keep O(block * F) alive.

* `block_rows` - the row indices of one block, clipped into range, plus which ones are real; a
  gather with clipped indices needs no padded copy of the F-row operand.
* `value_with_gradient` - a custom VJP for penalties that produce their value and their gradient
  in the same blockwise pass: the F x F products are the cost, so they are computed once, not
  again in the backward pass, and the residual is the [F, d] gradient instead of F x F tiles.
* `top_upper_pairs` - exact (or approximate) top-k of the strict upper triangle of an F x F score
  matrix given tile by tile.
"""

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SMALL_CANDIDATES = 4096
"""Tiles with at most this many scores above the current threshold take a cheap small top-k."""
FLUSH_TILES = 32
"""`top_upper_pairs` cuts its candidate buffer back to the top k after this many small tiles."""
APPROX_RECALL = 0.95
"""Recall target of `lax.approx_max_k` for `method="approx"`."""


def einsum(spec: str, a: jax.Array, b: jax.Array, compute_dtype: Any) -> jax.Array:
    """`jnp.einsum(spec, a, b)` with a float32 result, in `compute_dtype` like `models.matmul`:
    true fp32 (`Precision.HIGHEST`) for float32, else those operands with fp32 accumulation
    (exact for 0/1 operands, e.g. co-firing counts, whatever the dtype)."""
    if jnp.dtype(compute_dtype) == jnp.float32:
        return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)
    return jnp.einsum(
        spec, a.astype(compute_dtype), b.astype(compute_dtype), preferred_element_type=jnp.float32
    )


def n_blocks(n: int, block: int) -> int:
    return -(-n // block)


def block_rows(start: jax.Array, block: int, n: int) -> tuple[jax.Array, jax.Array]:
    """Indices `start .. start + block - 1` clipped to `n - 1`, and a mask of those < n."""
    rows = start + jnp.arange(block)
    return jnp.minimum(rows, n - 1), rows < n


def map_blocks(fn: Callable[[jax.Array], Any], n: int, block: int) -> Any:
    """`[fn(start) for start in 0, block, 2 * block, ...]` stacked, as one `lax.map` (a loop,
    so only one block's intermediates are alive at a time)."""
    starts = jnp.arange(n_blocks(n, block), dtype=jnp.int32) * block
    return lax.map(fn, starts)


def unblock(stacked: jax.Array, n: int) -> jax.Array:
    """[n_blocks, block, ...] outputs of `map_blocks` -> [n, ...] (drops the padding rows)."""
    return stacked.reshape(-1, *stacked.shape[2:])[:n]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def value_with_gradient(fn: Callable, w: jax.Array, args: Any) -> jax.Array:
    """`fn(w, args)[0]` where `fn(w, args) -> (value, d value / d w)` computes both in one pass.

    Differentiable in `w` only (the gradient `fn` returns, which may deliberately differ from the
    true derivative, e.g. a stop-gradient on one side of a pair); `args` get no gradient.
    """
    return fn(w, args)[0]


def _value_with_gradient_fwd(fn, w, args):
    value, grad = fn(w, args)
    return value, (grad, args)


def _value_with_gradient_bwd(fn, residuals, cotangent):
    grad, args = residuals
    return cotangent * grad, jax.tree.map(_zero_cotangent, args)


def _zero_cotangent(x: jax.Array) -> jax.Array | np.ndarray:
    """Zeros of a float input; a float0 numpy array (JAX's symbolic zero) of an integer one."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


value_with_gradient.defvjp(_value_with_gradient_fwd, _value_with_gradient_bwd)


class TopPairs(NamedTuple):
    """k pairs (rows[p], cols[p]) with rows < cols, by descending score `values`."""

    values: jax.Array  # [k] float32
    rows: jax.Array  # [k] int32
    cols: jax.Array  # [k] int32


def n_upper_pairs(n: int) -> int:
    return n * (n - 1) // 2


def top_upper_pairs(
    tile_scores: Callable[[jax.Array, jax.Array], jax.Array],
    n: int,
    k: int,
    block: int,
    method: str = "exact",
) -> TopPairs:
    """The k largest entries (i < j) of an n x n score matrix, visiting `block x block` tiles.

    `tile_scores(row_start, col_start)` returns the [block, block] tile of rows
    `row_start + (0..block-1)` and columns `col_start + ...` (entries past n are ignored, any
    value). Only tiles on or above the diagonal are visited, row-block major.

    Candidates go into a buffer of k + `FLUSH_TILES` * s slots (s = `SMALL_CANDIDATES`); a full
    buffer is flushed, i.e. cut to its top k, whose k-th value becomes the threshold t (a lower
    bound of the final k-th value: scores <= t can no longer enter). A tile with at most s scores
    above t appends its top s (exact: nothing else in it can enter); a tile with more (the first
    ones, or an unusually rich one) is merged at once with the flushed buffer through its own
    top k. (Merging every tile into a sorted top-k list instead costs a top-k over k + s values
    per tile: about half a ReLU-SAE step more at F 16384.) Peak memory O(k + block^2).

    `method="exact"` uses `lax.top_k`; ties are broken towards earlier tiles and, inside a tile,
    row-major. `method="approx"` takes each tile's candidates with `lax.approx_max_k` (recall
    target `APPROX_RECALL`; exact on backends without an approximate kernel); the flushes stay
    exact.
    """
    if not 1 <= k <= n_upper_pairs(n):
        raise ValueError(f"k must be in [1, {n_upper_pairs(n)}] for n={n}, got {k}")
    if method not in ("exact", "approx"):
        raise ValueError(f"unknown top-k method {method!r}; valid: exact, approx")
    starts = np.arange(n_blocks(n, block), dtype=np.int32) * block
    tile_i, tile_j = np.triu_indices(len(starts))
    per_tile = min(k, block * block)
    small = min(per_tile, SMALL_CANDIDATES)
    capacity = k + FLUSH_TILES * small
    local = np.arange(block, dtype=np.int32)

    def candidates(scores, row0, col0, size: int) -> TopPairs:
        if method == "approx" and size < scores.size:
            values, flat = lax.approx_max_k(scores, size, recall_target=APPROX_RECALL)
        else:
            values, flat = lax.top_k(scores, size)
        return TopPairs(values, row0 + flat // block, col0 + flat % block)

    def top_k_of(pairs: TopPairs) -> TopPairs:
        values, keep = lax.top_k(pairs.values, k)
        return TopPairs(values, pairs.rows[keep], pairs.cols[keep])

    def refill(top: TopPairs) -> tuple[TopPairs, jax.Array, jax.Array]:
        """A buffer holding `top` (k pairs) then empty slots; its fill level and threshold."""
        empty = capacity - k
        buffer = TopPairs(
            jnp.concatenate([top.values, jnp.full((empty,), -jnp.inf, jnp.float32)]),
            jnp.concatenate([top.rows, jnp.zeros((empty,), jnp.int32)]),
            jnp.concatenate([top.cols, jnp.zeros((empty,), jnp.int32)]),
        )
        return buffer, jnp.int32(k), top.values[-1]

    def append(carry, scores, row0, col0):
        buffer, fill, threshold = lax.cond(
            carry[1] + small > capacity, lambda: refill(top_k_of(carry[0])), lambda: carry
        )
        new = candidates(scores, row0, col0, small)
        new = new._replace(values=jnp.where(new.values > threshold, new.values, -jnp.inf))
        buffer = TopPairs(
            *(lax.dynamic_update_slice(b, a, (fill,)) for b, a in zip(buffer, new, strict=True))
        )
        return buffer, fill + small, threshold

    def merge(carry, scores, row0, col0):
        best = top_k_of(carry[0])
        new = candidates(scores, row0, col0, per_tile)
        return refill(
            top_k_of(TopPairs(*(jnp.concatenate(p) for p in zip(best, new, strict=True))))
        )

    def visit(carry, tile):
        row0, col0 = tile
        rows, cols = row0 + local[:, None], col0 + local[None, :]
        scores = jnp.where((rows < cols) & (cols < n), tile_scores(row0, col0), -jnp.inf)
        scores = scores.astype(jnp.float32).reshape(-1)
        if small == per_tile:  # tiles no larger than the small candidate list
            return append(carry, scores, row0, col0), None
        above = jnp.sum(scores > carry[2])
        carry = lax.cond(
            above <= small,
            lambda: append(carry, scores, row0, col0),
            lambda: merge(carry, scores, row0, col0),
        )
        return carry, None

    empty = TopPairs(
        jnp.full((k,), -jnp.inf, jnp.float32),
        jnp.zeros((k,), jnp.int32),
        jnp.zeros((k,), jnp.int32),
    )
    tiles = (jnp.asarray(starts[tile_i]), jnp.asarray(starts[tile_j]))
    (buffer, _, _), _ = lax.scan(visit, refill(empty), tiles)
    return top_k_of(buffer)
