"""`temporal`: adaptive temporal consistency, against float64 NumPy from the formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model.variants import VARIANTS, VariantError, make_variant
from tests.helpers import assert_close, relu_sae_gradients, train_briefly

D, F, B = 16, 64, 48
HP = {
    "lambda_1": 0.05,
    "lambda_2": 0.3,
    "beta": 3.0,
    "l_max_decay": 0.8,
    "sparsity_warmup_steps": 0,
}


def random_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_dec = rng.normal(size=(F, D))
    return {
        "W_enc": rng.normal(size=(D, F)) / np.sqrt(D),
        "W_dec": w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True),
        "b_enc": rng.normal(size=F) * 0.3 - 0.2,
        "b_dec": rng.normal(size=D) * 0.1,
    }


def to_jax(tree: dict) -> dict:
    return {
        k: jnp.asarray(v) if v.dtype == bool else jnp.asarray(v, jnp.float32)
        for k, v in tree.items()
    }


def random_batch(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    """x_prev rows at sequence starts hold garbage: the loss must ignore them."""
    seq_start = rng.random(B) < 0.25
    seq_start[:2] = [True, False]
    return {
        "x": rng.normal(size=(B, D)) * scale,
        "x_prev": rng.normal(size=(B, D)) * scale,
        "seq_start": seq_start,
    }


def np_encode(p, x):
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    return pre, np.maximum(pre, 0.0)


def np_reference(p, batch, l_max, gap_mode="relative"):
    """The formula in float64; L_max is updated with this batch BEFORE a is computed."""
    x = batch["x"]
    pre, h = np_encode(p, x)
    x_hat = h @ p["W_dec"] + p["b_dec"]
    recon = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    f_prev = np_encode(p, batch["x_prev"])[1]
    f_prev[batch["seq_start"]] = 0.0
    l_max = max(recon, HP["l_max_decay"] * l_max)
    gap = l_max - recon
    a = 1 / (1 + np.exp(-HP["beta"] * (gap / l_max if gap_mode == "relative" else gap)))
    l1 = np.mean(np.sum(np.abs(h), axis=1))
    temporal = np.mean(np.sum(np.abs(h - f_prev), axis=1))
    pairs = ~batch["seq_start"]
    active, active_prev = h[pairs] > 0, f_prev[pairs] > 0
    both, either = (active & active_prev).sum(1), (active | active_prev).sum(1)
    return {
        "pre": pre,
        "h": h,
        "x_hat": x_hat,
        "f_prev": f_prev,
        "recon": recon,
        "l1": l1,
        "temporal": temporal,
        "adaptive_weight": a,
        "l_max": l_max,
        "loss": recon + HP["lambda_1"] * l1 + HP["lambda_2"] * a * temporal,
        "temporal_jaccard": np.mean(np.where(either > 0, both / np.maximum(either, 1), 1.0)),
        "temporal_both_active": np.mean(both / F),
    }


def np_gradients(p, x, ref) -> dict[str, np.ndarray]:
    """Analytic gradient with a and f_prev held constant."""
    n = x.shape[0]
    penalty = HP["lambda_1"] / n * np.sign(ref["h"]) + HP["lambda_2"] * ref[
        "adaptive_weight"
    ] / n * np.sign(ref["h"] - ref["f_prev"])
    return relu_sae_gradients(p, x, ref, penalty)


def test_defaults_are_the_reference_ones_and_overridable():
    v = make_variant("temporal", d_in=2304, d_sae=VARIANTS["temporal"].suggested_d_sae(2304))
    expected = {"lambda_1": 3.0, "lambda_2": 1.5, "beta": 5.0, "l_max_decay": 0.99, "lr": 3e-4}
    assert {k: v.hparams[k] for k in expected} == expected
    assert v.hparams["gap_mode"] == "relative" and v.d_sae == 2304
    assert v.batch_keys == ("x", "x_prev", "seq_start")
    assert float(v.init_state()["l_max"]) == 0.0
    absolute = make_variant("temporal", D, F, gap_mode="absolute", lambda_1=0.1)
    assert absolute.hparams["lambda_1"] == 0.1
    with pytest.raises(VariantError, match="gap_mode"):
        make_variant("temporal", D, F, gap_mode="mean")
    with pytest.raises(VariantError, match="lambda_1"):
        make_variant("temporal", D, F, lambda_1=-1)


@pytest.mark.parametrize("gap_mode", ["relative", "absolute"])
def test_loss_terms_and_l_max_state_over_steps(gap_mode):
    v = make_variant("temporal", D, F, gap_mode=gap_mode, **HP)
    p = random_params(0)
    loss_fn = jax.jit(v.loss)
    rng = np.random.default_rng(1)
    state, l_max = v.init_state(), 0.0
    branches = []
    # reconstruction error rises, falls, rises: L_max both takes the batch value and decays
    for step, scale in enumerate([1.0, 0.6, 0.9, 2.0, 1.0]):
        batch = random_batch(rng, scale)
        ref = np_reference(p, batch, l_max, gap_mode)
        branches.append(ref["l_max"] == ref["recon"])
        l_max = ref["l_max"]
        loss, (state, metrics) = loss_fn(to_jax(p), state, to_jax(batch), step)
        assert_close(state["l_max"], l_max, what=f"L_max after step {step}")
        assert_close(loss, ref["loss"], what=f"loss at step {step}")
        for key in ("recon", "l1", "temporal", "adaptive_weight", "l_max"):
            assert_close(metrics[key], ref[key], what=f"{key} at step {step}")
        for key in ("temporal_jaccard", "temporal_both_active"):
            assert_close(metrics[key], ref[key], rtol=1e-6, what=key)
        if step == 0:  # from L_max = 0 the update comes first: a = sigmoid(0) exactly
            assert float(metrics["adaptive_weight"]) == 0.5
    assert any(branches) and not all(branches)
    assert 0 < float(metrics["temporal_jaccard"]) < 1


def test_gradient_treats_adaptive_weight_and_predecessor_codes_as_constants():
    v = make_variant("temporal", D, F, **HP)
    p = random_params(2)
    rng = np.random.default_rng(3)
    batch = random_batch(rng)
    state = {**v.init_state(), "l_max": jnp.float32(60.0)}
    grads, (_, metrics) = jax.jit(jax.grad(v.loss, has_aux=True))(
        to_jax(p), state, to_jax(batch), 0
    )
    ref = np_reference(p, batch, 60.0)
    assert 0.6 < ref["adaptive_weight"] < 0.9  # a non-trivial weight whose gradient would show
    for name, expected in np_gradients(p, batch["x"], ref).items():
        assert_close(grads[name], expected, rtol=5e-5, what=f"d loss / d {name}")


def test_x_prev_rows_at_sequence_starts_change_nothing():
    v = make_variant("temporal", D, F, **HP)
    p = to_jax(random_params(4))
    batch = random_batch(np.random.default_rng(5))
    changed = {**batch, "x_prev": batch["x_prev"].copy()}
    changed["x_prev"][batch["seq_start"]] = 1e6
    changed["x_prev"][np.flatnonzero(batch["seq_start"])[0]] = np.nan
    grad_fn = jax.jit(jax.grad(v.loss, has_aux=True))
    state = v.init_state()
    grads, (new_state, metrics) = grad_fn(p, state, to_jax(batch), 0)
    grads2, (new_state2, metrics2) = grad_fn(p, state, to_jax(changed), 0)
    for a, b in [(grads, grads2), (new_state, new_state2), (metrics, metrics2)]:
        for key in a:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    # ...while a predecessor row of a non-start token does matter
    moved = {**batch, "x_prev": batch["x_prev"].copy()}
    moved["x_prev"][~batch["seq_start"]] += 1.0
    _, (_, metrics3) = grad_fn(p, state, to_jax(moved), 0)
    assert float(metrics3["temporal"]) != float(metrics["temporal"])


def sequences(n_seq: int, length: int, seed: int) -> np.ndarray:
    """[n_seq, length, D]: sparse codes over 48 directions; each active feature persists to the
    next token with probability 0.8, so adjacent tokens share latents."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(48, D))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    codes = np.zeros((n_seq, length, 48))
    codes[:, 0] = rng.exponential(size=(n_seq, 48)) * (rng.random((n_seq, 48)) < 0.06)
    for t in range(1, length):
        keep = rng.random((n_seq, 48)) < 0.8
        fresh = rng.exponential(size=(n_seq, 48)) * (rng.random((n_seq, 48)) < 0.012)
        codes[:, t] = np.where(keep, codes[:, t - 1], fresh)
    return (codes @ atoms + 0.3).astype(np.float32)


