"""From a TrainConfig to everything a run needs: the cache, its loader, the variant with adapted
defaults, and the resolved ``config.json`` (checked before anything is written)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jax.sharding import Sharding

from jax_sae.data.cache import ActivationCache, hook_name
from jax_sae.data.loader import DEFAULT_BUFFER_CHUNKS, DEFAULT_CHUNK_TOKENS, Loader, norm_scale
from jax_sae.data.stream import Producer, StreamCache, StreamingLoader
from jax_sae.model.defaults import adapt_hparams
from jax_sae.model.variants import Variant, make_variant, variant_spec
from jax_sae.report import runs
from jax_sae.training.config import (
    RESOLVED_CONFIG,
    ConfigError,
    TrainConfig,
    default_log_every,
    write_config_file,
)
from jax_sae.training.engine import optimizer_for

DEFAULT_EVAL_TOKENS = 65536
SPARSITY_KEYS = ("lambda", "lambda_1", "sparsity_penalty", "k", "k_b")
"""Hyper-parameter reported as the template's ``sparsity_penalty`` (first one the variant has)."""


@dataclass(frozen=True)
class ResolvedRun:
    """One run (or sweep member) ready to train: ``config`` is what config.json records."""

    settings: TrainConfig  # resolved: every default filled in, as train_config.yaml keeps it
    config: dict[str, Any]
    variant: Variant
    out: Path


def open_cache(cfg: TrainConfig, producer: Producer | None = None) -> ActivationCache | StreamCache:
    """The cache to train on; with ``cfg.stream``, the stream the ``producer`` writes."""
    if cfg.stream is not None:
        return StreamCache(cfg.cache, producer)
    cache = ActivationCache(cfg.cache)
    if not cache.complete and not cfg.allow_incomplete:
        raise ConfigError(
            f"cache {cfg.cache} is not complete ({cache.n_tokens} tokens in "
            f"{len(cache.shard_sizes)} shards so far: extraction is running or was interrupted); "
            "finish it (python -m extract ... --resume) or pass --allow-incomplete to train on "
            "the shards listed now"
        )
    return cache


