"""When a run has diverged: the rule the trainer applies at every log line and at the end.

A run can be garbage with every number finite: at lr=1e6 one trained to a loss of 5e28 and a
held-out explained variance of -8.6e25 without a single NaN. Two signs, each far from anything a
healthy run does, stop such a run with an error and mark it diverged (the exporter then refuses
it):

* the reconstruction loss of a logged interval exceeds ``LOSS_BLOWUP_FACTOR`` times its early
  value, taken as the loss of reconstructing every input as zero (E||x||^2 of the training inputs,
  from the cache statistics): about where a fresh SAE starts, and a property of the data, so a run
  that already blows up within its first logged interval cannot raise its own bar. The rule reads
  the reconstruction term because sparsity penalties that ramp up (JumpReLU's L0 term, sparsity
  warm-ups) can legitimately lift the *total* loss far above its start. A fresh SAE on raw
  activations with a wide dictionary starts at up to ~30x the zero loss, hence the generous 1000;
* the held-out explained variance at the end is below ``MIN_EXPLAINED_VARIANCE`` (the SAE
  reconstructs worse than the constant mean) while the reconstruction loss ended no lower than its
  first logged value. A short healthy run can still be below the mean at the end (a TopK SAE
  starts there) while its loss falls: that is only a warning, as the run needs more steps, not
  another learning rate (so is a run with a single logged interval, which shows no trend).

Both thresholds are trainer options; ``inf`` / ``-inf`` switch a sign off. A held-out evaluation
that is not finite (NaN or inf: weights or inputs beyond float32) fails the run whatever the
thresholds: such a run has no measured quality to report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LOSS_BLOWUP_FACTOR = 1000.0
MIN_EXPLAINED_VARIANCE = 0.0
EVAL_KEY = "explained_variance_pooled"
"""The fast evaluation's 1 - FVU over all held-out tokens (jax_sae.report.evaluate)."""


def logged_reconstruction(record: dict) -> float:
    """The reconstruction term of a metrics record (the total loss if not logged separately)."""
    return float(record.get("recon", record["loss"]))


def zero_reconstruction_loss(mean_sq_norm: float, recon: str) -> float:
    """The reconstruction loss of predicting x_hat = 0 for inputs with E||x||^2 = ``mean_sq_norm``:
    that value for squared errors, its square root (an upper bound of E||x||) for ``l2norm``."""
    return math.sqrt(mean_sq_norm) if recon == "l2norm" else mean_sq_norm


@dataclass(frozen=True)
class DivergenceRule:
    loss_factor: float = LOSS_BLOWUP_FACTOR
    min_explained_variance: float = MIN_EXPLAINED_VARIANCE

    def loss_reason(self, record: dict, zero_loss: float) -> str | None:
        """Why ``record`` shows a diverged run (or None); ``zero_loss`` from
        ``zero_reconstruction_loss``."""
        now = logged_reconstruction(record)
        if math.isfinite(now) and now <= self.loss_factor * zero_loss:
            return None
        return (
            f"reconstruction loss {now:.4g} at step {record['step']} is more than "
            f"{self.loss_factor:g}x that of predicting zero ({zero_loss:.4g})"
        )

    @staticmethod
    def nonfinite_reason(fast_eval: dict | None) -> str | None:
        """Why the held-out evaluation has no meaning (a NaN or inf metric), or None."""
        bad = {
            key: value
            for key, value in (fast_eval or {}).items()
            if isinstance(value, float) and not math.isfinite(value)
        }
        if not bad:
            return None
        shown = ", ".join(f"{key} {value}" for key, value in sorted(bad.items())[:3])
        return (
            f"the held-out evaluation is not finite ({shown}): the weights or the inputs overflow "
            "float32 (check the cache for huge activations)"
        )

    def eval_reason(self, fast_eval: dict | None, first: dict, last: dict) -> str | None:
        """Why the end-of-run held-out evaluation shows a diverged run (or None), given the
        run's first and last logged records."""
        value = self._below_minimum(fast_eval)
        improved = logged_reconstruction(last) < logged_reconstruction(first)
        if value is None or improved or last["step"] <= first["step"]:  # one record: no trend
            return None
        return (
            f"held-out explained variance (pooled, 1 - FVU) {value:.4g} is below "
            f"{self.min_explained_variance:g} "
            f"(worse than predicting the mean) and the reconstruction loss never fell below its "
            f"early value {logged_reconstruction(first):.4g}"
        )

    def eval_warning(self, fast_eval: dict | None) -> str | None:
        """A warning for an explained variance below the minimum in a run that did improve."""
        value = self._below_minimum(fast_eval)
        if value is None:
            return None
        return (
            f"held-out explained variance (pooled, 1 - FVU) {value:.4g} is below "
            f"{self.min_explained_variance:g}: "
            "the SAE reconstructs worse than the mean; train longer (--resume --steps N)"
        )

    def _below_minimum(self, fast_eval: dict | None) -> float | None:
        value = (fast_eval or {}).get(EVAL_KEY)
        return value if value is not None and not value >= self.min_explained_variance else None
