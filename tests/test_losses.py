"""Loss terms, activations and their gradients vs independent float64 NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model.activations import heaviside, jumprelu, kth_largest
from jax_sae.model.losses import dead
from jax_sae.model.losses.auxk import auxk_loss
from jax_sae.model.losses.recon import explained_variance, reconstruction_loss
from jax_sae.model.variants import make_variant

D_IN, D_SAE, BATCH = 16, 64, 32
RTOL, ATOL = 2e-5, 2e-5


# ------------------------------------------------------------------ float64 NumPy references


def np_pre(p, x):
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]


def np_decode(p, h):
    return h @ p["W_dec"] + p["b_dec"]


def np_recon(x, x_hat, kind="squared"):
    sq = np.sum((x - x_hat) ** 2, axis=-1)
    return np.mean(sq) if kind == "squared" else np.mean(np.sqrt(sq))


def np_topk_relu(pre, k):
    out = np.zeros_like(pre)
    for row, values in enumerate(pre):
        keep = np.argsort(values)[::-1][:k]
        out[row, keep] = np.maximum(values[keep], 0.0)
    return out


def np_batch_topk_relu(pre, k):
    acts = np.maximum(pre, 0.0).ravel()
    keep = np.argsort(acts)[::-1][: k * pre.shape[0]]
    out = np.zeros_like(acts)
    out[keep] = acts[keep]
    return out.reshape(pre.shape)


def np_rectangle(u):
    return ((u > -0.5) & (u < 0.5)).astype(np.float64)


def np_auxk(x, x_hat, pre, dead_mask, w_dec, k_aux):
    if not dead_mask.any():
        return 0.0
    e = x - x_hat
    masked = np.where(dead_mask, pre, -np.inf)
    h_aux = np.zeros_like(pre)
    for row, values in enumerate(masked):
        keep = [i for i in np.argsort(values)[::-1][:k_aux] if dead_mask[i]]
        h_aux[row, keep] = np.maximum(values[keep], 0.0)
    e_hat = h_aux @ w_dec
    # sparsify's FVU + alpha * aux / var(e), in the units of the squared reconstruction loss
    # (mean over tokens of ||x - x_hat||^2): multiplied by the batch's variance of x per token
    x_variance = np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1))
    return x_variance * np.sum((e - e_hat) ** 2) / np.sum((e - e.mean(axis=0)) ** 2)


def as64(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def random_params(variant, seed=0, scale_b=0.3):
    """Trained-looking parameters: random encoder/decoder and non-zero biases."""
    rng = np.random.default_rng(seed)
    params = {k: np.asarray(v) for k, v in variant.init_params(jax.random.key(seed)).items()}
    params["W_enc"] = rng.normal(size=params["W_enc"].shape) / np.sqrt(variant.d_in)
    params["b_enc"] = scale_b * rng.normal(size=variant.d_sae)
    params["b_dec"] = scale_b * rng.normal(size=variant.d_in)
    if "threshold" in params:
        params["threshold"] = rng.uniform(0.05, 0.5, size=variant.d_sae)
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def random_x(seed=1, batch=BATCH):
    return np.random.default_rng(seed).normal(size=(batch, D_IN)).astype(np.float32)


def run_loss(variant, params, x, state=None, step=0):
    state = variant.init_state() if state is None else state
    loss, (new_state, metrics) = variant.loss(params, state, {"x": jnp.asarray(x)}, jnp.int32(step))
    return float(loss), new_state, {k: float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("kind", ["squared", "l2norm"])
def test_reconstruction_loss_matches_numpy(kind):
    rng = np.random.default_rng(0)
    x, x_hat = rng.normal(size=(2, BATCH, D_IN))
    got = reconstruction_loss(jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32), kind)
    np.testing.assert_allclose(float(got), np_recon(x, x_hat, kind), rtol=RTOL)


def test_explained_variance_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, D_IN)) + 2.0
    x_hat = x + 0.3 * rng.normal(size=x.shape)
    want = 1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    got = explained_variance(jnp.asarray(x, jnp.float32), jnp.asarray(x_hat, jnp.float32))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_l2norm_option_changes_the_recon_metric():
    variant = make_variant("standard", D_IN, D_SAE, recon="l2norm")
    params, x = random_params(variant), random_x()
    _, _, metrics = run_loss(variant, params, x)
    p = as64(params)
    want = np_recon(x, np_decode(p, np.maximum(np_pre(p, x), 0)), "l2norm")
    np.testing.assert_allclose(metrics["recon"], want, rtol=RTOL)


# ------------------------------------------------------------------------------- standard


@pytest.mark.parametrize(("warmup", "step", "scale"), [(0, 0, 1.0), (8, 2, 0.25), (8, 20, 1.0)])
def test_standard_encode_decode_and_loss_match_numpy(warmup, step, scale):
    """L = L_recon + min(1, step / sparsity_warmup_steps) * lambda * mean_b sum_i |h_i|."""
    variant = make_variant(
        "standard", D_IN, D_SAE, **{"lambda": 0.07}, sparsity_warmup_steps=warmup
    )
    params, x = random_params(variant), random_x()
    p = as64(params)
    h = np.maximum(np_pre(p, x), 0.0)
    x_hat = np_decode(p, h)
    np.testing.assert_allclose(variant.encode(params, x), h, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(variant.decode(params, jnp.asarray(h)), x_hat, rtol=RTOL, atol=ATOL)

    loss, _, metrics = run_loss(variant, params, x, step=step)
    recon, l1 = np_recon(x, x_hat), np.mean(np.sum(np.abs(h), axis=-1))
    np.testing.assert_allclose(metrics["recon"], recon, rtol=RTOL)
    np.testing.assert_allclose(metrics["l1"], l1, rtol=RTOL)
    np.testing.assert_allclose(loss, recon + scale * 0.07 * l1, rtol=RTOL)
    np.testing.assert_allclose(metrics["loss/l1"], scale * 0.07 * l1, rtol=RTOL)
    np.testing.assert_allclose(metrics["loss"], loss)
    np.testing.assert_allclose(metrics["l0"], np.mean(np.sum(h > 0, axis=-1)))
    ev = 1 - np.sum((x - x_hat) ** 2) / np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(metrics["explained_variance"], ev, rtol=1e-4)


@pytest.mark.parametrize(("warmup", "step"), [(0, 0), (10, 3)])
def test_standard_gradients_match_numpy(warmup, step):
    """Analytic float64 gradients; checks the b_dec mat-vec trick, the custom matmul backward
    and the L1 warm-up (lambda scaled by min(1, step / sparsity_warmup_steps))."""
    lam = 0.05 * (min(1.0, step / warmup) if warmup else 1.0)
    variant = make_variant(
        "standard", D_IN, D_SAE, **{"lambda": 0.05}, sparsity_warmup_steps=warmup
    )
    params, x = random_params(variant), random_x()
    grads = jax.grad(lambda prm: run_loss_traced(variant, prm, x, step))(params)

    p = as64(params)
    pre = np_pre(p, x)
    h = np.maximum(pre, 0.0)
    g_xhat = 2 * (np_decode(p, h) - x) / BATCH
    g_h = g_xhat @ p["W_dec"].T + lam / BATCH * (h > 0)
    g_pre = g_h * (pre > 0)
    want = {
        "W_dec": h.T @ g_xhat,
        "b_enc": g_pre.sum(0),
        "W_enc": (x - p["b_dec"]).T @ g_pre,
        "b_dec": g_xhat.sum(0) - g_pre.sum(0) @ p["W_enc"].T,
    }
    for name, value in want.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def run_loss_traced(variant, params, x, step=0):
    return variant.loss(params, variant.init_state(), {"x": jnp.asarray(x)}, jnp.int32(step))[0]


def test_bfloat16_compute_is_close_and_runs_matmuls_in_bfloat16():
    variant = make_variant("standard", D_IN, D_SAE)
    params, x = random_params(variant), random_x()

    def loss(prm, dtype):
        state = variant.init_state()
        return variant.loss(prm, state, {"x": jnp.asarray(x)}, jnp.int32(0), compute_dtype=dtype)[0]

    np.testing.assert_allclose(loss(params, jnp.bfloat16), loss(params, jnp.float32), rtol=2e-2)
    jaxpr = jax.make_jaxpr(jax.grad(lambda prm: loss(prm, jnp.bfloat16)))(params)
    big_dots = [
        eqn
        for eqn in iter_eqns(jaxpr.jaxpr)
        if eqn.primitive.name == "dot_general" and all(v.aval.ndim == 2 for v in eqn.invars)
    ]
    assert len(big_dots) >= 5  # encoder, decoder and their backward passes
    for eqn in big_dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn


def iter_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from iter_eqns(inner)


# ---------------------------------------------------------------------------- topk + AuxK


def test_topk_encode_and_loss_match_numpy():
    k, k_aux = 5, 6
    variant = make_variant("topk", D_IN, D_SAE, k=k, k_aux=k_aux, alpha_aux=0.25, dead_tokens=100)
    params, x = random_params(variant), random_x()
    p = as64(params)
    pre = np_pre(p, x)
    h = np_topk_relu(pre, k)
    x_hat = np_decode(p, h)
    np.testing.assert_allclose(variant.encode(params, x), h, rtol=RTOL, atol=ATOL)

    # Half of the latents have been silent for long: dead unless they fire in this batch.
    state = variant.init_state()
    silent = np.arange(D_SAE) % 2 == 0
    state["tokens_since_fired"] = jnp.asarray(np.where(silent, 1000.0, 0.0), jnp.float32)
    loss, _, metrics = run_loss(variant, params, x, state)
    dead_mask = silent & ~(h > 0).any(0)
    assert 0 < dead_mask.sum() < D_SAE
    aux = np_auxk(x, x_hat, pre, dead_mask, p["W_dec"], k_aux)
    np.testing.assert_allclose(metrics["aux"], aux, rtol=1e-4)
    np.testing.assert_allclose(metrics["recon"], np_recon(x, x_hat), rtol=RTOL)
    np.testing.assert_allclose(loss, np_recon(x, x_hat) + 0.25 * aux, rtol=RTOL)
    np.testing.assert_allclose(metrics["dead_frac"], dead_mask.mean())
    np.testing.assert_allclose(metrics["l0"], k)


@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_auxk_matches_numpy_with_few_or_many_dead(n_dead):
    rng = np.random.default_rng(n_dead)
    x, x_hat = rng.normal(size=(2, BATCH, D_IN))
    pre = rng.normal(size=(BATCH, D_SAE))
    w_dec = rng.normal(size=(D_SAE, D_IN))
    dead_mask = np.zeros(D_SAE, bool)
    dead_mask[rng.choice(D_SAE, n_dead, replace=False)] = True
    got = auxk_loss(*(jnp.asarray(a, jnp.float32) for a in (x, x_hat, pre)), dead_mask,
                    jnp.asarray(w_dec, jnp.float32), 8)  # fmt: skip
    np.testing.assert_allclose(float(got), np_auxk(x, x_hat, pre, dead_mask, w_dec, 8), rtol=1e-4)


def test_auxk_gradient_reaches_only_dead_latents_and_not_the_main_reconstruction():
    rng = np.random.default_rng(3)
    x, x_hat = (jnp.asarray(a, jnp.float32) for a in rng.normal(size=(2, BATCH, D_IN)))
    pre = jnp.asarray(rng.normal(size=(BATCH, D_SAE)) + 1.0, jnp.float32)
    w_dec = jnp.asarray(rng.normal(size=(D_SAE, D_IN)), jnp.float32)
    dead_mask = jnp.arange(D_SAE) < 10
    g_xhat, g_pre, g_wdec = jax.grad(auxk_loss, argnums=(1, 2, 4))(
        x, x_hat, pre, dead_mask, w_dec, 4
    )
    assert not np.any(g_xhat), "the residual target must be stop-gradient"
    assert not np.any(np.asarray(g_pre)[:, 10:]) and np.any(np.asarray(g_pre)[:, :10])
    assert not np.any(np.asarray(g_wdec)[10:]) and np.any(np.asarray(g_wdec)[:10])


# ------------------------------------------------------------------------------- batchtopk


def test_batchtopk_training_codes_and_inference_threshold():
    k = 3
    variant = make_variant("batchtopk", D_IN, D_SAE, k=k)
    params, x = random_params(variant), random_x()
    p = as64(params)
    pre = np_pre(p, x)
    want = np_batch_topk_relu(pre, k)
    assert len(set(np.sum(want > 0, axis=1))) > 1, "per-token L0 should vary under BatchTopK"
    np.testing.assert_allclose(variant.encode(params, x), want, rtol=RTOL, atol=ATOL)
    _, _, metrics = run_loss(variant, params, x)
    np.testing.assert_allclose(metrics["l0"], k)

    state = {**variant.init_state(), "threshold": jnp.float32(0.4)}
    inference = np.where(pre > 0.4, np.maximum(pre, 0), 0.0)
    np.testing.assert_allclose(variant.encode(params, x, state), inference, rtol=RTOL, atol=ATOL)
    unset = {**variant.init_state()}  # threshold -1: not set yet -> plain ReLU
    np.testing.assert_allclose(
        variant.encode(params, x, unset), np.maximum(pre, 0), rtol=RTOL, atol=ATOL
    )


def test_batchtopk_threshold_ema_matches_numpy_over_steps():
    k, decay = 4, 0.9
    variant = make_variant("batchtopk", D_IN, D_SAE, k=k, threshold_decay=decay)
    params = random_params(variant)
    p = as64(params)
    state = variant.init_state()
    threshold = None
    for step in range(5):
        x = random_x(seed=10 + step)
        _, state, metrics = run_loss(variant, params, x, state, step)
        codes = np_batch_topk_relu(np_pre(p, x), k)
        smallest = codes[codes > 0].min()
        threshold = smallest if threshold is None else decay * threshold + (1 - decay) * smallest
        np.testing.assert_allclose(float(state["threshold"]), threshold, rtol=1e-5)
        np.testing.assert_allclose(metrics["threshold"], threshold, rtol=1e-5)
    info = variant.export_info(params, state)
    assert info["architecture"] == "jumprelu" and info["k"] == k
    np.testing.assert_allclose(info["threshold"], np.full(D_SAE, threshold), rtol=1e-5)


# -------------------------------------------------------------------------------- jumprelu


def test_jumprelu_straight_through_gradients_match_pseudo_derivatives():
    bw = 0.1
    rng = np.random.default_rng(0)
    theta = rng.uniform(0.2, 0.6, size=D_SAE)
    # Put many pre-activations inside the kernel window around theta.
    pre = theta + rng.uniform(-0.1, 0.1, size=(BATCH, D_SAE))
    cot = rng.normal(size=(BATCH, D_SAE))
    args = (jnp.asarray(pre, jnp.float32), jnp.asarray(theta, jnp.float32))

    out, vjp = jax.vjp(lambda a, t: jumprelu(a, t, bw), *args)
    g_pre, g_theta = vjp(jnp.asarray(cot, jnp.float32))
    window = np_rectangle((pre - theta) / bw)
    assert 0 < window.mean() < 1
    np.testing.assert_allclose(out, pre * (pre > theta), rtol=RTOL)
    np.testing.assert_allclose(g_pre, cot * (pre > theta), rtol=RTOL)
    np.testing.assert_allclose(g_theta, np.sum(-(theta / bw) * window * cot, 0), rtol=1e-4)

    out, vjp = jax.vjp(lambda a, t: heaviside(a, t, bw), *args)
    g_pre, g_theta = vjp(jnp.asarray(cot, jnp.float32))
    np.testing.assert_allclose(out, (pre > theta).astype(float))
    assert not np.any(g_pre)
    np.testing.assert_allclose(g_theta, np.sum(-(1 / bw) * window * cot, 0), rtol=1e-4)

    # to_pre: the same kernel estimate reaches pre with the opposite sign (H depends on pre - theta)
    out, vjp = jax.vjp(lambda a, t: heaviside(a, t, bw, True), *args)
    g_pre, g_theta = vjp(jnp.asarray(cot, jnp.float32))
    np.testing.assert_allclose(out, (pre > theta).astype(float))
    np.testing.assert_allclose(g_pre, (1 / bw) * window * cot, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_theta, np.sum(-(1 / bw) * window * cot, 0), rtol=1e-4)


@pytest.mark.parametrize("to_pre", [True, False])
@pytest.mark.parametrize("target_l0", [8.0, None])
def test_jumprelu_loss_and_gradients_match_numpy(target_l0, to_pre):
    """Loss and every parameter's gradient in float64 from the formulas, with the L0 penalty's
    pseudo-gradient reaching theta only or, with `l0_grad_to_pre`, the pre-activations too."""
    bw, penalty, warmup, step = 0.05, 0.3, 10, 4
    variant = make_variant(
        "jumprelu", D_IN, D_SAE, bandwidth=bw, sparsity_penalty=penalty,
        target_l0=target_l0, sparsity_warmup_steps=warmup, l0_grad_to_pre=to_pre,
    )  # fmt: skip
    params, x = random_params(variant), random_x()
    p = as64(params)
    theta = p["threshold"]
    pre = np_pre(p, x)
    h = pre * (pre > theta)
    x_hat = np_decode(p, h)
    np.testing.assert_allclose(variant.encode(params, x), h, rtol=RTOL, atol=ATOL)

    l0 = np.mean(np.sum(pre > theta, axis=-1))
    sparsity = l0 if target_l0 is None else (l0 / target_l0 - 1) ** 2
    scale = step / warmup
    loss, _, metrics = run_loss(variant, params, x, step=step)
    np.testing.assert_allclose(metrics["sparsity"], sparsity, rtol=1e-5)
    np.testing.assert_allclose(loss, np_recon(x, x_hat) + penalty * scale * sparsity, rtol=RTOL)

    # gradients with the pseudo-derivatives (theta is the raw parameter)
    window = np_rectangle((pre - theta) / bw)
    assert 0 < window.mean() < 1  # some pre-activations lie in the kernel
    g_xhat = 2 * (x_hat - x) / BATCH
    g_h = g_xhat @ p["W_dec"].T
    g_theta_recon = np.sum(-(theta / bw) * window * g_h, axis=0)
    d_sparsity_d_l0 = 1.0 if target_l0 is None else 2 * (l0 / target_l0 - 1) / target_l0
    d_loss_d_step = penalty * scale * d_sparsity_d_l0 / BATCH  # per (token, latent) step H
    g_theta_l0 = np.sum(-(1 / bw) * window * d_loss_d_step, axis=0)
    g_pre = g_h * (pre > theta) + (((1 / bw) * window * d_loss_d_step) if to_pre else 0.0)
    want = {
        "threshold": g_theta_recon + g_theta_l0,
        "W_dec": h.T @ g_xhat,
        "W_enc": (x - p["b_dec"]).T @ g_pre,
        "b_enc": g_pre.sum(0),
        "b_dec": g_xhat.sum(0) - g_pre.sum(0) @ p["W_enc"].T,
    }
    grads = jax.grad(lambda prm: run_loss_traced(variant, prm, x, step))(params)
    for name, value in want.items():
        np.testing.assert_allclose(grads[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
    if to_pre:  # the L0 term's share of the encoder gradient is not negligible here
        l0_part = (x - p["b_dec"]).T @ ((1 / bw) * window * d_loss_d_step)
        assert np.linalg.norm(l0_part) > 0.01 * np.linalg.norm(want["W_enc"])


def test_jumprelu_sparsity_warmup_is_linear_then_constant():
    variant = make_variant("jumprelu", D_IN, D_SAE, sparsity_warmup_steps=8)
    params, x = random_params(variant), random_x()
    penalties = []
    for step in (0, 2, 8, 20):
        loss, _, metrics = run_loss(variant, params, x, step=step)
        penalties.append(loss - metrics["recon"])
    weighted = variant.hparams["sparsity_penalty"] * metrics["sparsity"]
    np.testing.assert_allclose(penalties, [0, 0.25 * weighted, weighted, weighted], rtol=1e-4)


# ---------------------------------------------------------------------------- dead latents


def test_dead_latent_counter_counts_resets_and_flags():
    counts = jnp.asarray([0.0, 5.0, 90.0, 95.0], jnp.float32)
    h = jnp.asarray([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
    new, fired = dead.update(counts, h)
    np.testing.assert_array_equal(new, [2.0, 0.0, 92.0, 97.0])
    np.testing.assert_array_equal(fired, [False, True, False, False])
    np.testing.assert_array_equal(dead.dead_mask(new, 95), [False, False, False, True])


def test_dead_fraction_through_the_loss_over_steps():
    variant = make_variant("standard", D_IN, D_SAE, dead_tokens=3 * BATCH)
    params = random_params(variant)
    # Latents 0..9 can never fire: large negative encoder bias.
    params["b_enc"] = params["b_enc"].at[:10].set(-1e3)
    state = variant.init_state()
    for step in range(4):
        _, state, metrics = run_loss(variant, params, random_x(seed=step), state, step)
        counts = np.asarray(state["tokens_since_fired"])
        np.testing.assert_array_equal(counts[:10], (step + 1) * BATCH)
        want_dead = np.mean(counts >= 3 * BATCH)
        np.testing.assert_allclose(metrics["dead_frac"], want_dead)
    assert metrics["dead_frac"] >= 10 / D_SAE


# ------------------------------------------------------------------------------ k-th largest


@pytest.mark.parametrize("k", [1, 7, 50])
def test_kth_largest_is_exact_with_ties_signs_zeros_and_infinities(k):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(6, 50)) * 10.0 ** rng.integers(-30, 30, size=(6, 50))
    x[0] = np.round(x[0])  # many ties
    x[1, :25] = 0.0
    x[1, 25:] = -0.0
    x[2, ::3] = -np.inf
    x[3, :10] = np.inf
    x = x.astype(np.float32)
    want = -np.sort(-x, axis=1)[:, k - 1]
    np.testing.assert_array_equal(kth_largest(jnp.asarray(x), k), want)
    np.testing.assert_array_equal(
        kth_largest(jnp.asarray(x.ravel()), 5 * k), np.sort(x.ravel())[-5 * k]
    )
