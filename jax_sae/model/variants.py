"""SAE variants: the registry `VARIANTS` and `make_variant`.

A variant = an architecture (a Flax module in `jax_sae.model.architectures`) + a tuple of loss terms
(`jax_sae.model.losses.LossTerm`, one file each in `jax_sae/model/losses/`) + default
hyper-parameters and suggestions. `Variant.loss` computes, for every variant,

    L = L_recon (losses/recon.py) + sum(term(ctx, state).loss for term in terms)

and updates dead-latent tracking (losses/dead.py) plus each term's own slice of the state.

How to add a variant (e.g. `freq`):

1. Write `jax_sae/model/losses/freq.py` with a `LossTerm` subclass: `NAME` and `ACTS_ON` (for the
   gradient-share diagnostics), `HPARAMS` (name -> default), `HPARAM_DOCS` (name -> one help
   line, required: `hparam_help` and tests/test_variants.py refuse a hyper-parameter without one),
   `init_state` (its state entries, e.g. `{"firing_rate": zeros [F]}`), and `__call__(ctx, state)`
   returning `TermOutput(loss_added, new_state_entries, metrics)`. `ctx` holds the params, the
   batch, `fwd.pre/h/x_hat`, the reconstruction loss, the fired and dead masks, the step and all
   hyper-parameters (`losses.LossContext`). Keep it pure: no Python `if` on traced values.
2. Register it below:
       "freq": VariantSpec(ReLUSAE, (L1Penalty(), FrequencyWeighting()), default_layer=19,
                           description="..."),
   `defaults` overrides any default of the architecture or terms for this variant (e.g. `k`),
   `default_d_sae`/`default_layer` are the suggestions train.py uses when the user gives none,
   `batch_keys` lists what the loader must provide (temporal: `("x", "x_prev", "seq_start")`).
3. Test the term against a float64 NumPy implementation of the formula in docs/variants.md (tests/).

A variant with a new architecture (e.g. `two_level`) adds a module subclassing
`models.ReLUSAE`; extra parameters named `W_dec*` automatically get unit-norm rows from the
optimizer, extra forward outputs go in a subclass of `models.Forward`.
"""

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jax_sae.model.architectures import (
    BatchTopKSAE,
    Forward,
    JumpReLUSAE,
    Params,
    ReLUSAE,
    State,
    TopKSAE,
    TwoLevelSAE,
)
from jax_sae.model.losses import LossContext, LossTerm, recon
from jax_sae.model.losses import dead as dead_tracking
from jax_sae.model.losses.auxk import AuxK
from jax_sae.model.losses.batchtopk_threshold import BatchTopKThreshold
from jax_sae.model.losses.freq import FrequencyWeighting
from jax_sae.model.losses.hier_ortho import HierarchicalOrthogonality
from jax_sae.model.losses.jumprelu_sparsity import JumpReLUSparsity
from jax_sae.model.losses.l1 import L1Penalty
from jax_sae.model.losses.matryoshka import MatryoshkaReconstruction
from jax_sae.model.losses.pair_ortho import PairOrthogonality
from jax_sae.model.losses.temporal import TemporalConsistency
from jax_sae.model.losses.two_level import ConceptAuxK
from jax_sae.util.cli import did_you_mean

# learning-rate schedules a variant may choose (`training.optim.make_schedule` builds them)
DECAYS = ("constant", "cosine", "linear")


class VariantError(ValueError):
    """Unknown variant, unknown or invalid hyper-parameter, or malformed parameters."""


