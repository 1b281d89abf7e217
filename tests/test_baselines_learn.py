"""The baselines learn at their defaults, on small worlds with known features.

A world here is built in the test with NumPy, by the recipe of the synthetic worlds
(docs/synthetic.md): `x = sum_i c_i d_i + b` with random unit directions `d_i`, each feature firing
independently with its own probability, magnitudes `relu(N(1, 0.25^2))`, a bias of norm 1; inputs
normalised to E||x||^2 = d as the trainer does. Runs use the real jitted train step and optimizer,
with every hyper-parameter at its default after `adapt_hparams` (as `train.py` resolves them for
the run's length), except the sizes named in each test.

Feature recovery is SAELens's MCC (`sae_lens.synthetic.evals.mean_correlation_coefficient`,
written out here since `.venv` has no SAELens): the mean |cos| of the one-to-one (Hungarian)
matching between decoder rows and true directions. Its chance line is the same score of a random
unit decoder of the same width, computed in the test: in small d random directions already match
some true direction fairly well (0.46 at d 32, width 128).
"""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from jax_sae.model.defaults import adapt_hparams
from jax_sae.model.losses.freq import STATE_KEY as FIRING_RATE
from jax_sae.model.variants import make_variant
from jax_sae.training.diagnostics import make_grad_shares
from jax_sae.training.optim import make_optimizer
from jax_sae.training.step import make_train_step


def make_world(n: int, d: int, n_features: int, p_max: float, seed: int = 0):
    """(x [n, d] normalised to E||x||^2 = d, true unit directions [n_features, d]); feature i
    fires with a probability drawn uniformly from [p_max / 10, p_max]."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(n_features, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    p = rng.uniform(p_max / 10, p_max, n_features)
    fires = rng.random((n, n_features)) < p
    codes = np.maximum(rng.normal(1.0, 0.25, (n, n_features)), 0) * fires
    bias = rng.normal(size=d)
    x = codes @ directions + bias / np.linalg.norm(bias)
    x *= np.sqrt(d / np.mean(np.sum(x * x, axis=1)))
    return x.astype(np.float32), directions


def mcc(decoder: np.ndarray, truth: np.ndarray) -> float:
    """SAELens's MCC: Hungarian-matched mean |cos| between the rows of the two sets."""
    a = decoder / np.linalg.norm(decoder, axis=1, keepdims=True)
    b = truth / np.linalg.norm(truth, axis=1, keepdims=True)
    cos = np.abs(a @ b.T)
    rows, cols = linear_sum_assignment(-cos)
    return float(cos[rows, cols].mean())


def train_at_defaults(name: str, x: np.ndarray, *, steps: int, batch: int, d_sae: int, **given):
    """Train `name` for `steps` steps of `batch` tokens (epochs over x, reshuffled) at the
    defaults as adapted to this run; returns (variant, params, per-step L0)."""
    d_in = x.shape[1]
    adapted = adapt_hparams(name, d_in, steps=steps, batch_size=batch, overrides=given, d_sae=d_sae)
    variant = make_variant(name, d_in, adapted.d_sae, **adapted.overrides)
    hp = variant.hparams
    rng = np.random.default_rng(0)
    params = variant.init_params(jax.random.key(0), data_sample=x[:4096])
    opt = make_optimizer(lr=hp["lr"], warmup_steps=hp["warmup_steps"], total_steps=steps)
    step_fn = make_train_step(variant, opt)
    opt_state, state = opt.init(params), variant.init_state()
    per_epoch = len(x) // batch
    l0 = []
    for step in range(steps):
        if step % per_epoch == 0:
            order = rng.permutation(len(x))
        rows = order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
        batch_x = {"x": jnp.asarray(x[rows])}
        params, opt_state, state, metrics = step_fn(
            params, opt_state, state, batch_x, jnp.int32(step)
        )
        l0.append(float(metrics["l0"]))
    return variant, params, np.asarray(l0)


