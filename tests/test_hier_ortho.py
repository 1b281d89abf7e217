"""hier_ortho against a float64 NumPy implementation of the formulas."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model import blockwise
from jax_sae.model.losses import hier_ortho
from jax_sae.model.variants import VariantError, make_variant
from jax_sae.training.optim import make_optimizer
from jax_sae.training.step import make_train_step

D, F, K, B = 12, 40, 5, 30
# F = 40 is not a multiple of the block size, B = 30 not a multiple of the token chunk
SMALL = {"k": K, "block_size": 16, "token_chunk": 7}


# --- the formulas in float64 NumPy ----------------------------------------------------------------


def np_weights(n_pair, n, k, c_max, mode, prior=0.25, diagonal=False):
    """w_ij from co-firing n_pair [F, F] and firing n [F]: c_ij = (n_ij + a) / (p n_j + a) with
    chance p = k / F, pairs that never co-fire weigh 0 (with the documented smoothing)."""
    f = len(n)
    p = k / f
    with np.errstate(invalid="ignore", divide="ignore"):
        if mode == "geometric":
            w = (n_pair + prior) / (p * np.sqrt(np.outer(n, n)) + prior)
        else:
            c = (n_pair + prior) / (p * n[None, :] + prior)
            w = np.maximum(c, c.T)
    w = np.where(n_pair > 0, np.minimum(np.nan_to_num(w), c_max), 0.0)
    if not diagonal:
        np.fill_diagonal(w, 0.0)
    return w


def np_decoder_penalty(w_dec, n_pair, n, k, c_max, mode, prior=0.25):
    """(sum_{i != j} w_ij |d_i . d_j| / F, gradient of that w.r.t. the decoder). Directional: a
    pair's gradient goes to the rarer latent only (row i gets it where n_i <= n_j)."""
    d = np.asarray(w_dec, np.float64)
    f = len(d)
    w = np_weights(n_pair, n, k, c_max, mode, prior)
    gram = d @ d.T
    value = np.sum(w * np.abs(gram)) / f
    gamma = np.where(n[:, None] <= n[None, :], 2.0, 0.0) if mode == "directional" else 2.0
    grad = (gamma * w * np.sign(gram)) @ d / f
    return value, grad


def np_activation_penalty(h, n_pair, n, k, c_max, mode):
    h = np.asarray(h, np.float64)
    w = np_weights(n_pair, n, k, c_max, mode, diagonal=True)
    a = h.T @ h / len(h)
    return np.sum(w * a**2) / len(n) ** 2


def batch_counts(h):
    m = (np.asarray(h) > 0).astype(np.float64)
    return m.T @ m, m.sum(0)


# --- fixtures -------------------------------------------------------------------------------------


def random_setup(seed=0, **hparams):
    """A hier_ortho variant with perturbed parameters (varied firing) and a random batch."""
    v = make_variant("hier_ortho", D, F, **(SMALL | hparams))
    keys = jax.random.split(jax.random.key(seed), 3)
    params = v.init_params(keys[0])
    params["W_enc"] = params["W_enc"] + 0.5 * jax.random.normal(keys[1], params["W_enc"].shape)
    x = jax.random.normal(keys[2], (B, D))
    return v, params, x


def codes(v, params, x):
    return np.asarray(v.encode(params, x), np.float64)


def ortho_of(v, params, state, x, step=0):
    _, (state, metrics) = jax.jit(v.loss)(params, state, {"x": x}, jnp.int32(step))
    return float(metrics["ortho"]), metrics, state


@pytest.mark.parametrize(
    ("competition", "target"),
    [
        ("max", "decoder"),
        ("geometric", "decoder"),
        ("max", "activations"),
        ("directional", "activations"),
    ],
)  # directional changes gradients only (tested below), not the value
def test_penalty_matches_numpy(competition, target):
    v, params, x = random_setup(competition=competition, ortho_target=target)
    h = codes(v, params, x)
    n_pair, n = batch_counts(h)
    assert np.count_nonzero(n) > K and np.count_nonzero(n_pair - np.diag(n)) > 0
    ortho, metrics, _ = ortho_of(v, params, v.init_state(), x)
    if target == "decoder":
        expected, _ = np_decoder_penalty(params["W_dec"], n_pair, n, K, 10.0, competition)
    else:
        expected = np_activation_penalty(h, n_pair, n, K, 10.0, competition)
    assert expected > 0
    np.testing.assert_allclose(ortho, expected, rtol=2e-5)
    lam = v.hparams["lambda_2"]
    added = float(metrics["loss"] - metrics["recon"] - v.hparams["alpha_aux"] * metrics["aux"])
    np.testing.assert_allclose(added, lam * expected, rtol=1e-3, atol=2e-5)  # float32 loss - recon


