"""Defaults that adapt to the problem.

The reference defaults are sizes for Gemma-2-2b (d_in = 2304) and a run of about 10M tokens.
Applied unchanged to another d_in or a short run they give garbage without a word: on the 64-wide
demo model `topk` asked for k 320 > d_in, and a 1000-step warm-up never ended in an 88-step run.
`adapt_hparams` fills in every size-like default the user did not set:

* d_sae keeps the reference expansion factor F / d_in, rounded to a multiple of 64 (so that
  two_level's F / 64 concepts divide it);
* k-like sizes (`k`, `k_aux`, `k_b`, `k_c`) keep the reference ratio to d_sae;
* the decoder-orthogonality coefficients (`LossTerm.D_IN_SCALED`: hier_ortho's `lambda_2`,
  pair_ortho's `tau`) scale with d_in / 2304: their gradient share at initialisation then stays
  at ~4% for d_in 64 to 2304 (unscaled it grew like 1 / d_in, to 135% and 330% at d_in 64);
* warm-ups (`warmup_steps`, `sparsity_warmup_steps`) are at most 10% of the run's steps;
* the dead-latent window `dead_tokens` is at most 10% of the run's tokens, so AuxK can act.

Values the user gives are never changed; each adaptation is one note (printed once by the trainer
and recorded in the run config), and a default or a given value that cannot work (k >= d_in, a
warm-up longer than the run) is a warning naming the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jax_sae.model.variants import VARIANTS, make_variant

REFERENCE_D_IN = 2304
"""d_in the reference defaults were chosen for (Gemma-2-2b's residual stream)."""
RUN_FRACTION = 0.1
"""Largest share of a run that a warm-up or the dead-latent window may take."""
SIZE_MULTIPLE = 64
K_LIKE = ("k", "k_aux", "k_b", "k_c")
WARMUPS = ("warmup_steps", "sparsity_warmup_steps")


@dataclass
class Adapted:
    """Resolved size and hyper-parameter overrides, and what was changed or is suspicious."""

    d_sae: int
    overrides: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def scaled_d_sae(name: str, d_in: int) -> int:
    """The variant's reference dictionary size at d_in = 2304, scaled to keep F / d_in."""
    reference = VARIANTS[name].suggested_d_sae(REFERENCE_D_IN)
    if d_in == REFERENCE_D_IN:
        return reference
    return max(
        SIZE_MULTIPLE, round(reference * d_in / REFERENCE_D_IN / SIZE_MULTIPLE) * SIZE_MULTIPLE
    )


def adapt_hparams(
    name: str,
    d_in: int,
    *,
    steps: int,
    batch_size: int,
    overrides: Mapping[str, Any],
    d_sae: int | None = None,
) -> Adapted:
    """Fill in the adaptive defaults of variant `name` (module docstring) for a run of `steps`
    steps of `batch_size` tokens on inputs of size d_in. `overrides` are the user's values."""
    given = dict(overrides)
    notes: list[str] = []
    if d_sae is None:
        d_sae = scaled_d_sae(name, d_in)
        if d_in != REFERENCE_D_IN:
            notes.append(f"d_sae {d_sae}: the reference expansion factor at d_in {d_in}")
    reference_d_sae = VARIANTS[name].suggested_d_sae(REFERENCE_D_IN)
    reference = make_variant(name, REFERENCE_D_IN, reference_d_sae).hparams
    adapted = dict(given)
    if d_in != REFERENCE_D_IN:
        _scale_sizes(adapted, notes, given, reference, d_sae / reference_d_sae)
        _scale_with_d_in(adapted, notes, given, reference, name, d_in)
    _cap_to_run(adapted, notes, given, reference, steps, batch_size)
    effective = {**reference, **adapted}
    warnings = [
        f"{key}={effective[key]} is >= d_in={d_in}: a code that size cannot be sparse; set a "
        f"smaller {key}"
        for key in ("k", "target_l0")
        if effective.get(key) is not None and effective[key] >= d_in
    ]
    warnings += [
        f"{key}={adapted[key]} is longer than the run ({steps} steps): lower it or train longer"
        for key in WARMUPS
        if key in given and adapted[key] >= steps
    ]
    return Adapted(d_sae=int(d_sae), overrides=adapted, notes=notes, warnings=warnings)


def _scale_sizes(
    adapted: dict, notes: list[str], given: Mapping, reference: Mapping, ratio: float
) -> None:
    """k-like counts scale with the dictionary size."""
    for key in K_LIKE:
        value = reference.get(key)
        if key in given or value is None:
            continue
        scaled = type(value)(max(1, round(value * ratio)))
        if scaled != value:
            adapted[key] = scaled
            notes.append(f"{key} {scaled}: reference {value} scaled with d_sae")


def _scale_with_d_in(
    adapted: dict, notes: list[str], given: Mapping, reference: Mapping, name: str, d_in: int
) -> None:
    """Coefficients calibrated at d_in 2304 that each term declares as scaling with d_in."""
    for term in VARIANTS[name].terms:
        for key in term.D_IN_SCALED:
            if key in given:
                continue
            adapted[key] = reference[key] * d_in / REFERENCE_D_IN
            notes.append(f"{key} {adapted[key]:.4g}: reference {reference[key]} x d_in / 2304")


def _cap_to_run(
    adapted: dict, notes: list[str], given: Mapping, reference: Mapping, steps: int, batch: int
) -> None:
    """Warm-ups and the dead-latent window take at most RUN_FRACTION of a short run."""
    for key in WARMUPS:
        if key in given or key not in reference:
            continue
        cap = max(1, int(RUN_FRACTION * steps))
        if reference[key] > cap:
            adapted[key] = cap
            notes.append(f"{key} {cap}: reference {reference[key]} capped at 10% of {steps} steps")
    tokens = steps * batch
    if "dead_tokens" not in given and reference["dead_tokens"] > RUN_FRACTION * tokens:
        cap = max(batch, int(RUN_FRACTION * tokens))
        adapted["dead_tokens"] = cap
        notes.append(
            f"dead_tokens {cap}: reference {reference['dead_tokens']} capped at 10% of "
            f"the run's {tokens} tokens"
        )
