"""Defaults that adapt to the problem.

The reference defaults are sizes for Gemma-2-2b (d_in = 2304) and a run of about 10M tokens.
Applied unchanged to another d_in or a short run they give garbage without a word: on the 64-wide
demo model `topk` asked for k 320 > d_in, and a 1000-step warm-up never ended in an 88-step run.
`adapt_hparams` fills in every size-like default the user did not set:

* d_sae keeps the reference expansion factor F / d_in, rounded to a multiple of 64 (so that
  two_level's F / 64 concepts divide it);
* k-like sizes (`k`, `k_aux`, `k_c`, `k_b`: latents selected per token) keep the reference ratio
  to d_in, whatever d_sae is: at the default d_sae this is the reference ratio to d_sae too (d_sae
  keeps F / d_in), and a given d_sae no longer drags k with it (`--set d_sae=512` at d_in 64 gave
  topk k 2 when k followed d_sae; it now keeps k 9). Only where the dictionary cannot hold that
  many is a k-like size lowered, to half of what it selects from (`k`, `k_aux`: d_sae; two_level's
  `k_c`: its F_c concepts, `k_b`: the k_c x d_sae / F_c base latents its active concepts open,
  the same half that two_level's own defaults and checks use);
* the decoder-orthogonality coefficients (`LossTerm.D_IN_SCALED`: hier_ortho's `lambda_2`,
  pair_ortho's `tau`) scale with d_in / 2304: their gradient share at initialisation then stays
  at ~4% for d_in 64 to 2304 (unscaled it grew like 1 / d_in, to 135% and 330% at d_in 64);
* warm-ups (`warmup_steps`, `sparsity_warmup_steps`) are at most 10% of the run's steps;
* the dead-latent window `dead_tokens` is at most 10% of the run's tokens, so AuxK can act;
* a default given by a rule of d_in and d_sae (the learning rate: `gao_lr`, `unit_row_lr`) is
  computed by `make_variant` at the run's sizes; where that differs from the value
  `--help-variant` prints (the reference sizes), it is noted like the others.

Values the user gives are never changed; each adaptation is one note (printed once by the trainer
and recorded in the run config), and a default or a given value that cannot work (k >= d_in, a
warm-up longer than the run) is a warning naming the fix. The user's values are checked only as
far as this module reads them (a known key, an integer d_sae); their types are `make_variant`'s
to check, so a value of the wrong type passes through here untouched and is refused there in one
line, never compared as a number on the way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jax_sae.model.variants import (
    VARIANTS,
    VariantError,
    declared_defaults,
    format_default,
    gao_lr,
    make_variant,
    refuse_unknown,
    unit_row_lr,
)

REFERENCE_D_IN = 2304
"""d_in the reference defaults were chosen for (Gemma-2-2b's residual stream)."""
RUN_FRACTION = 0.1
"""Largest share of a run that a warm-up or the dead-latent window may take."""
SIZE_MULTIPLE = 64
K_LIKE = ("k", "k_aux", "k_c", "k_b")
"""Counts of latents selected per token, scaled with d_in (k_c before k_b: k_b's limit uses it)."""
RULES = {
    gao_lr: "2e-4 / sqrt(d_sae / 2^14) (Gao et al. 2024)",
    unit_row_lr: "3e-4 x sqrt(2304 / d_in)",
}
"""How a note names a default given by a rule of (d_in, d_sae); any other: "its default"."""
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
    reference_d_sae = VARIANTS[name].suggested_d_sae(REFERENCE_D_IN)
    reference = make_variant(name, REFERENCE_D_IN, reference_d_sae).hparams
    refuse_unknown(name, given, reference)  # read here first; make_variant checks it again
    if d_sae is None:
        d_sae = scaled_d_sae(name, d_in)
        if d_in != REFERENCE_D_IN:
            notes.append(f"d_sae {d_sae}: the reference expansion factor at d_in {d_in}")
    d_sae = checked_d_sae(d_sae)
    adapted = dict(given)
    _scale_sizes(adapted, notes, given, reference, name, d_in, d_sae)
    if d_in != REFERENCE_D_IN:
        _scale_with_d_in(adapted, notes, given, reference, name, d_in)
    _note_rules(notes, adapted, reference, name, d_in, d_sae)
    _cap_to_run(adapted, notes, given, reference, steps, batch_size)
    effective = {**reference, **adapted}
    warnings = [
        f"{key}={effective[key]} is >= d_in={d_in}: a code that size cannot be sparse; set a "
        f"smaller {key}"
        for key in ("k", "target_l0")
        if is_number(effective.get(key)) and effective[key] >= d_in
    ]
    warnings += [
        f"{key}={adapted[key]} is longer than the run ({steps} steps): lower it or train longer"
        for key in WARMUPS
        if key in given and is_number(adapted[key]) and adapted[key] >= steps
    ]
    return Adapted(d_sae=d_sae, overrides=adapted, notes=notes, warnings=warnings)


def is_number(value: Any) -> bool:
    """Whether ``value`` can be compared as a number (a user's value may be any JSON value)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def checked_d_sae(d_sae: Any) -> int:
    """d_sae as an int: ``--set d_sae=512.5`` is refused, not truncated to 512 (an integral
    float such as 512.0 is 512, as for every integer hyper-parameter)."""
    if is_number(d_sae) and float(d_sae).is_integer() and d_sae >= 1:
        return int(d_sae)
    raise VariantError(f"d_sae must be a positive integer, got {d_sae!r}; e.g. --set d_sae=4096")


def defaults_at(name: str, d_in: int, d_sae: int) -> dict[str, Any]:
    """The declared defaults evaluated at (d_in, d_sae), unchecked."""
    return {
        key: default(d_in, d_sae) if callable(default) else default
        for key, default in declared_defaults(VARIANTS[name]).items()
    }


def _pool(key: str, current: Mapping[str, Any], d_sae: int) -> tuple[int, str] | None:
    """How many latents the k-like size ``key`` selects from, and how a note names them; None
    when a given value it depends on is not a number (``make_variant`` refuses that)."""
    if key not in ("k_c", "k_b"):
        return d_sae, f"d_sae {d_sae}"
    n_concepts: Any = current.get("F_c")
    k_c: Any = current.get("k_c")
    if not (is_number(n_concepts) and n_concepts >= 1):
        return None
    if key == "k_c":
        return int(n_concepts), f"F_c {n_concepts}"
    if not is_number(k_c):
        return None
    eligible = int(k_c * (d_sae // n_concepts))
    return eligible, f"the {eligible} base latents k_c x d_sae / F_c"


def _scale_sizes(
    adapted: dict,
    notes: list[str],
    given: Mapping,
    reference: Mapping,
    name: str,
    d_in: int,
    d_sae: int,
) -> None:
    """k-like counts keep the reference ratio to d_in (not to d_sae), at most half their pool."""
    at_size = defaults_at(name, d_in, d_sae)
    current = {**at_size, **adapted}
    for key in K_LIKE:
        value = reference.get(key)
        if key in given or value is None:
            continue
        size = max(1, round(value * d_in / REFERENCE_D_IN))
        rule = f"reference {value}" + ("" if d_in == REFERENCE_D_IN else f" x d_in {d_in} / 2304")
        pool = _pool(key, current, d_sae)
        if pool is not None and size > max(1, pool[0] // 2):
            lowered = max(1, pool[0] // 2)
            scaled = "" if size == value else f" = {size}"
            notes.append(f"{key} {lowered}: {rule}{scaled}, lowered to half of {pool[1]}")
            size = lowered
        elif size != value:
            notes.append(f"{key} {size}: {rule}")
        current[key] = size
        if size != value or size != at_size[key]:  # a default rule of d_sae would give another
            adapted[key] = size


def _note_rules(
    notes: list[str], adapted: Mapping, reference: Mapping, name: str, d_in: int, d_sae: int
) -> None:
    """A default computed from (d_in, d_sae) by a rule (the learning rate) that differs from the
    value ``--help-variant`` prints: noted, so the run's value is never a surprise."""
    reference_d_sae = VARIANTS[name].suggested_d_sae(REFERENCE_D_IN)
    for key, default in declared_defaults(VARIANTS[name]).items():
        if not callable(default) or key in adapted or key in K_LIKE:  # given or noted already
            continue
        value = default(d_in, d_sae)
        if value != reference[key]:
            rule = RULES.get(default, "its default")
            notes.append(
                f"{key} {format_default(value)}: {rule} at d_in {d_in}, d_sae {d_sae} "
                f"(--help-variant: {format_default(reference[key])}, at d_in {REFERENCE_D_IN}, "
                f"d_sae {reference_d_sae})"
            )


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
