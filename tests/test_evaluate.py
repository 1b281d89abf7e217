"""Fast evaluation metrics against a float64 NumPy implementation of their definitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.report.evaluate import MetricTotals, evaluate

D, F = 16, 48


def reference(x_batches, xhat_batches, h_batches):
    """The definitions of jax_sae.report.evaluate's docstring (SAEBench 0.6.0 core), in float64."""
    x = np.concatenate(x_batches).astype(np.float64)
    xh = np.concatenate(xhat_batches).astype(np.float64)
    h = np.concatenate(h_batches).astype(np.float64)
    n = len(x)
    rss = ((x - xh) ** 2).sum(1)
    mss = (x**2).sum(1).mean()
    legacy = np.concatenate(
        [
            1 - ((b - c) ** 2).sum(1) / ((b - b.mean(0)) ** 2).sum(1)
            for b, c in zip(x_batches, xhat_batches, strict=True)
        ]
    )
    mse = np.concatenate(
        [((b - c) ** 2).sum(1) / len(b) for b, c in zip(x_batches, xhat_batches, strict=True)]
    )
    rel_bias = [
        (np.linalg.norm(c, axis=1) ** 2).mean() / (b * c).sum(1).mean()
        for b, c in zip(x_batches, xhat_batches, strict=True)
    ]
    nin, nout = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    density = (h > 0).mean(0)
    return {
        "explained_variance": 1 - rss.sum() / ((x - x.mean(0)) ** 2).sum(),
        "explained_variance_pooled": 1 - rss.sum() / ((x - x.mean(0)) ** 2).sum(),
        "explained_variance_saebench": 1 - rss.mean() / (mss - (mss / D) ** 2),
        "explained_variance_legacy": legacy.mean(),
        "mse": mse.mean(),
        "mse_per_token": rss.mean(),
        "cossim": ((x * xh).sum(1) / (nin * nout)).mean(),
        "l2_norm_in": nin.mean(),
        "l2_norm_out": nout.mean(),
        "l2_ratio": (nout / nin).mean(),
        "relative_reconstruction_bias": np.mean(rel_bias),
        "l0": (h != 0).sum(1).mean(),
        "l1": h.sum(1).mean(),
        "frac_alive": (density > 0).mean(),
        "dead_frac": (density == 0).mean(),
        "freq_over_1_percent": (density > 0.01).mean(),
        "freq_over_10_percent": (density > 0.1).mean(),
        "dense_frac": (density > 0.1).mean(),
        "normalized_freq_over_1_percent": density[density > 0.01].sum() / density.sum(),
        "normalized_freq_over_10_percent": density[density > 0.1].sum() / density.sum(),
        "n_tokens": n,
        "feature_density": density,
    }


def random_data(rng, sizes):
    """Activations with a large common offset (like a residual stream) and sparse codes."""
    offset = 5 * rng.normal(size=D)
    xs = [(offset + rng.normal(size=(n, D))).astype(np.float32) for n in sizes]
    hs = []
    for n in sizes:
        h = rng.exponential(size=(n, F)) * (rng.random((n, F)) < rng.random(F) ** 3)
        h[:, :5] = 0  # some dead latents
        hs.append(h.astype(np.float32))
    w = rng.normal(size=(F, D)).astype(np.float32) / np.sqrt(F)
    xhats = [(0.8 * x + h @ w).astype(np.float32) for x, h in zip(xs, hs, strict=True)]
    return xs, xhats, hs


def test_every_metric_matches_the_float64_reference():
    rng = np.random.default_rng(0)
    xs, xhats, hs = random_data(rng, [64, 64, 64, 23])  # a short last batch, as in real runs
    totals = MetricTotals()
    for x, xh, h in zip(xs, xhats, hs, strict=True):
        totals.add(x, xh, h)
    got = totals.result()
    expected = reference(xs, xhats, hs)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
    # the data make the metrics non-trivial, so the comparison above can fail
    assert 0 < got["dead_frac"] < 1 and 0 < got["dense_frac"] < 1
    assert got["explained_variance_pooled"] != pytest.approx(got["explained_variance_legacy"])


