"""The run folder ``runs/<name>/`` that ``train.py`` writes (SPEC 4).

``config.json``        resolved configuration, cache identity, library versions, export info
``final_info.json``    the reference template's schema plus our fast-eval results
``metrics.jsonl``      one record per ``--log-every`` steps
``checkpoints/``       orbax (``jax_sae.checkpoint``)
``plots/*.png``        ``jax_sae.plots``
``sae_params.safetensors``  float32 weights with SAELens names (what the exporter reads)
"""

from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from jax_sae.data import MANIFEST, ActivationCache, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "config.json"
FINAL_INFO = "final_info.json"
METRICS = "metrics.jsonl"
PARAMS = "sae_params.safetensors"
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
    "compute_dtype",
    "normalize",
    "norm_scale",
    "eval_tokens",
    "loader",
)
"""Config entries that change the trained weights; a checkpoint only resumes if they all match."""


def library_versions() -> dict[str, str]:
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def manifest_sha256(cache: ActivationCache) -> str:
    """Identity of the cache contents: the manifest lists every shard with its checksum."""
    return hashlib.sha256((cache.path / MANIFEST).read_bytes()).hexdigest()


def portable_path(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it (runs move between machines)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(REPO_ROOT))
    except ValueError:
        return str(resolved)


def config_hash(config: dict) -> str:
    """Hash of the entries in ``TRAINING_KEYS`` (canonical JSON)."""
    subset = {key: config.get(key) for key in TRAINING_KEYS}
    return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


def differing_keys(old: dict, new: dict) -> list[str]:
    """The ``TRAINING_KEYS`` (hparams expanded) on which two configs disagree."""
    keys = []
    for key in TRAINING_KEYS:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            keys.append(key)
    return keys


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, obj: Any) -> None:
    """Atomic write: a kill leaves the old file or the new one, never half of one."""
    write_json_atomic(Path(path), obj)


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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def final_info(
    config: dict,
    *,
    training_steps: int,
    final_loss: float,
    learning_rate: float,
    sparsity_penalty: Any,
    extra: dict | None = None,
) -> dict:
    """The reference template's ``final_info.json`` schema, keyed by layer."""
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
