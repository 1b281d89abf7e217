"""The training loop of one group of members (a single run is a group of one).

Every member has its own run folder, metrics log and checkpoints; the group shares the batches
and one compiled step (``jax_sae.training.engine``). Metrics are summed on the device and
fetched every ``log_every`` steps. A member whose loss turns non-finite or blows up is marked
diverged and no longer saved; the group stops (TrainingError, last good checkpoint kept) when
no member is left. With several processes the metrics are replicated, so every process takes
the same decisions; only the primary logs them.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jax_sae.data.source import BatchSource
from jax_sae.model.variants import Variant
from jax_sae.parallel.distributed import is_primary
from jax_sae.report import runs
from jax_sae.report.record import RunRecord
from jax_sae.training.checkpoint import Checkpoints
from jax_sae.training.divergence import DivergenceRule
from jax_sae.training.engine import Engine, TrainState
from jax_sae.training.optim import make_schedule
from jax_sae.training.tracking import ExperimentLog

GRAD_SHARE_POINTS = 50
"""Gradient shares cost one gradient per term: computed at about this many logged intervals."""


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, blow-up); the last good checkpoint is kept."""


@dataclass
class Member:
    """One SAE of a group: its folder, config, variant, and where its records go."""

    name: str
    out: Path
    config: RunRecord
    variant: Variant
    log: ExperimentLog | None  # None on processes other than the primary
    checkpoints: Checkpoints
    zero_loss: float
    failure: str | None = None
    record: dict | None = None  # last logged interval
    shares: dict[str, float] | None = None  # last gradient shares, for the progress bar

    def learning_rate(self, step: int) -> float:
        hp = self.variant.hparams
        schedule = make_schedule(hp["lr"], hp["warmup_steps"], self.config.steps, hp["lr_decay"])
        return float(schedule(step))

    def last_good(self) -> str:
        latest = self.checkpoints.latest_step()
        if latest is None:
            return "no checkpoint was saved yet"
        return f"the last good checkpoint is step {latest} in {self.checkpoints.directory}"


@jax.jit
def _accumulate(sums: dict, metrics: dict, step: jax.Array, first_bad: jax.Array):
    """Add one step's metrics to the interval sums and remember (per member) the first step whose
    loss is not finite, on the device: no host sync per step."""
    bad = (first_bad < 0) & ~jnp.isfinite(metrics["loss"])
    return jax.tree.map(jnp.add, sums, metrics), jnp.where(bad, step, first_bad)


class MetricsWindow:
    """Metrics of the steps since the last log line, and each member's first non-finite step."""

    def __init__(self, batch_size: int, start: int) -> None:
        self.batch_size = batch_size
        self.first_bad: jax.Array | None = None
        self.sums: dict | None = None
        self.count = 0
        self.since = (start, time.perf_counter())

    def add(self, metrics: dict, step: int) -> None:
        if self.sums is None:  # host zeros: no extra compile
            self.sums = {key: np.zeros(np.shape(v), np.float32) for key, v in metrics.items()}
        if self.first_bad is None:
            self.first_bad = jnp.full(np.shape(metrics["loss"]), -1, jnp.int32)
        self.sums, self.first_bad = _accumulate(self.sums, metrics, jnp.int32(step), self.first_bad)
        self.count += 1

    def bad_steps(self) -> np.ndarray:
        """1-based step of each member's first non-finite loss so far, 0 for none (waits)."""
        if self.first_bad is None:
            return np.zeros(0, np.int64)
        return np.atleast_1d(np.asarray(self.first_bad)).astype(np.int64) + 1

    def restart_clock(self, done: int) -> None:
        """Start timing the next interval now (diagnostics between intervals are not steps)."""
        self.since = (done, time.perf_counter())

    def flush(self, done: int) -> tuple[list[dict], float]:
        """Each member's mean metrics over the interval as a metrics.jsonl record, and tokens/s."""
        means = {k: np.atleast_1d(v) / self.count for k, v in jax.device_get(self.sums).items()}
        (step0, time0), now = self.since, time.perf_counter()
        tokens_per_s = (done - step0) * self.batch_size / max(now - time0, 1e-9)
        self.sums, self.count, self.since = None, 0, (done, now)
        size = len(means["loss"])
        base = {"step": done, "tokens": done * self.batch_size, "tokens_per_s": tokens_per_s}
        return [
            base | {k: float(v[i]) for k, v in means.items()} for i in range(size)
        ], tokens_per_s


def host_copy(tree: Any) -> Any:
    """Owned numpy copies: the step donates its inputs, so a background checkpoint write must
    not read device buffers that the next step reuses. With several processes the global arrays
    themselves (numpy cannot hold another process's shards; ``Checkpoints.save`` then waits)."""
    return jax.tree.map(np.array, tree) if jax.process_count() == 1 else tree


def mark_diverged(member: Member, message: str) -> None:
    """Mark the member diverged (the exporter then refuses it); it is no longer saved."""
    if is_primary():
        runs.write_status(member.out, runs.DIVERGED, reason=message)
    member.failure = message


