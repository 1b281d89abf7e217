"""Defaults that adapt to d_in and run length (`jax_sae.model.defaults`)."""

import pytest

from jax_sae.model.defaults import K_LIKE, REFERENCE_D_IN, adapt_hparams, scaled_d_sae
from jax_sae.model.variants import VARIANTS, VariantError, make_variant
from jax_sae.util.cli import did_you_mean


def test_topk_on_the_64_wide_demo_model_gets_sane_sizes():
    """The new-user case: `VARIANT=topk` picked d_sae 65536 and k 320 > d_in 64."""
    a = adapt_hparams("topk", 64, steps=88, batch_size=2048, overrides={})
    assert a.d_sae == 1792  # 65536 * 64 / 2304 = 1820, rounded to a multiple of 64
    assert a.overrides["k"] == round(320 * 1792 / 65536) == 9
    assert a.overrides["k_aux"] == round(1152 * 1792 / 65536)
    assert a.overrides["warmup_steps"] == 8  # 1000 capped at 10% of 88 steps
    assert a.overrides["dead_tokens"] == 88 * 2048 // 10
    assert not a.warnings and len(a.notes) == 6  # d_sae, k, k_aux, lr, warm-up, dead window
    make_variant("topk", 64, a.d_sae, **a.overrides)  # valid


def test_freq_on_the_demo_model_keeps_the_expansion_factor_and_a_short_warmup():
    a = adapt_hparams("freq", 64, steps=88, batch_size=2048, overrides={})
    assert a.d_sae == 64 and a.overrides["warmup_steps"] == 8


def test_user_values_are_never_changed_and_impossible_ones_are_warned_about():
    given = {"k": 100, "warmup_steps": 500, "dead_tokens": 10**9}
    a = adapt_hparams("topk", 64, steps=100, batch_size=256, overrides=given, d_sae=512)
    assert {k: a.overrides[k] for k in given} == given and a.d_sae == 512
    assert any("k=100 is >= d_in=64" in w for w in a.warnings)
    assert any("warmup_steps=500 is longer than the run" in w for w in a.warnings)


def test_reference_sizes_are_kept_and_only_run_length_caps_apply():
    a = adapt_hparams("jumprelu", 2304, steps=4883, batch_size=2048, overrides={})
    assert a.d_sae == 65536 and "target_l0" not in a.overrides
    assert a.overrides["sparsity_warmup_steps"] == 488 and a.overrides["warmup_steps"] == 488
    assert a.overrides["dead_tokens"] == 4883 * 2048 // 10  # 10M window: AuxK could never act
    long = adapt_hparams("jumprelu", 2304, steps=50_000, batch_size=2048, overrides={})
    assert long.overrides == {} and not long.notes


@pytest.mark.parametrize("name", ["standard", "topk", "hier_ortho", "two_level", "jumprelu"])
def test_every_variant_builds_at_small_d_in(name):
    for d_in in (16, 64, 768):
        a = adapt_hparams(name, d_in, steps=200, batch_size=1024, overrides={})
        assert a.d_sae == scaled_d_sae(name, d_in) and a.d_sae % 64 == 0
        v = make_variant(name, d_in, a.d_sae, **a.overrides)
        assert v.d_sae == a.d_sae


def test_a_default_that_cannot_work_is_warned_about():
    """jumprelu's target_l0 20 is not a size (it does not scale), so on a 16-wide model it asks
    for a code as large as the input: a warning names it."""
    a = adapt_hparams("jumprelu", 16, steps=100, batch_size=256, overrides={})
    assert any("target_l0=20.0 is >= d_in=16" in w for w in a.warnings)


def test_a_value_of_the_wrong_type_passes_through_for_make_variant_to_refuse():
    """Adapting compared a given k with d_in: a string k ended in a TypeError traceback."""
    a = adapt_hparams("topk", 16, steps=10, batch_size=32, overrides={"k": "sixteen"}, d_sae=64)
    assert a.overrides["k"] == "sixteen" and not a.warnings
    with pytest.raises(VariantError, match="hyper-parameter k must be .*, got 'sixteen'"):
        make_variant("topk", 16, a.d_sae, **a.overrides)


@pytest.mark.parametrize("d_sae", [512.5, "512", True, 0, -64, None])
def test_d_sae_must_be_a_positive_integer(d_sae):
    if d_sae is None:  # not given: the scaled default
        assert adapt_hparams("standard", 64, steps=10, batch_size=32, overrides={}).d_sae == 64
        return
    with pytest.raises(VariantError, match=f"d_sae must be a positive integer, got {d_sae!r}"):
        adapt_hparams("standard", 64, steps=10, batch_size=32, overrides={}, d_sae=d_sae)


def test_an_unknown_hyper_parameter_names_the_closest_one():
    with pytest.raises(
        VariantError, match=r"'lamda' for variant 'standard' \(did you mean 'lambda'"
    ):
        adapt_hparams("standard", 64, steps=10, batch_size=32, overrides={"lamda": 1.0})


