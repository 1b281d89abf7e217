"""The `matryoshka` variant (Matryoshka BatchTopK): the nested-prefix loss and its gradients
against float64 NumPy written from the formula, known answers, the prefix widths, inference and
export in BatchTopK's JumpReLU form, and a training run at the defaults."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train
from jax_sae.export import saelens as ex
from jax_sae.model.losses import dead as dead_tracking
from jax_sae.model.losses.matryoshka import prefix_widths
from jax_sae.model.variants import VariantError, make_variant
from tests.helpers import assert_close
from tests.test_sparse import big_dots
from tests.test_train_cli import args, write_cache

D, F, B, K = 12, 96, 20, 5
K_AUX, ALPHA_AUX = 7, 0.5

# ------------------------------------------------------------------------------ prefix widths


def test_default_widths_are_fractions_that_follow_d_sae():
    assert make_variant("matryoshka", 64, 4096).hparams["matryoshka_widths"] == (
        1 / 32, 1 / 8, 1 / 2, 1.0
    )  # fmt: skip
    assert prefix_widths((1 / 32, 1 / 8, 1 / 2, 1.0), 4096) == (128, 512, 2048, 4096)
    assert prefix_widths((1 / 32, 1 / 8, 1 / 2, 1.0), 448) == (14, 56, 224, 448)
    assert prefix_widths([0.25, 0.5, 1], 100) == (25, 50, 100)
    assert prefix_widths((128, 512, 4096), 4096) == (128, 512, 4096)
    assert prefix_widths((1.0,), 7) == (7,)


def test_cli_and_json_lists_become_tuples():
    hparams = make_variant("matryoshka", D, F, k=K, matryoshka_widths=[8, 32, F]).hparams
    assert hparams["matryoshka_widths"] == (8, 32, F)
    assert json.loads(json.dumps(hparams["matryoshka_widths"])) == [8, 32, F]


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ([32, 8, F], "not strictly increasing"),
        ([8, 32, 64], f"the last width must be d_sae={F}"),
        ([0.25, 0.5], "fractions must lie in"),
        ([0.5, 1.5], "fractions must lie in"),
        ([128, 0.5, 1.0], "fractions must lie in"),
        ([0.001, 1.0], "the first prefix has 0 latents"),
        ([0, F], "the first prefix has 0 latents"),
        ([0.5, 0.501, 1.0], r"gives prefixes of \[48, 48, 96\]"),
        ([], "not a non-empty list"),
        (["8", F], "not a number"),
        ([True, F], "not a number"),
    ],
)
def test_invalid_widths_are_one_line_errors_naming_the_fix(widths, message):
    with pytest.raises(VariantError, match=message) as error:
        make_variant("matryoshka", D, F, k=K, matryoshka_widths=widths)
    text = str(error.value)
    assert "\n" not in text and text.startswith("matryoshka: matryoshka_widths=")
    assert "give" in text


def test_a_scalar_width_is_refused_by_type():
    with pytest.raises(VariantError, match="matryoshka_widths must be a list"):
        make_variant("matryoshka", D, F, k=K, matryoshka_widths=0.5)


# ---------------------------------------------------------------- the loss against float64


def np_matryoshka_loss_and_grads(p, x, dead_before, widths, k, k_aux, alpha):
    """L = sum_i mean_b ||x - x_hat_i||^2 + alpha L_aux (`auxk`: in units of the squared error),
    x_hat_i = h[:, :m_i] W_dec[:m_i] + b_dec,
    h the BatchTopK code, and its gradients, from the formulas (float64)."""
    n = len(x)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    acts = np.maximum(pre, 0)
    kth = np.sort(acts.reshape(-1))[-k * n]
    keep = (acts >= kth) & (acts > 0)
    h = np.where(keep, pre, 0.0)
    loss, per_prefix = 0.0, {}
    grads = {"W_dec": np.zeros_like(p["W_dec"]), "b_dec": np.zeros_like(p["b_dec"])}
    g_pre = np.zeros_like(pre)
    for m in widths:
        mask = np.arange(h.shape[1]) < m
        x_hat = (h * mask) @ p["W_dec"] + p["b_dec"]
        per_prefix[m] = np.mean(np.sum((x - x_hat) ** 2, axis=1))
        loss += per_prefix[m]
        g_xhat = -2.0 / n * (x - x_hat)
        g_pre += (g_xhat @ p["W_dec"].T) * keep * mask
        grads["W_dec"] += (h * mask).T @ g_xhat
        grads["b_dec"] += g_xhat.sum(0)
    x_hat = h @ p["W_dec"] + p["b_dec"]  # the full width
    dead = dead_before & ~np.any(h > 0, axis=0)
    scores = np.where(dead, pre, -np.inf)
    aux_keep = np.zeros(pre.shape, bool)
    np.put_along_axis(aux_keep, np.argsort(-scores, axis=1)[:, :k_aux], True, axis=1)
    aux_keep &= dead & (pre > 0)
    h_aux = np.where(aux_keep, pre, 0.0)
    e = x - x_hat
    variance = np.sum((e - e.mean(0)) ** 2)
    x_variance = np.mean(np.sum((x - x.mean(0)) ** 2, axis=1))  # a constant (sparsify's units)
    loss += alpha * x_variance * np.sum((e - h_aux @ p["W_dec"]) ** 2) / variance
    g_ehat = -2.0 * alpha * x_variance * (e - h_aux @ p["W_dec"]) / variance
    g_pre += (g_ehat @ p["W_dec"].T) * aux_keep
    grads["W_dec"] += h_aux.T @ g_ehat
    grads["W_enc"] = (x - p["b_dec"]).T @ g_pre
    grads["b_enc"] = g_pre.sum(0)
    grads["b_dec"] -= p["W_enc"] @ g_pre.sum(0)
    return loss, grads, per_prefix


def random_setup(seed=0, **hparams):
    """A trained-looking matryoshka SAE, a batch, and about half the latents dead before it."""
    rng = np.random.default_rng(seed)
    hparams = {"k": K, "k_aux": K_AUX, "alpha_aux": ALPHA_AUX, "dead_tokens": 2 * B, **hparams}
    v = make_variant("matryoshka", D, F, **hparams)
    params = {
        key: np.asarray(value, np.float64) + 0.05 * rng.normal(size=value.shape)
        for key, value in v.init_params(jax.random.key(seed), rng.normal(size=(64, D))).items()
    }
    x = rng.normal(size=(B, D))
    dead_before = rng.random(F) < 0.5
    state = v.init_state()
    state[dead_tracking.STATE_KEY] = jnp.asarray(np.where(dead_before, B, 0), jnp.float32)
    return v, params, x, dead_before, state


def loss_and_grads(v, params, x, state):
    p32 = {key: jnp.asarray(value, jnp.float32) for key, value in params.items()}
    fn = jax.jit(jax.value_and_grad(v.loss, has_aux=True))
    (loss, (_, metrics)), grads = fn(p32, state, {"x": jnp.asarray(x, jnp.float32)}, 0)
    return loss, metrics, grads


WIDTH_SETS = {
    "default": None,  # fractions 1/32, 1/8, 1/2, 1: 3, 12, 48, 96 latents
    "two-levels": [10, F],
    "one-latent-first": [1, 2, 50, 95, F],
}


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
@pytest.mark.parametrize("widths", list(WIDTH_SETS))
def test_loss_and_gradients_match_float64(widths, dense):
    given = {} if WIDTH_SETS[widths] is None else {"matryoshka_widths": WIDTH_SETS[widths]}
    v, params, x, dead_before, state = random_setup(dense=dense, **given)
    ends = prefix_widths(v.hparams["matryoshka_widths"], F)
    want_loss, want, per_prefix = np_matryoshka_loss_and_grads(
        params, x, dead_before, ends, K, K_AUX, ALPHA_AUX
    )
    loss, metrics, grads = loss_and_grads(v, params, x, state)
    assert float(metrics["aux"]) > 0, "AuxK must have dead latents to select"
    assert_close(loss, want_loss, what="loss")
    for m in ends[:-1]:
        assert_close(metrics[f"recon/{m}"], per_prefix[m], what=f"recon/{m}")
    assert_close(metrics["recon"], per_prefix[F], what="full-width recon")
    assert_close(metrics["l0"], K)
    for key in want:
        assert_close(grads[key], want[key], what=key)


def test_one_level_is_batchtopk():
    v, params, x, _, state = random_setup(matryoshka_widths=[1.0])
    plain = make_variant(
        "batchtopk", D, F, k=K, k_aux=K_AUX, alpha_aux=ALPHA_AUX, dead_tokens=2 * B
    )
    loss, metrics, grads = loss_and_grads(v, params, x, state)
    want_loss, _, want_grads = loss_and_grads(plain, params, x, state)
    assert float(metrics["matryoshka"]) == 0
    assert_close(loss, want_loss)
    for key in want_grads:
        assert_close(grads[key], want_grads[key], what=key)


# ------------------------------------------------------------------------------ known answers


@pytest.mark.parametrize("dense", [False, True], ids=["sparse", "dense"])
def test_a_first_group_latent_gets_the_gradient_of_every_prefix(dense):
    """Only latents of the first group fire: every prefix reconstructs x like the full width,
    so the loss and each first-group decoder row's gradient are K_levels times BatchTopK's."""
    widths = [8, 24, 48, F]
    v, params, x, _, state = random_setup(dense=dense, matryoshka_widths=widths, alpha_aux=0.0)
    params["b_enc"][widths[0] :] = -100.0  # nothing beyond the first group can fire
    plain = make_variant("batchtopk", D, F, k=K, alpha_aux=0.0, dense=dense)
    loss, metrics, grads = loss_and_grads(v, params, x, state)
    want_loss, _, want = loss_and_grads(plain, params, x, state)
    assert np.any(np.asarray(grads["W_dec"][: widths[0]]))
    assert_close(loss, len(widths) * want_loss)
    for m in widths[:-1]:
        assert_close(metrics[f"recon/{m}"], metrics["recon"], what=f"recon/{m}")
    assert_close(grads["W_dec"], len(widths) * want["W_dec"], what="W_dec")


def test_a_last_group_latent_gets_the_full_width_gradient_only():
    """Decoder rows beyond the last inner prefix appear only in the full-width reconstruction:
    their gradient is BatchTopK's; rows of the first group differ from it."""
    widths = [8, 24, 48, F]
    v, params, x, _, state = random_setup(matryoshka_widths=widths, alpha_aux=0.0)
    plain = make_variant("batchtopk", D, F, k=K, alpha_aux=0.0)
    _, _, grads = loss_and_grads(v, params, x, state)
    _, _, want = loss_and_grads(plain, params, x, state)
    last = slice(widths[-2], F)
    assert np.any(np.asarray(want["W_dec"][last]))
    assert_close(grads["W_dec"][last], want["W_dec"][last], what="last group")
    assert not np.allclose(grads["W_dec"][: widths[0]], want["W_dec"][: widths[0]])


