"""Training checkpoints with orbax-checkpoint.

A checkpoint holds the whole training state as one pytree (params, optimizer state, regulariser
state, RNG key) plus a small JSON record (step, loader position, config hash). orbax writes each
step to a temporary folder and renames it when complete, and removes old steps only after a newer
one is committed, so a kill at any moment leaves the last good checkpoint in place.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_sae.model.variants import Variant
from jax_sae.training.engine import TrainState, abstract_state
from jax_sae.util.disk import require_space

DEFAULT_KEEP = 3
WRITE_OVERHEAD = 1 << 20
"""Bytes a checkpoint takes beyond its arrays (orbax metadata), with room to spare."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message names the fix."""


METADATA_FILE = "_CHECKPOINT_METADATA"
"""The file orbax writes into every committed step folder."""


def drop_unfinished_steps(directory: Path) -> None:
    """Remove empty step folders a kill left behind, refuse partial ones.

    orbax would take an empty ``checkpoints/<step>/`` for the latest step and fail to restore
    it. An empty folder holds nothing, so removing it loses nothing; a non-empty one without
    orbax's metadata file is left for the user to look at, with a one-line refusal.
    """
    if not directory.is_dir():
        return
    for step in sorted(directory.iterdir()):
        if not (step.name.isdigit() and step.is_dir()) or (step / METADATA_FILE).exists():
            continue
        if any(step.iterdir()):
            raise CheckpointError(
                f"checkpoint folder {step} is incomplete (no {METADATA_FILE}: its write was "
                "interrupted); move it out of the run folder, then rerun with --resume"
            )
        step.rmdir()
        print(
            f"note: removed the empty checkpoint folder {step} a kill left behind", file=sys.stderr
        )


class Checkpoints:
    """The ``checkpoints/`` folder of one run: the last ``keep`` steps (the final one included).

    ``read_only`` opens it for reading beside a trainer that may be writing it: nothing is
    created, cleaned up or removed (``drop_unfinished_steps`` is the trainer's to run)."""

    def __init__(self, directory: str | Path, keep: int = DEFAULT_KEEP, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if read_only:
            options = ocp.CheckpointManagerOptions(
                read_only=True, create=False, save_interval_steps=0, max_to_keep=None
            )
        else:
            drop_unfinished_steps(self.directory)
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, cleanup_tmp_directories=True
            )
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # orbax warns that a read-only folder is read-only
            absl.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl.setLevel(level)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step, in order."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, record: dict) -> None:
        """Save ``state`` (a pytree of arrays) and ``record`` (JSON) as checkpoint ``step``.

        Returns once the arrays are copied off the device; writing to disk finishes in the
        background (``close()`` waits for it). With several processes every process writes its
        shards of the global arrays and the call waits for the write: the arrays are the
        training state itself, whose buffers the next step donates.
        """
        if step in self._manager.all_steps():
            return
        state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
        require_space(
            self.directory,
            state_bytes + WRITE_OVERHEAD,
            f"checkpoint {step}",
            "rerun with --resume",
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
        )
        self._manager.save(step, args=args)
        if jax.process_count() > 1:
            self._manager.wait_until_finished()

    def wait(self) -> None:
        """Block until every save so far is committed (durable)."""
        self._manager.wait_until_finished()

    def read_record(self, step: int) -> dict:
        """The JSON record of a checkpoint, without reading its arrays."""
        self._manager.wait_until_finished()
        restored = self._manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        )
        return dict(restored.record)

    def restore(
        self, step: int, like: Any, config_hashes: str | Collection[str]
    ) -> tuple[Any, dict]:
        """Restore checkpoint ``step`` into the structure, shapes and dtypes of ``like``.

        Refuses a checkpoint written under a configuration not in ``config_hashes`` (a run's
        own, plus those of the shorter runs it extends): continuing it would silently mix two
        experiments.
        """
        if isinstance(config_hashes, str):
            config_hashes = {config_hashes}
        record = self.read_record(step)
        if record.get("config_hash") not in config_hashes:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} belongs to a run with a different "
                "config; rerun with the original flags or choose a new --out"
            )
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        return self._manager.restore(step, args=args).state, record

    def close(self) -> None:
        """Wait for pending writes, then release the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_step(
    directory: str | Path,
    step: int,
    variant: Variant,
    steps: int,
    config_hashes: str | Collection[str],
) -> TrainState:
    """Checkpoint ``step`` of a run of ``variant`` trained for ``steps`` steps, on one device,
    for use outside training (``jax_sae.SAE.load``): read-only, so it is safe beside a live
    trainer. Refuses a checkpoint of another configuration, as ``Checkpoints.restore`` does.
    CheckpointError naming the saved steps when ``step`` is not one of them."""
    directory = Path(directory)
    with Checkpoints(directory, read_only=True) as checkpoints:
        saved = checkpoints.all_steps()
        if step not in saved:
            listed = ", ".join(map(str, saved)) or "none"
            raise CheckpointError(
                f"{directory} has no checkpoint of step {step} (saved steps: {listed}); "
                "choose one of those"
            )
        state, _ = checkpoints.restore(step, abstract_state(variant, steps), config_hashes)
    return state