@dataclass
class GroupRun:
    """The loop over one group: ``run`` trains from ``start`` to the members' step count."""

    members: list[Member]
    engine: Engine
    loader: BatchSource
    rule: DivergenceRule
    label: str
    after_checkpoint: Callable[[int], None] | None = None
    """Called with a step once every member's checkpoint of it is committed (a stream then
    releases the shards no later step reads)."""

    @property
    def alive(self) -> list[tuple[int, Member]]:
        return [(i, m) for i, m in enumerate(self.members) if m.failure is None]

    def _fail(self, member: Member, message: str) -> None:
        mark_diverged(member, message)
        if len(self.members) > 1:
            print(f"warning: sweep member {member.name} stopped: {message}", file=sys.stderr)
        if not self.alive:
            raise TrainingError(self.members[0].failure if len(self.members) == 1 else message)

    def _check_finite(self, window: MetricsWindow) -> None:
        for index, step in enumerate(window.bad_steps()):
            member = self.members[index]
            if step > 0 and member.failure is None:
                remedy = remedy_for(member.config)
                self._fail(
                    member,
                    f"loss is not finite at step {step}; stopped without saving, "
                    f"{member.last_good()}. The inputs read were finite and matched their "
                    f"checksums, so the optimisation diverged: {remedy}",
                )

    def _save(self, state: TrainState, done: int, window: MetricsWindow) -> None:
        self._check_finite(window)
        host = host_copy(state)
        for index, member in self.alive:
            record = {
                "step": done,
                "config_hash": member.config.config_hash,
                "loader_step": done,
            }
            member.checkpoints.save(done, self.engine.member(host, index), record)
        if self.after_checkpoint is not None:
            for _, member in self.alive:
                member.checkpoints.wait()
            self.after_checkpoint(done)

    def _log(self, state, batch, step: int, done: int, window: MetricsWindow, shares_due: bool):
        self._check_finite(window)
        records, tokens_per_s = window.flush(done)
        shares = self.engine.grad_shares(state, batch, jnp.int32(step)) if shares_due else {}
        shares = jax.device_get(shares)
        for index, member in self.alive:
            record = records[index] | {"lr": member.learning_rate(step)}
            if shares:
                member.shares = {k: float(np.atleast_1d(v)[index]) for k, v in shares.items()}
                record |= member.shares
            if member.log is not None:
                member.log.append(record)
            member.record = record
            reason = self.rule.loss_reason(record, member.zero_loss)
            if reason is not None:
                self._fail(
                    member,
                    f"the run diverged: {reason}; stopped, {member.last_good()}; "
                    f"{remedy_for(member.config)}",
                )
        window.restart_clock(done)
        return tokens_per_s

    def run(self, state: TrainState, start: int) -> TrainState:
        config = self.members[0].config
        steps, log_every = config.steps, config.log_every
        shares_every = log_every * max(1, steps // log_every // GRAD_SHARE_POINTS)
        window = MetricsWindow(config.batch_size, start)
        bar = tqdm(
            total=steps,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            desc=self.label,
            disable=not is_primary(),
        )
        with bar, self.loader.batches(start, steps) as batches:
            done, in_flight = start, None
            try:
                for step in range(start, steps):
                    batch = next(batches)
                    state, metrics = self.engine.step(state, batch, jnp.int32(step))
                    done = step + 1
                    window.add(metrics, step)
                    if in_flight is not None:
                        in_flight.block_until_ready()  # at most two steps queued on the device
                    in_flight = metrics["loss"]
                    bar.update(1)
                    if done % log_every == 0 or done == steps:
                        due = done % shares_every == 0 or done == steps
                        tokens_per_s = self._log(state, batch, step, done, window, due)
                        bar.set_postfix_str(progress_fields(self.alive, tokens_per_s))
                    if done % config.checkpoint_every == 0 or done == steps:
                        self._save(state, done, window)
            except KeyboardInterrupt:
                # keep the finished steps; not if the state is non-finite or a step was cut
                # mid-call (its inputs are donated, i.e. gone)
                with contextlib.suppress(Exception):
                    self._save(state, done, window)
                raise
        return state


def remedy_for(config: RunRecord) -> str:
    return "lower the learning rate (--set lr=...)" + (
        "" if config.normalize else " or train with --normalize"
    )


def span(values: list[float], fmt: str) -> str:
    """One value, or the range of a sweep's values."""
    low, high = min(values), max(values)
    return format(low, fmt) if low == high else f"{low:{fmt}}..{high:{fmt}}"


def per_second(rate: float) -> str:
    """A rate as a person reads it: 97k, 1.2M, 850 (whole numbers from 10 up)."""
    scale, suffix = next(
        (
            (scale, suffix)
            for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k"))
            if rate >= scale
        ),
        (1.0, ""),
    )
    value = rate / scale
    return f"{value:.0f}{suffix}" if value >= 10 else f"{value:.1f}{suffix}"


DEAD_TRAIN = "dead(train)"
"""The progress bar's dead fraction: latents that fired on none of the last ``dead_tokens``
training tokens (metrics.jsonl ``dead_frac``; docs/training.md, "Dead latents")."""


def progress_fields(alive: list[tuple[int, Member]], tokens_per_s: float) -> str:
    """The progress bar's postfix: one member's numbers, or each number's range over members."""
    records = [m.record for _, m in alive if m.record is not None]
    if not records:
        return ""
    fields = [
        f"loss={span([r['loss'] for r in records], '.4g')}",
        f"L0={span([r['l0'] for r in records], '.1f')}",
        f"{DEAD_TRAIN}={span([r['dead_frac'] for r in records], '.3f')}",
        f"{per_second(tokens_per_s)} tok/s",
    ]
    shares = [m.shares for _, m in alive if m.shares]
    for key in sorted(shares[0]) if shares else []:
        name = key.removeprefix("grad_share/")
        fields.append(f"{name}={span([s[key] for s in shares], '.1%')}")
    return ", ".join(fields)