def test_c_max_clips_the_weights():
    v, params, x = random_setup(c_max=1.5)
    n_pair, n = batch_counts(codes(v, params, x))
    ortho, _, _ = ortho_of(v, params, v.init_state(), x)
    expected, _ = np_decoder_penalty(params["W_dec"], n_pair, n, K, 1.5, "max")
    unclipped, _ = np_decoder_penalty(params["W_dec"], n_pair, n, K, 1e9, "max")
    assert expected < unclipped
    np.testing.assert_allclose(ortho, expected, rtol=2e-5)


def test_raw_spec_weights_without_smoothing():
    """prior_cofirings = 0 gives the raw c_ij = (n_ij / n_j) / (k / F)."""
    v, params, x = random_setup(prior_cofirings=0.0)
    n_pair, n = batch_counts(codes(v, params, x))
    ortho, _, _ = ortho_of(v, params, v.init_state(), x)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.nan_to_num(n_pair / n[None, :]) / (K / F)
    w = np.minimum(np.maximum(c, c.T), 10.0)
    np.fill_diagonal(w, 0.0)
    gram = np.asarray(params["W_dec"], np.float64) @ np.asarray(params["W_dec"], np.float64).T
    np.testing.assert_allclose(ortho, np.sum(w * np.abs(gram)) / F, rtol=2e-5)


def test_smoothing_keeps_chance_cofirings_below_c_max():
    """One co-firing of two latents (n_ij = n_i = n_j = 1) weighs (1 + a) / (p + a) <= c_max / 2
    at a = 0.25, while a child that fires 3 times, always with its parent, reaches c_max."""
    chance, c_max = 120 / 18432, 10.0
    n = jnp.asarray([1.0, 1.0, 3.0, 40.0])
    n_pair = jnp.asarray([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 3.0, 40.0]])  # fmt: skip
    args = (n_pair, n[:, None], n[None, :], chance, c_max, "max")
    w, _ = hier_ortho.competition_weights(*args, 0.25)
    assert float(w[0, 1]) == pytest.approx(1.25 / (chance + 0.25), rel=1e-6)
    assert float(w[0, 1]) < c_max / 2 and float(w[2, 3]) == c_max
    assert float(w[0, 2]) == 0.0  # never co-fired
    raw, _ = hier_ortho.competition_weights(*args)
    assert float(raw[0, 1]) == c_max  # what the smoothing fixes: raw counts saturate


# --- gradients ------------------------------------------------------------------------------------


def penalty_grad(v, params, x, **hparams):
    """d(lambda_2 * ortho)/d params: the loss gradient with lambda_2 = 1 minus with lambda_2 = 0."""
    grads = []
    for lam in (1.0, 0.0):
        w = make_variant("hier_ortho", D, F, **(SMALL | hparams | {"lambda_2": lam}))
        grad_fn = jax.jit(jax.grad(lambda p, w=w: w.loss(p, w.init_state(), {"x": x}, 0)[0]))
        grads.append(grad_fn(params))
    return {key: np.asarray(grads[0][key], np.float64) - grads[1][key] for key in params}


@pytest.mark.parametrize("competition", ["max", "directional"])
def test_decoder_gradient_matches_numpy_and_skips_the_weights(competition):
    v, params, x = random_setup(competition=competition)
    n_pair, n = batch_counts(codes(v, params, x))
    grad = penalty_grad(v, params, x, competition=competition)
    _, expected = np_decoder_penalty(params["W_dec"], n_pair, n, K, 10.0, competition)
    np.testing.assert_allclose(grad["W_dec"], expected, rtol=1e-3, atol=1e-6)
    # the weights come from binary masks: nothing reaches the encoder or the biases
    for key in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_allclose(grad[key], 0.0, atol=1e-6)