def gao_lr(d_in: int, d_sae: int) -> float:
    """Learning rate scaling of Gao et al. (2024): 2e-4 / sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def unit_row_lr(d_in: int, d_sae: int) -> float:
    """3e-4 at d_in 2304, times sqrt(2304 / d_in): Adam moves every coordinate of a unit-norm
    decoder row by about lr per step, so the row turns by about lr sqrt(d_in) radians per step;
    this keeps that angle at its d_in-2304 value (1.8e-3 at d_in 64, where a flat 3e-4 left the
    decoder at chance after 1024 steps; docs/variants.md, `standard`)."""
    return 3e-4 * math.sqrt(2304 / d_in)


TRAINING_HPARAMS: Mapping[str, Any] = MappingProxyType(
    {
        "lr": 3e-4,
        "warmup_steps": 1000,
        "lr_decay": "constant",
        "grad_clip_norm": None,
        "adam_b1": 0.9,
        "adam_b2": 0.999,
        "adam_eps": 1e-8,
    }
)
"""Per-variant training defaults; train.py passes them to `optim.make_optimizer`.
`grad_clip_norm` (off): global gradient-norm clipping, as dictionary_learning and SAELens do (1.0);
measured on our TopK it lowered held-out explained variance (benchmarks/RESULTS.md)."""
TRAINING_HPARAM_DOCS: Mapping[str, str] = MappingProxyType(
    {
        "lr": "peak Adam lr (TopK: 2e-4/sqrt(d_sae/2^14); standard, freq: 3e-4 sqrt(2304/d_in))",
        "warmup_steps": "steps of linear learning-rate warm-up (lr / warmup_steps to lr); 0: none",
        "lr_decay": "after the warm-up: constant lr, or cosine/linear decay to 0 at the last step",
        "grad_clip_norm": "clip the gradient to this global L2 norm before Adam; None: no clipping",
        "adam_b1": "Adam's decay rate of the first moment (mean gradient), in [0, 1)",
        "adam_b2": "Adam's decay rate of the second moment (mean squared gradient), in [0, 1)",
        "adam_eps": "added to the root of Adam's second moment before dividing by it; > 0",
    }
)
"""One help line per key of `TRAINING_HPARAMS` (`hparam_help`)."""


@dataclass(frozen=True)
class VariantSpec:
    """Registry entry: how to build one variant."""

    architecture: type[ReLUSAE]
    terms: tuple[LossTerm, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    """Overrides of architecture/term/training defaults; a callable gets (d_in, d_sae)."""
    default_d_sae: int | None = None
    """Suggested dictionary size when the user gives none; None means d_in (= d_model)."""
    default_layer: int = 12
    batch_keys: tuple[str, ...] = ("x",)
    description: str = ""

    def hparam_sources(self) -> tuple[Any, ...]:
        """Everything that declares hyper-parameters (`HPARAMS`, optional CHOICES/NULLABLE)."""
        return (recon, dead_tracking, self.architecture, *self.terms)

    def suggested_d_sae(self, d_in: int) -> int:
        return d_in if self.default_d_sae is None else self.default_d_sae


VARIANTS: dict[str, VariantSpec] = {
    "standard": VariantSpec(
        ReLUSAE,
        (L1Penalty(),),
        defaults={"lr": unit_row_lr},
        default_layer=19,
        description="ReLU SAE + L1 penalty",
    ),
    "topk": VariantSpec(
        TopKSAE,
        (AuxK(),),
        defaults={"lr": gao_lr},
        default_d_sae=65536,
        description="TopK SAE + AuxK (Gao et al. 2024)",
    ),
    "batchtopk": VariantSpec(
        BatchTopKSAE,
        (AuxK(), BatchTopKThreshold()),
        defaults={"lr": gao_lr},
        default_d_sae=65536,
        description="BatchTopK SAE + AuxK, exported as JumpReLU (Bussmann et al. 2024)",
    ),
    "matryoshka": VariantSpec(
        BatchTopKSAE,
        (AuxK(), BatchTopKThreshold(), MatryoshkaReconstruction()),
        defaults={"lr": gao_lr},
        default_d_sae=65536,
        description="BatchTopK whose nested prefixes each reconstruct x (Bussmann et al. 2025)",
    ),
    "jumprelu": VariantSpec(
        JumpReLUSAE,
        (JumpReLUSparsity(),),
        default_d_sae=65536,
        description="JumpReLU SAE + L0 penalty (Rajamanoharan et al. 2024)",
    ),
    "freq": VariantSpec(
        ReLUSAE,
        (L1Penalty(), FrequencyWeighting()),
        defaults={"lr": unit_row_lr},
        default_layer=19,
        description="ReLU SAE + L1 weighted by each latent's EMA firing rate",
    ),
    "temporal": VariantSpec(
        ReLUSAE,
        (L1Penalty("lambda_1"), TemporalConsistency()),
        defaults={"lr": unit_row_lr},
        default_layer=19,
        batch_keys=("x", "x_prev", "seq_start"),
        description="ReLU SAE + L1 + adaptive consistency with the previous token",
    ),
    "hier_ortho": VariantSpec(
        TopKSAE,
        (AuxK(), HierarchicalOrthogonality()),
        defaults={"lr": gao_lr, "k": 120},
        default_d_sae=18432,
        description="TopK + AuxK + co-firing-weighted decoder orthogonality",
    ),
    "pair_ortho": VariantSpec(
        ReLUSAE,
        (L1Penalty(), PairOrthogonality()),
        defaults={"lr": unit_row_lr},
        default_layer=19,
        description="ReLU SAE + L1 + orthogonality of the top co-activating pairs",
    ),
    "two_level": VariantSpec(
        TwoLevelSAE,
        (AuxK(), ConceptAuxK()),
        defaults={"lr": gao_lr},
        default_d_sae=65536,
        description="concept TopK gating base TopK latents, AuxK on both levels",
    ),
}


TYPE_WORDS: dict[type, str] = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    tuple: "a list",
}
"""How a hyper-parameter's type reads in an error (`_coerce`)."""


