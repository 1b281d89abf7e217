"""Sparse path of the TopK family (jax_sae/model/sparse.py): values and gradients against float64
NumPy written from the formulas, and against the dense path through the public `Variant.loss`."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from jax_sae.model import activations, sparse
from jax_sae.model.losses import dead as dead_tracking
from jax_sae.model.variants import make_variant
from jax_sae.training.optim import project_decoder_grads

D, F, B = 12, 96, 20


@pytest.fixture(params=[False, True], ids=["one-pass", "chunked"])
def chunked(request, monkeypatch):
    """Run a test once in one pass and once with a budget of 3 pairs per chunk (with padding)."""
    if request.param:
        monkeypatch.setattr(sparse, "CHUNK_BYTES", 3 * 4 * D)
    return request.param


def random_pairs(rng, n_rows, n_cols, k):
    cols = np.stack([rng.choice(n_cols, k, replace=False) for _ in range(n_rows)])
    return np.repeat(np.arange(n_rows), k), cols.reshape(-1)


@pytest.mark.parametrize("per_row", [False, True], ids=["coo", "per-row"])
def test_decode_value_and_gradients_match_float64(per_row, chunked):
    rng = np.random.default_rng(0)
    rows, cols = random_pairs(rng, B, F, 5)
    values, w_dec, g = rng.normal(size=rows.size), rng.normal(size=(F, D)), rng.normal(size=(B, D))
    h = np.zeros((B, F))
    h[rows, cols] = values

    def loss(values, w_dec):
        return jnp.sum(sparse.decode(values, rows, cols, w_dec, B, jnp.float32, per_row) * g)

    f32 = [jnp.asarray(a, jnp.float32) for a in (values, w_dec)]
    assert_close(sparse.decode(f32[0], rows, cols, f32[1], B, jnp.float32, per_row), h @ w_dec)
    g_values, g_w_dec = jax.grad(loss, argnums=(0, 1))(*f32)
    assert_close(g_values, (g @ w_dec.T)[rows, cols], what="d values")
    assert_close(g_w_dec, h.T @ g, what="d W_dec")


def test_encode_at_gradients_match_float64(chunked):
    rng = np.random.default_rng(1)
    rows, cols = random_pairs(rng, B, F, 4)
    x, b_dec = rng.normal(size=(B, D)), rng.normal(size=D)
    w_enc, b_enc = rng.normal(size=(D, F)), rng.normal(size=F)
    g = rng.normal(size=rows.size)
    pre = (x - b_dec) @ w_enc + b_enc
    g_pre = np.zeros((B, F))
    np.add.at(g_pre, (rows, cols), g)

    def loss(x, b_dec, w_enc, b_enc):
        dense = (x - b_dec) @ w_enc + b_enc
        at = sparse.encode_at(x, b_dec, w_enc, b_enc, jax.lax.stop_gradient(dense), rows, cols)
        return jnp.sum(at * g)

    args = [jnp.asarray(a, jnp.float32) for a in (x, b_dec, w_enc, b_enc)]
    assert_close(jnp.asarray(pre, jnp.float32)[rows, cols], pre[rows, cols])
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    want = (g_pre @ w_enc.T, -w_enc @ g_pre.sum(0), (x - b_dec).T @ g_pre, g_pre.sum(0))
    for name, got, expected in zip(("x", "b_dec", "W_enc", "b_enc"), grads, want, strict=True):
        assert_close(got, expected, what=name)


# ------------------------------------------------- the TopK loss against a float64 reference


def np_topk_mask(scores, k):
    mask = np.zeros(scores.shape, bool)
    np.put_along_axis(mask, np.argsort(-scores, axis=1)[:, :k], True, axis=1)
    return mask


def np_topk_loss_and_grads(p, x, dead_before, k, k_aux, alpha):
    """L = mean_b ||x - x_hat||^2 + alpha L_aux and its gradients, from the formulas."""
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    keep = np_topk_mask(pre, k) & (pre > 0)
    h = np.where(keep, pre, 0.0)
    x_hat = h @ p["W_dec"] + p["b_dec"]
    dead = dead_before & ~np.any(h > 0, axis=0)
    aux_keep = np_topk_mask(np.where(dead, pre, -np.inf), k_aux) & dead & (pre > 0)
    h_aux = np.where(aux_keep, pre, 0.0)
    e = x - x_hat
    e_hat = h_aux @ p["W_dec"]
    # AuxK in the units of the squared error: times the batch's variance of x per token
    variance = np.sum((e - e.mean(0)) ** 2) / np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))
    loss = np.mean(np.sum((x - x_hat) ** 2, axis=1)) + alpha * np.sum((e - e_hat) ** 2) / variance
    g_xhat = -2.0 / len(x) * (x - x_hat)
    g_ehat = -2.0 * alpha * (e - e_hat) / variance
    g_pre = (g_xhat @ p["W_dec"].T) * keep + (g_ehat @ p["W_dec"].T) * aux_keep
    grads = {
        "W_enc": (x - p["b_dec"]).T @ g_pre,
        "b_enc": g_pre.sum(0),
        "W_dec": h.T @ g_xhat + h_aux.T @ g_ehat,
        "b_dec": g_xhat.sum(0) - p["W_enc"] @ g_pre.sum(0),
    }
    return loss, grads, dead


def random_topk_setup(name="topk", seed=0, **hparams):
    rng = np.random.default_rng(seed)
    v = make_variant(name, D, F, dead_tokens=2 * B, **hparams)
    params = {
        key: np.asarray(value, np.float64) + 0.05 * rng.normal(size=value.shape)
        for key, value in v.init_params(jax.random.key(seed), rng.normal(size=(64, D))).items()
    }
    x = rng.normal(size=(B, D))
    dead_before = rng.random(F) < 0.5  # dead after this batch unless they fire in it
    state = v.init_state()
    state[dead_tracking.STATE_KEY] = jnp.asarray(np.where(dead_before, B, 0), jnp.float32)
    return v, params, x, dead_before, state


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_topk_loss_gradients_and_projection_match_float64(dense, chunked):
    v, p, x, dead_before, state = random_topk_setup(k=5, k_aux=7, alpha_aux=0.5, dense=dense)
    want_loss, want, dead = np_topk_loss_and_grads(p, x, dead_before, 5, 7, 0.5)
    assert dead.sum() >= 7, "AuxK must have dead latents to select"
    p32 = {key: jnp.asarray(value, jnp.float32) for key, value in p.items()}
    batch = {"x": jnp.asarray(x, jnp.float32)}
    (loss, (_, metrics)), grads = jax.value_and_grad(v.loss, has_aux=True)(p32, state, batch, 0)
    assert float(metrics["aux"]) > 0
    assert_close(loss, want_loss, what="loss")
    for key in want:
        assert_close(grads[key], want[key], what=key)
    projected, _ = project_decoder_grads().update(grads, None, p32)
    rows = p["W_dec"]
    parallel = np.sum(want["W_dec"] * rows, 1, keepdims=True) / np.sum(rows * rows, 1)[:, None]
    assert_close(projected["W_dec"], want["W_dec"] - parallel * rows, what="projected W_dec")


# ---------------------------------------------------- sparse == dense through Variant.loss

CASES = {
    "topk": {"k": 5, "k_aux": 7},
    "batchtopk": {"k": 5, "k_aux": 7},
    "matryoshka": {"k": 5, "k_aux": 7},
    "hier_ortho": {"k": 5, "k_aux": 7, "lambda_2": 1.0},
    "hier_ortho-activations": {"k": 5, "k_aux": 7, "lambda_2": 1.0, "ortho_target": "activations"},
    "two_level": {"F_c": 8, "k_c": 3, "k_b": 6, "k_aux": 7},
}


def loss_and_grads(name, dense, compute_dtype=jnp.float32, seed=0):
    v, p, x, _, state = random_topk_setup(name.split("-")[0], seed, dense=dense, **CASES[name])
    p32 = {key: jnp.asarray(value, jnp.float32) for key, value in p.items()}
    fn = jax.jit(jax.value_and_grad(v.loss, has_aux=True), static_argnames="compute_dtype")
    (loss, (new_state, metrics)), grads = fn(
        p32, state, {"x": jnp.asarray(x, jnp.float32)}, 0, compute_dtype=compute_dtype
    )
    return loss, new_state, metrics, grads


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_sparse_path_equals_dense_path(name, chunked):
    dense = loss_and_grads(name, dense=True)
    sparse_ = loss_and_grads(name, dense=False)
    assert_close(sparse_[0], dense[0], what="loss")
    for key in dense[1]:
        assert_close(sparse_[1][key], dense[1][key], what=f"state {key}")
    for key in ("l0", "dead_frac", "aux", "explained_variance"):
        assert_close(sparse_[2][key], dense[2][key], what=key)
    assert float(dense[2]["aux"]) > 0
    for key in dense[3]:
        assert float(jnp.max(jnp.abs(dense[3][key]))) > 0, key
        assert_close(sparse_[3][key], dense[3][key], what=f"grad {key}")


def test_sparse_path_equals_dense_path_in_bfloat16():
    dense = loss_and_grads("topk", dense=True, compute_dtype=jnp.bfloat16)
    sparse_ = loss_and_grads("topk", dense=False, compute_dtype=jnp.bfloat16)
    assert_close(sparse_[0], dense[0], rtol=1e-3, what="loss")
    for key in dense[3]:
        assert_close(sparse_[3][key], dense[3][key], rtol=1e-2, what=f"grad {key}")


def test_batchtopk_threshold_selection_equals_sort_selection(monkeypatch):
    """Above BATCH_TOPK_SORT_MAX BatchTopK selects by threshold + nonzero: same pairs."""
    want = loss_and_grads("batchtopk", dense=False)
    monkeypatch.setattr(activations, "BATCH_TOPK_SORT_MAX", 0)
    got = loss_and_grads("batchtopk", dense=False)
    assert_close(got[0], want[0])
    for key in want[3]:
        assert_close(got[3][key], want[3][key], what=key)


# ------------------------------------------------------------- the cost: what is computed


def big_dots(name, dense, **hparams):
    """Operand shapes of the B x d x F-sized products (or larger) in the loss gradient's jaxpr."""
    v = make_variant(name, D, F, dense=dense, **hparams)
    params = v.init_params(jax.random.key(0))
    batch = {"x": jnp.zeros((B, D), jnp.float32)}
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: v.loss(p, v.init_state(), batch, 0)[0]))(params)
    dots = []
    for eqn in _all_eqns(jaxpr.jaxpr):
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (var.aval.shape for var in eqn.invars)
            (contract, _), _ = eqn.params["dimension_numbers"]
            flops = np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
            if flops >= B * D * F:
                dots.append((tuple(lhs), tuple(rhs)))
    return dots