@pytest.mark.slow
def test_activation_target_gradient_reaches_the_encoder():
    v, params, x = random_setup(ortho_target="activations")
    grad = penalty_grad(v, params, x, ortho_target="activations")
    h = codes(v, params, x)
    n_pair, n = batch_counts(h)

    def penalty(w_enc):  # the same formula in JAX, differentiated directly (weights fixed)
        p = params | {"W_enc": w_enc}
        a = v.encode(p, x).astype(jnp.float32)
        w = np_weights(n_pair, n, K, 10.0, "max", diagonal=True)
        return jnp.sum(jnp.asarray(w, jnp.float32) * (a.T @ a / B) ** 2) / F**2

    expected = np.asarray(jax.grad(penalty)(params["W_enc"]))
    assert np.abs(expected).max() > 0
    np.testing.assert_allclose(grad["W_enc"], expected, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(grad["W_dec"], 0.0, atol=1e-7)


def two_latent_codes(n_child: int) -> np.ndarray:
    """Latent 0 fires on 10 tokens, latent 1 on `n_child` of them, latent 2 alone on 2 others."""
    h = np.zeros((16, 6), np.float32)
    h[:10, 0] = 1.0 + np.arange(10)
    h[:n_child, 1] = 2.0
    h[12:14, 2] = 1.0
    return h


def decoder_term(h, w_dec, mode):
    """value_with_gradient of the token-pair penalty for given codes (TopK with k = 3)."""
    h = jnp.asarray(h)
    fires = (h > 0).astype(jnp.float32)
    active = jax.lax.top_k(h, 3)[1]
    valid = jnp.take_along_axis(fires, active, axis=1) > 0
    fn = partial(
        hier_ortho.token_pair_decoder_sum,
        chance=3 / 6,
        c_max=10.0,
        mode=mode,
        prior=0.25,
        token_chunk=5,
    )
    args = (active, valid, fires.T, fires.sum(0))
    return lambda w: blockwise.value_with_gradient(fn, w, args)


def unit_decoder(seed=0):
    w = np.random.default_rng(seed).normal(size=(6, 4))
    return jnp.asarray(w / np.linalg.norm(w, axis=1, keepdims=True), jnp.float32)


def test_directional_moves_only_the_dependent_latent():
    """n_0 = 10 > n_1 = 3, so c_01 = (n_01 + a) / (p n_1 + a) > c_10: latent 1 is the rarer,
    dependent latent that may absorb latent 0, and only its row gets the gradient."""
    w_dec = unit_decoder()
    h = two_latent_codes(n_child=3)
    directional = decoder_term(h, w_dec, "directional")
    max_mode = decoder_term(h, w_dec, "max")
    assert float(directional(w_dec)) == pytest.approx(float(max_mode(w_dec)))
    g_dir, g_max = jax.grad(directional)(w_dec), jax.grad(max_mode)(w_dec)
    np.testing.assert_allclose(g_dir[1], g_max[1], rtol=1e-6)
    assert np.abs(g_max[0]).max() > 0 and np.all(g_dir[0] == 0)
    # the same from the float64 reference, written from the documented rule
    d = np.asarray(w_dec, np.float64)
    m = (h > 0).astype(np.float64)
    _, expected = np_decoder_penalty(d, m.T @ m, m.sum(0), 3, 10.0, "directional")
    np.testing.assert_allclose(g_dir, expected * 6, rtol=1e-5, atol=1e-7)  # unnormalised sum
    # through the real optimizer: only row 1 of the decoder moves (rows 2.. have no pairs)
    opt = make_optimizer(lr=0.01, warmup_steps=0)
    params = {"W_dec": w_dec}
    updates, _ = opt.update({"W_dec": g_dir}, opt.init(params), params)
    moved = np.abs(np.asarray(updates["W_dec"])).max(axis=1) > 1e-6  # renormalising rounds
    assert moved.tolist() == [False, True, False, False, False, False]


def test_directional_tie_gives_both_latents_the_max_gradient():
    w_dec = unit_decoder(1)
    h = two_latent_codes(n_child=10)  # n_0 = n_1: c_01 = c_10
    g_dir = jax.grad(decoder_term(h, w_dec, "directional"))(w_dec)
    g_max = jax.grad(decoder_term(h, w_dec, "max"))(w_dec)
    assert np.abs(g_max[:2]).min(axis=1).max() > 0
    np.testing.assert_allclose(g_dir, g_max, rtol=1e-6)


@pytest.mark.parametrize("mode", ["max", "directional", "geometric"])
def test_token_pairs_equal_row_blocks(mode):
    """The default per-token enumeration and the F x F row-block pass agree, for block sizes
    that do and do not divide F, and both equal NumPy."""
    v, params, x = random_setup()
    h = jnp.asarray(codes(v, params, x), jnp.float32)
    fires = (h > 0).astype(jnp.float32)
    n_pair, n = batch_counts(h)
    options = {"chance": K / F, "c_max": 10.0, "mode": mode, "prior": 0.25}
    active = jax.lax.top_k(h, K)[1]
    valid = jnp.take_along_axis(fires, active, axis=1) > 0
    w_dec = params["W_dec"]
    tokens = hier_ortho.token_pair_decoder_sum(
        w_dec, (active, valid, fires.T, fires.sum(0)), token_chunk=4, **options
    )
    expected_value, expected_grad = np_decoder_penalty(w_dec, n_pair, n, K, 10.0, mode)
    scale = F
    for result in [tokens] + [
        hier_ortho.block_decoder_sum(
            w_dec, (fires.sum(0), fires.T), counts="batch", block=block, **options
        )
        for block in (8, 13, 64)
    ]:
        np.testing.assert_allclose(result[0] / scale, expected_value, rtol=2e-5)
        np.testing.assert_allclose(result[1] / scale, expected_grad, rtol=1e-4, atol=1e-7)


# --- EMA counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["decoder", "activations"])
def test_ema_counts_over_steps(target):
    decay = 0.9
    v, params, _ = random_setup(counts="ema", counts_decay=decay, ortho_target=target)
    state = v.init_state()
    assert state[hier_ortho.COFIRE_KEY].shape == (F, F)
    ema_pair, ema = np.zeros((F, F)), np.zeros(F)
    for step in range(3):
        x = jax.random.normal(jax.random.key(10 + step), (B, D))
        h = codes(v, params, x)
        n_pair, n = batch_counts(h)
        ema_pair = decay * ema_pair + (1 - decay) * n_pair
        ema = decay * ema + (1 - decay) * n
        ortho, _, state = ortho_of(v, params, state, x, step)
        if target == "decoder":
            expected, _ = np_decoder_penalty(params["W_dec"], ema_pair, ema, K, 10.0, "max")
        else:
            expected = np_activation_penalty(h, ema_pair, ema, K, 10.0, "max")
        np.testing.assert_allclose(ortho, expected, rtol=2e-5)
        np.testing.assert_allclose(state[hier_ortho.COFIRE_KEY], ema_pair, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state[hier_ortho.FIRE_KEY], ema, rtol=1e-5, atol=1e-6)


def test_ema_with_decay_zero_is_batch_mode():
    v, params, x = random_setup()
    ema, _, _ = random_setup(counts="ema", counts_decay=0.0)
    batch_value, _, _ = ortho_of(v, params, v.init_state(), x)
    ema_value, _, _ = ortho_of(ema, params, ema.init_state(), x)
    np.testing.assert_allclose(ema_value, batch_value, rtol=1e-5)
    assert hier_ortho.COFIRE_KEY not in v.init_state()


def test_bad_hyper_parameters():
    with pytest.raises(VariantError, match="competition"):
        make_variant("hier_ortho", D, F, k=K, competition="mean")
    with pytest.raises(VariantError, match="counts_decay"):
        make_variant("hier_ortho", D, F, k=K, counts_decay=1.0)


@pytest.mark.slow
def test_training_beats_the_untrained_loss_and_lowers_the_overlap():
    """A short real run: the loss falls, and the penalised overlap of co-firing decoder rows falls
    below what the same run without the term ends with."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(24, D))
    data = (rng.exponential(size=(512, 24)) * (rng.random((512, 24)) < 0.15)) @ directions
    data = jnp.asarray(data, jnp.float32)
    final_ortho = {}
    for lam in (1.0, 0.0):
        v = make_variant("hier_ortho", D, F, **SMALL, lambda_2=lam)
        opt = make_optimizer(lr=3e-3, warmup_steps=5)
        step_fn = make_train_step(v, opt)
        params = v.init_params(jax.random.key(0), data_sample=np.asarray(data[:128]))
        opt_state, state = opt.init(params), v.init_state()
        losses = []
        for step in range(60):
            batch = {"x": data[(step % 8) * 64 : (step % 8 + 1) * 64]}
            params, opt_state, state, metrics = step_fn(params, opt_state, state, batch, step)
            losses.append(float(metrics["loss"]))
        assert np.isfinite(losses).all()
        assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
        final_ortho[lam] = ortho_of(v, params, v.init_state(), data[:64])[0]
    assert final_ortho[1.0] < 0.95 * final_ortho[0.0]  # measured 0.93: 40 rows in 12 dims
