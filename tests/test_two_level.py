"""`two_level`: parent-gated TopK levels, AuxK on both, and the clamping interventions,
against float64 NumPy written from the formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model import interventions
from jax_sae.model.init import geometric_median
from jax_sae.model.variants import VARIANTS, VariantError, gao_lr, make_variant
from tests.helpers import assert_close, train_briefly

D, F, F_C, B = 16, 64, 8, 40
CHILDREN = F // F_C
HP = {"F_c": F_C, "k_c": 3, "k_b": 10, "k_aux": 12, "alpha_aux": 0.5}
NAMES = {"W_enc", "W_dec", "b_enc", "b_dec", "W_enc_c", "W_dec_c", "b_enc_c"}


def random_params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = {}
    for suffix, n in (("", F), ("_c", F_C)):
        w_dec = rng.normal(size=(n, D))
        p[f"W_dec{suffix}"] = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)
        p[f"W_enc{suffix}"] = rng.normal(size=(D, n)) / np.sqrt(D)
        p[f"b_enc{suffix}"] = rng.normal(size=n) * 0.2
    p["b_dec"] = rng.normal(size=D) * 0.1
    return p


def to_jax(tree: dict) -> dict:
    return {k: jnp.asarray(v, jnp.float32) for k, v in tree.items()}


def np_topk(values: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest entries of each row, zero the rest."""
    keep = np.argsort(-values, axis=1, kind="stable")[:, :k]
    out = np.zeros_like(values)
    np.put_along_axis(out, keep, np.take_along_axis(values, keep, axis=1), axis=1)
    return out