def test_sparse_path_adds_no_dense_product_and_no_second_selection():
    """The prefix decodes reuse the forward's selected pairs: no [B, F] x [F, d]-sized product
    and no top-k beyond BatchTopK's own (its selection and AuxK's)."""
    assert big_dots("matryoshka", dense=False, k=5) == big_dots("batchtopk", dense=False, k=5)
    assert len(big_dots("matryoshka", dense=False, k=5)) == 1

    def n_top_k(name):
        v = make_variant(name, D, F, k=K)
        params = v.init_params(jax.random.key(0))
        batch = {"x": jnp.zeros((B, D), jnp.float32)}
        text = str(
            jax.make_jaxpr(jax.grad(lambda p: v.loss(p, v.init_state(), batch, 0)[0]))(params)
        )
        return text.count("top_k[")

    assert n_top_k("matryoshka") == n_top_k("batchtopk") == 2


# -------------------------------------------------------------------- inference and export


def test_inference_is_batchtopks_jumprelu_with_the_learned_threshold():
    v, params, x, _, _ = random_setup()
    plain = make_variant("batchtopk", D, F, k=K)
    p32 = {key: jnp.asarray(value, jnp.float32) for key, value in params.items()}
    state = v.init_state() | {"threshold": jnp.float32(0.3)}
    h = np.asarray(v.encode(p32, jnp.asarray(x, jnp.float32), state))
    np.testing.assert_array_equal(h, plain.encode(p32, jnp.asarray(x, jnp.float32), state))
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    assert_close(h, np.where(pre > 0.3, np.maximum(pre, 0), 0.0))
    assert 0 < np.count_nonzero(h) < h.size
    info, plain_info = v.export_info(p32, state), plain.export_info(p32, state)
    assert info["architecture"] == "jumprelu" and info["k"] == K
    np.testing.assert_array_equal(info["threshold"], plain_info["threshold"])
    np.testing.assert_allclose(info["threshold"], np.full(F, 0.3, np.float32))
    assert v.export_form() == plain.export_form()
    assert v.export_form()["architecture"] == "jumprelu"


