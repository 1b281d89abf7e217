"""Fast evaluation on held-out cached activations: no language model needed.

Metrics are computed in the space of the raw activations, i.e. for the SAE as exported (input
normalisation folded into the weights: x_hat_raw = x_hat(s x) / s, codes h / s), so the numbers
are comparable with SAEBench's core eval of the exported SAE on the same tokens.

Definitions follow SAEBench 0.6.0 ``evals/core/main.py`` key for key, including its quirks, with
our own unambiguous versions next to them, except for the explained variance: ours,
``explained_variance``, is 1 - FVU as researchers read it, and SAEBench's is
``explained_variance_saebench``. Tokens are processed in consecutive batches of
``EVAL_BATCH`` = 2048 (SAEBench's 16 prompts x 128 tokens), the batch-dependent quirks use these
batches, and means over tokens weight every token alike (SAEBench averages per-batch means: the
same for equal batches). ``rss_t = ||x_t - x_hat_t||^2``.

==================================  ==========================================================
``explained_variance``              the headline: ``1 - FVU = 1 - sum_t rss_t / sum_t ||x_t -
                                    mean(x)||^2``, at most 1, 0 for predicting the mean
``explained_variance_pooled``       the same number, under the name older runs hold it by and
                                    the divergence rule reads
``explained_variance_saebench``     SAEBench's ``explained_variance``: ``1 - mean_t rss_t / (M -
                                    (M / d)^2)``, M = mean_t ||x_t||^2 (their formula; not the
                                    variance about the mean, and above 1 wherever M > d^2: see
                                    below)
``explained_variance_legacy``       SAEBench: mean_t of ``1 - rss_t / ||x_t - mean_batch(x)||^2``
``mse``                             SAEBench: mean_t of ``rss_t / n_batch`` (sic)
``mse_per_token``                   ours: mean_t rss_t (the training loss's reconstruction term)
``cossim``                          mean_t cos(x_t, x_hat_t) (0 where x_hat_t = 0; SAEBench: NaN)
``l2_norm_in`` / ``l2_norm_out``    mean_t ||x_t||, mean_t ||x_hat_t||
``l2_ratio``                        mean_t ||x_hat_t|| / ||x_t|| (||x_t|| < 1e-4 counts as 1)
``relative_reconstruction_bias``    mean over batches of mean||x_hat||^2 / mean(x . x_hat)
``l0`` / ``l1``                     mean_t #{i: h_ti != 0}, mean_t sum_i h_ti
``frac_alive``                      fraction of latents with density > 0 (density = fraction of
                                    tokens with h_ti > 0); ``dead_frac`` = 1 - frac_alive
``freq_over_1/10_percent``          fraction of latents with density > 1% / 10%;
                                    ``dense_frac`` = freq_over_10_percent
``normalized_freq_over_1/10_pct``   share of all firings made by those latents
==================================  ==========================================================

Why SAEBench's formula is not the headline: its denominator ``M - (M / d)^2`` is not the
variance about the mean, and it depends on the scale of the activations. Scaling x by c scales
``M`` by c^2 but ``(M / d)^2`` by c^4: as ``M`` nears d^2 the denominator nears 0 and the value
plunges; beyond, the denominator is negative and the value exceeds 1 (a TopK run on a cache at 5x
scale: 1.066 while 1 - FVU was 0.57). ``1 - FVU`` does not depend on the scale of x.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EVAL_BATCH = 2048


def batch_sums(x: jax.Array, x_hat: jax.Array, h: jax.Array, shift: jax.Array) -> dict:
    """Per-batch sums of the per-token quantities (float32; totals are kept in float64).

    ``shift`` is a fixed vector close to the data mean: the pooled variance is accumulated
    around it so the final ``sum||x - m||^2 - n ||mean - m||^2`` does not cancel catastrophically.
    """
    n = x.shape[0]
    rss = jnp.sum((x - x_hat) ** 2, axis=1)
    norm_in = jnp.linalg.norm(x, axis=1)
    norm_out = jnp.linalg.norm(x_hat, axis=1)
    batch_var = jnp.sum((x - x.mean(axis=0)) ** 2, axis=1)
    cos = jnp.sum(x * x_hat, axis=1) / (
        jnp.maximum(norm_in, jnp.finfo(x.dtype).tiny)
        * jnp.maximum(norm_out, jnp.finfo(x.dtype).tiny)
    )
    centred = x - shift
    return {
        "n": n,
        "rss": rss.sum(),
        "sq_norm": jnp.sum(norm_in**2),
        "ev_legacy": jnp.sum(1.0 - rss / batch_var),
        "mse_saebench": rss.sum() / n,
        "cossim": cos.sum(),
        "l2_norm_in": norm_in.sum(),
        "l2_norm_out": norm_out.sum(),
        "l2_ratio": jnp.sum(norm_out / jnp.where(norm_in < 1e-4, 1.0, norm_in)),
        "rel_bias": jnp.mean(norm_out**2) / jnp.mean(jnp.sum(x * x_hat, axis=1)),
        "l0": jnp.sum(h != 0),
        "l1": jnp.sum(h),
        "centred_sum": centred.sum(axis=0),
        "centred_sq": jnp.sum(centred**2),
        "fires": jnp.sum(h > 0, axis=0, dtype=jnp.int32),
    }


_batch_sums = jax.jit(batch_sums)


class MetricTotals:
    """Running float64 totals of ``batch_sums`` over the batches of one evaluation."""

    def __init__(self) -> None:
        self.batches = 0
        self.sums: dict[str, np.ndarray] = {}
        self.shift: np.ndarray | None = None

    def add(self, x: jax.Array | np.ndarray, x_hat: jax.Array, h: jax.Array) -> None:
        """Add one batch of raw activations (host or device), reconstructions and codes."""
        if self.shift is None:
            self.shift = np.asarray(x, np.float64).mean(axis=0).astype(np.float32)
        sums = jax.device_get(_batch_sums(x, x_hat, h, self.shift))
        self.batches += 1
        for key, value in sums.items():
            value = np.asarray(value, np.float64)
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def result(self) -> dict[str, Any]:
        """Floats per the module docstring, plus ``feature_density`` (numpy [F])."""
        if not self.batches:
            raise ValueError("no held-out tokens to evaluate; pass --eval-tokens > 0")
        assert self.shift is not None  # set by the first ``add``, and one has run
        s, n = self.sums, self.sums["n"]
        d = len(self.shift)
        mean_sq_norm = s["sq_norm"] / n
        delta = s["centred_sum"] / n  # mean(x) - shift
        pooled_var = s["centred_sq"] - n * np.dot(delta, delta)
        density = s["fires"] / n
        total = density.sum()

        def share(threshold: float) -> float:
            return density[density > threshold].sum() / total if total else 0.0

        metrics = {
            "explained_variance": 1 - s["rss"] / pooled_var,
            "explained_variance_pooled": 1 - s["rss"] / pooled_var,
            "explained_variance_saebench": 1
            - (s["rss"] / n) / (mean_sq_norm - (mean_sq_norm / d) ** 2),
            "explained_variance_legacy": s["ev_legacy"] / n,
            "mse": s["mse_saebench"] / n,
            "mse_per_token": s["rss"] / n,
            "cossim": s["cossim"] / n,
            "l2_norm_in": s["l2_norm_in"] / n,
            "l2_norm_out": s["l2_norm_out"] / n,
            "l2_ratio": s["l2_ratio"] / n,
            "relative_reconstruction_bias": s["rel_bias"] / self.batches,
            "l0": s["l0"] / n,
            "l1": s["l1"] / n,
            "frac_alive": np.mean(density > 0),
            "dead_frac": np.mean(density == 0),
            "freq_over_1_percent": np.mean(density > 0.01),
            "freq_over_10_percent": np.mean(density > 0.1),
            "dense_frac": np.mean(density > 0.1),
            "normalized_freq_over_1_percent": share(0.01),
            "normalized_freq_over_10_percent": share(0.1),
        }
        return {k: float(v) for k, v in metrics.items()} | {
            "n_tokens": int(n),
            "feature_density": density,
        }


def evaluate(
    variant: Any,
    params: Any,
    batches: Iterable[np.ndarray],
    *,
    state: Any = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Evaluate an SAE trained on ``scale * x`` on raw activations ``x`` (see module docstring).

    ``state`` is the regulariser state, for variants whose inference reads it (BatchTopK's
    threshold).
    """

    @jax.jit
    def reconstruct(params: Any, state: Any, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        # weights are arguments: a closure would bake them into the program as constants
        h = variant.encode(params, x * scale, state)
        return variant.decode(params, h) / scale, h / scale

    totals = MetricTotals()
    for x in batches:
        totals.add(x, *reconstruct(params, state, x))
    return totals.result()
