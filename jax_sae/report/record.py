"""``RunRecord``: a run's resolved configuration, as the training code uses it and as
``config.json`` holds it (``to_json`` / ``from_json``).

The file is what other tools read (the comparison, the exporter, SAEBench), so its keys and
their order are those the trainer has always written, and ``config_hash`` is computed from that
same JSON dict: a run folder written before this class existed resumes, compares and exports as
it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jax_sae.report import runs

OPTIONAL_KEYS = ("sweep", "extends", "export_info", "export_form")
"""Entries only some runs have (a sweep member, an extended run, a finished run); absent from
config.json otherwise."""


@dataclass(frozen=True)
class RunRecord:
    """Everything config.json records about a run; one attribute per entry.

    A file written by an older version may lack an entry: it reads as None (the config hash
    treats a missing entry and None alike) and stays out of ``to_json`` while it is None.
    Entries this class does not know are kept in ``extra``. So ``from_json(d).to_json() == d``
    for every config.json, whichever version wrote it.
    """

    variant: str
    hparams: dict[str, Any]
    adapted_defaults: list[str]  # how the defaults were fitted to the run (printed at start)
    warnings: list[str]
    d_in: int
    d_sae: int
    layer: int
    cache: str  # relative to the repository when inside it (runs move between machines)
    cache_manifest_sha256: str  # the data's identity (``stream:...`` for a stream)
    stream: str | None  # the extractor's arguments of a streamed run
    cache_complete: bool
    model_name: str | None
    hook_name: str
    ctx_len: int | None
    dataset: str | None
    prepend_bos: bool | None
    batch_size: int
    steps: int
    tokens: int
    epochs: float
    train_tokens_in_cache: int
    seed: int
    data_seed: int
    compute_dtype: str
    normalize: bool
    norm_scale: float
    eval_tokens: int
    heldout_tokens: int
    loader: dict[str, int]
    mesh: str | None
    checkpoint_every: int
    log_every: int
    divergence: dict[str, float | None]
    versions: dict[str, str]
    config_hash: str | None = None  # of the entries in ``runs.TRAINING_KEYS``; see ``hashed``
    sweep: dict[str, Any] | None = None  # a sweep member: the sweep, its name, its values
    extends: list[dict[str, Any]] | None = None  # earlier lengths of a run extended by --steps
    export_info: dict[str, Any] | None = None  # what the exporter needs, once finished
    export_form: dict[str, Any] | None = None  # how it writes the architecture (export.saelens)
    extra: dict[str, Any] = field(default_factory=dict)
    absent: frozenset[str] = field(default=frozenset(), repr=False)  # entries the file lacked

    def to_json(self) -> dict[str, Any]:
        """The config.json dict, entries in the order the trainer has always written them."""
        data = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            left_out = f.name in OPTIONAL_KEYS or f.name in self.absent
            if f.name not in ("extra", "absent") and not (value is None and left_out):
                data[f.name] = value
        return data | self.extra

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """The record of a config.json dict (missing entries read as None)."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "absent")]
        known: dict[str, Any] = {name: data.get(name) for name in names}
        extra = {key: value for key, value in data.items() if key not in known}
        absent = frozenset(name for name in names if name not in data)
        return cls(**known, extra=extra, absent=absent)

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        """The record in a config.json file."""
        return cls.from_json(runs.read_json(path))

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def hashed(self) -> RunRecord:
        """This record with ``config_hash`` set: the hash of its training entries, computed from
        the JSON dict (the same bytes as for every config.json written so far)."""
        return self.replace(config_hash=runs.config_hash(self.to_json()))

    def differing_keys(self, other: RunRecord) -> list[str]:
        """The training entries (hparams expanded) on which two records disagree."""
        return runs.differing_keys(self.to_json(), other.to_json())

    @property
    def accepted_hashes(self) -> set[str]:
        """Config hashes whose checkpoints this run may restore: its own and those it extends."""
        return runs.accepted_hashes(self.to_json())

    @property
    def first_steps(self) -> int | None:
        """Steps the run was first started for (before any ``--resume --steps N`` extension)."""
        return (self.extends or [{"steps": self.steps}])[0].get("steps")
