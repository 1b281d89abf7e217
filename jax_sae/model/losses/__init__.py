"""Loss and regulariser terms of the SAE variants, one file per term.

A variant's loss is `L = L_recon + sum of its terms` (`jax_sae.model.variants.Variant.loss`). The
reconstruction loss (`recon.py`) and dead-latent tracking (`dead.py`) are common to every variant
and computed by the variant itself; everything else is a `LossTerm`: an object that reads the
forward pass (`LossContext`), returns its (possibly zero) addition to the loss, the new values of
the regulariser-state entries it owns, and its metrics. Terms are pure functions of their inputs
(jit-able, vmap-able): no Python-side mutation, no host sync, no Python branching on traced values.

Hyper-parameters: a term declares the ones it reads in `HPARAMS` (name -> default; a callable
default is computed from `(d_in, d_sae)`) with one help line each in `HPARAM_DOCS` (same keys;
`variants.hparam_help` refuses a missing one), may restrict string values in `CHOICES`, list the
ones that may be None ("off") in `NULLABLE`, and check ranges in `check_hparams`. Names are global
within a variant, so two terms that read `lambda` share it. Coefficients are used arithmetically
only, never in Python `if`s, so a sweep may later pass them as traced arrays.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import flax.linen as nn
import jax

from jax_sae.model.architectures import Forward, Params, State


@dataclass(frozen=True)
class LossContext:
    """Everything a loss term may read for one training batch."""

    params: Params
    batch: Mapping[str, jax.Array]  # as given to the step (e.g. x_prev, seq_start for temporal)
    x: jax.Array  # batch["x"] as float32 [B, d]
    fwd: Forward  # pre-activations, codes and reconstruction of x
    recon: jax.Array  # reconstruction loss (scalar, differentiable)
    fired: jax.Array  # [F] bool: latent fired on at least one token of this batch
    dead: jax.Array  # [F] bool: dead after this batch (see losses.dead)
    step: jax.Array  # int32 scalar, 0-based index of this update
    hparams: Mapping[str, Any]  # all resolved hyper-parameters of the variant
    model: nn.Module  # the (unbound) architecture module, for terms that re-encode other inputs


class TermOutput(NamedTuple):
    loss: jax.Array  # scalar added to the total loss (coefficient already applied)
    state: State  # new values of the state entries this term owns ({} if none)
    metrics: dict[str, jax.Array]  # scalars, logged under these names


class LossTerm:
    """One additive term of a variant's loss, with its hyper-parameters and its state entries.

    `NAME` labels the term's diagnostics (`grad_share/<NAME>`, `jax_sae.training.diagnostics`) and
    lets `Variant.loss(skip_terms=...)` switch it off; `ACTS_ON` names the parameters whose gradient
    share it reports (empty: the term adds no loss, only state).
    """

    NAME: ClassVar[str] = ""
    ACTS_ON: ClassVar[tuple[str, ...]] = ()
    D_IN_SCALED: ClassVar[tuple[str, ...]] = ()
    """Coefficients whose default is calibrated at d_in 2304 and scales with d_in / 2304
    (`jax_sae.model.defaults`): on normalised inputs the reconstruction gradient the term competes
    with grows about linearly with d_in."""
    # Not ClassVars: a term whose names depend on its arguments sets them per instance (L1Penalty)
    HPARAMS: Mapping[str, Any] = {}
    HPARAM_DOCS: Mapping[str, str] = {}
    """One line per key of `HPARAMS`: what it does, in which unit (`variants.hparam_help`)."""
    CHOICES: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    def check_hparams(self, hparams: Mapping[str, Any], d_in: int, d_sae: int) -> None:
        """Raise ValueError (one line, naming the hyper-parameter) for an invalid value."""

    def init_state(self, d_in: int, d_sae: int, hparams: Mapping[str, Any]) -> State:
        """Initial values of the state entries this term owns (keys unique within a variant)."""
        return {}

    def __call__(self, ctx: LossContext, state: State) -> TermOutput:
        raise NotImplementedError