class TinyReLUSAE:
    """Just enough of the Variant interface (encode/decode) for the evaluation wiring."""

    def encode(self, params, x, state):
        return jnp.maximum((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0)

    def decode(self, params, h):
        return h @ params["W_dec"] + params["b_dec"]


def test_evaluate_scores_the_sae_on_raw_activations_with_the_scale_folded():
    rng = np.random.default_rng(1)
    scale = 0.25
    params = {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32) / 4,
        "W_dec": rng.normal(size=(F, D)).astype(np.float32) / 4,
        "b_enc": rng.normal(size=F).astype(np.float32) / 10,
        "b_dec": rng.normal(size=D).astype(np.float32),
    }
    xs = [(8 * rng.normal(size=(n, D))).astype(np.float32) for n in (50, 50, 17)]
    got = evaluate(TinyReLUSAE(), params, xs, scale=scale)
    p = {k: v.astype(np.float64) for k, v in params.items()}
    hs = [np.maximum((scale * x - p["b_dec"]) @ p["W_enc"] + p["b_enc"], 0) for x in xs]
    xhats = [(h @ p["W_dec"] + p["b_dec"]) / scale for h in hs]
    expected = reference(xs, xhats, [h / scale for h in hs])
    for key in ("explained_variance_pooled", "mse_per_token", "cossim", "l1", "l0", "l2_ratio"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)


def test_headline_explained_variance_is_one_minus_fvu_where_saebench_exceeds_one():
    """A known answer by hand (d = 4, four tokens): x = m + delta with m = (1, 1, 1, 1) and delta
    = +-e1, +-e2, reconstructed as m + delta / 2. Then sum ||x - mean||^2 = 4, rss = 1/4 per
    token, so 1 - FVU = 1 - 1 / 4 = 0.75 at any scale. SAEBench's formula uses M = mean ||x||^2
    = 5: 1 - 0.25 / (5 - (5/4)^2) = 0.9273 at scale 1, but scaled 5x (M = 125, rss 6.25 per
    token) its denominator 125 - 31.25^2 is negative: 1 + 6.25 / 851.5625 = 1.0073 > 1."""
    m = np.ones(4)
    delta = np.array([[1, 0, 0, 0], [-1, 0, 0, 0], [0, 1, 0, 0], [0, -1, 0, 0]], np.float64)
    by_hand = {1.0: 1 - 0.25 / (5 - (5 / 4) ** 2), 5.0: 1 + 6.25 / (31.25**2 - 125)}
    for scale, saebench_by_hand in by_hand.items():
        x, x_hat = scale * (m + delta), scale * (m + delta / 2)
        totals = MetricTotals()
        totals.add(x.astype(np.float32), x_hat.astype(np.float32), np.zeros((4, 3), np.float32))
        got = totals.result()
        # the formulas, in float64
        rss = ((x - x_hat) ** 2).sum(1)
        mean_sq = (x**2).sum(1).mean()
        one_minus_fvu = 1 - rss.sum() / ((x - x.mean(0)) ** 2).sum()
        saebench = 1 - rss.mean() / (mean_sq - (mean_sq / 4) ** 2)
        assert one_minus_fvu == pytest.approx(0.75) and saebench == pytest.approx(saebench_by_hand)
        assert got["explained_variance"] == pytest.approx(one_minus_fvu, rel=1e-6)
        assert got["explained_variance_pooled"] == got["explained_variance"]
        assert got["explained_variance_saebench"] == pytest.approx(saebench, rel=1e-6)
    assert by_hand[1.0] < 1 < by_hand[5.0]  # SAEBench's number passes 1 at 5x; ours stays 0.75
