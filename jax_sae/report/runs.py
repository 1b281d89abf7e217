"""The run folder ``runs/<name>/`` that ``train.py`` writes.

``config.json``        resolved configuration, cache identity, library versions, export info
                       (``jax_sae.report.record.RunRecord``)
``final_info.json``    the standard results schema plus our fast-eval results
``metrics.jsonl``      one record per ``--log-every`` steps
``checkpoints/``       orbax (``jax_sae.training.checkpoint``)
``plots/*.png``        ``jax_sae.report.plots``
``sae_params.safetensors``  float32 weights with SAELens names (what the exporter reads)
``status.json``        running / finished / diverged: the exporter refuses all but finished
``train.lock``         present while a trainer uses the folder; holds its pid
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from jax_sae.data.cache import MANIFEST
from jax_sae.util.files import read_json_object, write_json_atomic, write_text_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "config.json"
FINAL_INFO = "final_info.json"
METRICS = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s",)
"""Keys of a metrics.jsonl record that measure wall-clock time, not training: a resumed run's
records equal the uninterrupted run's in every other key."""
PARAMS = "sae_params.safetensors"
STATUS = "status.json"
LOCK = "train.lock"
RUNNING, FINISHED, DIVERGED = "running", "finished", "diverged"
FAST_EVAL_KEY = "fast evaluation results"
"""Where the built-in held-out evaluation goes, next to the template's "config"/"final_info"."""

TRAINING_KEYS = (
    "variant",
    "hparams",
    "d_in",
    "d_sae",
    "layer",
    "cache_manifest_sha256",
    "batch_size",
    "steps",
    "seed",
    "data_seed",
    "compute_dtype",
    "normalize",
    "norm_scale",
    "eval_tokens",
    "loader",
)
"""Config entries that change the trained weights; a checkpoint only resumes if they all match."""

HPARAMS_ADDED_SINCE_V1 = {
    "encoder_init_scale": None,
    "sparsity_warmup_steps": 0,
    "l0_grad_to_pre": False,
    "adam_b1": 0.9,
    "adam_b2": 0.999,
    "adam_eps": 1e-8,
}
"""Hyper-parameters added after run folders were first written, each with the value that trains
as the code did before it existed. A config.json without one was trained at that value: the
config hash leaves such an entry out at that value, so an older run keeps its hash, and
``--resume`` of it trains on at that value (``legacy_hparams``)."""


def legacy_hparams(recorded: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """The added hyper-parameters (``HPARAMS_ADDED_SINCE_V1``) among a variant's hyper-parameter
    ``names`` that a recorded run's hparams lack, at the value that run was trained with."""
    return {
        key: value
        for key, value in HPARAMS_ADDED_SINCE_V1.items()
        if key in names and key not in recorded
    }


def _hashed_entry(key: str, config: dict) -> Any:
    """``config[key]`` as the hash sees it: hparams without added entries at their old value."""
    value = config.get(key)
    if key != "hparams" or not isinstance(value, dict):
        return value
    return {
        k: v
        for k, v in value.items()
        if k not in HPARAMS_ADDED_SINCE_V1 or HPARAMS_ADDED_SINCE_V1[k] != v
    }


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def portable_path(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it (runs move between machines)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(resolved)


def config_hash(config: dict) -> str:
    """Hash of the entries in ``TRAINING_KEYS`` (canonical JSON; ``HPARAMS_ADDED_SINCE_V1``)."""
    subset = {key: _hashed_entry(key, config) for key in TRAINING_KEYS}
    return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


def differing_keys(old: dict, new: dict) -> list[str]:
    """The ``TRAINING_KEYS`` (hparams expanded) on which two configs disagree, compared as
    ``config_hash`` sees them, in JSON: a fresh config's tuple (matryoshka's widths) equals the
    list that config.json reads back."""

    def differ(a: Any, b: Any) -> bool:
        return json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True)

    keys = []
    for key in TRAINING_KEYS:
        a, b = _hashed_entry(key, old), _hashed_entry(key, new)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if differ(a.get(k), b.get(k))]
        elif differ(a, b):
            keys.append(key)
    return keys


class RunFolderError(RuntimeError):
    """A run folder that cannot be used right now; the message names the fix."""


