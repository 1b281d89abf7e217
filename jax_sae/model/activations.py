"""Sparse activation functions and their straight-through estimators.

Shared by the architectures (`jax_sae.model.architectures`) and the loss terms
(`jax_sae.model.losses`), so that the forward rule and the pseudo-gradient of each activation live
in exactly one place.
"""

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_sae.parallel import layout
from jax_sae.parallel.layout import AXES


def _order_key(x: jax.Array) -> jax.Array:
    """Map float32 to uint32 such that unsigned integer order is float order (-inf < ... < inf)."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_order_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def kth_largest(
    x: jax.Array, k: int, total: Callable[[jax.Array], jax.Array] | None = None
) -> jax.Array:
    """Exact k-th largest value along the last axis of `x` (shape [..., n] -> [...]), no gradient.

    A bitwise binary search: 32 passes of compare-and-count over `x` find, bit by bit from the top,
    the largest float t with `count(x >= t) >= k`, which is the k-th largest value. Its cost does
    not depend on k, so it beats `lax.top_k` when k is very large (BatchTopK's k * B of a whole
    batch; `benchmarks/bench_topk.py`); for per-row k it is several times slower. `total` sums
    the counts over the shards of a larger array (a `psum` inside `shard_map`).
    """
    key = _order_key(lax.stop_gradient(x))

    def set_next_bit(i, threshold):
        candidate = threshold | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        count = jnp.sum(key >= candidate[..., None], axis=-1)
        if total is not None:
            count = total(count)
        return jnp.where(count >= k, candidate, threshold)

    threshold = lax.fori_loop(0, 32, set_next_bit, jnp.zeros(key.shape[:-1], jnp.uint32))
    return _from_order_key(threshold)


def topk(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(values, indices) of the k largest entries of each row, values descending, no gradient.

    `lax.top_k` on every backend. The k-th largest is `values.min(-1)`, not `values[..., -1]`:
    XLA:CPU lowers that slice into a far slower top-k (measured 66x at [2048, 12288], k 32;
    `benchmarks/bench_topk.py`). `lax.approx_max_k` measured the same as `lax.top_k` on CPU.
    """
    return layout.top_k(lax.stop_gradient(x), k)


def topk_relu(pre: jax.Array, k: int) -> jax.Array:
    """`relu(topk_k(pre))` per row: keep the k largest pre-activations of each row, zero the rest.

    A mask against each row's k-th largest value (instead of a scatter): the compare-and-select
    fuses with the ReLU and is cheap in both directions. Exact ties with the k-th value are all
    kept, which has probability zero for real-valued activations.
    """
    kth = topk(pre, k)[0].min(-1, keepdims=True)
    return jnp.where(pre >= kth, jax.nn.relu(pre), 0.0)


BATCH_TOPK_SORT_MAX = 2**17
"""Up to this many kept entries BatchTopK selects with `lax.top_k` over the flattened batch, above
it with `kth_largest` (measured crossover on XLA:CPU: `benchmarks/bench_topk.py`)."""


def batch_kth_largest(acts: jax.Array, n_keep: int) -> jax.Array:
    """The `n_keep`-th largest entry of the whole array (a scalar), no gradient.

    On a device mesh ([B, F] split as (data, model)) each device counts over its own block and
    only the counts are summed, where a top-k would gather the whole array to every device.
    """
    mesh = layout.step_mesh()
    if mesh is not None and layout.splits(acts.shape, 1, mesh):
        return jax.shard_map(
            lambda block: kth_largest(block.reshape(-1), n_keep, lambda c: lax.psum(c, AXES)),
            mesh=mesh,
            in_specs=P(*AXES),
            out_specs=P(),
        )(lax.stop_gradient(acts))
    flat = lax.stop_gradient(acts).reshape(-1)
    if n_keep <= BATCH_TOPK_SORT_MAX:
        return lax.top_k(flat, n_keep)[0].min()
    return kth_largest(flat, n_keep)


