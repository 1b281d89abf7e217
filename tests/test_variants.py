"""Variant registry, hyper-parameter resolution, initialisation and parameter conversion."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_sae.model.architectures import TopKSAE
from jax_sae.model.init import geometric_median
from jax_sae.model.losses import dead
from jax_sae.model.losses.auxk import AuxK
from jax_sae.model.variants import (
    VARIANTS,
    VariantError,
    describe_hparams,
    format_variant_help,
    hparam_help,
    make_variant,
)

D_IN, D_SAE = 16, 64
BASELINES = ["standard", "topk", "batchtopk", "jumprelu"]


def small(name: str, **hparams):
    """make_variant at test size (the default k = 320 exceeds D_SAE)."""
    if name in ("topk", "batchtopk"):
        hparams = {"k": 8, **hparams}
    return make_variant(name, D_IN, D_SAE, **hparams)


def test_baselines_are_registered():
    assert set(BASELINES) <= set(VARIANTS)


def test_unknown_variant_names_it_and_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown variant 'topK'") as error:
        make_variant("topK", D_IN, D_SAE)
    for name in BASELINES:
        assert name in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_hyperparameter_names_it_and_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match="unknown hyper-parameter 'kk' for variant 'topk'"
    ) as error:
        make_variant("topk", D_IN, D_SAE, kk=3)
    for valid in ("k", "k_aux", "alpha_aux", "lr", "dead_tokens"):
        assert valid in str(error.value)
    with pytest.raises(ValueError, match="'k'"):
        make_variant("standard", D_IN, D_SAE, k=3)  # k is not a standard hyper-parameter


@pytest.mark.parametrize(
    ("name", "hparams", "message"),
    [
        ("topk", {"k": "many"}, "k must be an integer"),
        ("topk", {"k": 2.5}, "k must be an integer"),
        ("topk", {"k": D_SAE + 1}, "k=65 must be in"),
        ("topk", {"k_aux": 0}, "k_aux=0 must be in"),
        ("standard", {"recon": "l1"}, "recon='l1' is not one of squared, l2norm"),
        ("standard", {"lambda": None}, "lambda cannot be None"),
        ("standard", {"lambda": -1.0}, "lambda must be >= 0"),
        ("jumprelu", {"bandwidth": 0.0}, "bandwidth must be > 0"),
        ("batchtopk", {"threshold_decay": 1.0}, "threshold_decay must be in"),
        ("freq", {"lr_decay": "cos"}, "lr_decay='cos' is not one of constant, cosine, linear"),
    ],
)
def test_invalid_hyperparameter_values_are_one_line_errors(name, hparams, message):
    with pytest.raises(VariantError, match=message) as error:
        small(name, **hparams)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("d_in", "d_sae"), [(0, 8), (8, -1), (8.0, 8), (True, 8)])
def test_invalid_sizes(d_in, d_sae):
    with pytest.raises(VariantError, match="must be a positive integer"):
        make_variant("standard", d_in, d_sae)


def test_resolved_hyperparameters_hold_spec_defaults_and_are_json():
    standard = make_variant("standard", 2304, 2304).hparams
    assert standard["lambda"] == 3.0 and standard["lr"] == 3e-4
    assert standard["sparsity_warmup_steps"] == 1000 and standard["encoder_init_scale"] == 0.1
    assert make_variant("standard", 64, 1024).hparams["lr"] == pytest.approx(3e-4 * 6)
    for name in ("freq", "temporal", "pair_ortho"):  # standard plus one term: standard's base
        hparams = make_variant(name, 64, 1024).hparams
        assert hparams["encoder_init_scale"] == 0.1 and hparams["sparsity_warmup_steps"] == 1000
        assert hparams["lr"] == pytest.approx(3e-4 * 6)
        assert hparams.get("lambda", hparams.get("lambda_1")) == 3.0
    assert standard["warmup_steps"] == 1000 and standard["dead_tokens"] == 10_000_000
    assert standard["recon"] == "squared" and standard["lr_decay"] == "constant"

    topk = make_variant("topk", 2304, 65536).hparams
    assert topk["k"] == 320 and topk["k_aux"] == 1152 and topk["alpha_aux"] == 1 / 32
    assert topk["lr"] == pytest.approx(1e-4)  # Gao scaling at F = 2^16
    assert make_variant("topk", 64, 4096).hparams["lr"] == pytest.approx(2e-4 / math.sqrt(0.25))
    assert make_variant("topk", 64, 4096, lr=1e-3).hparams["lr"] == 1e-3

    jump = make_variant("jumprelu", 2304, 65536).hparams
    assert jump["lr"] == 3e-4 and jump["sparsity_penalty"] == 100.0 and jump["target_l0"] == 20
    assert jump["bandwidth"] == 0.1 and jump["threshold_init"] == 0.001
    assert jump["l0_grad_to_pre"] is True
    assert make_variant("jumprelu", D_IN, D_SAE, target_l0=None).hparams["target_l0"] is None

    assert make_variant("batchtopk", 2304, 65536).hparams["threshold_decay"] == 0.99
    for name in BASELINES:
        hparams = dict(small(name).hparams)
        assert json.loads(json.dumps(hparams)) == hparams


def test_cli_style_values_are_coerced_to_the_default_type():
    hparams = small("topk", k=4.0, alpha_aux=1, dead_tokens=1e7).hparams
    assert hparams["k"] == 4 and type(hparams["k"]) is int
    assert hparams["alpha_aux"] == 1.0 and type(hparams["alpha_aux"]) is float
    assert hparams["dead_tokens"] == 10_000_000 and type(hparams["dead_tokens"]) is int


def test_registry_suggestions():
    assert VARIANTS["standard"].suggested_d_sae(2304) == 2304
    assert VARIANTS["standard"].default_layer == 19
    for name in ("topk", "jumprelu"):
        assert VARIANTS[name].suggested_d_sae(2304) == 65536
        assert VARIANTS[name].default_layer == 12
    for name in BASELINES:
        assert small(name).batch_keys == ("x",)
        assert VARIANTS[name].description


# ---------------------------------------------------------------------------------- init


def test_standard_init_is_tied_and_small_with_unit_decoder_rows_and_zero_biases():
    params = make_variant("standard", D_IN, D_SAE).init_params(jax.random.key(0))
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(params["W_enc"], 0.1 * np.asarray(params["W_dec"]).T, rtol=1e-6)
    assert not np.any(params["b_enc"]) and not np.any(params["b_dec"])
    scaled = make_variant("standard", D_IN, D_SAE, encoder_init_scale=0.5)
    params = scaled.init_params(jax.random.key(0))
    np.testing.assert_allclose(params["W_enc"], 0.5 * np.asarray(params["W_dec"]).T, rtol=1e-6)


def test_template_init_is_kaiming_uniform_with_unit_decoder_rows_and_zero_biases():
    variant = make_variant("standard", D_IN, D_SAE, encoder_init_scale=None)
    params = variant.init_params(jax.random.key(0))
    w_enc = np.asarray(params["W_enc"])
    bound = math.sqrt(6 / D_IN)
    assert w_enc.shape == (D_IN, D_SAE) and np.abs(w_enc).max() <= bound
    assert np.abs(w_enc).max() > 0.9 * bound  # uniform, fills the range
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(params["W_dec"], w_enc.T / np.linalg.norm(w_enc.T, axis=1)[:, None])
    assert not np.any(params["b_enc"]) and not np.any(params["b_dec"])


def test_jumprelu_init_threshold():
    variant = make_variant("jumprelu", D_IN, D_SAE, threshold_init=0.02)
    params = variant.init_params(jax.random.key(0))
    np.testing.assert_allclose(params["threshold"], 0.02, rtol=1e-6)
    np.testing.assert_allclose(variant.params_to_arrays(params)["threshold"], 0.02, rtol=1e-6)


@pytest.mark.parametrize("name", ["topk", "batchtopk"])
def test_topk_family_init_is_tied_with_geometric_median_bias(name):
    rng = np.random.default_rng(0)
    sample = (rng.standard_t(df=2, size=(500, D_IN)) + 3.0).astype(np.float32)
    variant = small(name)
    params = variant.init_params(jax.random.key(1), data_sample=sample)
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(params["W_enc"], np.asarray(params["W_dec"]).T)
    np.testing.assert_allclose(params["b_dec"], geometric_median(sample))
    assert not np.any(params["b_enc"])
    no_sample = variant.init_params(jax.random.key(1))
    assert not np.any(no_sample["b_dec"])
    with pytest.raises(VariantError, match="data_sample must be"):
        variant.init_params(jax.random.key(1), data_sample=sample[:, :3])


def test_geometric_median_minimises_the_sum_of_distances():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(size=(200, 5)), 100 + rng.normal(size=(20, 5))])
    median = geometric_median(points).astype(np.float64)
    # Optimality: the unit vectors from the median to the points sum to ~0 ...
    diff = points - median
    unit_sum = np.sum(diff / np.linalg.norm(diff, axis=1, keepdims=True), axis=0)
    assert np.linalg.norm(unit_sum) < 1e-2 * len(points)

    # ... and no nearby point does better; the outliers barely move it, unlike the mean.
    def cost(c):
        return np.linalg.norm(points - c, axis=1).sum()

    for direction in np.eye(5):
        assert cost(median) <= min(cost(median + 0.01 * direction), cost(median - 0.01 * direction))
    assert np.linalg.norm(median) < 2 < np.linalg.norm(points.mean(0))


# ------------------------------------------------------------------- conversion and export


@pytest.mark.parametrize("name", BASELINES)
def test_params_arrays_round_trip(name):
    variant = small(name)
    params = variant.init_params(jax.random.key(0))
    params = jax.tree.map(lambda p: p + 0.01 * jnp.arange(p.size).reshape(p.shape), params)
    arrays = variant.params_to_arrays(params)
    expected = {"W_enc", "W_dec", "b_enc", "b_dec"} | (
        {"threshold"} if name == "jumprelu" else set()
    )
    assert set(arrays) == expected
    assert arrays["W_enc"].shape == (D_IN, D_SAE) and arrays["W_dec"].shape == (D_SAE, D_IN)
    assert all(a.dtype == np.float32 and isinstance(a, np.ndarray) for a in arrays.values())
    back = variant.params_from_arrays(arrays)
    assert set(back) == set(params)
    for key in params:
        np.testing.assert_allclose(back[key], params[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_params_from_arrays_rejects_missing_extra_and_misshapen():
    variant = make_variant("jumprelu", D_IN, D_SAE)
    arrays = variant.params_to_arrays(variant.init_params(jax.random.key(0)))
    with pytest.raises(VariantError, match=r"missing \['threshold'\]"):
        variant.params_from_arrays({k: v for k, v in arrays.items() if k != "threshold"})
    with pytest.raises(VariantError, match=r"unexpected \['extra'\]"):
        variant.params_from_arrays({**arrays, "extra": np.zeros(3)})
    with pytest.raises(VariantError, match="W_dec has shape"):
        variant.params_from_arrays({**arrays, "W_dec": arrays["W_dec"].T})
    with pytest.raises(ValueError, match="threshold must be >= 0"):
        variant.params_from_arrays({**arrays, "threshold": np.full(D_SAE, -0.1, np.float32)})


def test_export_info_per_variant():
    infos = {}
    for name in BASELINES:
        variant = small(name, **({"k": 7} if "topk" in name else {}))
        params = variant.init_params(jax.random.key(0))
        infos[name] = variant.export_info(params, variant.init_state())
    assert infos["standard"] == {"architecture": "standard"}
    assert infos["topk"] == {"architecture": "topk", "k": 7}
    assert infos["jumprelu"]["architecture"] == "jumprelu"
    np.testing.assert_allclose(infos["jumprelu"]["threshold"], 0.001, rtol=1e-6)
    assert infos["batchtopk"]["architecture"] == "jumprelu" and infos["batchtopk"]["k"] == 7
    assert infos["batchtopk"]["threshold"].shape == (D_SAE,)


@pytest.mark.parametrize("name", BASELINES)
def test_init_state_tracks_dead_latents(name):
    state = small(name).init_state()
    assert state["tokens_since_fired"].shape == (D_SAE,)
    assert state["tokens_since_fired"].dtype == jnp.float32
    assert ("threshold" in state) == (name == "batchtopk")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_hyperparameter_has_a_help_line(name):
    """A hyper-parameter added without a line in its source's HPARAM_DOCS fails here."""
    rows = hparam_help(name)
    assert [f"{key}={default}" for key, default, _ in rows] == describe_hparams(name)
    for key, _, doc in rows:
        assert doc.strip() and "\n" not in doc and len(doc) <= 90, (key, doc)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_help_lists_every_hyperparameter(name):
    spec = VARIANTS[name]
    lines = format_variant_help(name).splitlines()
    assert lines[0].startswith(f"{name}: {spec.description}")
    assert f"d_sae {spec.suggested_d_sae(2304)}" in lines[0]
    assert "defaults shown for d_in 2304" in lines[1]
    hparams = make_variant(name, 2304, spec.suggested_d_sae(2304)).hparams
    table = lines[2:]
    assert [line.split()[0] for line in table] == list(hparams)
    doc_column = {
        line.index(doc) for line, (_, _, doc) in zip(table, hparam_help(name), strict=True)
    }
    assert len(doc_column) == 1  # aligned