def _coerce(variant: str, name: str, value: Any, default: Any, nullable: bool) -> Any:
    """Give `value` the type of `default`: ints are accepted for floats, integral floats for
    ints and lists for tuples (values from a CLI or JSON); anything else is a VariantError."""
    if value is None:
        if nullable or default is None:
            return None
        raise VariantError(f"{variant}: hyper-parameter {name} cannot be None")
    if default is None or type(value) is type(default):
        return value
    if type(default) is tuple and isinstance(value, list):  # a list from JSON, YAML or the CLI
        return tuple(value)
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if type(default) is float and numeric:
        return float(value)
    if type(default) is int and numeric and float(value).is_integer():
        return int(value)
    expected = TYPE_WORDS.get(type(default), type(default).__name__)
    raise VariantError(f"{variant}: hyper-parameter {name} must be {expected}, got {value!r}")


def hparam_choices(spec: VariantSpec) -> dict[str, tuple[str, ...]]:
    """The allowed values of every string-valued hyper-parameter of a variant."""
    choices: dict[str, tuple[str, ...]] = {"lr_decay": tuple(DECAYS)}
    for source in spec.hparam_sources():
        choices.update(getattr(source, "CHOICES", {}))
    return choices


def declared_defaults(spec: VariantSpec) -> dict[str, Any]:
    """Every hyper-parameter's declared default (a callable takes (d_in, d_sae)), each later
    declaration winning: the training ones, then each source's, then the variant's own."""
    defaults: dict[str, Any] = dict(TRAINING_HPARAMS)
    for source in spec.hparam_sources():
        defaults.update(getattr(source, "HPARAMS", {}))
    defaults.update(spec.defaults)
    return defaults