# --------------------------------------------------------------------------- a training run


@pytest.mark.slow
def test_training_at_the_defaults_lowers_the_loss_and_holds_l0_at_k(tmp_path):
    """train.py at every default on the small synthetic cache, then the SAELens export."""
    cache = write_cache(tmp_path / "cache")
    out = tmp_path / "run"
    assert train.main(args(cache, out, "--steps", "60", variant="matryoshka", sets=())) == 0
    config = json.loads((out / "config.json").read_text())
    hparams = config["hparams"]
    assert config["d_sae"] == 448 and hparams["k"] == 2  # adapted like batchtopk's
    assert hparams["matryoshka_widths"] == [1 / 32, 1 / 8, 1 / 2, 1.0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    assert len(records) >= 10
    assert all(r["l0"] == hparams["k"] for r in records)
    assert {"recon/14", "recon/56", "recon/224", "loss/matryoshka"} <= set(records[-1])
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    export = ex.export_run(out)
    cfg = json.loads((export / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 448


@pytest.mark.slow
def test_a_run_with_given_widths_extends_with_more_steps(tmp_path, capsys):
    """Widths given as a list (a tuple once resolved, a list in config.json) still match the run's
    config when `--resume --steps` extends it; other widths are refused in one line."""
    cache = write_cache(tmp_path / "cache")
    out = tmp_path / "run"
    sets = ("d_sae=64", "k=4", "matryoshka_widths=[0.25,0.5,1]")
    assert train.main(args(cache, out, "--steps", "10", variant="matryoshka", sets=sets)) == 0
    more = args(cache, out, "--steps", "15", "--resume", variant="matryoshka", sets=sets)
    assert train.main(more) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 15 and config["hparams"]["matryoshka_widths"] == [0.25, 0.5, 1]
    other = (*sets[:2], "matryoshka_widths=[0.25,0.75,1]")
    capsys.readouterr()
    refused = args(cache, out, "--steps", "15", "--resume", variant="matryoshka", sets=other)
    assert train.main(refused) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "differs in hparams.matryoshka_widths;" in errors[0]