def check_out_folder(out: Path, cache: Path) -> None:
    """Refuse an ``--out`` that is a file, or that is (or lies inside) an activation cache: run
    files mixed into a cache folder are easy to lose with it, and confuse both readers."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out {out} is a file, not a folder; choose a folder for the run")
    inside = [out.resolve(), *out.resolve().parents]
    if Path(cache).resolve() in inside or (out / MANIFEST).is_file():
        where = out if (out / MANIFEST).is_file() else Path(cache)
        raise RunFolderError(
            f"--out {out} is inside the activation cache {where}; give the run a folder of its "
            "own, e.g. runs/<name>"
        )


def has_progress(folder: Path) -> bool:
    """Whether a run folder holds trained state (a checkpoint or final weights). A folder with
    only a config was never trained a step: starting it afresh loses nothing."""
    checkpoints = Path(folder) / "checkpoints"
    saved = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    return saved or (Path(folder) / PARAMS).exists()


def accepted_hashes(config: dict) -> set[str]:
    """Config hashes whose checkpoints this run may restore: its own and those it extends."""
    return {config["config_hash"]} | {e["config_hash"] for e in config.get("extends", [])}


def space_to_finish(config: dict) -> int:
    """Rough bytes a run still writes: one checkpoint (float32 weights and Adam's two moments)
    being saved beside the kept ones, and the final weights."""
    n_weights = 2 * config["d_in"] * config["d_sae"] + 2 * config["d_sae"] + config["d_in"]
    return 4 * n_weights * (3 + 1)


def read_json(path: Path) -> dict:
    """A JSON object the trainer wrote; DamagedFileError (one line) for anything else."""
    return read_json_object(path, "restore it from a copy, or train into a new --out")


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float replaced by None: JSON has no such numbers, and Python's
    ``NaN`` token breaks strict parsers (jq, JavaScript, pandas' strict mode)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {key: strict_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(value) for value in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Atomic, strict-JSON write: a kill leaves the old file or the new one, never half of one;
    non-finite numbers become null."""
    write_json_atomic(Path(path), strict_json(obj))


def write_status(folder: Path, state: str, **details: Any) -> None:
    """``status.json``: whether the run's weights may be used (see the module docstring)."""
    write_json(Path(folder) / STATUS, {"state": state, **details})


def read_status(folder: Path) -> dict | None:
    """The run's status, or None for a folder written before status files existed."""
    file = Path(folder) / STATUS
    return read_json(file) if file.exists() else None


class RunLock:
    """Exclusive use of a run folder by one trainer, through ``train.lock`` (holding its pid).

    The lock is an advisory ``flock`` on that file. The kernel drops it when the owner exits,
    however it exits (SIGKILL included), so a lock file left by a dead process is stale by
    construction and the next trainer takes it over; while the owner lives, a second trainer
    fails at once instead of interleaving metrics and checkpoints with it.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; returns the pid text of a stale lock that was taken over, if any.

        Raises RunFolderError naming the live owner's pid.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunFolderError(
                    f"{self.path.parent} is in use by another trainer (pid {owner}, lock "
                    f"{self.path}); wait for it to finish or choose another --out"
                ) from None
            except OSError as error:  # a file system without locks (some network mounts)
                os.close(fd)
                raise RunFolderError(
                    f"cannot lock {self.path} ({error.strerror}); put --out on a file system "
                    "that supports file locks"
                ) from None
            # the previous owner may have removed the file between our open and our flock
            if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                break
            os.close(fd)
        previous = os.read(fd, 64).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return previous or None

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: no one locks a removed file
        they could not see)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


class MetricsLog:
    """``metrics.jsonl``: appended every few steps; on resume cut back to the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        # a kill can leave a half-written last line; it is dropped, not fatal
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def truncate_after(self, step: int) -> None:
        """Drop records logged after ``step``: a resumed run logs them again."""
        kept = [r for r in self.read() if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        write_text_atomic(self.path, text)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(strict_json(record)) + "\n")


def final_info(
    config: dict,
    *,
    training_steps: int,
    final_loss: float,
    learning_rate: float,
    sparsity_penalty: Any,
    extra: dict | None = None,
) -> dict:
    """The standard ``final_info.json`` schema, keyed by layer."""
    info = {
        "training_steps": training_steps,
        "final_loss": final_loss,
        "layer": config["layer"],
        "dict_size": config["d_sae"],
        "learning_rate": learning_rate,
        "sparsity_penalty": sparsity_penalty,
    }
    return {
        f"training results for layer {config['layer']}": {"config": config, "final_info": info}
        | (extra or {})
    }
