"""Flax modules for the SAE architectures.

Parameters are a flat dict with SAELens names and shapes: `W_enc [d, F]`, `b_enc [F]`,
`W_dec [F, d]`, `b_dec [d]` (+ `threshold [F]` for JumpReLU).
Every parameter whose name starts with `W_dec` is a dictionary with unit-norm rows; the optimizer
(`jax_sae.training.optim`) keeps it so.

An architecture class holds the forward rule only. Losses live in `jax_sae.model.losses`, the
regulariser state in the state dict of `jax_sae.model.variants.Variant`; `state` reaches a module
only where inference needs it (the BatchTopK threshold).

Precision: with `compute_dtype=float32` every matmul runs at `Precision.HIGHEST`, i.e. true fp32.
JAX's GPU default for fp32 is TF32 (10-bit mantissa), which silently costs reconstruction quality
(explained variance is a difference of nearly equal numbers); on CPU HIGHEST is the ordinary fp32
path and costs nothing. Whoever wants speed asks for `compute_dtype=bfloat16`: bf16 operands with
fp32 accumulation, which is faster than TF32 and is an explicit choice.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_sae.model import sparse
from jax_sae.model.activations import batch_topk_indices, batch_topk_relu, jumprelu, topk, topk_relu
from jax_sae.model.init import (
    geometric_median,
    kaiming_uniform,
    unit_rows_kaiming,
    unit_rows_normal,
)
from jax_sae.parallel import layout

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


def _dot(a: jax.Array, b: jax.Array, compute_dtype: Any) -> jax.Array:
    if jnp.dtype(compute_dtype) == jnp.float32:
        return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
    return jnp.matmul(
        a.astype(compute_dtype), b.astype(compute_dtype), preferred_element_type=jnp.float32
    )


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(a: jax.Array, b: jax.Array, compute_dtype: Any) -> jax.Array:
    """`a @ b` for 2-D arrays with operands in `compute_dtype` and a float32 result.

    Written with an explicit backward pass for two reasons. (1) Mixed precision: autodiff of a
    bf16 matmul gives float32-cotangent x bf16 products, which XLA runs in float32; here the
    backward matmuls take `compute_dtype` operands too. (2) XLA:CPU computes the weight gradient
    `a^T g` -> [m, n] about 2x slower when m < n (e.g. the encoder's [d, F]) than as `(g^T a)^T`
    (measured at d 2304, F 16384, B 2048), so on CPU that case uses the latter; the barrier keeps
    XLA from folding the transpose back. GPUs do not need it and would pay bandwidth for it.
    """
    return _dot(a, b, compute_dtype)


def _matmul_fwd(a, b, compute_dtype):
    return _dot(a, b, compute_dtype), (a, b)


def _matmul_bwd(compute_dtype, residuals, g):
    a, b = residuals
    g_a = _dot(g, b.T, compute_dtype)  # removed by XLA when `a` needs no gradient (the input x)
    if b.shape[0] < b.shape[1] and jax.default_backend() == "cpu":
        g_b = lax.optimization_barrier(_dot(g.T, a, compute_dtype)).T
    else:
        g_b = _dot(a.T, g, compute_dtype)
    return g_a.astype(a.dtype), g_b.astype(b.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


@dataclass(frozen=True)
class Forward:
    """Training-time forward pass. Architectures with more levels subclass it with more fields.

    On the sparse path of the TopK family (`jax_sae.model.sparse`) `pre` carries no gradient: a term
    that differentiates selected pre-activations reads them with the module's `selected_pre`.
    """

    pre: jax.Array  # [B, F] pre-activations
    h: jax.Array  # [B, F] latent codes
    x_hat: jax.Array  # [B, d] reconstruction


@dataclass(frozen=True)
class SparseForward(Forward):
    """The sparse path's forward pass (`TopKSAE`), with the selected (token, latent) pairs, so
    that a term decoding the code again (matryoshka's prefixes) neither selects again nor adds a
    second encoder backward: its gradient reaches `values`, h's differentiable entries."""

    rows: jax.Array  # [n] token of each selected pair
    cols: jax.Array  # [n] latent of each selected pair
    values: jax.Array  # [n] h[rows, cols]


class ReLUSAE(nn.Module):
    """`standard`: h = relu(pre), pre = (x - b_dec) W_enc + b_enc, x_hat = h W_dec + b_dec.

    Subclasses change `activate_train` (and `activate` where inference differs) and, where their
    architecture asks for it, the initialisation; the parameter layout, the encoder and the decoder
    are shared.
    """

    d_in: int
    d_sae: int
    compute_dtype: Any
    encoder_init_scale: float | None
    """See `dictionary`. `from_hparams` passes None (the template init) to architectures that do
    not declare the hyper-parameter (JumpReLU; the TopK family has its own tied init)."""

    HPARAMS: ClassVar[Mapping[str, Any]] = {"encoder_init_scale": 0.1}
    """Architecture hyper-parameters and defaults; each is also a dataclass field of the class."""
    HPARAM_DOCS: ClassVar[Mapping[str, str]] = {
        "encoder_init_scale": "W_enc starts as this x W_dec^T; None: kaiming-uniform, untied "
        "(template)",
    }
    """One line per key of `HPARAMS`: what it does, in which unit (`variants.hparam_help`)."""
    NULLABLE: ClassVar[frozenset[str]] = frozenset({"encoder_init_scale"})
    EXPORT_ARCHITECTURE: ClassVar[str] = "standard"
    """SAELens architecture name the exporter writes."""
    EXPORT_PER_LATENT: ClassVar[tuple[str, ...]] = ()
    """Exported per-latent tensors besides the encoder and decoder (JumpReLU's threshold)."""
    RANKS_LATENTS: ClassVar[bool] = False
    """Whether the encoder picks winners by ranking pre-activations (TopK): decoder norms then
    cannot be folded into the encoder exactly, so the exporter requires unit-norm rows."""
    B_DEC_FROM_DATA: ClassVar[bool] = False
    """Initialise `b_dec` to the geometric median of a data sample (TopK family)."""

    @classmethod
    def init_from_data(
        cls, params: dict[str, Any], sample: np.ndarray, hparams: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Data-dependent part of the init from a sample [n, d_in]: the TopK
        family's `b_dec` is the sample's geometric median; other architectures keep their init."""
        if cls.B_DEC_FROM_DATA:
            params = params | {"b_dec": jnp.asarray(geometric_median(sample))}
        return params

    @classmethod
    def from_hparams(cls, d_in: int, d_sae: int, hparams: Mapping[str, Any], compute_dtype: Any):
        own = {name: hparams[name] for name in cls.HPARAMS}
        own.setdefault("encoder_init_scale", None)
        return cls(d_in, d_sae, compute_dtype, **own)

    def setup(self) -> None:
        self.W_enc, self.W_dec = self.dictionary()
        self.b_enc = self.param("b_enc", nn.initializers.zeros_init(), (self.d_sae,))
        self.b_dec = self.param("b_dec", nn.initializers.zeros_init(), (self.d_in,))

    def dictionary(self) -> tuple[jax.Array, jax.Array]:
        """`W_dec` with random unit rows (normalised kaiming-uniform) and, by default, the tied
        encoder `W_enc = encoder_init_scale * W_dec^T` (0.1, as SAELens's `decoder_init_norm` and
        Anthropic's 2024 recipe): pre-activations start at a tenth of each latent's projection,
        so the code starts small and the latents grow along the directions they decode.

        `encoder_init_scale=None` is the reference template: kaiming-uniform `W_enc` independent of
        `W_dec`. Its encoder columns have norm sqrt(2): on normalised inputs about half the
        latents fire from the first step and the reconstruction is ~18x the input's energy
        (measured on a d-64 world with F 1024); undoing that took the whole of a 1024-step run,
        in which the decoder stayed at chance (docs/variants.md, `standard`).
        """
        if self.encoder_init_scale is None:
            w_enc = self.param("W_enc", kaiming_uniform, (self.d_in, self.d_sae))
            w_dec = self.param("W_dec", unit_rows_kaiming, (self.d_sae, self.d_in))
            return w_enc, w_dec
        scale = self.encoder_init_scale
        w_dec = self.param("W_dec", unit_rows_kaiming, (self.d_sae, self.d_in))
        w_enc = self.param("W_enc", lambda _key, _shape: scale * w_dec.T, (self.d_in, self.d_sae))
        return w_enc, w_dec

    def pre_activation(self, x: jax.Array) -> jax.Array:
        """`(x - b_dec) W_enc + b_enc`, arranged so that b_dec's gradient costs a mat-vec.

        Differentiating `(x - b_dec) @ W_enc` w.r.t. b_dec naively is a full [B, F] x [F, d] matmul
        (the gradient w.r.t. the centred input) followed by a batch sum. Here the matmul sees
        `x - stop_gradient(b_dec)`, and b_dec's gradient comes from a zero-valued correction term
        `-(b_dec - stop_gradient(b_dec)) @ W_enc`, whose backward is `-(sum_b g_pre) @ W_enc^T`. The
        value is unchanged; one of the six [B x F x d] matmuls of a step disappears.
        """
        b_dec_fixed = lax.stop_gradient(self.b_dec)
        pre = matmul(x - b_dec_fixed, self.W_enc, self.compute_dtype) + self.b_enc
        b_dec_delta = self.b_dec - b_dec_fixed  # == 0, carries the gradient only
        return pre - jnp.matmul(
            b_dec_delta, lax.stop_gradient(self.W_enc), precision=lax.Precision.HIGHEST
        )

    def selected_pre(
        self,
        x: jax.Array,
        pre: jax.Array,
        rows: jax.Array,
        cols: jax.Array,
        per_row: bool = True,
    ) -> jax.Array:
        """`pre[rows, cols]` for `pre = Forward.pre` of `x`, differentiable w.r.t. the encoder.

        On the dense path `pre` carries its gradient; the sparse path overrides this with a
        scatter-add backward over the given pairs only (`sparse.encode_at`). `per_row`: the
        pairs come from `sparse.per_row_pairs` (else from the architecture's own `select`).
        """
        return sparse.gather_pairs(pre, rows, cols)

    def activate_train(self, pre: jax.Array) -> jax.Array:
        """Training-time activation."""
        return jax.nn.relu(pre)

    def activate(self, pre: jax.Array, state: State | None) -> jax.Array:
        """Inference-time activation (same as training unless an architecture says otherwise)."""
        return self.activate_train(pre)

    def encode(self, x: jax.Array, state: State | None = None) -> jax.Array:
        return self.activate(self.pre_activation(x), state)

    def decode(self, h: jax.Array) -> jax.Array:
        return matmul(h, self.W_dec, self.compute_dtype) + self.b_dec

    def forward(self, x: jax.Array) -> Forward:
        pre = self.pre_activation(x)
        h = self.activate_train(pre)
        return Forward(pre=pre, h=h, x_hat=self.decode(h))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.forward(x).x_hat

    # --- conversions to the exported (SAELens) form; pure numpy, no module binding needed ---

    @classmethod
    def to_saelens(cls, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Parameters under SAELens names, float32 numpy."""
        return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}

    @classmethod
    def from_saelens(cls, arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Inverse of `to_saelens`."""
        return {name: np.asarray(value, dtype=np.float32) for name, value in arrays.items()}

    @classmethod
    def export_info(
        cls, params: Mapping[str, Any], state: Mapping[str, Any], hparams: Mapping[str, Any]
    ) -> dict[str, Any]:
        return {"architecture": cls.EXPORT_ARCHITECTURE}

    @classmethod
    def inference_state(cls, state: State, stored: Mapping[str, np.ndarray]) -> State:
        """The regulariser state that inference reads, given back from the arrays `export_info`
        stored beside the weights (`stored`, by name), so a run read back from its folder
        encodes as it did at the end of training. Unchanged here: `encode` reads no state."""
        return state

    @classmethod
    def export_form(cls, d_sae: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """How the exporter writes this architecture, as plain JSON in `config.json` (the
        exporter never imports JAX): the SAELens architecture, each dictionary to unit-normalise
        (decoder suffix -> number of latents), the per-latent tensors that scale with it, whether
        the encoder ranks latents, and the entries the SAELens config adds."""
        return {
            "architecture": cls.EXPORT_ARCHITECTURE,
            "dictionaries": {"": d_sae},
            "per_latent": list(cls.EXPORT_PER_LATENT),
            "ranks_latents": cls.RANKS_LATENTS,
            "saelens_config": cls.saelens_config(d_sae, hparams),
        }

    @classmethod
    def saelens_config(cls, d_sae: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Entries of SAELens's `cfg.json` beyond the shared ones."""
        return {}


class TopKFamilySAE(ReLUSAE):
    """Shared by the TopK family: tied init, b_dec from data, and the sparse training path.

    Training takes the sparse path (`jax_sae.model.sparse`: one dense encoder product, then gathers
    and scatter-adds over the selected (token, latent) pairs) unless the hyper-parameter `dense` is
    set; both give the same values and gradients (tests/test_sparse.py). `encode`/`decode` (the
    inference API) stay dense.
    """

    dense: bool

    HPARAMS: ClassVar[Mapping[str, Any]] = {"dense": False}
    HPARAM_DOCS: ClassVar[Mapping[str, str]] = {
        "dense": "train on the dense reference path, not the sparse one (same values, gradients)",
    }
    B_DEC_FROM_DATA: ClassVar[bool] = True
    PER_ROW_SELECTION: ClassVar[bool] = True
    """The sparse path selects the same number of latents per token (`sparse.per_row_pairs`)."""

    def dictionary(self) -> tuple[jax.Array, jax.Array]:
        return self.tied_dictionary("", self.d_sae)

    def tied_dictionary(self, suffix: str, n_latents: int) -> tuple[jax.Array, jax.Array]:
        """`W_enc{suffix}`, `W_dec{suffix}` with the TopK init: random unit decoder rows, encoder
        tied to the decoder transpose."""
        w_dec = self.param(f"W_dec{suffix}", unit_rows_normal, (n_latents, self.d_in))
        w_enc = self.param(f"W_enc{suffix}", lambda _key, _shape: w_dec.T, (self.d_in, n_latents))
        return w_enc, w_dec

    def selected_pre(self, x, pre, rows, cols, per_row: bool = True) -> jax.Array:
        if self.dense:
            return super().selected_pre(x, pre, rows, cols)
        return sparse.encode_at(
            x, self.b_dec, self.W_enc, self.b_enc, pre, rows, cols, self.compute_dtype, per_row
        )

    def dense_pre(self, x: jax.Array) -> jax.Array:
        """The encoder product without gradient, the only dense [B, d] x [d, F] of the sparse
        path; the same value as `pre_activation` (whose correction term is exactly zero)."""
        pre = matmul(x - self.b_dec, self.W_enc, self.compute_dtype) + self.b_enc
        return lax.stop_gradient(pre)

    def sparse_decode(self, values: jax.Array, rows: jax.Array, cols: jax.Array, n_rows: int):
        """`h @ W_dec` for the code with `values` at (rows, cols), without `b_dec`."""
        return sparse.decode(
            values, rows, cols, self.W_dec, n_rows, self.compute_dtype, self.PER_ROW_SELECTION
        )


class TopKSAE(TopKFamilySAE):
    """`topk`: h = relu(topk_k(pre)) per token (Gao et al. 2024)."""

    k: int

    HPARAMS: ClassVar[Mapping[str, Any]] = {**TopKFamilySAE.HPARAMS, "k": 320}
    HPARAM_DOCS: ClassVar[Mapping[str, str]] = {
        **TopKFamilySAE.HPARAM_DOCS,
        "k": "latents active per token: the k largest pre-activations of each token are kept",
    }
    EXPORT_ARCHITECTURE: ClassVar[str] = "topk"
    RANKS_LATENTS: ClassVar[bool] = True

    @classmethod
    def saelens_config(cls, d_sae: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        # SAELens silently defaults a missing k to 100
        return {"k": int(hparams["k"]), "rescale_acts_by_decoder_norm": False}

    @classmethod
    def check_hparams(cls, hparams: Mapping[str, Any], d_in: int, d_sae: int) -> None:
        if not 1 <= hparams["k"] <= d_sae:
            raise ValueError(
                f"k={hparams['k']} must be in [1, d_sae={d_sae}]: set a smaller k or a larger d_sae"
            )

    def activate_train(self, pre: jax.Array) -> jax.Array:
        return topk_relu(pre, self.k)

    def select(self, pre: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(rows, cols) of the pairs `activate_train` keeps: the k largest of each row."""
        return sparse.per_row_pairs(topk(pre, self.k)[1])

    def forward(self, x: jax.Array) -> Forward:
        if self.dense:
            return super().forward(x)
        pre = self.dense_pre(x)
        rows, cols = self.select(pre)
        per_row = self.PER_ROW_SELECTION
        values = jax.nn.relu(self.selected_pre(x, pre, rows, cols, per_row))
        x_hat = self.sparse_decode(values, rows, cols, x.shape[0]) + self.b_dec
        h = sparse.densify(values, rows, cols, pre.shape, per_row)
        return SparseForward(pre=pre, h=h, x_hat=x_hat, rows=rows, cols=cols, values=values)

    @classmethod
    def export_info(cls, params, state, hparams) -> dict[str, Any]:
        return {"architecture": cls.EXPORT_ARCHITECTURE, "k": hparams["k"]}


class BatchTopKSAE(TopKSAE):
    """`batchtopk`: training keeps the k * B largest activations of the batch (Bussmann et al.).

    Inference cannot depend on the batch, so `encode` with a state applies the learned global
    threshold (an EMA of the smallest kept activation, kept in `state["threshold"]` by
    `jax_sae.model.losses.batchtopk_threshold`): h = relu(pre) * 1[pre > threshold], i.e. a
    JumpReLU, which is also how it is exported. Before the threshold is set (state value < 0) this
    is relu.
    Without a state `encode` falls back to the training rule on the given batch.
    """

    HPARAM_DOCS: ClassVar[Mapping[str, str]] = {
        **TopKSAE.HPARAM_DOCS,
        "k": "mean latents active per token: the k x batch-size largest activations of a batch",
    }
    EXPORT_ARCHITECTURE: ClassVar[str] = "jumprelu"
    EXPORT_PER_LATENT: ClassVar[tuple[str, ...]] = ("threshold",)
    RANKS_LATENTS: ClassVar[bool] = False  # exported as a JumpReLU with the learned threshold
    PER_ROW_SELECTION: ClassVar[bool] = False

    @classmethod
    def saelens_config(cls, d_sae: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def activate_train(self, pre: jax.Array) -> jax.Array:
        return batch_topk_relu(pre, self.k)

    def select(self, pre: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The k * B largest pairs of the batch; on a device mesh each device lists its own
        (`sparse.owned_batch_pairs`), so no [B, F] array is gathered."""
        n_keep = min(self.k * pre.shape[0], pre.size)
        if layout.step_mesh() is not None:
            return sparse.owned_batch_pairs(jax.nn.relu(pre), n_keep)
        flat = batch_topk_indices(jax.nn.relu(pre), n_keep)
        return sparse.flat_pairs(flat, pre.shape[-1])

    def activate(self, pre: jax.Array, state: State | None) -> jax.Array:
        if state is None:
            return self.activate_train(pre)
        return jnp.where(pre > state["threshold"], jax.nn.relu(pre), 0.0)

    @classmethod
    def inference_state(cls, state: State, stored: Mapping[str, np.ndarray]) -> State:
        """The learned threshold from its stored form (`export_info`: max(threshold, 0) per
        latent). Exact for inference: before the threshold is set (< 0) `activate` is relu, and
        relu keeps no pre-activation <= 0 either."""
        if "threshold" not in stored:
            raise ValueError(
                "the stored weights lack the inference threshold (`threshold`) that BatchTopK "
                "encodes with; resume the run to write its final weights again"
            )
        threshold = jnp.asarray(np.max(stored["threshold"]), jnp.float32)
        return {**state, "threshold": threshold}

    @classmethod
    def export_info(cls, params, state, hparams) -> dict[str, Any]:
        threshold = max(float(state["threshold"]), 0.0)
        d_sae = np.shape(params["b_enc"])[-1]
        return {
            "architecture": cls.EXPORT_ARCHITECTURE,
            "k": hparams["k"],
            "threshold": np.full(d_sae, threshold, dtype=np.float32),
        }


class JumpReLUSAE(ReLUSAE):
    """`jumprelu`: h = pre * H(pre - theta) with a learned threshold theta >= 0 per latent.

    theta is the raw parameter `threshold` (SAELens's name: export is a copy), kept >= 0 by the
    optimizer (`optim.clamp_thresholds`), as dictionary_learning does. A log-theta parameter under
    the shared learning rate moved theta by a factor of ~e^(lr * steps): it could not exceed 0.004
    from its 0.001 start in a reference-length run, so L0 never approached `target_l0`.
    """

    bandwidth: float
    threshold_init: float

    HPARAMS: ClassVar[Mapping[str, Any]] = {
        "bandwidth": 0.1,
        "threshold_init": 0.001,
    }
    HPARAM_DOCS: ClassVar[Mapping[str, str]] = {
        "bandwidth": "width of the rectangle kernel of the straight-through (pseudo-)gradients",
        "threshold_init": "initial threshold theta of every latent (b_enc's data init uses it)",
    }
    EXPORT_ARCHITECTURE: ClassVar[str] = "jumprelu"
    EXPORT_PER_LATENT: ClassVar[tuple[str, ...]] = ("threshold",)

    @classmethod
    def check_hparams(cls, hparams: Mapping[str, Any], d_in: int, d_sae: int) -> None:
        if hparams["bandwidth"] <= 0:
            raise ValueError(f"bandwidth must be > 0, got {hparams['bandwidth']}")
        if hparams["threshold_init"] < 0:
            raise ValueError(f"threshold_init must be >= 0, got {hparams['threshold_init']}")

    @classmethod
    def init_from_data(cls, params, sample, hparams):
        """Encoder bias such that each latent fires on `target_l0 / F` of the sample, so L0 starts
        at its target (as in Anthropic's 2025 JumpReLU recipe) instead of at F / 2: the threshold
        moves by about lr per step, far too slowly to bring L0 from F / 2 down to 20 in a run of
        the default length. Without `target_l0` the plain init is kept."""
        params = super().init_from_data(params, sample, hparams)
        target = hparams.get("target_l0")
        if target is None:
            return params
        w_enc = np.asarray(params["W_enc"], np.float32)
        pre = (np.asarray(sample, np.float32) - np.asarray(params["b_dec"])) @ w_enc
        fire_quantile = np.quantile(pre, 1.0 - min(target / w_enc.shape[1], 1.0), axis=0)
        return params | {"b_enc": jnp.asarray(hparams["threshold_init"] - fire_quantile)}

    def setup(self) -> None:
        super().setup()
        self.threshold = self.param(
            "threshold", nn.initializers.constant(self.threshold_init), (self.d_sae,)
        )

    def activate_train(self, pre: jax.Array) -> jax.Array:
        return jumprelu(pre, self.threshold, self.bandwidth)

    @classmethod
    def from_saelens(cls, arrays) -> dict[str, np.ndarray]:
        if np.any(np.asarray(arrays["threshold"]) < 0):
            raise ValueError("jumprelu threshold must be >= 0 everywhere")
        return super().from_saelens(arrays)

    @classmethod
    def export_info(cls, params, state, hparams) -> dict[str, Any]:
        return {
            "architecture": cls.EXPORT_ARCHITECTURE,
            "threshold": np.asarray(params["threshold"], np.float32),
        }


def _default_n_concepts(d_sae: int) -> int:
    return max(d_sae // 64, 1)


def _default_k_c(d_sae: int) -> int:
    """32, or half the concepts of a dictionary too small for 32."""
    return min(32, max(1, _default_n_concepts(d_sae) // 2))


def _default_k_b(d_sae: int) -> int:
    """288, or half the eligible base latents (the `check_hparams` guard) when fewer."""
    n_concepts = _default_n_concepts(d_sae)
    return min(288, max(1, _default_k_c(d_sae) * (d_sae // n_concepts) // 2))


@dataclass(frozen=True)
class TwoLevelForward(Forward):
    """`two_level`: `pre`, `h` are the base level (F latents); the concept level adds its own."""

    pre_c: jax.Array  # [B, F_c] concept pre-activations
    g: jax.Array  # [B, F_c] concept codes


class TwoLevelSAE(TopKFamilySAE):
    """`two_level`: concept latents gate contiguous blocks of base latents.

    g = topk_{k_c}(relu(pre_c)); base latent j belongs to concept j // (F / F_c) and may fire only
    while it fires: h = topk_{k_b}(relu(pre) * parent_active); x_hat = h W_dec + g W_dec_c + b_dec.
    Both levels centre the input on the shared b_dec. The base level keeps the SAELens names; the
    concept level adds `W_enc_c [d, F_c]`, `W_dec_c [F_c, d]` (unit rows: the optimizer projects
    every `W_dec*`) and `b_enc_c [F_c]`. Both use the TopK-family init (encoder = decoder
    transpose, b_dec from data).

    `encode`/`decode` use the joint code [h, g] of F + F_c entries, base latents first. Decoding is
    linear in it, and it is the layout of the exported SAEBench custom SAE
    (`jax_sae.export.torch_twins.TwoLevelSAE`), so evaluation, interventions and the export index
    latents alike. Training reads both levels from `forward` (`TwoLevelForward`).
    """

    k_b: int
    k_c: int
    F_c: int

    HPARAMS: ClassVar[Mapping[str, Any]] = {
        **TopKFamilySAE.HPARAMS,
        "k_b": lambda d_in, d_sae: _default_k_b(d_sae),
        "k_c": lambda d_in, d_sae: _default_k_c(d_sae),
        "F_c": lambda d_in, d_sae: _default_n_concepts(d_sae),
    }
    HPARAM_DOCS: ClassVar[Mapping[str, str]] = {
        **TopKFamilySAE.HPARAM_DOCS,
        "k_b": "base latents active per token: a TopK among the children of active concepts",
        "k_c": "concept latents active per token (concept-level TopK)",
        "F_c": "number of concept latents; each gates a block of d_sae / F_c base latents",
    }
    """F / 64 concepts, k_c 32, k_b 288 (k_c + k_b = 320, the TopK baseline's L0), each lowered
    only where a small dictionary cannot hold it; k_b must stay below the k_c * F / F_c eligible
    base latents, or the base TopK selects nothing (docs/variants.md)."""
    EXPORT_ARCHITECTURE: ClassVar[str] = "two_level"
    RANKS_LATENTS: ClassVar[bool] = True

    @classmethod
    def export_form(cls, d_sae: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        form = super().export_form(d_sae, hparams)
        return form | {"dictionaries": {"": d_sae, "_c": int(hparams["F_c"])}}

    @classmethod
    def saelens_config(cls, d_sae: int, hparams: Mapping[str, Any]) -> dict[str, Any]:
        # the SAEBench module's code is [base, concept]: SAEBench sizes per-latent metrics by d_sae
        n_concepts = int(hparams["F_c"])
        return {
            "k_concept": int(hparams["k_c"]),
            "k_base": int(hparams["k_b"]),
            "d_sae": d_sae + n_concepts,
            "d_base": d_sae,
            "d_concept": n_concepts,
        }

    @classmethod
    def check_hparams(cls, hparams: Mapping[str, Any], d_in: int, d_sae: int) -> None:
        n_concepts, k_c, k_b = hparams["F_c"], hparams["k_c"], hparams["k_b"]
        if n_concepts < 1 or d_sae % n_concepts:
            raise ValueError(
                f"F_c={n_concepts} must divide d_sae={d_sae} (each concept has a contiguous block "
                "of d_sae / F_c base latents); choose d_sae a multiple of F_c"
            )
        if not 1 <= k_c <= n_concepts:
            raise ValueError(f"k_c must be in [1, F_c={n_concepts}], got {k_c}")
        if not 1 <= k_b <= d_sae:
            raise ValueError(f"k_b must be in [1, d_sae={d_sae}], got {k_b}")
        eligible = k_c * (d_sae // n_concepts)
        if eligible < 2 * k_b:
            raise ValueError(
                f"k_c * d_sae / F_c = {eligible} base latents are eligible per token, fewer than "
                f"2 k_b = {2 * k_b}: the base TopK would barely select; raise k_c or d_sae / F_c, "
                "or lower k_b"
            )

    def setup(self) -> None:
        super().setup()
        self.W_enc_c, self.W_dec_c = self.tied_dictionary("_c", self.F_c)
        self.b_enc_c = self.param("b_enc_c", nn.initializers.zeros_init(), (self.F_c,))

    def concept_pre_activation(self, x: jax.Array) -> jax.Array:
        """`(x - b_dec) W_enc_c + b_enc_c`. Written plainly: b_dec's gradient through it costs one
        [B, F_c] x [F_c, d] matmul, 1/8 of a base-level one at the default F_c."""
        return matmul(x - self.b_dec, self.W_enc_c, self.compute_dtype) + self.b_enc_c

    def gated(self, pre: jax.Array, g: jax.Array) -> jax.Array:
        """Base pre-activations with the children of inactive concepts set to 0 (no gradient)."""
        blocks = pre.reshape(*pre.shape[:-1], self.F_c, self.d_sae // self.F_c)
        return jnp.where(g[..., None] > 0, blocks, 0.0).reshape(pre.shape)

    def activate_levels(self, pre: jax.Array, pre_c: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(h, g): concept TopK, then base TopK among the children of active concepts."""
        g = topk_relu(pre_c, self.k_c)
        return topk_relu(self.gated(pre, g), self.k_b), g

    def decode_levels(self, h: jax.Array, g: jax.Array) -> jax.Array:
        return (
            matmul(h, self.W_dec, self.compute_dtype)
            + matmul(g, self.W_dec_c, self.compute_dtype)
            + self.b_dec
        )

    def encode(self, x: jax.Array, state: State | None = None) -> jax.Array:
        h, g = self.activate_levels(self.pre_activation(x), self.concept_pre_activation(x))
        return jnp.concatenate([h, g], axis=-1)

    def decode(self, codes: jax.Array) -> jax.Array:
        return self.decode_levels(codes[..., : self.d_sae], codes[..., self.d_sae :])

    def forward(self, x: jax.Array) -> TwoLevelForward:
        pre_c = self.concept_pre_activation(x)
        if self.dense:
            pre = self.pre_activation(x)
            h, g = self.activate_levels(pre, pre_c)
            return TwoLevelForward(pre=pre, h=h, x_hat=self.decode_levels(h, g), pre_c=pre_c, g=g)
        # Sparse base level; the concept level (F_c = F / 64 by default) stays dense.
        g = topk_relu(pre_c, self.k_c)
        pre = self.dense_pre(x)
        rows, cols = sparse.per_row_pairs(topk(self.gated(pre, g), self.k_b)[1])
        parent_active = g[rows, cols // (self.d_sae // self.F_c)] > 0
        values = jnp.where(parent_active, jax.nn.relu(self.selected_pre(x, pre, rows, cols)), 0.0)
        x_hat = (
            self.sparse_decode(values, rows, cols, x.shape[0])
            + matmul(g, self.W_dec_c, self.compute_dtype)
            + self.b_dec
        )
        h = sparse.densify(values, rows, cols, pre.shape)
        return TwoLevelForward(pre=pre, h=h, x_hat=x_hat, pre_c=pre_c, g=g)

    @classmethod
    def export_info(cls, params, state, hparams) -> dict[str, Any]:
        return {
            "architecture": cls.EXPORT_ARCHITECTURE,
            "k_c": hparams["k_c"],
            "k_b": hparams["k_b"],
            "F_c": hparams["F_c"],
        }
