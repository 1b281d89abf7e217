"""Experiment logging: every logged interval goes to ``metrics.jsonl`` and, when asked, to
TensorBoard (``<out>/tensorboard``) and Weights & Biases (``<out>/wandb``), through one
``ExperimentLog``.

``metrics.jsonl`` is the record the library reads back (plots, resume, divergence checks); the
trackers are views of it for people, imported only when enabled (``pip install -e
".[tracking]"``). On resume the trackers may already hold points past the checkpoint:

- TensorBoard: the resumed run's event file starts with a purge marker at the first step after
  the checkpoint, so TensorBoard hides the old file's points from there on and shows the
  re-logged ones.
- W&B: the run id lives in ``<out>/wandb_id.txt``, so a resumed run continues the same W&B run.
  W&B steps must increase, so a record whose step is not past the run's last logged step is not
  sent (W&B would drop it anyway); an online run resumes after its last step, an offline one
  (``WANDB_MODE=offline``) starts a new local file that ``wandb sync`` merges into that run.
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from jax_sae.report.runs import METRICS, MetricsLog

TENSORBOARD_DIR = "tensorboard"
WANDB_ID = "wandb_id.txt"
INSTALL_HINT = 'pip install -e ".[tracking]"'


def import_tracker(package: str) -> ModuleType:
    """Import an optional tracking package, or fail with the install command."""
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ValueError(f"{package} is not installed; run: {INSTALL_HINT}") from None


def wandb_run_id(out: Path) -> str:
    """The folder's W&B run id, created on first use: every session of a run logs to one run."""
    file = out / WANDB_ID
    if not file.exists():
        file.write_text(secrets.token_hex(8) + "\n")
    return file.read_text().strip()


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers except its step, which is the x axis rather than a metric."""
    return {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, int | float)}


def event_file_suffix(logdir: Path) -> str:
    """A suffix unique in ``logdir``: tensorboardX names event files by the second and truncates
    an existing file of the same name, so a quick resume would erase the first session's file."""
    return f".{len(list(logdir.glob('events.out.tfevents.*'))):03d}"


class ExperimentLog:
    """The one place a run's logged records go (see the module docstring)."""

    def __init__(
        self,
        out: Path,
        config: dict,
        *,
        name: str,
        tensorboard: bool = False,
        wandb_project: str | None = None,
    ) -> None:
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._metrics = MetricsLog(self.out / METRICS)
        self._summary_writer: Callable[..., Any] | None = (
            import_tracker("tensorboardX").SummaryWriter if tensorboard else None
        )
        self._tensorboard: Any = None  # opened at the first append, after any truncate_after
        self._purge_step: int | None = None
        self._wandb: Any = None
        self._wandb_next = 0
        if wandb_project is not None:
            self._wandb = import_tracker("wandb").init(
                project=wandb_project,
                name=name,
                config=config,
                dir=str(self.out),
                id=wandb_run_id(self.out),
                resume="allow",
            )
            self._wandb_next = self._wandb.step

    def truncate_after(self, step: int) -> None:
        """On resume: drop the records past the checkpoint's ``step``, which are logged again."""
        self._metrics.truncate_after(step)
        self._purge_step = step + 1

    def append(self, record: dict) -> None:
        """Log one interval's record; ``record["step"]`` is the x axis of both trackers."""
        self._metrics.append(record)
        step = record["step"]
        if self._summary_writer is not None:
            writer = self._tensorboard_writer()
            for tag, value in scalars(record).items():
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()
        if self._wandb is not None and step >= self._wandb_next:
            self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)
            self._wandb_next = step + 1

    def read(self) -> list[dict]:
        return self._metrics.read()

    def close(self) -> None:
        """Flush TensorBoard and finish the W&B run (offline: its files stay in ``out/wandb``)."""
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()

    def __enter__(self) -> ExperimentLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _tensorboard_writer(self) -> Any:
        assert self._summary_writer is not None  # called only when TensorBoard is on
        if self._tensorboard is None:
            logdir = self.out / TENSORBOARD_DIR
            self._tensorboard = self._summary_writer(
                logdir=str(logdir),
                purge_step=self._purge_step,
                filename_suffix=event_file_suffix(logdir),
            )
        return self._tensorboard
