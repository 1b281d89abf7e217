"""From a TrainConfig to everything a run needs: the cache, its batch source, the variant with
adapted defaults, and the run's record, ``config.json`` (checked before anything is written)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jax.sharding import Sharding

from jax_sae.data.cache import ActivationCache, hook_name
from jax_sae.data.loader import DEFAULT_BUFFER_CHUNKS, DEFAULT_CHUNK_TOKENS, Loader, norm_scale
from jax_sae.data.source import BatchSource, BatchSpec
from jax_sae.data.stream import Producer, StreamCache, StreamingLoader
from jax_sae.data.synthetic import (
    SyntheticSource,
    WorldError,
    load_world,
    world_norm_scale,
)
from jax_sae.model.defaults import adapt_hparams
from jax_sae.model.variants import Variant, declared_defaults, make_variant, variant_spec
from jax_sae.report import runs
from jax_sae.report.record import RunRecord
from jax_sae.training.config import (
    RESOLVED_CONFIG,
    ConfigError,
    TrainConfig,
    as_flag,
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
    config: RunRecord
    variant: Variant
    out: Path


def open_cache(cfg: TrainConfig, producer: Producer | None = None) -> ActivationCache | StreamCache:
    """The cache to train on; with ``cfg.stream``, the stream the ``producer`` writes."""
    assert cfg.cache is not None  # TrainConfig.checked requires it
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
    if cfg.stream is not None:  # the first shards of the stream, kept to the end
        return DEFAULT_EVAL_TOKENS
    assert isinstance(cache, ActivationCache)  # open_cache opens a stream only for cfg.stream
    return min(DEFAULT_EVAL_TOKENS, cache.n_tokens // 10)


def world_source(
    cfg: TrainConfig, sharding: Sharding | None = None, rows: slice | None = None
) -> SyntheticSource:
    """The batches of a run on a synthetic world folder (``--cache`` holding ``world.json``):
    drawn on the device at each step. The world has one layer, 0."""
    assert cfg.cache is not None and cfg.variant is not None
    if cfg.stream is not None:
        raise ConfigError(f"{cfg.cache} is a synthetic world, drawn on the device: drop --stream")
    if cfg.layer != 0:
        raise ConfigError(f"{cfg.cache} is a synthetic world with one layer: pass --layer 0")
    try:
        world = load_world(cfg.cache)
    except WorldError as error:
        raise ConfigError(str(error)) from None
    scale = world_norm_scale(world) if cfg.normalize else 1.0
    eval_tokens = DEFAULT_EVAL_TOKENS if cfg.eval_tokens is None else cfg.eval_tokens
    return SyntheticSource(world, run_batch_spec(cfg, scale, sharding, rows), eval_tokens)


def run_batch_spec(
    cfg: TrainConfig, scale: float, sharding: Sharding | None, rows: slice | None
) -> BatchSpec:
    """The BatchSpec of a run, whichever source reads it."""
    assert cfg.variant is not None  # TrainConfig.checked requires it
    return BatchSpec(
        batch_size=cfg.batch_size,
        seed=cfg.batch_seed,
        batch_keys=variant_spec(cfg.variant).batch_keys,
        scale=scale,
        sharding=sharding,
        rows=rows,
    )


def make_loader(
    cfg: TrainConfig,
    cache: ActivationCache | StreamCache,
    sharding: Sharding | None = None,
    rows: slice | None = None,
) -> BatchSource:
    """The batches of a run (shared by every member of a sweep group); with ``rows`` this
    process's rows of each, as part of global arrays of ``sharding`` (several processes)."""
    assert cfg.layer is not None and cfg.variant is not None  # TrainConfig.checked requires them
    scale = norm_scale(cache, cfg.layer) if cfg.normalize else 1.0
    spec = run_batch_spec(cfg, scale, sharding, rows)
    eval_tokens = eval_tokens_for(cfg, cache)
    if cfg.stream is not None:
        assert isinstance(cache, StreamCache)  # open_cache opens a stream for cfg.stream
        return StreamingLoader(
            cache, cfg.layer, spec, window=cfg.stream_window, eval_tokens=eval_tokens
        )
    assert isinstance(cache, ActivationCache)
    return Loader(cache, cfg.layer, spec, eval_tokens=eval_tokens)


def run_steps(cfg: TrainConfig, source: BatchSource) -> int:
    """--steps, or --tokens in steps, or one epoch; a stream is read once (no epochs)."""
    if source.single_pass:
        most = source.n_train // cfg.batch_size
        steps = cfg.steps or (cfg.tokens or most * cfg.batch_size) // cfg.batch_size
        if steps > most:
            raise ConfigError(
                f"the stream holds {source.n_train} training tokens, {most} steps of "
                f"{cfg.batch_size}: ask for fewer or extract more (--tokens in --stream)"
            )
        return steps
    tokens = cfg.tokens or (cfg.steps or 0) * cfg.batch_size or source.n_train
    return cfg.steps or math.ceil(tokens / cfg.batch_size)


def recorded_run(out: Path, resume: bool) -> RunRecord | None:
    """The config.json of the run that ``--resume`` continues in ``out`` (None for a new run)."""
    config_file = out / runs.CONFIG
    if not (resume and config_file.exists()):
        return None
    return RunRecord.read(config_file)


def resolved_overrides(cfg: TrainConfig, recorded: RunRecord | None) -> dict[str, Any]:
    """The user's hyper-parameters, plus, for a resumed run recorded before a hyper-parameter
    existed, that one at the value it was trained with (``runs.HPARAMS_ADDED_SINCE_V1``)."""
    if recorded is None:
        return dict(cfg.hparams)
    assert cfg.variant is not None
    names = set(declared_defaults(variant_spec(cfg.variant)))  # every hyper-parameter it has now
    return {**runs.legacy_hparams(dict(recorded.hparams), names), **cfg.hparams}