def test_did_you_mean_suggests_only_close_names():
    names = ["k", "k_aux", "lambda", "warmup_steps", "d_sae"]
    assert did_you_mean("kk", names) == " (did you mean 'k'?)"
    assert did_you_mean("K", names) == " (did you mean 'k'?)"
    assert did_you_mean("warmup", names) == " (did you mean 'warmup_steps'?)"
    assert did_you_mean("completely_else", names) == ""


K_VARIANTS = [name for name in VARIANTS if K_LIKE[0] in make_variant(name, 64, 512).hparams]
K_VARIANTS += ["two_level"]  # k_c, k_b


def k_like(a) -> dict:
    return {key: a.overrides[key] for key in K_LIKE if key in a.overrides}


def test_setting_d_sae_alone_keeps_k():
    """`--set d_sae=512` on the 64-wide demo model gave topk k 2 (k followed d_sae: 320 x 512 /
    65536); k-like sizes now follow d_in, so d_sae alone leaves k where the default d_sae has it."""
    default = adapt_hparams("topk", 64, steps=1000, batch_size=256, overrides={})
    given = adapt_hparams("topk", 64, steps=1000, batch_size=256, overrides={}, d_sae=512)
    assert given.overrides["k"] == default.overrides["k"] == round(320 * 64 / REFERENCE_D_IN) == 9
    assert given.overrides["k_aux"] == 32  # = d_in / 2, AuxK's own rule
    assert "k 9: reference 320 x d_in 64 / 2304" in given.notes
    make_variant("topk", 64, 512, **given.overrides)


@pytest.mark.parametrize("name", sorted(set(K_VARIANTS)))
@pytest.mark.parametrize("d_in", [16, 64, 768, 2304])
def test_k_like_sizes_do_not_depend_on_a_given_d_sae_that_holds_them(name, d_in):
    default = adapt_hparams(name, d_in, steps=10_000, batch_size=256, overrides={})
    for d_sae in (64, 512, 4096, 16384, default.d_sae):
        a = adapt_hparams(name, d_in, steps=10_000, batch_size=256, overrides={}, d_sae=d_sae)
        make_variant(name, d_in, d_sae, **a.overrides)  # valid at every size
        lowered = [note for note in a.notes if "lowered to half" in note]
        if not lowered:
            assert k_like(a) == k_like(default), d_sae
        for key, value in k_like(a).items():  # each value is noted with its reason
            if value != make_variant(name, 2304, VARIANTS[name].suggested_d_sae(2304)).hparams[key]:
                assert any(note.startswith(f"{key} {value}: reference ") for note in a.notes)


def test_a_dictionary_too_small_for_k_lowers_it_to_half_of_d_sae_and_says_so():
    """At Gemma's d_in a 512-latent dictionary cannot hold k 320 sparsely (nor AuxK's 1152, which
    it refused): each is lowered to half of d_sae, with a note."""
    a = adapt_hparams("topk", 2304, steps=10_000, batch_size=256, overrides={}, d_sae=512)
    assert a.overrides["k"] == 256 and a.overrides["k_aux"] == 256
    assert "k 256: reference 320, lowered to half of d_sae 512" in a.notes
    make_variant("topk", 2304, 512, **a.overrides)
    two = adapt_hparams("two_level", 2304, steps=10_000, batch_size=256, overrides={}, d_sae=1024)
    assert (two.overrides["k_c"], two.overrides["k_b"]) == (8, 256)  # F_c 16; 8 x 64 eligible
    assert "k_c 8: reference 32, lowered to half of F_c 16" in two.notes
    make_variant("two_level", 2304, 1024, **two.overrides)
    given = adapt_hparams("topk", 2304, steps=10, batch_size=256, overrides={"k": 400}, d_sae=512)
    assert given.overrides["k"] == 400  # a given value is never changed


def test_a_learning_rate_from_a_rule_is_noted_when_it_differs_from_the_help():
    """`--help-variant topk` shows lr 0.0001 (d_sae 65536); at d_sae 512 the run used 0.00113
    without a word. Rule-given defaults that differ from the help are now notes."""
    a = adapt_hparams("topk", 64, steps=10_000, batch_size=256, overrides={}, d_sae=512)
    (lr_note,) = [note for note in a.notes if note.startswith("lr ")]
    assert lr_note.startswith("lr 0.001131: 2e-4 / sqrt(d_sae / 2^14) (Gao et al. 2024)")
    assert "d_sae 512" in lr_note and "(--help-variant: 0.0001" in lr_note
    assert make_variant("topk", 64, 512, **a.overrides).hparams["lr"] == pytest.approx(
        2e-4 * 32**0.5
    )
    standard = adapt_hparams("standard", 64, steps=10_000, batch_size=256, overrides={})
    assert any(n.startswith("lr 0.0018: 3e-4 x sqrt(2304 / d_in)") for n in standard.notes)
    given = adapt_hparams("topk", 64, steps=10_000, batch_size=256, overrides={"lr": 1e-3})
    assert not any(note.startswith("lr ") for note in given.notes)
    reference = adapt_hparams("topk", 2304, steps=100_000, batch_size=2048, overrides={})
    assert not reference.notes  # the help's values: nothing adapted
