"""The research terms act at their defaults.

Measured with the gradient-share diagnostic (`jax_sae.training.diagnostics`) at the default sizes,
on normalised inputs (E||x||^2 = d_in), at initialisation, against the documented band.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model.defaults import adapt_hparams
from jax_sae.model.losses.freq import STATE_KEY as FIRING_RATE
from jax_sae.model.variants import VARIANTS, make_variant
from jax_sae.training.diagnostics import make_grad_shares
from tests.helpers import relu_sae_gradients

pytestmark = pytest.mark.slow  # gradient shares at the full default sizes

D_IN, BATCH = 2304, 2048
SHARE_BAND = (0.02, 0.30)


def normalised_inputs(n: int, seed: int = 0) -> jax.Array:
    x = jax.random.normal(jax.random.key(seed), (n, D_IN))
    return x * jnp.sqrt(D_IN / jnp.mean(jnp.sum(x * x, axis=1)))


def shares_at_init(name: str, batch: dict, state_fn=None, step: int = 0) -> dict[str, float]:
    d_sae = VARIANTS[name].suggested_d_sae(D_IN) if name in ("hier_ortho",) else D_IN
    v = make_variant(name, D_IN, d_sae)
    params = v.init_params(jax.random.key(1), data_sample=np.asarray(batch["x"][:256]))
    state = v.init_state() if state_fn is None else state_fn(v, params, batch)
    out = make_grad_shares(v)(params, state, batch, jnp.int32(step))
    return {key.split("/")[1]: float(value) for key, value in out.items()}


@pytest.mark.parametrize("name", ["hier_ortho", "pair_ortho"])
def test_orthogonality_share_is_in_the_spec_band_at_the_defaults(name):
    shares = shares_at_init(name, {"x": normalised_inputs(BATCH)})
    assert SHARE_BAND[0] <= shares[name] <= SHARE_BAND[1], shares


def test_freq_weighting_acts_beside_its_l1_term():
    """With the firing-rate state warmed up (set to the batch's rates), the frequency weighting
    moves W_enc within an order of magnitude of the plain L1 term (measured 0.24x)."""

    def warmed(v, params, batch):
        codes = v.encode(params, batch["x"])
        return v.init_state() | {FIRING_RATE: jnp.mean(codes > 0, axis=0, dtype=jnp.float32)}

    # after the L1 warm-up, which scales both terms (at step 0 both are 0)
    shares = shares_at_init("freq", {"x": normalised_inputs(BATCH)}, warmed, step=10**6)
    assert 0.1 <= shares["freq"] / shares["l1"] <= 10, shares


def test_temporal_term_acts_beside_its_l1_term():
    """Predecessors are the same tokens slightly perturbed (adjacent tokens are similar), no
    sequence starts: the consistency term moves W_enc within an order of magnitude of L1."""
    x = normalised_inputs(BATCH)
    x_prev = x + 0.5 * normalised_inputs(BATCH, seed=1)
    batch = {"x": x, "x_prev": x_prev, "seq_start": jnp.zeros(BATCH, bool)}
    shares = shares_at_init("temporal", batch, step=10**6)  # after the shared L1 warm-up
    assert 0.1 <= shares["temporal"] / shares["l1"] <= 10, shares


def test_grad_share_matches_a_float64_reference():
    """grad_share/l1 of a standard SAE = ||dL1/dW|| / ||dL_recon/dW|| on (W_enc, b_enc), with the
    analytic float64 gradients of the formulas."""
    d, f, n, lam = 8, 24, 32, 0.04
    rng = np.random.default_rng(0)
    v = make_variant("standard", d, f, **{"lambda": lam}, sparsity_warmup_steps=0)
    p = {
        "W_enc": rng.normal(size=(d, f)) / np.sqrt(d),
        "b_enc": rng.normal(size=f) * 0.3,
        "W_dec": rng.normal(size=(f, d)),
        "b_dec": rng.normal(size=d) * 0.1,
    }
    p["W_dec"] /= np.linalg.norm(p["W_dec"], axis=1, keepdims=True)
    x = rng.normal(size=(n, d))
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    h = np.maximum(pre, 0)
    ref = {"pre": pre, "h": h, "x_hat": h @ p["W_dec"] + p["b_dec"]}
    without = relu_sae_gradients(p, x, ref, np.zeros_like(h))
    with_l1 = relu_sae_gradients(p, x, ref, lam / n * np.sign(h))
    keys = ("W_enc", "b_enc")
    diff = np.sqrt(sum(np.sum((with_l1[k] - without[k]) ** 2) for k in keys))
    base = np.sqrt(sum(np.sum(without[k] ** 2) for k in keys))
    params = {k: jnp.asarray(val, jnp.float32) for k, val in p.items()}
    out = make_grad_shares(v)(params, v.init_state(), {"x": jnp.asarray(x, jnp.float32)}, 0)
    np.testing.assert_allclose(float(out["grad_share/l1"]), diff / base, rtol=1e-4)


@pytest.mark.parametrize("name", ["hier_ortho", "pair_ortho"])
@pytest.mark.parametrize("d_in", [64, 256])
def test_orthogonality_share_stays_in_the_band_at_other_widths(name, d_in):
    """The adaptive defaults scale the coefficient with d_in: unscaled, the share grew like
    1 / d_in (135% for hier_ortho and 330% for pair_ortho at d_in 64)."""
    a = adapt_hparams(name, d_in, steps=10_000, batch_size=BATCH, overrides={})
    v = make_variant(name, d_in, a.d_sae, **a.overrides)
    x = jax.random.normal(jax.random.key(0), (BATCH, d_in))
    x = x * jnp.sqrt(d_in / jnp.mean(jnp.sum(x * x, axis=1)))
    params = v.init_params(jax.random.key(1), data_sample=np.asarray(x[:256]))
    share = float(make_grad_shares(v)(params, v.init_state(), {"x": x}, 0)[f"grad_share/{name}"])
    assert SHARE_BAND[0] <= share <= SHARE_BAND[1], share