def test_sparse_path_has_one_dense_product():
    assert big_dots("topk", dense=False, k=5) == [((B, D), (D, F))]
    # the dense path: forward encoder and decoder, and four backward products (of which XLA
    # removes the one for the input x, which needs no gradient)
    assert len(big_dots("topk", dense=True, k=5)) == 6


def test_auxk_is_skipped_statically_when_alpha_is_zero():
    def n_top_k(alpha):
        v = make_variant("topk", D, F, k=5, alpha_aux=alpha)
        params = v.init_params(jax.random.key(0))
        batch = {"x": jnp.zeros((B, D), jnp.float32)}
        text = str(jax.make_jaxpr(lambda p: v.loss(p, v.init_state(), batch, 0))(params))
        return text.count("top_k[")

    assert n_top_k(1 / 32) == 2
    assert n_top_k(0.0) == 1


def test_chunks_never_hold_the_whole_batch(monkeypatch):
    """With a budget of 3 pairs a gather of d-wide rows holds 3 pairs, or the pairs of one token
    where a chunk is a whole number of tokens (k_aux = 7 here), never all B k of the batch."""
    monkeypatch.setattr(sparse, "CHUNK_BYTES", 3 * 4 * D)
    v = make_variant("topk", D, F, k=5, k_aux=7)
    params = v.init_params(jax.random.key(0))
    batch = {"x": jnp.zeros((B, D), jnp.float32)}
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: v.loss(p, v.init_state(), batch, 0)[0]))(params)
    gathered = [
        int(np.prod(var.aval.shape[:-1]))
        for eqn in _all_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "gather"
        for var in eqn.outvars
        if var.aval.ndim >= 2 and var.aval.shape[-1] == D
    ]
    assert gathered and max(gathered) == 7


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


@pytest.mark.slow
def test_sparse_path_is_vmappable_for_sweeps():
    """A vmapped gradient over stacked parameters equals each member's own (a sweep)."""
    v, p, x, _, state = random_topk_setup(k=5, k_aux=7)
    members = [{key: jnp.asarray(value * scale, jnp.float32) for key, value in p.items()}
               for scale in (1.0, 0.5)]  # fmt: skip
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    grad = jax.grad(lambda q: v.loss(q, state, {"x": jnp.asarray(x, jnp.float32)}, 0)[0])
    batched = jax.vmap(grad)(stacked)
    for i, member in enumerate(members):
        for key, value in grad(member).items():
            assert_close(batched[key][i], value, what=f"member {i} {key}")