def batch_topk_indices(acts: jax.Array, n_keep: int) -> jax.Array:
    """Flat indices [n_keep] of the `n_keep` largest entries of `acts`, no gradient.

    Above `BATCH_TOPK_SORT_MAX` the indices of the entries >= the n_keep-th largest, in row-major
    order; ties beyond n_keep are dropped (they have value 0 after the ReLU, or probability 0).
    """
    flat = lax.stop_gradient(acts).reshape(-1)
    if n_keep <= BATCH_TOPK_SORT_MAX:
        return lax.top_k(flat, n_keep)[1]
    return jnp.nonzero(flat >= kth_largest(flat, n_keep), size=n_keep)[0]


def batch_topk_relu(pre: jax.Array, k: int) -> jax.Array:
    """BatchTopK: keep the `k * batch` largest ReLU activations of the whole [B, F] batch.

    Latents compete across tokens, so the per-token L0 varies while its batch mean is <= k.
    """
    acts = jax.nn.relu(pre)
    n_keep = min(k * pre.shape[0], acts.size)
    return jnp.where(acts >= batch_kth_largest(acts, n_keep), acts, 0.0)


def _rectangle(u: jax.Array) -> jax.Array:
    """Rectangle kernel K(u) = 1[-1/2 < u < 1/2] of Rajamanoharan et al. (2024)."""
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


def _sum_to_threshold_shape(grad: jax.Array, theta: jax.Array) -> jax.Array:
    """Sum a [..., F] cotangent over the leading (batch) axes that `theta` was broadcast over."""
    return jnp.sum(grad, axis=tuple(range(grad.ndim - theta.ndim))).astype(theta.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(pre: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """JumpReLU `pre * H(pre - theta)`.

    Gradients (Rajamanoharan et al. 2024, "Jumping Ahead", eq. 11): d/dpre = H(pre - theta);
    d/dtheta = -(theta / bandwidth) * K((pre - theta) / bandwidth), a straight-through estimate of
    the jump's effect, since the true derivative w.r.t. theta is zero almost everywhere.
    """
    return jnp.where(pre > theta, pre, 0.0)


def _jumprelu_fwd(pre, theta, bandwidth):
    return jumprelu(pre, theta, bandwidth), (pre, theta)


def _jumprelu_bwd(bandwidth, residuals, g):
    pre, theta = residuals
    g_pre = jnp.where(pre > theta, g, 0.0)
    g_theta = -(theta / bandwidth) * _rectangle((pre - theta) / bandwidth) * g
    return g_pre, _sum_to_threshold_shape(g_theta, theta)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def heaviside(
    pre: jax.Array, theta: jax.Array, bandwidth: float, to_pre: bool = False
) -> jax.Array:
    """Step function `H(pre - theta)` (1.0 where a JumpReLU latent fires), for the L0 penalty.

    Pseudo-gradients with the rectangle kernel K: d/dtheta = -(1 / bandwidth) K((pre - theta) /
    bandwidth) (Rajamanoharan et al. 2024); d/dpre = 0 (the paper trains the encoder only through
    the reconstruction) or, with `to_pre`, the same estimate with the opposite sign,
    +(1 / bandwidth) K((pre - theta) / bandwidth), since the step depends on pre only through
    pre - theta (Anthropic's 2025 JumpReLU recipe: the L0 penalty then reaches W_enc and b_enc).
    """
    return (pre > theta).astype(pre.dtype)


def _heaviside_fwd(pre, theta, bandwidth, to_pre):
    return heaviside(pre, theta, bandwidth, to_pre), (pre, theta)


def _heaviside_bwd(bandwidth, to_pre, residuals, g):
    pre, theta = residuals
    estimate = (1.0 / bandwidth) * _rectangle((pre - theta) / bandwidth) * g
    g_pre = estimate.astype(pre.dtype) if to_pre else jnp.zeros_like(pre)
    return g_pre, _sum_to_threshold_shape(-estimate, theta)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)
