"""Defaults that adapt to d_in and run length (`jax_sae.model.defaults`)."""

import pytest

from jax_sae.model.defaults import adapt_hparams, scaled_d_sae
from jax_sae.model.variants import make_variant


def test_topk_on_the_64_wide_demo_model_gets_sane_sizes():
    """The new-user case: `VARIANT=topk` picked d_sae 65536 and k 320 > d_in 64."""
    a = adapt_hparams("topk", 64, steps=88, batch_size=2048, overrides={})
    assert a.d_sae == 1792  # 65536 * 64 / 2304 = 1820, rounded to a multiple of 64
    assert a.overrides["k"] == round(320 * 1792 / 65536) == 9
    assert a.overrides["k_aux"] == round(1152 * 1792 / 65536)
    assert a.overrides["warmup_steps"] == 8  # 1000 capped at 10% of 88 steps
    assert a.overrides["dead_tokens"] == 88 * 2048 // 10
    assert not a.warnings and len(a.notes) == 5
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
