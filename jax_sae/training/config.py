"""The typed configuration of a training run, shared by the CLI, config files and Python.

    from jax_sae.training import TrainConfig, Trainer
    Trainer(TrainConfig(cache="activations_cache/x", layer=12, variant="topk",
                        hparams={"k": 64}, steps=2000)).fit()

``train.py`` parses the same fields with tyro (``--batch-size``, ``--no-normalize``, ...), reads
them from ``--config run.yaml`` (or ``.toml``; flags given next to it win), and writes the
resolved ones to ``train_config.yaml`` in the run folder, so ``--config`` of that file repeats
the run. Variant hyper-parameters (``hparams``; ``--set KEY=VALUE`` on the command line) are
typed by the registry: ``jax_sae.model.variants.resolve_hparams`` coerces and checks them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import tyro
import yaml

from jax_sae.training.divergence import LOSS_BLOWUP_FACTOR, MIN_EXPLAINED_VARIANCE
from jax_sae.training.engine import COMPUTE_DTYPES

CONFIG_SUFFIXES = (".yaml", ".yml", ".toml")
RESOLVED_CONFIG = "train_config.yaml"
"""The resolved TrainConfig kept in every run folder (``--config`` of it repeats the run)."""


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting and the fix."""


@dataclass
class TrainConfig:
    """Train one SAE (or a sweep of SAEs) on one layer of an activation cache."""

    cache: str | None = None
    """activation cache folder (make extract); required"""
    layer: int | None = None
    """layer of the cache to train on; required"""
    variant: str | None = None
    """SAE variant, e.g. standard, topk, jumprelu, freq (--help-variant NAME lists its
    hyper-parameters); required"""
    hparams: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """variant hyper-parameters and d_sae (command line: --set KEY=VALUE)"""
    steps: int | None = None
    """training steps (default: --tokens / --batch-size)"""
    tokens: int | None = None
    """training tokens (default: one epoch of the cache's training tokens)"""
    batch_size: int = 2048
    """tokens per step"""
    out: str | None = None
    """run folder (default runs/<variant>_L<layer>, with --sweep runs/<variant>_L<layer>_sweep)"""
    resume: bool = False
    """continue the run (or sweep) in --out; with a larger --steps, extend a finished one"""
    seed: int = 0
    """seed of the initial weights and of every random choice in training"""
    data_seed: int | None = None
    """seed of the order of training batches (default: --seed); sweep members share it"""
    compute_dtype: str = "float32"
    """matmul precision: float32 or bfloat16 (parameters stay float32)"""
    normalize: bool = True
    """scale inputs to E||x||^2 = d_in (--no-normalize trains on raw activations)"""
    checkpoint_every: int = 1000
    """steps between checkpoints (and at the end)"""
    log_every: int | None = None
    """steps between logged intervals (default: about 200 per run, at most 50 steps apart)"""
    eval_tokens: int | None = None
    """held-out tail of the cache for the final evaluation (default: 65536 or a tenth)"""
    allow_incomplete: bool = False
    """train on a cache whose extraction has not finished (only the shards listed now)"""
    diverge_loss_factor: float = LOSS_BLOWUP_FACTOR
    """stop when the reconstruction loss exceeds this many times that of predicting zero
    (inf: never)"""
    diverge_min_ev: float = MIN_EXPLAINED_VARIANCE
    """mark the run diverged when held-out explained variance ends below this (-inf: never)"""
    stream: str | None = None
    """train while an extractor writes --cache: these are its arguments (e.g. "--model
    google/gemma-2-2b --dataset monology/pile-uncopyrighted --layers 12 --tokens 500M");
    unset: --cache is a finished cache (docs/scaling.md, Streaming)"""
    disk_budget: str | None = None
    """with --stream: the most disk the cache may take (e.g. 40G); the extractor deletes shards
    the trainer no longer needs to stay within it"""
    stream_window: int = 4
    """with --stream: batches mix the tokens of this many consecutive shards"""
    mesh: str | None = None
    """data=N,model=M: split each batch over N devices and the latents over M (jax.sharding;
    N x M = all devices); unset: one device"""
    sweep: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """KEY=V1,V2,...: train the grid of every --sweep in one vmapped step per group of equal
    shapes (keys: hyper-parameters, d_sae, seed)"""
    tensorboard: bool = False
    """also log to TensorBoard (<run>/tensorboard/)"""
    wandb: str | None = None
    """also log to this Weights & Biases project (WANDB_MODE=offline works without network)"""

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def checked(self) -> TrainConfig:
        """This config, or a ConfigError naming the first setting that cannot work."""
        for name in ("cache", "layer", "variant"):
            if getattr(self, name) is None:
                flag = f"--{name}"
                raise ConfigError(f"{flag} is required (or `{name}:` in the --config file)")
        if self.steps is not None and self.tokens is not None:
            raise ConfigError("give --steps or --tokens, not both")
        for name in ("batch_size", "checkpoint_every", "log_every", "steps", "tokens"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.eval_tokens is not None and self.eval_tokens < 0:
            raise ConfigError(f"--eval-tokens must be >= 0, got {self.eval_tokens}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"--compute-dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}"
            )
        if self.disk_budget is not None and self.stream is None:
            raise ConfigError("--disk-budget bounds a streamed cache: give --stream EXTRACT_ARGS")
        if self.stream_window < 1:
            raise ConfigError(f"--stream-window must be >= 1, got {self.stream_window}")
        if not isinstance(self.hparams, dict):
            raise ConfigError(f"hparams must be a mapping KEY: VALUE, got {self.hparams!r}")
        return self

    @property
    def batch_seed(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def default_out(self) -> Path:
        suffix = "_sweep" if self.sweep else ""
        return Path(self.out or f"runs/{self.variant}_L{self.layer}{suffix}")


def default_log_every(steps: int) -> int:
    """About 200 logged points per run, at most 50 steps apart (a logged interval syncs with the
    device, so not every step)."""
    return max(1, min(50, math.ceil(steps / 200)))


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, booleans, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs of ``--set``."""
    overrides = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set lambda=0.04)")
        overrides[key] = parse_value(text)
    return overrides


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` items of ``--sweep`` -> {key: values}, in the given order."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = [parse_value(v) for v in text.split(",") if v.strip()]
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {item!r} is not KEY=V1,V2,... (e.g. lambda=0.01,0.02)")
        if key in grid:
            raise ConfigError(f"--sweep names {key!r} twice; give all its values in one list")
        if len(set(map(json.dumps, values))) != len(values):
            raise ConfigError(f"--sweep {key} repeats a value: {text}")
        grid[key] = values
    return grid


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or TOML file (keys: TrainConfig fields, dashes or underscores)."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"--config {path}: use a {' or '.join(CONFIG_SUFFIXES)} file")
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    try:
        text = path.read_text()
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"--config {path} is not valid {path.suffix[1:]}: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of settings, got {type(data)}")
    settings = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(settings) - set(config_fields()))
    if unknown:
        raise ConfigError(
            f"--config {path}: unknown setting {unknown[0]!r}; valid: {', '.join(config_fields())}"
        )
    return settings


def write_config_file(path: Path, config: TrainConfig) -> None:
    """The resolved config as YAML (atomically: a kill leaves the old file or the new one)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    tmp.replace(path)
