"""pair_ortho against a float64 NumPy implementation of the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model import blockwise
from jax_sae.model.losses import pair_ortho
from jax_sae.model.variants import make_variant
from jax_sae.training.optim import make_optimizer
from jax_sae.training.step import make_train_step

D, F, B = 12, 37, 30
SMALL = {"block_size": 8, "rho": 0.03}  # F = 37 is not a multiple of the block size; K = 19


def np_select(scores, k):
    """Top-k pairs i < j of a score matrix (NumPy float64): rows, cols, values."""
    rows, cols = np.triu_indices(len(scores), 1)
    values = scores[rows, cols]
    order = np.argsort(-values, kind="stable")[:k]
    return rows[order], cols[order], values[order]


def np_penalty(w_dec, rows, cols, values, mode):
    """(sum_selected t_ij |d_i . d_j| / F, its gradient): the sum form with N = 1/F."""
    d = np.asarray(w_dec, np.float64)
    f = len(d)
    weight = 1 + values / values.max() if mode == "adaptive" else np.ones_like(values)
    dots = np.sum(d[rows] * d[cols], axis=1)
    grad = np.zeros_like(d)
    np.add.at(grad, rows, (weight * np.sign(dots))[:, None] * d[cols] / f)
    np.add.at(grad, cols, (weight * np.sign(dots))[:, None] * d[rows] / f)
    return np.sum(weight * np.abs(dots)) / f, grad


def setup(seed=0, **hparams):
    v = make_variant("pair_ortho", D, F, **(SMALL | hparams))
    params = v.init_params(jax.random.key(seed))
    x = jax.random.normal(jax.random.key(seed + 1), (B, D))
    return v, params, x


def scores_of(v, params, x):
    h = np.asarray(v.encode(params, x), np.float64)
    return h.T @ h / len(h)


def run_loss(v, params, state, x, step=0):
    _, (state, metrics) = jax.jit(v.loss)(params, state, {"x": x}, jnp.int32(step))
    return metrics, state


def test_selection_size_and_method():
    assert pair_ortho.n_selected(F, 0.03, 10) == int(0.03 * F * (F - 1) / 2) == 19
    assert pair_ortho.n_selected(F, 0.0, 10) == 10
    assert pair_ortho.n_selected(3, 0.5, 10) == 3  # capped at the number of pairs
    assert make_variant("pair_ortho", D, 16384).hparams["topk_method"] == "exact"
    assert make_variant("pair_ortho", D, 16385).hparams["topk_method"] == "approx"


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_penalty_and_gradient_match_numpy(mode):
    v, params, x = setup(tau_mode=mode)
    scores = scores_of(v, params, x)
    k = pair_ortho.n_selected(F, v.hparams["rho"], v.hparams["min_pairs"])
    rows, cols, values = np_select(scores, k)
    assert values[-1] > 0 and len(set(np.round(values, 6))) == k  # no ties to break
    expected, expected_grad = np_penalty(params["W_dec"], rows, cols, values, mode)
    metrics, state = run_loss(v, params, v.init_state(), x)
    np.testing.assert_allclose(metrics["pair_ortho"], expected, rtol=2e-5)
    np.testing.assert_allclose(metrics["pair_score_max"], values[0], rtol=2e-5)
    assert set(
        zip(state["pair_prev_rows"].tolist(), state["pair_prev_cols"].tolist(), strict=True)
    ) == set(zip(rows.tolist(), cols.tolist(), strict=True))
    # gradient: tau * the NumPy gradient on the decoder, nothing through the scores/selection
    grads = []
    for tau in (1.0, 0.0):
        w = make_variant("pair_ortho", D, F, **(SMALL | {"tau_mode": mode, "tau": tau}))
        loss = jax.jit(jax.grad(lambda p, w=w: w.loss(p, w.init_state(), {"x": x}, 0)[0]))
        grads.append(loss(params))
    diff = {key: np.asarray(grads[0][key], np.float64) - grads[1][key] for key in params}
    np.testing.assert_allclose(diff["W_dec"], expected_grad, rtol=1e-4, atol=1e-6)
    for key in ("W_enc", "b_enc", "b_dec"):
        np.testing.assert_allclose(diff[key], 0.0, atol=1e-6)


@pytest.mark.parametrize(
    ("block", "small_candidates", "flush_tiles"),
    [(5, 3, 1), (8, 3, 32), (8, 4096, 32), (40, 4096, 32)],
)
def test_blockwise_top_pairs_is_exact(monkeypatch, block, small_candidates, flush_tiles):
    """Both branches (few / many scores above the threshold), frequent and rare buffer flushes,
    several tile sizes (dividing F or not), against NumPy."""
    monkeypatch.setattr(blockwise, "SMALL_CANDIDATES", small_candidates)
    monkeypatch.setattr(blockwise, "FLUSH_TILES", flush_tiles)
    rng = np.random.default_rng(block)
    scores = rng.normal(size=(F, F))
    top = blockwise.top_upper_pairs(
        lambda r, c: jnp.asarray(scores, jnp.float32)[blockwise.block_rows(r, block, F)[0]][
            :, blockwise.block_rows(c, block, F)[0]
        ],
        F,
        25,
        block,
    )
    rows, cols, values = np_select(scores, 25)
    np.testing.assert_allclose(top.values, values, rtol=1e-6)
    np.testing.assert_array_equal(top.rows, rows)
    np.testing.assert_array_equal(top.cols, cols)


def test_approx_method_finds_most_pairs():
    v, params, x = setup(topk_method="approx")
    _, state = run_loss(v, params, v.init_state(), x)
    k = len(state["pair_prev_rows"])
    rows, cols, _ = np_select(scores_of(v, params, x), k)
    got = set(zip(state["pair_prev_rows"].tolist(), state["pair_prev_cols"].tolist(), strict=True))
    assert len(got & set(zip(rows.tolist(), cols.tolist(), strict=True))) >= 0.9 * k


def test_score_ema_and_jaccard_over_steps():
    decay = 0.5
    v, params, _ = setup(score_ema=True, score_ema_decay=decay, tau_mode="adaptive", select_every=1)
    state = v.init_state()
    assert state[pair_ortho.SCORES_KEY].shape == (F, F)
    ema, previous = np.zeros((F, F)), None
    for step in range(3):
        x = jax.random.normal(jax.random.key(20 + step), (B, D))
        ema = decay * ema + (1 - decay) * scores_of(v, params, x)
        metrics, state = run_loss(v, params, state, x, step)
        k = len(state["pair_prev_rows"])
        rows, cols, values = np_select(ema, k)
        expected, _ = np_penalty(params["W_dec"], rows, cols, values, "adaptive")
        np.testing.assert_allclose(metrics["pair_ortho"], expected, rtol=2e-5)
        np.testing.assert_allclose(state[pair_ortho.SCORES_KEY], ema, rtol=1e-5, atol=1e-7)
        selected = set(zip(rows.tolist(), cols.tolist(), strict=True))
        jaccard = 0.0 if previous is None else len(selected & previous) / len(selected | previous)
        np.testing.assert_allclose(metrics["pair_jaccard"], jaccard, rtol=1e-6)
        previous = selected
    assert 0 < jaccard < 1  # the test saw a partly changed selection


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_select_every_reuses_the_stored_pairs_on_the_current_decoder(mode):
    """select_every 3: steps 0 and 3 select afresh from their own batch; steps 1, 2 and 4 keep
    the last fresh selection (and its scores, for the adaptive weights) but penalise it on the
    decoder they are given; pair_jaccard is 1 on reuse steps and, at step 3, compares with the
    selection of step 0."""
    v, params, _ = setup(tau_mode=mode, select_every=3)
    state = v.init_state()
    rng = np.random.default_rng(5)
    in_use = previous = None
    for step in range(5):
        x = jax.random.normal(jax.random.key(40 + step), (B, D))
        w_dec = params["W_dec"] * (1 + 0.1 * rng.normal(size=params["W_dec"].shape))
        params_now = params | {"W_dec": jnp.asarray(w_dec, jnp.float32)}
        metrics, state = run_loss(v, params_now, state, x, step)
        k = len(state["pair_prev_rows"])
        if step % 3 == 0:
            previous, in_use = in_use, np_select(scores_of(v, params_now, x), k)
        rows, cols, values = in_use
        expected, _ = np_penalty(w_dec, rows, cols, values, mode)
        np.testing.assert_allclose(metrics["pair_ortho"], expected, rtol=2e-5)
        np.testing.assert_array_equal(state["pair_prev_rows"], rows)
        np.testing.assert_array_equal(state["pair_prev_cols"], cols)
        selected = set(zip(rows.tolist(), cols.tolist(), strict=True))
        if step == 0:
            jaccard = 0.0
        elif step % 3:
            jaccard = 1.0
        else:
            before = set(zip(previous[0].tolist(), previous[1].tolist(), strict=True))
            jaccard = len(selected & before) / len(selected | before)
            assert selected != before  # step 3 selected afresh
        np.testing.assert_allclose(metrics["pair_jaccard"], jaccard, rtol=1e-6)


@pytest.mark.parametrize("bad", [0, 2.5, -1])
def test_select_every_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="select_every must be an integer"):
        make_variant("pair_ortho", D, F, select_every=bad)


def test_training_beats_the_untrained_loss():
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(24, D))
    data = (rng.exponential(size=(512, 24)) * (rng.random((512, 24)) < 0.15)) @ directions
    data = jnp.asarray(data, jnp.float32)
    v = make_variant("pair_ortho", D, F, **SMALL, tau=1.0, **{"lambda": 0.01})
    opt = make_optimizer(lr=3e-3, warmup_steps=5)
    step_fn = make_train_step(v, opt)
    params = v.init_params(jax.random.key(0))
    opt_state, state = opt.init(params), v.init_state()
    losses = []
    for step in range(60):
        batch = {"x": data[(step % 8) * 64 : (step % 8 + 1) * 64]}
        params, opt_state, state, metrics = step_fn(params, opt_state, state, batch, step)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-8:]) < 0.5 * np.mean(losses[:8])