def np_forward(p, x, k_c=HP["k_c"], k_b=HP["k_b"]):
    """g = topk(relu(pre_c)); h = topk(relu(pre_b) * parent_active); x_hat."""
    pre_c = (x - p["b_dec"]) @ p["W_enc_c"] + p["b_enc_c"]
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    g = np_topk(np.maximum(pre_c, 0), k_c)
    parent_active = g[:, np.arange(F) // CHILDREN] > 0
    h = np_topk(np.maximum(pre, 0) * parent_active, k_b)
    x_hat = g @ p["W_dec_c"] + h @ p["W_dec"] + p["b_dec"]
    return {"pre": pre, "pre_c": pre_c, "g": g, "h": h, "x_hat": x_hat, "parent": parent_active}


def np_auxk(x, x_hat, pre, dead, w_dec, k):
    """Gao et al. AuxK: the k largest dead pre-activations reconstruct the residual."""
    if not dead.any():
        return 0.0
    e = x - x_hat
    h_aux = np.maximum(np_topk(np.where(dead, pre, -np.inf), k), 0)
    x_variance = np.mean(np.sum((x - x.mean(axis=0)) ** 2, axis=1))  # in squared-error units
    return x_variance * np.sum((e - h_aux @ w_dec) ** 2) / np.sum((e - e.mean(axis=0)) ** 2)


def test_defaults_hparams_and_export_info():
    d_sae = VARIANTS["two_level"].suggested_d_sae(2304)
    v = make_variant("two_level", d_in=2304, d_sae=d_sae)
    assert (v.hparams["k_c"], v.hparams["k_b"], v.hparams["F_c"]) == (32, 288, d_sae // 64)
    assert v.hparams["lr"] == pytest.approx(gao_lr(2304, d_sae))
    assert v.init_state()["concept_tokens_since_fired"].shape == (d_sae // 64,)
    v = make_variant("two_level", D, F, **HP)
    info = v.export_info(v.init_params(jax.random.key(0)), v.init_state())
    assert info == {"architecture": "two_level", "k_c": 3, "k_b": 10, "F_c": F_C}
    for bad, match in [
        ({"F_c": 7}, "F_c=7 must divide"),
        ({"k_c": 9}, "k_c"),
        ({"k_b": 0}, "k_b"),
        ({"k_c": 1, "k_b": 5}, "fewer than 2 k_b = 10"),  # 1 concept x 8 children < 10
    ]:
        with pytest.raises(VariantError, match=match):
            make_variant("two_level", D, F, **{**HP, **bad})


def test_init_and_parameter_round_trip():
    v = make_variant("two_level", D, F, **HP)
    sample = np.random.default_rng(0).normal(size=(200, D)) + 1.0
    params = v.init_params(jax.random.key(1), data_sample=sample)
    assert set(params) == NAMES
    for suffix in ("", "_c"):
        np.testing.assert_array_equal(params[f"W_enc{suffix}"], params[f"W_dec{suffix}"].T)
        norms = np.linalg.norm(params[f"W_dec{suffix}"], axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    np.testing.assert_allclose(params["b_dec"], geometric_median(sample), atol=1e-6)
    arrays = v.params_to_arrays(to_jax(random_params(2)))
    assert set(arrays) == NAMES and arrays["W_enc_c"].shape == (D, F_C)
    back = v.params_to_arrays(v.params_from_arrays(arrays))
    for name in NAMES:
        np.testing.assert_array_equal(back[name], arrays[name])
    with pytest.raises(VariantError, match="W_dec_c"):
        v.params_from_arrays({k: a for k, a in arrays.items() if k != "W_dec_c"})


def test_forward_matches_numpy_and_children_fire_only_with_their_parent():
    v = make_variant("two_level", D, F, **HP)
    p = random_params(3)
    x = np.random.default_rng(4).normal(size=(256, D))
    ref = np_forward(p, x)
    codes = np.asarray(jax.jit(v.encode)(to_jax(p), jnp.asarray(x, jnp.float32)))
    assert_close(codes[:, :F], ref["h"], what="base codes")
    assert_close(codes[:, F:], ref["g"], what="concept codes")
    assert_close(jax.jit(v.decode)(to_jax(p), codes), ref["x_hat"], what="decode")
    h, g = codes[:, :F], codes[:, F:]
    assert not np.any((h > 0) & (g[:, np.arange(F) // CHILDREN] <= 0))
    # the gate did real work: base latents with positive pre-activations were switched off
    assert np.any((ref["pre"] > 0) & ~ref["parent"])
    assert np.all((g > 0).sum(axis=1) <= HP["k_c"]) and np.all((h > 0).sum(axis=1) <= HP["k_b"])


def test_loss_aux_on_both_levels_and_dead_tracking_over_steps():
    dead_tokens = 2 * B
    v = make_variant("two_level", D, F, dead_tokens=dead_tokens, **HP)
    p = random_params(5)
    p["b_enc_c"][[2, 6]] = -50.0  # two concepts (hence their 16 children) never fire
    p["b_enc"][[0, 9, 33]] = -50.0  # and three more base latents never fire
    loss_fn = jax.jit(v.loss)
    rng = np.random.default_rng(6)
    state = v.init_state()
    counts, counts_c = np.zeros(F), np.zeros(F_C)
    for step in range(4):
        x = rng.normal(size=(B, D)) * (1 + 0.3 * step)
        ref = np_forward(p, x)
        counts = np.where((ref["h"] > 0).any(axis=0), 0, counts + B)
        counts_c = np.where((ref["g"] > 0).any(axis=0), 0, counts_c + B)
        dead, dead_c = counts >= dead_tokens, counts_c >= dead_tokens
        recon = np.mean(np.sum((x - ref["x_hat"]) ** 2, axis=1))
        aux = np_auxk(x, ref["x_hat"], ref["pre"], dead, p["W_dec"], HP["k_aux"])
        aux_c = np_auxk(x, ref["x_hat"], ref["pre_c"], dead_c, p["W_dec_c"], F_C)
        loss, (state, metrics) = loss_fn(to_jax(p), state, {"x": jnp.asarray(x, jnp.float32)}, 0)
        np.testing.assert_array_equal(state["tokens_since_fired"], counts)
        np.testing.assert_array_equal(state["concept_tokens_since_fired"], counts_c)
        assert_close(loss, recon + HP["alpha_aux"] * (aux + aux_c), what=f"loss at step {step}")
        for key, expected in [
            ("recon", recon),
            ("aux", aux),
            ("aux_c", aux_c),
            ("dead_frac", dead.mean()),
            ("dead_frac_c", dead_c.mean()),
            ("l0", (ref["h"] > 0).sum(axis=1).mean()),
            ("l0_c", (ref["g"] > 0).sum(axis=1).mean()),
        ]:
            assert_close(metrics[key], expected, what=f"{key} at step {step}")
    assert dead_c.sum() == 2 and dead.sum() >= 19 and aux > 0 and aux_c > 0


def test_gradient_matches_numpy_and_skips_gated_latents():
    v = make_variant("two_level", D, F, **HP)
    p = random_params(7)
    x = np.random.default_rng(8).normal(size=(4, D))
    grads, _ = jax.jit(jax.grad(v.loss, has_aux=True))(
        to_jax(p), v.init_state(), {"x": jnp.asarray(x, jnp.float32)}, 0
    )
    ref = np_forward(p, x)
    n = x.shape[0]
    g_xhat = -2.0 / n * (x - ref["x_hat"])
    g_pre = (g_xhat @ p["W_dec"].T) * (ref["h"] > 0)
    g_pre_c = (g_xhat @ p["W_dec_c"].T) * (ref["g"] > 0)
    expected = {
        "W_enc": (x - p["b_dec"]).T @ g_pre,
        "b_enc": g_pre.sum(axis=0),
        "W_dec": ref["h"].T @ g_xhat,
        "W_enc_c": (x - p["b_dec"]).T @ g_pre_c,
        "b_enc_c": g_pre_c.sum(axis=0),
        "W_dec_c": ref["g"].T @ g_xhat,
        "b_dec": g_xhat.sum(axis=0)
        - p["W_enc"] @ g_pre.sum(axis=0)
        - p["W_enc_c"] @ g_pre_c.sum(axis=0),
    }
    for name, value in expected.items():
        assert_close(grads[name], value, rtol=5e-5, what=f"d loss / d {name}")
    gated = ((ref["pre"] > 0) & ~ref["parent"]).any(axis=0) & ~ref["parent"].any(axis=0)
    assert gated.sum() >= 4  # would fire by their own pre-activation, but their parent never does
    assert not np.any(np.asarray(grads["W_enc"])[:, gated])
    assert not np.any(np.asarray(grads["b_enc"])[gated])


def np_clamp(p, x, selected, multiplier, untouched):
    """SAEBench clamp_feature_activation on the joint code [h, g], error term kept."""
    ref = np_forward(p, x)
    codes = np.concatenate([ref["h"], ref["g"]], axis=1)
    w_dec = np.concatenate([p["W_dec"], p["W_dec_c"]])
    clamped = np.where(selected & (codes > 0), -multiplier, codes)
    out = x - (codes @ w_dec + p["b_dec"]) + clamped @ w_dec + p["b_dec"]
    return np.where(untouched[:, None], x, out), codes


def test_clamping_interventions_match_numpy():
    v = make_variant("two_level", D, F, **HP)
    p = random_params(9)
    rng = np.random.default_rng(10)
    x = rng.normal(size=(64, D))
    untouched = np.zeros(64, bool)
    untouched[::16] = True  # e.g. the BOS token of each sequence
    concepts = [1, 4]
    base = [3, 8, 9, 17, 40, 63]
    cases = {
        "base": (base, np.isin(np.arange(F + F_C), base)),
        "concepts": (concepts, np.isin(np.arange(F + F_C), F + np.array(concepts))),
        "coordinated": (
            concepts,
            np.isin(np.arange(F + F_C), F + np.array(concepts))
            | np.isin(np.arange(F + F_C) // CHILDREN, concepts) & (np.arange(F + F_C) < F),
        ),
    }
    for name, (indices, selected) in cases.items():
        x_jax, untouched_jax = jnp.asarray(x, jnp.float32), jnp.asarray(untouched)
        out = interventions.clamp(v, to_jax(p), x_jax, name, indices, 7.5, untouched_jax)
        expected, codes = np_clamp(p, x, selected, 7.5, untouched)
        assert_close(out, expected, rtol=1e-5, what=name)
        np.testing.assert_array_equal(np.asarray(out)[untouched], x[untouched].astype(np.float32))
        assert np.any((codes[~untouched] > 0) & selected), f"{name} clamped nothing"
        assert np.abs(np.asarray(out) - x).max() > 1.0
    with pytest.raises(VariantError, match="concept indices"):
        interventions.clamp(v, to_jax(p), jnp.asarray(x), "concepts", [F_C], 1.0)


def test_base_clamp_of_a_single_level_sae():
    v = make_variant("standard", D, F)
    p = {k: random_params(11)[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    x = np.random.default_rng(12).normal(size=(32, D))
    out = interventions.clamp(v, to_jax(p), jnp.asarray(x, jnp.float32), "base", [0, 5, 6], 3.0)
    h = np.maximum((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0)
    clamped = np.where(np.isin(np.arange(F), [0, 5, 6]) & (h > 0), -3.0, h)
    assert_close(out, x + (clamped - h) @ p["W_dec"], rtol=1e-5)
    with pytest.raises(VariantError, match="no concept level"):
        interventions.clamp(v, to_jax(p), jnp.asarray(x), "coordinated", [0], 1.0)


def test_clamp_rejects_an_unknown_level():
    v = make_variant("two_level", D, F, **HP)
    x = jnp.zeros((4, D), jnp.float32)
    with pytest.raises(VariantError, match="clamp level 'children' is unknown"):
        interventions.clamp(v, to_jax(random_params(13)), x, "children", [0], 1.0)


def hierarchical_data(n: int, seed: int) -> np.ndarray:
    """Each token: 1-2 of 8 concept directions, each with 1-3 of its 8 child directions (child =
    its concept's direction + a private direction)."""
    rng = np.random.default_rng(seed)
    concept_dirs = rng.normal(size=(F_C, D))
    child_dirs = concept_dirs[:, None] + 0.7 * rng.normal(size=(F_C, CHILDREN, D))
    concepts = rng.random((n, F_C)) < 1.5 / F_C
    children = concepts[:, :, None] & (rng.random((n, F_C, CHILDREN)) < 0.25)
    strength = rng.exponential(size=(n, F_C, CHILDREN)) * children
    x = np.einsum("ncj,cjd->nd", strength, child_dirs) + concepts @ concept_dirs
    return (x / np.sqrt(D) + 0.2).astype(np.float32)


@pytest.mark.slow
def test_trains_through_the_real_train_step():
    v = make_variant("two_level", D, F, F_c=F_C, k_c=2, k_b=8, lr=3e-3, warmup_steps=10)
    data = hierarchical_data(256 * 61, seed=13)
    held_out = {"x": jnp.asarray(data[-256:])}
    params = v.init_params(jax.random.key(0), data_sample=data[:512])
    before, after, params, _, _ = train_briefly(
        v, params, lambda step: {"x": jnp.asarray(data[step * 256 : (step + 1) * 256])}, held_out
    )
    assert after < 0.5 * before
    for name in ("W_dec", "W_dec_c"):
        np.testing.assert_allclose(np.linalg.norm(params[name], axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_base_topk_selects_at_the_defaults():
    """At the default sizes the base TopK must cut the gated candidates down on
    most tokens: k_b below the k_c * F / F_c eligible children."""
    d_in = 2304
    d_sae = VARIANTS["two_level"].suggested_d_sae(d_in)
    v = make_variant("two_level", d_in, d_sae)
    params = v.init_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, d_in))
    model = v.model()
    pre = model.apply({"params": params}, x, method=model.pre_activation)
    pre_c = model.apply({"params": params}, x, method=model.concept_pre_activation)
    g = np.asarray(model.apply({"params": params}, pre, pre_c, method=model.activate_levels)[1])
    children = np.asarray(pre).reshape(64, v.hparams["F_c"], -1)
    candidates = np.sum((children > 0) & (g[:, :, None] > 0), axis=(1, 2))
    assert np.mean(candidates > v.hparams["k_b"]) > 0.9