def test_standard_recovers_features_far_above_chance_at_its_defaults():
    """d 32, 128 true features (true L0 ~2.6), d_sae 128, 400 steps of 1024 tokens. Measured:
    MCC 0.743 against the chance line 0.457, L0 9.6; with the template's settings (lambda 0.04,
    lr 3e-4, the untied kaiming-uniform encoder, no L1 warm-up) MCC 0.456, at chance."""
    x, directions = make_world(64 * 1024, d=32, n_features=128, p_max=0.04, seed=1)
    _, params, l0 = train_at_defaults("standard", x, steps=400, batch=1024, d_sae=128)
    decoder = np.asarray(params["W_dec"])
    chance = mcc(np.random.default_rng(12345).standard_normal(decoder.shape), directions)
    score = mcc(decoder, directions)
    assert score > chance + 0.2, (score, chance)
    assert np.mean(l0[-20:]) < 32, l0[-20:]  # sparse: fewer active latents than dimensions


def test_jumprelu_holds_target_l0_over_ten_default_length_runs():
    """d 64, 256 true features, d_sae 256, target_l0 20, 1280 steps of 256 tokens (10x the
    128-step default-length run of tests/test_research_worlds.py): the mean L0 of every 128-step
    window stays within 10% of target_l0. Measured 19.3, 19.8, 20.4, 20.7, ..., 20.6; with the
    template's settings (sparsity_penalty 1, bandwidth 0.001, the L0 gradient to theta only)
    18.8, 17.0, 20.3, 25.5, 30.2, 33.4, 36.1, 39.4, 43.7, 48.7."""
    x, _ = make_world(32768, d=64, n_features=256, p_max=0.1)
    variant, _, l0 = train_at_defaults("jumprelu", x, steps=1280, batch=256, d_sae=256)
    target = variant.hparams["target_l0"]
    windows = l0.reshape(10, 128).mean(axis=1)
    assert np.all(np.abs(windows / target - 1) <= 0.1), windows


def sparse_rates_state(variant, params, x):
    """The firing-rate state of a sparse code: each latent's rate on x, after lowering b_enc so
    that rates spread over 1e-4 .. 0.1 (a trained SAE's range, not the ~0.5 of the init)."""
    model = variant.model()
    pre = np.asarray(model.apply({"params": params}, jnp.asarray(x), method=model.forward).pre)
    quantiles = np.quantile(pre, 1 - np.logspace(-4, -1, variant.d_sae), axis=0)
    params = params | {"b_enc": jnp.asarray(params["b_enc"] - quantiles.diagonal())}
    codes = np.asarray(variant.encode(params, jnp.asarray(x)))
    rate = jnp.asarray(np.mean(codes > 0, axis=0), jnp.float32)
    return params, variant.init_state() | {FIRING_RATE: rate}


def freq_weighting_effect(**given) -> tuple[float, float]:
    """(loss of the frequency weighting / loss of the L1 term, ratio of their shares of the
    encoder gradient) after the L1 warm-up, at firing rates of 1e-4 .. 0.1 (median 0.003)."""
    x, _ = make_world(4096, d=32, n_features=128, p_max=0.04)
    variant = make_variant("freq", 32, 256, **given)
    params, state = sparse_rates_state(variant, variant.init_params(jax.random.key(0)), x)
    rate = np.asarray(state[FIRING_RATE])
    assert 1e-3 <= np.median(rate) <= 1e-2 and rate.max() <= 0.15
    after_warmup = jnp.int32(variant.hparams["sparsity_warmup_steps"] + 1)
    batch = {"x": jnp.asarray(x)}
    _, (_, metrics) = variant.loss(params, state, batch, after_warmup)
    shares = make_grad_shares(variant)(params, state, batch, after_warmup)
    return (
        float(metrics["loss/freq"] / metrics["loss/l1"]),
        float(shares["grad_share/freq"] / shares["grad_share/l1"]),
    )


def test_freq_weighting_acts_at_its_defaults():
    """At the defaults (`freq_norm=mean`) the frequency weighting adds 1.8x the plain L1 term's
    loss, and its share of the encoder gradient is 7.8x L1's; with w = f (`freq_norm=none`, the
    raw rate) 0.027x and 0.098x: alpha f is small at the firing rates of a sparse code."""
    assert make_variant("freq", 32, 256).hparams["freq_norm"] == "mean"
    loss_ratio, share_ratio = freq_weighting_effect()
    assert loss_ratio > 0.5 and share_ratio > 0.5, (loss_ratio, share_ratio)
    loss_none, share_none = freq_weighting_effect(freq_norm="none")
    assert loss_ratio > 10 * loss_none and share_ratio > 10 * share_none
