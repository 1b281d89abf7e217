"""`freq`: frequency-weighted L1, checked against float64 NumPy written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model.losses.freq import RATE_BINS
from jax_sae.model.variants import VARIANTS, VariantError, make_variant
from tests.helpers import assert_close, relu_sae_gradients, train_briefly

D, F, B = 16, 64, 48


def random_params(seed: int) -> dict[str, np.ndarray]:
    """Non-zero everything; some latents biased off so that firing rates differ widely."""
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, D))
    return {
        "W_enc": rng.normal(size=(D, F)) / np.sqrt(D),
        "W_dec": w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True),
        "b_enc": rng.normal(size=F) * 0.5 - np.linspace(0, 2, F),
        "b_dec": rng.normal(size=D) * 0.1,
    }


def to_jax(params: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def np_reference(p, x, rate, *, lam, alpha, decay, freq_norm):
    """The formula in float64: f updated first, then
    L = L_recon + lam mean_b sum_i (1 + a w_i) |h_i|."""
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    h = np.maximum(pre, 0.0)
    x_hat = h @ p["W_dec"] + p["b_dec"]
    recon = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    rate = decay * rate + (1 - decay) * np.mean(h > 0, axis=0)
    if freq_norm == "mean":
        w = rate / rate.mean() if rate.mean() > 0 else np.zeros_like(rate)
    else:
        w = rate
    weights = 1 + alpha * w
    freq_l1 = np.mean(np.sum(weights * np.abs(h), axis=1))
    return {
        "pre": pre,
        "h": h,
        "x_hat": x_hat,
        "rate": rate,
        "weights": weights,
        "recon": recon,
        "freq_l1": freq_l1,
        "l1": np.mean(np.sum(np.abs(h), axis=1)),
        "loss": recon + lam * freq_l1,
    }


def np_gradients(p, x, ref, lam) -> dict[str, np.ndarray]:
    """Analytic gradient of the total loss with the firing rate held constant."""
    penalty = lam / x.shape[0] * ref["weights"] * np.sign(ref["h"])
    return relu_sae_gradients(p, x, ref, penalty)


def test_defaults_are_the_reference_ones_and_overridable():
    v = make_variant("freq", d_in=2304, d_sae=VARIANTS["freq"].suggested_d_sae(2304))
    assert v.d_sae == 2304 and VARIANTS["freq"].default_layer == 19
    keys = ("lambda", "sparsity_warmup_steps", "alpha", "rate_decay", "freq_norm", "lr")
    assert {k: v.hparams[k] for k in keys} == {
        "lambda": 3.0,
        "sparsity_warmup_steps": 1000,
        "alpha": 0.5,
        "rate_decay": 0.99,
        "freq_norm": "mean",
        "lr": 3e-4,
    }
    assert make_variant("freq", 64, 256).hparams["lr"] == pytest.approx(3e-4 * 6)
    assert v.init_state()["firing_rate"].shape == (2304,)
    assert not np.any(v.init_state()["firing_rate"])
    v = make_variant("freq", D, F, alpha=0.1, freq_norm="none", rate_decay=0.9)
    assert (v.hparams["alpha"], v.hparams["freq_norm"], v.hparams["rate_decay"]) == (
        0.1,
        "none",
        0.9,
    )
    with pytest.raises(VariantError, match="freq_norm"):
        make_variant("freq", D, F, freq_norm="max")
    with pytest.raises(VariantError, match="rate_decay"):
        make_variant("freq", D, F, rate_decay=1.0)


@pytest.mark.parametrize("freq_norm", ["none", "mean"])
def test_loss_terms_and_firing_rate_state_over_steps(freq_norm):
    hp = {"lam": 0.07, "alpha": 0.8, "decay": 0.9}
    v = make_variant(
        "freq", D, F, **{"lambda": 0.07}, alpha=0.8, rate_decay=0.9, freq_norm=freq_norm,
        sparsity_warmup_steps=0,
    )  # fmt: skip
    p = random_params(0)
    loss_fn = jax.jit(v.loss)
    rng = np.random.default_rng(1)
    state, rate = v.init_state(), np.zeros(F)
    for step in range(4):
        x = rng.normal(size=(B, D)) * (1 + step)
        ref = np_reference(p, x, rate, freq_norm=freq_norm, **hp)
        loss, (state, metrics) = loss_fn(to_jax(p), state, {"x": jnp.asarray(x, jnp.float32)}, step)
        rate = ref["rate"]
        assert_close(state["firing_rate"], rate, what=f"firing rate after step {step}")
        assert_close(loss, ref["loss"], what="loss")
        for key in ("recon", "freq_l1", "l1"):
            assert_close(metrics[key], ref[key], what=key)
        assert_close(metrics["firing_rate_mean"], rate.mean(), what="mean rate")
        assert_close(metrics["firing_rate_max"], rate.max(), what="max rate")
        counts = np.bincount(np.digitize(rate, 10.0 ** np.arange(-5, 0)), minlength=6)
        for key, expected in zip(RATE_BINS, counts / F, strict=True):
            assert_close(metrics[key], expected, what=key)
    # the weights really varied across latents: the test would see a mean/sum mix-up
    assert 0 < rate.min() < rate.max() < 1 and np.ptp(ref["weights"]) > 0.1
    assert float(metrics["freq_l1"]) > float(metrics["l1"])


@pytest.mark.parametrize("freq_norm", ["none", "mean"])
def test_l1_warmup_scales_the_whole_weighted_penalty(freq_norm):
    """lambda(t) = lambda * min(1, step / sparsity_warmup_steps) multiplies both terms: the plain
    L1 and the frequency weighting (float64 reference, step 2 of a 8-step warm-up)."""
    v = make_variant(
        "freq", D, F, **{"lambda": 0.07}, alpha=0.8, rate_decay=0.9, freq_norm=freq_norm,
        sparsity_warmup_steps=8,
    )  # fmt: skip
    p = random_params(9)
    x = np.random.default_rng(10).normal(size=(B, D))
    rate = np.random.default_rng(11).uniform(0, 0.3, size=F)
    state = {**v.init_state(), "firing_rate": jnp.asarray(rate, jnp.float32)}
    ref = np_reference(p, x, rate, lam=0.07 * 0.25, alpha=0.8, decay=0.9, freq_norm=freq_norm)
    loss, (_, metrics) = jax.jit(v.loss)(to_jax(p), state, {"x": jnp.asarray(x, jnp.float32)}, 2)
    assert_close(loss, ref["loss"], what="loss at a quarter of the warm-up")
    assert_close(metrics["loss/l1"] + metrics["loss/freq"], 0.07 * 0.25 * ref["freq_l1"])
    grads = jax.jit(jax.grad(v.loss, has_aux=True))(
        to_jax(p), state, {"x": jnp.asarray(x, jnp.float32)}, 2
    )[0]
    for name, expected in np_gradients(p, x, ref, 0.07 * 0.25).items():
        assert_close(grads[name], expected, rtol=5e-5, what=f"d loss / d {name}")


def test_penalty_is_a_sum_over_latents_not_a_mean():
    """The reference bug: averaging over latents made the penalty ~F times too weak."""
    v = make_variant("freq", D, F, **{"lambda": 0.04}, alpha=0.0, sparsity_warmup_steps=0)
    p = random_params(2)
    x = np.random.default_rng(3).normal(size=(B, D))
    batch = {"x": jnp.asarray(x, jnp.float32)}
    _, (_, metrics) = jax.jit(v.loss)(to_jax(p), v.init_state(), batch, 0)
    h = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    assert_close(metrics["loss"] - metrics["recon"], 0.04 * h.sum(axis=1).mean())


@pytest.mark.parametrize("freq_norm", ["none", "mean"])
def test_gradient_holds_the_firing_rate_constant(freq_norm):
    v = make_variant(
        "freq", D, F, **{"lambda": 0.04}, alpha=2.0, rate_decay=0.5, freq_norm=freq_norm,
        sparsity_warmup_steps=0,
    )  # fmt: skip
    p = random_params(4)
    rng = np.random.default_rng(5)
    rate = rng.uniform(0, 0.3, size=F)
    state = {**v.init_state(), "firing_rate": jnp.asarray(rate, jnp.float32)}
    x = rng.normal(size=(B, D))
    grads, _ = jax.jit(jax.grad(v.loss, has_aux=True))(
        to_jax(p), state, {"x": jnp.asarray(x, jnp.float32)}, 0
    )
    ref = np_reference(p, x, rate, lam=0.04, alpha=2.0, decay=0.5, freq_norm=freq_norm)
    for name, expected in np_gradients(p, x, ref, 0.04).items():
        assert_close(grads[name], expected, rtol=5e-5, what=f"d loss / d {name}")


def test_nothing_firing_keeps_everything_finite():
    """freq_norm=mean with every f = 0: normalised rates are 0 (plain L1), no 0/0."""
    v = make_variant("freq", D, F, freq_norm="mean")
    p = {**random_params(6), "b_enc": np.full(F, -100.0)}
    x = np.random.default_rng(7).normal(size=(B, D))
    grad_fn = jax.jit(jax.grad(v.loss, has_aux=True))
    grads, (state, metrics) = grad_fn(to_jax(p), v.init_state(), {"x": jnp.asarray(x)}, 0)
    assert not np.any(state["firing_rate"]) and float(metrics["l0"]) == 0
    assert all(np.isfinite(np.asarray(m)).all() for m in metrics.values())
    assert all(np.isfinite(np.asarray(g)).all() for g in grads.values())


def sparse_data(n: int, seed: int) -> np.ndarray:
    """Tokens = sparse non-negative combinations of 48 random unit directions plus an offset."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(48, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = rng.exponential(size=(n, 48)) * (rng.random((n, 48)) < 0.06)
    return (codes @ atoms + 0.3).astype(np.float32)


def test_trains_through_the_real_train_step():
    v = make_variant("freq", D, F, lr=3e-3, warmup_steps=10)
    data = sparse_data(256 * 61, seed=8)
    held_out = {"x": jnp.asarray(data[-256:])}
    params = v.init_params(jax.random.key(0))
    before, after, params, _, metrics = train_briefly(
        v, params, lambda step: {"x": jnp.asarray(data[step * 256 : (step + 1) * 256])}, held_out
    )
    assert after < 0.5 * before
    assert 0 < float(metrics["firing_rate_mean"]) < 1
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, atol=1e-5)