def refuse_unknown(name: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """The one-line error of a hyper-parameter variant `name` does not have, naming the closest
    valid key (`d_sae` is valid too: it is read beside the hyper-parameters)."""
    unknown = sorted(set(given) - set(defaults) - {"d_sae"})
    if unknown:
        raise VariantError(
            f"unknown hyper-parameter {unknown[0]!r} for variant {name!r}"
            f"{did_you_mean(unknown[0], [*defaults, 'd_sae'])}; "
            f"valid: {', '.join(sorted(defaults))}, d_sae"
        )


def resolve_hparams(
    name: str, spec: VariantSpec, d_in: int, d_sae: int, overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """Defaults of every source, then the variant's defaults, then `overrides`, validated."""
    defaults = declared_defaults(spec)
    choices = hparam_choices(spec)
    nullable: set[str] = set()
    for source in spec.hparam_sources():
        nullable.update(getattr(source, "NULLABLE", ()))
    refuse_unknown(name, overrides, defaults)
    hparams = {}
    for key, default in defaults.items():
        default = default(d_in, d_sae) if callable(default) else default
        if key in overrides:
            value = _coerce(name, key, overrides[key], default, key in nullable)
        else:
            value = default
        if key in choices and value not in choices[key]:
            raise VariantError(
                f"{name}: hyper-parameter {key}={value!r} is not one of {', '.join(choices[key])}"
            )
        hparams[key] = value
    try:
        for source in spec.hparam_sources():
            if hasattr(source, "check_hparams"):
                source.check_hparams(hparams, d_in, d_sae)
    except ValueError as error:
        raise VariantError(f"{name}: {error}") from None
    return hparams


def variant_spec(name: str) -> VariantSpec:
    """The registry entry of `name`; VariantError naming the valid variants if there is none."""
    if name not in VARIANTS:
        raise VariantError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def format_default(value: Any, choices: tuple[str, ...] = ()) -> str:
    """A hyper-parameter value as the help prints it: floats to 4 significant digits, anything
    else as is, followed by the allowed values of a string option."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value}" + (f" ({'|'.join(choices)})" if choices else "")


def _printed_defaults(name: str, d_in: int) -> list[tuple[str, str]]:
    """(key, formatted default) of every hyper-parameter of variant `name` at its reference size
    for d_in, in resolution order (training, recon, dead tracking, architecture, terms)."""
    spec = variant_spec(name)
    choices = hparam_choices(spec)
    hparams = make_variant(name, d_in, spec.suggested_d_sae(d_in)).hparams
    return [(key, format_default(value, choices.get(key, ()))) for key, value in hparams.items()]


def describe_hparams(name: str, d_in: int = 2304) -> list[str]:
    """`key=default` (with the allowed values of string options) for every hyper-parameter of
    variant `name` at its reference size for d_in; for `--help` and the docs."""
    return [f"{key}={default}" for key, default in _printed_defaults(name, d_in)]


def _declared_in(source: Any) -> tuple[str, str]:
    """(name, file relative to the repository) of a hyper-parameter source: a module, an
    architecture class or a loss-term instance."""
    owner = source if inspect.ismodule(source) or inspect.isclass(source) else type(source)
    path = Path(inspect.getfile(owner)).resolve()
    root = Path(__file__).resolve().parents[2]  # the repository: jax_sae/model/variants.py
    where = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return owner.__name__.rsplit(".", 1)[-1], where


def _check_docs(hparams: Mapping[str, Any], docs: Mapping[str, str], owner: str, where: str):
    for key in hparams:
        if key not in docs:
            raise VariantError(
                f"hyper-parameter {key!r} of {owner} has no help line: add it to the "
                f"HPARAM_DOCS of {owner} in {where}"
            )
    stale = sorted(set(docs) - set(hparams))
    if stale:
        raise VariantError(
            f"HPARAM_DOCS of {owner} in {where} documents {stale[0]!r}, which is not one of its "
            "hyper-parameters: remove or rename it"
        )


def hparam_docs(spec: VariantSpec) -> dict[str, str]:
    """The help line of every hyper-parameter a variant's sources declare (the last declaration
    of a shared name wins, as for its default). VariantError naming the key and the file when a
    source declares a hyper-parameter without a line in its `HPARAM_DOCS`, or documents one it
    does not declare."""
    _check_docs(
        TRAINING_HPARAMS, TRAINING_HPARAM_DOCS, "TRAINING_HPARAMS", "jax_sae/model/variants.py"
    )
    docs = dict(TRAINING_HPARAM_DOCS)
    for source in spec.hparam_sources():
        hparams = getattr(source, "HPARAMS", {})
        source_docs = getattr(source, "HPARAM_DOCS", {})
        _check_docs(hparams, source_docs, *_declared_in(source))
        docs.update({key: source_docs[key] for key in hparams})
    return docs


def hparam_help(name: str, d_in: int = 2304) -> list[tuple[str, str, str]]:
    """(key, default as `describe_hparams` prints it, help line) for every hyper-parameter of
    variant `name`, in `describe_hparams`' order; for `train.py --help-variant`.

    VariantError when a hyper-parameter has no help line (`hparam_docs`)."""
    spec = variant_spec(name)
    docs = hparam_docs(spec)
    rows = []
    for key, default in _printed_defaults(name, d_in):
        if key not in docs:  # a key only `VariantSpec.defaults` introduces
            raise VariantError(
                f"hyper-parameter {key!r} of variant {name!r} is declared by no HPARAMS, only by "
                "its defaults in VARIANTS (jax_sae/model/variants.py): declare and document it"
            )
        rows.append((key, default, docs[key]))
    return rows


def format_variant_help(name: str, d_in: int = 2304) -> str:
    """Every hyper-parameter of variant `name` with its default and help line, as an aligned
    table under a header naming the variant and its suggested d_sae."""
    spec = variant_spec(name)
    rows = hparam_help(name, d_in)
    key_width = max(len(key) for key, _, _ in rows)
    default_width = max(len(default) for _, default, _ in rows)
    lines = [
        f"{name}: {spec.description}; suggested d_sae {spec.suggested_d_sae(d_in)} at d_in {d_in}",
        f"defaults shown for d_in {d_in}; sizes and some coefficients adapt to the cache's d_in "
        "and warm-ups to the run length, see docs/variants.md",
    ]
    lines += [
        f"  {key:<{key_width}}  {default:<{default_width}}  {doc}" for key, default, doc in rows
    ]
    return "\n".join(lines)


def make_variant(name: str, d_in: int, d_sae: int, **hparams: Any) -> "Variant":
    """Build variant `name` for inputs of size d_in with d_sae latents; `hparams` override defaults.

    Unknown variant or hyper-parameter -> VariantError (a ValueError) naming it and the valid ones.
    """
    spec = variant_spec(name)
    for size_name, size in (("d_in", d_in), ("d_sae", d_sae)):
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise VariantError(f"{size_name} must be a positive integer, got {size!r}")
    resolved = resolve_hparams(name, spec, int(d_in), int(d_sae), hparams)
    return Variant(name, int(d_in), int(d_sae), MappingProxyType(resolved), spec)


@dataclass(frozen=True)
class Variant:
    """One configured SAE variant: pure functions over (params, state); holds no arrays."""

    name: str
    d_in: int
    d_sae: int
    hparams: Mapping[str, Any]
    """Resolved hyper-parameters, read-only; `dict(v.hparams)` is JSON-able."""
    spec: VariantSpec

    @property
    def batch_keys(self) -> tuple[str, ...]:
        return self.spec.batch_keys

    def with_hparams(self, values: Mapping[str, Any]) -> "Variant":
        """This variant with some hyper-parameters replaced, unchecked: a sweep traces its
        members' differing values as arrays (each member was checked by `make_variant`)."""
        return replace(self, hparams=MappingProxyType({**self.hparams, **values}))

    def model(self, compute_dtype: Any = jnp.float32) -> ReLUSAE:
        """The Flax module of this variant's architecture."""
        return self.spec.architecture.from_hparams(
            self.d_in, self.d_sae, self.hparams, compute_dtype
        )

    # --- parameters -------------------------------------------------------------------------

    def init_params(self, key: jax.Array, data_sample: np.ndarray | None = None) -> Params:
        """Initial parameters. With `data_sample` [n, d_in] the architecture's
        data-dependent init applies (`init_from_data`: the TopK family's `b_dec`, JumpReLU's
        `b_enc`); without one those stay zero."""
        model = self.model()
        params = dict(model.init(key, jnp.zeros((1, self.d_in), jnp.float32))["params"])
        if data_sample is None:
            return params
        sample = np.asarray(data_sample)
        if sample.ndim != 2 or sample.shape[1] != self.d_in or sample.shape[0] == 0:
            raise VariantError(
                f"data_sample must be [n, d_in={self.d_in}] with n > 0, got {sample.shape}"
            )
        return dict(self.spec.architecture.init_from_data(params, sample, self.hparams))

    def params_to_arrays(self, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Float32 numpy arrays under SAELens names and shapes (JumpReLU: `threshold`), from
        device or host parameters."""
        return self.spec.architecture.to_saelens(jax.device_get(params))

    def params_from_arrays(self, arrays: Mapping[str, Any]) -> Params:
        """Inverse of `params_to_arrays`; checks names and shapes."""
        expected = self.params_to_arrays(self._placeholder_params())
        missing = sorted(set(expected) - set(arrays))
        extra = sorted(set(arrays) - set(expected))
        if missing or extra:
            raise VariantError(
                f"{self.name} parameters: missing {missing or 'none'}, unexpected {extra or 'none'}"
            )
        for key, reference in expected.items():
            if np.shape(arrays[key]) != reference.shape:
                raise VariantError(
                    f"{self.name} parameter {key} has shape {np.shape(arrays[key])}, "
                    f"expected {reference.shape} (d_in={self.d_in}, d_sae={self.d_sae})"
                )
        params = self.spec.architecture.from_saelens(arrays)
        return {key: jnp.asarray(value, jnp.float32) for key, value in params.items()}

    def _placeholder_params(self) -> dict[str, np.ndarray]:
        """Arrays of the right names and shapes (ones: valid for every conversion)."""
        shapes = jax.eval_shape(self.init_params, jax.random.key(0))
        return {key: np.ones(s.shape, np.float32) for key, s in shapes.items()}

    def export_form(self) -> dict[str, Any]:
        """How the exporter writes this SAE (`ReLUSAE.export_form`), recorded in config.json."""
        return self.spec.architecture.export_form(self.d_sae, self.hparams)

    def export_info(self, params: Params, state: State) -> dict[str, Any]:
        """What the exporter needs besides the weights: SAELens `architecture`, `k`, `threshold`."""
        return self.spec.architecture.export_info(
            jax.device_get(params), jax.device_get(state), self.hparams
        )

    # --- forward ------------------------------------------------------------------------------

    def encode(
        self,
        params: Params,
        x: jax.Array,
        state: State | None = None,
        *,
        compute_dtype: Any = jnp.float32,
    ) -> jax.Array:
        """Inference-time latent codes. Only `batchtopk` and `matryoshka` read `state` (their
        threshold; without a state they apply the training rule, batch top-k, to the given x)."""
        model = self.model(compute_dtype)
        # flax types apply's result as (output, variables) for the mutable case; not used here
        return cast(jax.Array, model.apply({"params": params}, x, state, method=model.encode))

    def decode(self, params: Params, h: jax.Array, *, compute_dtype: Any = jnp.float32):
        model = self.model(compute_dtype)
        return model.apply({"params": params}, h, method=model.decode)

    # --- training -----------------------------------------------------------------------------

    def init_state(self) -> State:
        """Regulariser state: dead-latent counts plus each term's entries."""
        state = dead_tracking.init_state(self.d_sae)
        for term in self.spec.terms:
            entries = term.init_state(self.d_in, self.d_sae, self.hparams)
            clash = set(entries) & set(state)
            if clash:
                raise VariantError(f"{self.name}: state entries {sorted(clash)} defined twice")
            state.update(entries)
        return state

    def loss(
        self,
        params: Params,
        state: State,
        batch: Mapping[str, jax.Array],
        step: jax.Array,
        *,
        compute_dtype: Any = jnp.float32,
        skip_terms: frozenset[str] = frozenset(),
    ) -> tuple[jax.Array, tuple[State, dict[str, jax.Array]]]:
        """Total loss and (new state, metrics); pure and jit-able. Differentiate w.r.t. params.

        Metrics (float32 scalars): `loss`, `recon`, `l0` (mean active latents per token),
        `dead_frac`, `explained_variance`, plus each term's own (e.g. `l1`, `aux`) and, for
        every term with a loss, `loss/<NAME>`: what it adds to the loss, coefficient included.
        `skip_terms`: `LossTerm.NAME`s left out (their state entries unchanged), for the
        gradient-share diagnostics (`jax_sae.training.diagnostics`).
        """
        hp = self.hparams
        model = self.model(compute_dtype)
        x = batch["x"].astype(jnp.float32)
        fwd = cast(Forward, model.apply({"params": params}, x, method=model.forward))
        recon_loss = recon.reconstruction_loss(x, fwd.x_hat, hp["recon"])
        counts, fired = dead_tracking.update(state[dead_tracking.STATE_KEY], fwd.h)
        dead = dead_tracking.dead_mask(counts, hp["dead_tokens"])
        ctx = LossContext(
            params=params,
            batch=batch,
            x=x,
            fwd=fwd,
            recon=recon_loss,
            fired=fired,
            dead=dead,
            step=jnp.asarray(step, jnp.int32),
            hparams=hp,
            model=model,
        )
        total = recon_loss
        new_state = {**state, dead_tracking.STATE_KEY: counts}
        codes = jax.lax.stop_gradient(fwd.h)
        metrics = {
            "recon": recon_loss,
            "l0": jnp.mean(jnp.sum(codes > 0, axis=-1, dtype=jnp.float32)),
            "dead_frac": jnp.mean(dead, dtype=jnp.float32),
            "explained_variance": recon.explained_variance(x, jax.lax.stop_gradient(fwd.x_hat)),
        }
        for term in self.spec.terms:
            if term.NAME in skip_terms:
                continue
            out = term(ctx, state)
            total = total + out.loss
            new_state.update(out.state)
            metrics.update(out.metrics)
            if term.ACTS_ON:  # what the term adds to the loss, coefficient included
                metrics[f"loss/{term.NAME}"] = jax.lax.stop_gradient(out.loss)
        metrics["loss"] = total
        return total, (new_state, metrics)
