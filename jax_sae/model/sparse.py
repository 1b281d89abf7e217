"""The sparse training path of the TopK family.

A TopK-family code has k nonzeros per token out of F, so only the encoder forward needs to be a
dense [B, d] x [d, F] product (to find them). Everything else works on the selected (token,
latent) pairs, given as a coordinate list `rows [n]`, `cols [n]` (n = B k per token, or k B for
BatchTopK):

* `decode`: x_hat[b] = sum over pairs (b, j) of v_bj W_dec[j], a gather of the selected decoder
  rows; backward: d v_bj = g_b . W_dec[j] (a gather) and dW_dec[j] = sum_b v_bj g_b (a
  scatter-add over the pairs);
* `encode_at`: the selected pre-activations pre[b, j] with pre = (x - b_dec) W_enc + b_enc
  computed densely *without* gradient; backward: dW_enc[:, j] = sum_b d pre_bj (x_b - b_dec) (a
  scatter-add), d b_enc[j] = sum_b d pre_bj, d b_dec = -W_enc d b_enc (a mat-vec, the dense
  path's b_dec trick), d x_b = sum_j d pre_bj W_enc[:, j] (a gather; removed by XLA when x needs
  no gradient, which is the training case).

FLOPs per token ~ 2 d F + O(k d) instead of ~10 d F. Values and gradients equal the dense path's
up to float summation order (tests/test_sparse.py). With `compute_dtype=bfloat16` the operands
are rounded to bf16 and products accumulated in float32, as the dense path's matmuls do.

Memory: a pass over the pairs materialises an [n, d] float32 intermediate; above `CHUNK_BYTES` it
runs over chunks of pairs in a `lax.scan`, so [B, k, d] is never held for the whole batch.

On a device mesh (inside a step of `layout.shard_train_step`) `decode`, `encode_at`, `densify` and
`gather_pairs` run under `shard_map`, and each device reads and updates only its own latents' rows
of W_dec, W_enc, b_enc and its own [B / data, F / model] blocks. Two pair layouts:

* per-row pairs (`per_row_pairs`: row-major, k per token) live with their token block on the
  `data` shard, replicated over `model`; a device masks the pairs of other shards' latents, and
  the per-pair values [B / data, k] (and their gradients) are summed over `model`;
* owned pairs (`owned_batch_pairs`, BatchTopK's varying count per token) are split over both
  axes: each device lists the pairs of its own block, padded with pairs no device owns.

Either way what crosses devices is the reconstruction [B / data, d] summed over `model` and the
per-row values; XLA's partitioner alone would all-reduce the gathered rows [B k, d] (12 GB per
step at B 4096, k 320, d 2304).
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_sae.model.activations import batch_kth_largest
from jax_sae.parallel import layout

CHUNK_BYTES = 256 * 2**20
"""Largest [n, d] float32 intermediate of one pass over the selected pairs."""


def _rounded(a: jax.Array, compute_dtype: Any) -> jax.Array:
    """`a` rounded to `compute_dtype` and back to float32 (a no-op for float32)."""
    if jnp.dtype(compute_dtype) == jnp.float32:
        return a.astype(jnp.float32)
    return a.astype(compute_dtype).astype(jnp.float32)


def _chunked(n: int, width: int) -> int:
    """Number of pairs per chunk so that an [n_chunk, width] float32 array fits the budget."""
    return max(1, min(n, CHUNK_BYTES // (4 * width)))


def _pad(a: jax.Array, length: int) -> jax.Array:
    return jnp.pad(a, (0, length - a.shape[0]))


def _over_chunks(
    fn: Callable[..., jax.Array], init: jax.Array, arrays: tuple[jax.Array, ...], chunk: int
) -> jax.Array:
    """`init + sum_c fn(*arrays[c])` over chunks c of the pair axis; padding pairs get weight 0,
    so `arrays[0]` must be the per-pair weights that `fn` multiplies by."""
    n = arrays[0].shape[0]
    if chunk >= n:
        return init + fn(*arrays)
    n_chunks = -(-n // chunk)
    stacked = tuple(_pad(a, n_chunks * chunk).reshape(n_chunks, chunk) for a in arrays)

    def body(total, chunk_arrays):
        return total + fn(*chunk_arrays), None

    return lax.scan(body, init, stacked)[0]


def spmm(
    weights: jax.Array,
    out_ids: jax.Array,
    in_ids: jax.Array,
    table: jax.Array,
    n_out: int,
    compute_dtype: Any = jnp.float32,
) -> jax.Array:
    """out[s] = sum over pairs p with out_ids[p] = s of weights[p] * table[in_ids[p]].

    A gather of table rows and a scatter-add ([n_out, d] float32), chunked over the pairs.
    """
    table = _rounded(table, compute_dtype)

    def part(w, out_ids, in_ids):
        rows = _rounded(w, compute_dtype)[:, None] * table[in_ids]
        return jax.ops.segment_sum(rows, out_ids, n_out)

    width = table.shape[1]
    init = jnp.zeros((n_out, width), jnp.float32)
    return _over_chunks(part, init, (weights, out_ids, in_ids), _chunked(len(weights), width))


def sddmm(
    a: jax.Array, a_ids: jax.Array, b: jax.Array, b_ids: jax.Array, compute_dtype: Any
) -> jax.Array:
    """out[p] = a[a_ids[p]] . b[b_ids[p]] for every pair p ([n] float32), chunked over the pairs."""
    a, b = _rounded(a, compute_dtype), _rounded(b, compute_dtype)
    n = a_ids.shape[0]
    chunk = _chunked(n, a.shape[1])
    if chunk >= n:
        return jnp.sum(a[a_ids] * b[b_ids], axis=-1)
    n_chunks = -(-n // chunk)
    ids = (_pad(a_ids, n_chunks * chunk), _pad(b_ids, n_chunks * chunk))
    out = lax.map(
        lambda c: jnp.sum(a[c[0]] * b[c[1]], axis=-1),
        tuple(i.reshape(n_chunks, chunk) for i in ids),
    )
    return out.reshape(-1)[:n]


def row_dots(a: jax.Array, b: jax.Array, cols: jax.Array, compute_dtype: Any) -> jax.Array:
    """out[i, j] = a[i] . b[cols[i, j]] ([B, k]): `sddmm` for k pairs per row in row-major order,
    as a batched matrix product (1.5x faster than the general form on XLA:CPU), chunked over rows.
    """
    a, b = _rounded(a, compute_dtype), _rounded(b, compute_dtype)
    n_rows, k = cols.shape
    rows_per_chunk = max(1, _chunked(n_rows * k, a.shape[1]) // k)

    def part(a_chunk, cols_chunk):
        return jnp.einsum("id,ijd->ij", a_chunk, b[cols_chunk], precision=lax.Precision.HIGHEST)

    if rows_per_chunk >= n_rows:
        return part(a, cols)
    n_chunks = -(-n_rows // rows_per_chunk)
    pad = n_chunks * rows_per_chunk - n_rows
    a_chunks = jnp.pad(a, ((0, pad), (0, 0))).reshape(n_chunks, rows_per_chunk, -1)
    cols_chunks = jnp.pad(cols, ((0, pad), (0, 0))).reshape(n_chunks, rows_per_chunk, k)
    return lax.map(lambda c: part(*c), (a_chunks, cols_chunks)).reshape(-1, k)[:n_rows]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _decode_here(
    values: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    w_dec: jax.Array,
    n_rows: int,
    compute_dtype: Any = jnp.float32,
    per_row: bool = False,
) -> jax.Array:
    """`decode` on the arrays as they are (one device, or one device's shard)."""
    return spmm(values, rows, cols, w_dec, n_rows, compute_dtype)


def _decode_fwd(values, rows, cols, w_dec, n_rows, compute_dtype, per_row):
    out = _decode_here(values, rows, cols, w_dec, n_rows, compute_dtype, per_row)
    return out, (values, rows, cols, w_dec)


def _decode_bwd(n_rows, compute_dtype, per_row, residuals, g):
    values, rows, cols, w_dec = residuals
    if per_row:
        g_values = row_dots(g, w_dec, cols.reshape(n_rows, -1), compute_dtype).reshape(-1)
    else:
        g_values = sddmm(g, rows, w_dec, cols, compute_dtype)
    g_w_dec = spmm(values, cols, rows, g, w_dec.shape[0], compute_dtype)
    return g_values.astype(values.dtype), None, None, g_w_dec.astype(w_dec.dtype)


_decode_here.defvjp(_decode_fwd, _decode_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _encode_at_here(
    x: jax.Array,
    b_dec: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    pre: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    compute_dtype: Any = jnp.float32,
) -> jax.Array:
    """`encode_at` on the arrays as they are (one device, or one device's shard)."""
    return pre[rows, cols]


def _encode_at_fwd(x, b_dec, w_enc, b_enc, pre, rows, cols, compute_dtype):
    out = _encode_at_here(x, b_dec, w_enc, b_enc, pre, rows, cols, compute_dtype)
    return out, (x, b_dec, w_enc, rows, cols)


def _encode_at_bwd(compute_dtype, residuals, g):
    x, b_dec, w_enc, rows, cols = residuals
    d, n_latents = w_enc.shape
    g_b_enc = jax.ops.segment_sum(g, cols, n_latents)
    g_b_dec = -jnp.matmul(w_enc, g_b_enc, precision=lax.Precision.HIGHEST)
    g_w_enc = spmm(g, cols, rows, x - b_dec, n_latents, compute_dtype).T
    g_x = spmm(g, rows, cols, w_enc.T, x.shape[0], compute_dtype)
    return (
        g_x.astype(x.dtype),
        g_b_dec.astype(b_dec.dtype),
        g_w_enc.astype(w_enc.dtype),
        g_b_enc,
        None,
        None,
        None,
    )


_encode_at_here.defvjp(_encode_at_fwd, _encode_at_bwd)


def per_row_pairs(indices: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(rows, cols) [B k] of per-row selections `indices` [B, k], row-major."""
    n_rows, k = indices.shape
    return jnp.repeat(jnp.arange(n_rows, dtype=indices.dtype), k), indices.reshape(-1)


def flat_pairs(flat_indices: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """(rows, cols) of indices into a flattened [B, width] array."""
    return flat_indices // width, flat_indices % width


def decode(
    values: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    w_dec: jax.Array,
    n_rows: int,
    compute_dtype: Any = jnp.float32,
    per_row: bool = False,
    replicated_table: bool = False,
) -> jax.Array:
    """`h @ W_dec` for the sparse code h[rows[p], cols[p]] = values[p] ([n_rows, d] float32).

    `per_row`: the pairs are the same number per row in row-major order (`per_row_pairs`), which
    allows a faster backward; otherwise, on a mesh, they are owned pairs (`owned_batch_pairs`).
    `replicated_table`: `w_dec` is not split over `model` (two_level's concept level, F / 64
    rows), so the mesh needs no per-shard decode.
    """
    mesh = layout.step_mesh()
    if mesh is None or replicated_table:
        return _decode_here(values, rows, cols, w_dec, n_rows, compute_dtype, per_row)
    pairs = _pair_axes(per_row)
    rows_here = n_rows // mesh.shape["data"]

    def on_shard(values, rows, cols, w_dec):
        own, cols_here = _own_latents(cols, w_dec.shape[0])
        values = jnp.where(own, _varying(values, _replicated(pairs)), 0.0)
        rows, w_dec = _rows_here(rows, rows_here), _varying(w_dec, "data")
        out = _decode_here(values, rows, cols_here, w_dec, rows_here, compute_dtype, per_row)
        return lax.psum(out, "model")

    specs = (P(pairs), P(pairs), P(pairs), P("model"))
    return jax.shard_map(on_shard, mesh=mesh, in_specs=specs, out_specs=P("data"))(
        values, rows, cols, w_dec
    )


def encode_at(
    x: jax.Array,
    b_dec: jax.Array,
    w_enc: jax.Array,
    b_enc: jax.Array,
    pre: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    compute_dtype: Any = jnp.float32,
    per_row: bool = True,
) -> jax.Array:
    """pre[rows, cols], with the gradients of `(x - b_dec) W_enc + b_enc` at those pairs only.

    `pre` [B, F] is that product, already computed (under `stop_gradient`); it gets no gradient.
    On a mesh the pairs are per-row (`per_row_pairs`) or, with `per_row=False`, owned.
    """
    mesh = layout.step_mesh()
    if mesh is None:
        return _encode_at_here(x, b_dec, w_enc, b_enc, pre, rows, cols, compute_dtype)
    pairs = _pair_axes(per_row)
    rows_here = x.shape[0] // mesh.shape["data"]

    def on_shard(x, b_dec, w_enc, b_enc, pre, rows, cols):
        own, cols_here = _own_latents(cols, w_enc.shape[1])
        rows = _rows_here(rows, rows_here)
        x, b_dec = _varying(x, "model"), _varying(b_dec, layout.AXES)
        w_enc, b_enc = _varying(w_enc, "data"), _varying(b_enc, "data")
        out = _encode_at_here(x, b_dec, w_enc, b_enc, pre, rows, cols_here, compute_dtype)
        return _to_pairs(jnp.where(own, out, 0.0), pairs)

    specs = (P("data"), P(), P(None, "model"), P("model"), P(*layout.AXES), P(pairs), P(pairs))
    return jax.shard_map(on_shard, mesh=mesh, in_specs=specs, out_specs=P(pairs))(
        x, b_dec, w_enc, b_enc, pre, rows, cols
    )


def gather_pairs(a: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """`a[rows, cols]` of a [B, F] array, differentiable; on a mesh (per-row pairs) each device
    reads its own block, where XLA's partitioner would gather the whole of `a`."""
    mesh = layout.step_mesh()
    if mesh is None:
        return a[rows, cols]
    rows_here = a.shape[0] // mesh.shape["data"]

    def on_shard(a, rows, cols):
        own, cols_here = _own_latents(cols, a.shape[1])
        values = a[_rows_here(rows, rows_here), cols_here]
        return lax.psum(jnp.where(own, values, 0.0), "model")

    specs = (P(*layout.AXES), P("data"), P("data"))
    return jax.shard_map(on_shard, mesh=mesh, in_specs=specs, out_specs=P("data"))(a, rows, cols)


def densify(
    values: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    shape: tuple[int, ...],
    per_row: bool = True,
) -> jax.Array:
    """The dense [B, F] code with `values` at (rows, cols), zeros elsewhere; differentiable in
    `values` (its backward is a gather), for loss terms and metrics that read `Forward.h`. On a
    mesh each device writes its own [B / data, F / model] block."""
    mesh = layout.step_mesh()
    if mesh is None:
        return jnp.zeros(shape, values.dtype).at[rows, cols].set(values)
    pairs = _pair_axes(per_row)
    block = (shape[0] // mesh.shape["data"], shape[1] // mesh.shape["model"])

    def on_shard(values, rows, cols):
        own, cols_here = _own_latents(cols, block[1])
        cols_here = jnp.where(own, cols_here, block[1])  # out of range: dropped
        out = jnp.zeros(block, values.dtype)
        return out.at[_rows_here(rows, block[0]), cols_here].set(values, mode="drop")

    specs = (P(pairs), P(pairs), P(pairs))
    return jax.shard_map(on_shard, mesh=mesh, in_specs=specs, out_specs=P(*layout.AXES))(
        values, rows, cols
    )


def owned_batch_pairs(acts: jax.Array, n_keep: int) -> tuple[jax.Array, jax.Array]:
    """(rows, cols) of the `n_keep` largest entries of acts [B, F] >= 0 (BatchTopK), on a mesh:
    each device lists the entries of its own [B / data, F / model] block that reach the global
    n_keep-th largest (`activations.batch_kth_largest`, which moves only counts), padded to a
    fixed length with pairs of latent id F, which no device owns. Zeros are never listed (they
    would decode to nothing). The list is split over both axes: device (i, j) holds the pairs
    of token block i and latent block j, so the sparse functions here use them without traffic.
    """
    mesh = layout.step_mesh()
    if mesh is None:
        raise ValueError("owned_batch_pairs lists pairs per device: call it on a device mesh")
    threshold = batch_kth_largest(acts, n_keep)
    n_rows, n_latents = acts.shape
    block = (n_rows // mesh.shape["data"], n_latents // mesh.shape["model"])
    length = min(n_keep, block[0] * block[1])

    def on_shard(block_acts, threshold):
        keep = (block_acts >= threshold) & (block_acts > 0)
        flat = jnp.nonzero(keep.reshape(-1), size=length, fill_value=-1)[0]
        rows = flat // block[1] + lax.axis_index("data") * block[0]
        cols = jnp.where(flat >= 0, flat % block[1] + lax.axis_index("model") * block[1], n_latents)
        return rows.astype(jnp.int32), cols.astype(jnp.int32)

    owned = P(layout.AXES)
    return jax.shard_map(
        on_shard, mesh=mesh, in_specs=(P(*layout.AXES), P()), out_specs=(owned, owned)
    )(lax.stop_gradient(acts), threshold)


def _pair_axes(per_row: bool) -> tuple[str, ...]:
    """The mesh axes a pair list is split over: per-row pairs live with their token block on
    `data` (replicated over `model`); owned pairs (`owned_batch_pairs`) over both axes."""
    return ("data",) if per_row else layout.AXES


def _replicated(pair_axes: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(axis for axis in layout.AXES if axis not in pair_axes)


def _to_pairs(values: jax.Array, pair_axes: tuple[str, ...]) -> jax.Array:
    """Per-pair values computed by their owners (zeros elsewhere), in the pair list's layout:
    summed over `model` when the list is replicated there."""
    return values if "model" in pair_axes else lax.psum(values, "model")


def _own_latents(cols: jax.Array, latents_here: int) -> tuple[jax.Array, jax.Array]:
    """Inside `shard_map`: which global latent ids `cols` this device's model shard holds, and
    their local ids (0 for the others, which the caller masks)."""
    local = cols - lax.axis_index("model") * latents_here
    own = (local >= 0) & (local < latents_here)
    return own, jnp.where(own, local, 0)


def _varying(a: jax.Array, replicated_over: str | tuple[str, ...]) -> jax.Array:
    """Inside `shard_map`: `a`, replicated over the given mesh axes, cast to varying over them,
    so that the custom gradients computed per device have its type; the cast's transpose sums
    the per-device gradients over those axes."""
    return lax.pcast(a, replicated_over, to="varying")


def _rows_here(rows: jax.Array, rows_here: int) -> jax.Array:
    """Inside `shard_map`: global token ids of this data shard's pairs as local ids."""
    return rows - lax.axis_index("data") * rows_here