def eval_tokens_for(cfg: TrainConfig, cache: ActivationCache | StreamCache) -> int:
    if cfg.eval_tokens is not None:
        return cfg.eval_tokens
    if isinstance(cache, StreamCache):  # the first shards of the stream, kept to the end
        return DEFAULT_EVAL_TOKENS
    return min(DEFAULT_EVAL_TOKENS, cache.n_tokens // 10)


def make_loader(
    cfg: TrainConfig,
    cache: ActivationCache | StreamCache,
    sharding: Sharding | None = None,
    rows: slice | None = None,
) -> Loader | StreamingLoader:
    """The batches of a run (shared by every member of a sweep group); with ``rows`` this
    process's rows of each, as part of global arrays of ``sharding`` (several processes)."""
    options = {
        "batch_size": cfg.batch_size,
        "seed": cfg.batch_seed,
        "eval_tokens": eval_tokens_for(cfg, cache),
        "batch_keys": variant_spec(cfg.variant).batch_keys,
        "scale": norm_scale(cache, cfg.layer) if cfg.normalize else 1.0,
        "sharding": sharding,
    }
    if isinstance(cache, StreamCache):
        if rows is not None:
            raise ConfigError("--stream runs in one process; multi-host training needs a cache")
        return StreamingLoader(cache, cfg.layer, window=cfg.stream_window, **options)
    return Loader(cache, cfg.layer, rows=rows, **options)


def cache_identity(cache: ActivationCache | StreamCache) -> str:
    """What the run trains on: a finished cache's manifest (every shard's checksum), or a
    stream's extraction settings (its manifest grows while the run reads it)."""
    if isinstance(cache, ActivationCache):
        return runs.manifest_sha256(cache)
    manifest = cache.manifest
    fixed = {k: manifest.get(k) for k in ("settings", "metadata", "layers", "d_model", "dtype")}
    return "stream:" + hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


def run_steps(cfg: TrainConfig, loader: Loader | StreamingLoader) -> int:
    """--steps, or --tokens in steps, or one epoch; a stream is read once (no epochs)."""
    if isinstance(loader, StreamingLoader):
        most = loader.n_train // cfg.batch_size
        steps = cfg.steps or (cfg.tokens or most * cfg.batch_size) // cfg.batch_size
        if steps > most:
            raise ConfigError(
                f"the stream holds {loader.n_train} training tokens, {most} steps of "
                f"{cfg.batch_size}: ask for fewer or extract more (--tokens in --stream)"
            )
        return steps
    tokens = cfg.tokens or (cfg.steps or 0) * cfg.batch_size or loader.n_train
    return cfg.steps or math.ceil(tokens / cfg.batch_size)


def cache_field(cache: ActivationCache, *names: str) -> Any:
    """First of ``names`` in the manifest's top level, metadata or settings (None if absent)."""
    manifest = cache.manifest
    for section in (manifest, manifest.get("metadata") or {}, manifest.get("settings") or {}):
        for name in names:
            if section.get(name) is not None:
                return section[name]
    return None


def first_run_length(out: Path, resume: bool) -> int | None:
    """Steps the run in ``out`` was first started for: the defaults that adapt to the run length
    keep their values when ``--resume --steps N`` extends it (None for a new run)."""
    config_file = out / runs.CONFIG
    if not (resume and config_file.exists()):
        return None
    old = runs.read_json(config_file)
    return (old.get("extends") or [old])[0].get("steps")


def resolve_run(cfg: TrainConfig, loader: Loader | StreamingLoader, out: Path) -> ResolvedRun:
    """The run's variant and config.json; one-line errors for settings that cannot work."""
    cache, steps = loader.cache, run_steps(cfg, loader)
    overrides = dict(cfg.hparams)
    d_sae = overrides.pop("d_sae", None)
    adapted = adapt_hparams(
        cfg.variant,
        cache.d_model,
        steps=first_run_length(out, cfg.resume) or steps,
        batch_size=cfg.batch_size,
        overrides=overrides,
        d_sae=d_sae,
    )
    variant = make_variant(cfg.variant, cache.d_model, adapted.d_sae, **adapted.overrides)
    try:  # checks lr, warm-up and clipping; fail before anything is written
        optimizer_for(variant.hparams, steps)
    except ValueError as error:
        raise ConfigError(f"{error}; change it with --set") from None
    eval_tokens = eval_tokens_for(cfg, cache)
    settings = cfg.replace(
        hparams={**variant.hparams, "d_sae": variant.d_sae},
        steps=steps,
        tokens=None,
        out=str(out),
        resume=False,
        data_seed=cfg.batch_seed,
        log_every=cfg.log_every or default_log_every(steps),
        eval_tokens=eval_tokens,
        sweep=[],
    )
    config = {
        "variant": variant.name,
        "hparams": dict(variant.hparams),
        "adapted_defaults": adapted.notes,
        "warnings": adapted.warnings,
        "d_in": cache.d_model,
        "d_sae": variant.d_sae,
        "layer": cfg.layer,
        "cache": runs.portable_path(cache.path),
        "cache_manifest_sha256": cache_identity(cache),
        "stream": cfg.stream,
        "cache_complete": cache.complete,
        "model_name": cache_field(cache, "model_name", "model"),
        "hook_name": hook_name(cfg.layer),
        "ctx_len": cache_field(cache, "ctx_len", "context_size"),
        "dataset": cache_field(cache, "dataset", "dataset_name"),
        "prepend_bos": cache_field(cache, "prepend_bos"),
        "batch_size": cfg.batch_size,
        "steps": steps,
        "tokens": steps * cfg.batch_size,
        "epochs": steps * cfg.batch_size / loader.n_train,
        "train_tokens_in_cache": loader.n_train,
        "seed": cfg.seed,
        "data_seed": cfg.batch_seed,
        "compute_dtype": cfg.compute_dtype,
        "normalize": cfg.normalize,
        "norm_scale": loader.scale,
        "eval_tokens": eval_tokens,
        "heldout_tokens": loader.heldout_tokens,
        "loader": {"chunk_tokens": DEFAULT_CHUNK_TOKENS, "buffer_chunks": DEFAULT_BUFFER_CHUNKS},
        "mesh": cfg.mesh,
        "checkpoint_every": cfg.checkpoint_every,
        "log_every": settings.log_every,
        "divergence": {
            "loss_factor": cfg.diverge_loss_factor,
            "min_explained_variance": cfg.diverge_min_ev,
        },
        "versions": runs.library_versions(),
    }
    config["config_hash"] = runs.config_hash(config)
    return ResolvedRun(settings, config, variant, out)


def run_dir_config(out: Path, config: dict, resume: bool) -> dict:
    """The config to record in the run folder, after checking (reading only) that the folder is
    new or that ``--resume`` continues (or extends) the same experiment."""
    config_file = out / runs.CONFIG
    if not resume and runs.has_progress(out):
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and config_file.exists():
        config = continued_config(out, runs.read_json(config_file), config)
    return config


def start_run_dir(run: ResolvedRun, config: dict) -> None:
    """Create the run folder with config.json, a running status and train_config.yaml."""
    run.out.mkdir(parents=True, exist_ok=True)
    runs.write_json(run.out / runs.CONFIG, config)
    runs.write_status(run.out, runs.RUNNING)
    write_config_file(run.out / RESOLVED_CONFIG, run.settings)


def continued_config(out: Path, old: dict, new: dict) -> dict:
    """The config of a resumed run: the old one's history, plus an extension when ``--steps``
    grew. Extending is exact only when the learning-rate schedule ignores the run length."""
    extends = list(old.get("extends", []))
    if old.get("config_hash") != new["config_hash"]:
        keys = runs.differing_keys(old, new)
        if keys != ["steps"]:
            changed = "cache_manifest_sha256" in keys
            hint = " (the cache changed since the run started)" if changed else ""
            raise ConfigError(
                f"cannot resume {out}: its config differs in {', '.join(keys) or 'config hash'}"
                f"{hint}; rerun with the original flags or choose another --out"
            )
        if new["steps"] < old["steps"]:
            raise ConfigError(
                f"cannot resume {out} with --steps {new['steps']}: it was started for "
                f"{old['steps']} steps; pass --steps {old['steps']} or more"
            )
        if new["hparams"]["lr_decay"] != "constant":
            raise ConfigError(
                f"cannot extend {out}: lr_decay={new['hparams']['lr_decay']} depends on the run "
                "length, so more steps would change the finished ones; train a new --out"
            )
        extends.append({"steps": old["steps"], "config_hash": old["config_hash"]})
        print(f"extending {out} from {old['steps']} to {new['steps']} steps", file=sys.stderr)
    return new | {"extends": extends} if extends else new
