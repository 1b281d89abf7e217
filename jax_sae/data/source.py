"""What the trainer asks of its training data: a ``BatchSource``, set up with a ``BatchSpec``.

The file loader (``jax_sae.data.loader.Loader``) and the streaming loader
(``jax_sae.data.stream.StreamingLoader``) are the sources today; a source that makes its
batches on the fly (a synthetic world, say) implements the same protocol. The trainer only uses
what the protocol names, so it never needs to know which kind of source it was given: every
difference between the kinds is a property or a method here.

``BatchSpec`` holds the batch settings every source takes, so the trainer builds them once and
hands them to whichever source the run reads; what only one kind needs (the file loader's chunk
sizes, the stream's window) stays a keyword argument of its constructor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

DEFAULT_PREFETCH = 4
BATCH_KEYS = ("x", "x_prev", "seq_start")


class LoaderError(ValueError):
    """A loader request the cache cannot satisfy; the message names the fix."""


def check_batch_keys(batch_keys: Sequence[str]) -> None:
    """The keys a variant asks for must be ones the loaders make, ``x`` among them."""
    unknown = sorted(set(batch_keys) - set(BATCH_KEYS))
    if unknown or "x" not in batch_keys:
        raise LoaderError(
            f"batch keys {list(batch_keys)} unsupported; the loader makes {BATCH_KEYS}"
        )


@dataclass(frozen=True)
class BatchSpec:
    """The batch settings every source takes: what each batch holds and where it goes.

    ``seed`` fixes the batch order (a run's ``data_seed``); ``scale`` multiplies every training
    activation (a run's ``norm_scale``); ``prefetch`` batches are read and put on the device
    ahead of the step; ``sharding`` places each batch (None: the default device). With several
    processes, ``rows`` are this process's rows of every batch, part of one global array of
    ``sharding``.
    """

    batch_size: int
    seed: int = 0
    batch_keys: tuple[str, ...] = ("x",)
    scale: float = 1.0
    prefetch: int = DEFAULT_PREFETCH
    sharding: jax.sharding.Sharding | None = None
    rows: slice | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_keys", tuple(self.batch_keys))
        object.__setattr__(self, "scale", float(self.scale))
        check_batch_keys(self.batch_keys)
        rows = self.rows
        if rows is not None and (
            self.sharding is None or not 0 <= rows.start < rows.stop <= self.batch_size
        ):
            raise LoaderError(
                f"rows {rows} must lie in a batch of {self.batch_size} and come with a sharding"
            )

    @property
    def temporal(self) -> bool:
        """Whether batches carry each token's predecessor (``x_prev``, ``seq_start``)."""
        return "x_prev" in self.batch_keys or "seq_start" in self.batch_keys


def batch_spec(spec: BatchSpec | None, settings: dict[str, Any]) -> BatchSpec:
    """A source's BatchSpec: the one it was given, or one made of the batch settings it was
    given as keywords instead (``Loader(cache, layer, batch_size=64)``, the short form)."""
    if spec is None:
        return BatchSpec(**settings)
    if settings:
        raise TypeError(f"batch settings {sorted(settings)} given beside a BatchSpec; pass one")
    return spec


@dataclass(frozen=True)
class SourceDescription:
    """What a run records about the data it trains on (config.json)."""

    path: Path  # the cache folder
    identity: str  # changes whenever the data does: a resumed run checks it is the same
    complete: bool  # whether the cache held all of its extraction when the run started
    model_name: Any
    ctx_len: Any
    dataset: Any
    prepend_bos: Any

    @classmethod
    def of_manifest(cls, path: Path, manifest: dict, identity: str) -> SourceDescription:
        """The description of a cache from its manifest (field names as extractors wrote them)."""
        return cls(
            path=Path(path),
            identity=identity,
            complete=bool(manifest.get("complete")),
            model_name=manifest_field(manifest, "model_name", "model"),
            ctx_len=manifest_field(manifest, "ctx_len", "context_size"),
            dataset=manifest_field(manifest, "dataset", "dataset_name"),
            prepend_bos=manifest_field(manifest, "prepend_bos"),
        )


def manifest_field(manifest: dict, *names: str) -> Any:
    """First of ``names`` in the manifest's top level, metadata or settings (None if absent)."""
    for section in (manifest, manifest.get("metadata") or {}, manifest.get("settings") or {}):
        for name in names:
            if section.get(name) is not None:
                return section[name]
    return None


def file_sha256(path: Path) -> str:
    """Identity of a finished cache: its manifest lists every shard with its checksum."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def settings_sha256(manifest: dict) -> str:
    """Identity of a stream: its extraction settings (its manifest grows while a run reads it)."""
    fixed = {k: manifest.get(k) for k in ("settings", "metadata", "layers", "d_model", "dtype")}
    return "stream:" + hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


class DeviceBatches(Protocol):
    """Device batches of consecutive steps; closing it (or leaving its ``with`` block) stops
    the threads that read them, also when the consumer stops early."""

    def __iter__(self) -> Iterator[dict[str, jax.Array]]: ...

    def __next__(self) -> dict[str, jax.Array]: ...

    def close(self) -> None: ...

    def __enter__(self) -> DeviceBatches: ...

    def __exit__(self, *exc: object) -> None: ...


class BatchSource(Protocol):
    """Training batches of one layer's activations, and held-out rows to evaluate on.

    Batch ``s`` is a pure function of the spec's seed and ``s``, so a run resumed at a step
    reads exactly the batches the first one would have read from there.
    """

    @property
    def spec(self) -> BatchSpec:
        """The batch settings the source was made with."""
        ...

    @property
    def d_model(self) -> int:
        """Width of an activation row."""
        ...

    @property
    def n_train(self) -> int:
        """Training tokens: per epoch, or in all for a single-pass source."""
        ...

    @property
    def eval_tokens(self) -> int:
        """The held-out tokens asked for."""
        ...

    @property
    def heldout_tokens(self) -> int:
        """Tokens ``heldout`` yields: at least ``eval_tokens`` (0: nothing to evaluate on)."""
        ...

    @property
    def single_pass(self) -> bool:
        """True when the training tokens can be read only once, in order (a stream): a run then
        gets no epochs, and a sweep must train all its members in one vmapped group."""
        ...

    @property
    def releases_data(self) -> bool:
        """True when ``release_before`` lets data go for good (a stream's shards): the training
        loop then waits for each checkpoint to be committed before it calls it."""
        ...

    def describe(self) -> SourceDescription:
        """Where the data comes from and its identity, for config.json."""
        ...

    def mean_sq_norm(self) -> float:
        """Mean squared norm of the unscaled training activations (the loss of an SAE that
        reconstructs zero, against which divergence is judged)."""
        ...

    def batches(
        self,
        start_step: int = 0,
        stop_step: int | None = None,
        convert_on_device: bool | None = None,
    ) -> DeviceBatches:
        """Device batches for steps ``[start_step, stop_step)``."""
        ...

    def sample(self, n_tokens: int, windows: int = 16) -> np.ndarray:
        """About ``n_tokens`` scaled training rows, the same after a resume (initialisation)."""
        ...

    def heldout(self, batch_size: int) -> Iterator[np.ndarray]:
        """The held-out rows as raw float32 (no input scale), in batches."""
        ...

    def release_before(self, step: int) -> None:
        """Let go of data no step from ``step`` on reads; called once the checkpoint of
        ``step`` is committed (never later: a killed run resumes there)."""
        ...

    def record(self, step: int) -> dict | None:
        """What batches ``[0, step)`` and evaluation read, when the description's identity does
        not pin it down (a stream's shards and their checksums); None when it does."""
        ...