def resolve_run(cfg: TrainConfig, source: BatchSource, out: Path) -> ResolvedRun:
    """The run's variant and config.json; one-line errors for settings that cannot work."""
    assert cfg.layer is not None and cfg.variant is not None  # TrainConfig.checked requires them
    steps = run_steps(cfg, source)
    recorded = recorded_run(out, cfg.resume)
    overrides = resolved_overrides(cfg, recorded)
    d_sae = overrides.pop("d_sae", None)
    adapted = adapt_hparams(  # adapted to the first length, kept when --steps N extends the run
        cfg.variant,
        source.d_model,
        steps=(recorded.first_steps if recorded else None) or steps,
        batch_size=cfg.batch_size,
        overrides=overrides,
        d_sae=d_sae,
    )
    variant = make_variant(cfg.variant, source.d_model, adapted.d_sae, **adapted.overrides)
    try:  # checks lr, warm-up and clipping; fail before anything is written
        optimizer_for(variant.hparams, steps)
    except ValueError as error:
        raise ConfigError(f"{error}; change it with --set") from None
    eval_tokens = source.eval_tokens
    log_every = cfg.log_every or default_log_every(steps)
    settings = cfg.replace(
        hparams={**variant.hparams, "d_sae": variant.d_sae},
        steps=steps,
        tokens=None,
        out=str(out),
        resume=False,
        data_seed=cfg.batch_seed,
        log_every=log_every,
        eval_tokens=eval_tokens,
        sweep=[],
    )
    data = source.describe()
    config = RunRecord(
        variant=variant.name,
        hparams=dict(variant.hparams),
        adapted_defaults=adapted.notes,
        warnings=adapted.warnings,
        d_in=source.d_model,
        d_sae=variant.d_sae,
        layer=cfg.layer,
        cache=runs.portable_path(data.path),
        cache_manifest_sha256=data.identity,
        stream=cfg.stream,
        cache_complete=data.complete,
        model_name=data.model_name,
        hook_name=hook_name(cfg.layer),
        ctx_len=data.ctx_len,
        dataset=data.dataset,
        prepend_bos=data.prepend_bos,
        batch_size=cfg.batch_size,
        steps=steps,
        tokens=steps * cfg.batch_size,
        epochs=steps * cfg.batch_size / source.n_train,
        train_tokens_in_cache=source.n_train,
        seed=cfg.seed,
        data_seed=cfg.batch_seed,
        compute_dtype=cfg.compute_dtype,
        normalize=cfg.normalize,
        norm_scale=source.spec.scale,
        eval_tokens=eval_tokens,
        heldout_tokens=source.heldout_tokens,
        loader={"chunk_tokens": DEFAULT_CHUNK_TOKENS, "buffer_chunks": DEFAULT_BUFFER_CHUNKS},
        mesh=cfg.mesh,
        checkpoint_every=cfg.checkpoint_every,
        log_every=log_every,
        divergence={
            "loss_factor": cfg.diverge_loss_factor,
            "min_explained_variance": cfg.diverge_min_ev,
        },
        versions=runs.library_versions(),
    ).hashed()
    return ResolvedRun(settings, config, variant, out)


def run_dir_config(out: Path, config: RunRecord, resume: bool) -> RunRecord:
    """The config to record in the run folder, after checking (reading only) that the folder is
    new or that ``--resume`` continues (or extends) the same experiment."""
    config_file = out / runs.CONFIG
    if not resume and runs.has_progress(out):
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and config_file.exists():
        config = continued_config(out, RunRecord.read(config_file), config)
    return config


def start_run_dir(run: ResolvedRun, config: RunRecord) -> None:
    """Create the run folder with config.json, a running status and train_config.yaml."""
    run.out.mkdir(parents=True, exist_ok=True)
    runs.write_json(run.out / runs.CONFIG, config.to_json())
    runs.write_status(run.out, runs.RUNNING)
    write_config_file(run.out / RESOLVED_CONFIG, run.settings)


def continued_config(out: Path, old: RunRecord, new: RunRecord) -> RunRecord:
    """The config of a resumed run: the old one's history, plus an extension when ``--steps``
    grew. Extending is exact only when the learning-rate schedule ignores the run length."""
    extends = list(old.extends or [])
    if old.config_hash != new.config_hash:
        keys = old.differing_keys(new)
        if keys != ["steps"]:
            changed = "cache_manifest_sha256" in keys
            hint = " (the cache changed since the run started)" if changed else ""
            recorded = [
                f"{name}={as_flag(old.hparams.get(name))}"
                for name in (key.removeprefix("hparams.") for key in keys)
                if f"hparams.{name}" in keys
            ]
            fix = f"--set {' '.join(recorded)}" if recorded else "the original flags"
            raise ConfigError(
                f"cannot resume {out}: its config differs in {', '.join(keys) or 'config hash'}"
                f"{hint}; rerun with {fix} or choose another --out"
            )
        if new.steps < old.steps:
            raise ConfigError(
                f"cannot resume {out} with --steps {new.steps}: it was started for "
                f"{old.steps} steps; pass --steps {old.steps} or more"
            )
        if new.hparams["lr_decay"] != "constant":
            raise ConfigError(
                f"cannot extend {out}: lr_decay={new.hparams['lr_decay']} depends on the run "
                "length, so more steps would change the finished ones; train a new --out"
            )
        extends.append({"steps": old.steps, "config_hash": old.config_hash})
        print(f"extending {out} from {old.steps} to {new.steps} steps", file=sys.stderr)
    return new.replace(extends=extends) if extends else new