def test_describe_hparams_format_is_unchanged():
    assert describe_hparams("topk") == [
        "lr=0.0001",
        "warmup_steps=1000",
        "lr_decay=constant (constant|cosine|linear)",
        "grad_clip_norm=None",
        "adam_b1=0.9",
        "adam_b2=0.999",
        "adam_eps=1e-08",
        "recon=squared (squared|l2norm)",
        "dead_tokens=10000000",
        "dense=False",
        "k=320",
        "k_aux=1152",
        "alpha_aux=0.03125",
    ]


@pytest.mark.parametrize(
    ("variant", "owner", "where"),
    [
        ("topk", AuxK, "jax_sae/model/losses/auxk.py"),
        ("topk", TopKSAE, "jax_sae/model/architectures.py"),
        ("standard", dead, "jax_sae/model/losses/dead.py"),
    ],
)
def test_undocumented_hyperparameter_is_refused(monkeypatch, variant, owner, where):
    monkeypatch.setattr(owner, "HPARAMS", {**owner.HPARAMS, "new_knob": 1})
    with pytest.raises(VariantError, match=f"'new_knob'.*{where}"):
        hparam_help(variant)


def test_undocumented_l1_coefficient_is_refused(monkeypatch):
    l1 = VARIANTS["temporal"].terms[0]
    assert l1.HPARAM_DOCS.keys() == {"lambda_1", "sparsity_warmup_steps"}
    monkeypatch.setattr(l1, "HPARAM_DOCS", {})
    with pytest.raises(VariantError, match="'lambda_1'.*jax_sae/model/losses/l1.py"):
        hparam_help("temporal")


def test_stale_help_line_is_refused(monkeypatch):
    monkeypatch.setattr(AuxK, "HPARAM_DOCS", {**AuxK.HPARAM_DOCS, "old_knob": "gone"})
    with pytest.raises(VariantError, match="'old_knob'.*not one of its hyper-parameters"):
        hparam_help("topk")