def batches_from(seqs: np.ndarray, rng: np.random.Generator, batch_size: int) -> dict:
    """Random tokens with their predecessors, as the loader yields them."""
    n_seq, length, _ = seqs.shape
    s, t = rng.integers(n_seq, size=batch_size), rng.integers(length, size=batch_size)
    prev = np.where(t[:, None] > 0, seqs[s, np.maximum(t - 1, 0)], 0.0)
    return {"x": seqs[s, t], "x_prev": prev.astype(np.float32), "seq_start": t == 0}


def test_trains_through_the_real_train_step():
    v = make_variant("temporal", D, F, lr=3e-3, warmup_steps=10)
    seqs = sequences(400, 32, seed=6)
    rng = np.random.default_rng(7)
    held_out = to_jax(batches_from(seqs, rng, 256))
    params = v.init_params(jax.random.key(0))
    before, after, params, state, metrics = train_briefly(
        v, params, lambda step: to_jax(batches_from(seqs, rng, 256)), held_out
    )
    assert after < 0.5 * before
    _, (_, held_metrics) = jax.jit(v.loss)(params, v.init_state(), held_out, 0)
    assert 0.5 <= float(metrics["adaptive_weight"]) < 1 and float(state["l_max"]) > 0
    assert float(held_metrics["temporal_jaccard"]) > 0.3
