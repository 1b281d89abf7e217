"""The typed configuration of a training run, shared by the CLI, config files and Python.

    from jax_sae.training import TrainConfig, Trainer
    Trainer(TrainConfig(cache="activations_cache/x", layer=12, variant="topk",
                        hparams={"k": 64}, steps=2000)).fit()

``train.py`` parses the same fields with tyro (``--batch-size``, ``--no-normalize``, ...), reads
them from ``--config run.yaml`` (or ``.toml``; each value checked against its field's type;
flags given next to it win), and writes the resolved ones to ``train_config.yaml`` in the run
folder, so ``--config`` of that file repeats the run. Variant hyper-parameters (``hparams``;
``--set KEY=VALUE`` on the command line) are typed by the registry:
``jax_sae.model.variants.resolve_hparams`` coerces and checks them.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import functools
import inspect
import json
import math
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, cast

import tyro
import yaml

from jax_sae.training.divergence import LOSS_BLOWUP_FACTOR, MIN_EXPLAINED_VARIANCE
from jax_sae.training.engine import COMPUTE_DTYPES
from jax_sae.util.files import write_text_atomic

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
    """SAE variant name, e.g. topk; required"""
    hparams: Annotated[dict[str, Any], tyro.conf.Suppress] = field(default_factory=dict)
    """variant hyper-parameters and d_sae (command line: --set KEY=VALUE)"""
    steps: int | None = None
    """training steps (default: --tokens / --batch-size)"""
    tokens: int | None = None
    """training tokens (default: one epoch of the cache)"""
    batch_size: int = 2048
    """tokens per step"""
    out: str | None = None
    """run folder (default: runs/<variant>_L<layer>[_sweep])"""
    resume: bool = False
    """continue the run in --out (must exist)"""
    resume_if_exists: bool = False
    """continue the run in --out, or start it"""
    seed: int = 0
    """seed of the weights and of random choices"""
    data_seed: int | None = None
    """seed of the batch order (default: --seed)"""
    compute_dtype: str = "float32"
    """matmul dtype, float32 or bfloat16"""
    normalize: bool = True
    """scale inputs to E||x||^2 = d_in"""
    checkpoint_every: int = 1000
    """steps between checkpoints"""
    log_every: int | None = None
    """steps per logged point (default: steps / 200, at most 50)"""
    eval_tokens: int | None = None
    """held-out tokens (default: min(65536, a tenth of the cache))"""
    allow_incomplete: bool = False
    """train on a cache still being extracted"""
    diverge_loss_factor: float = LOSS_BLOWUP_FACTOR
    """stop at this many times the loss of a zero output (inf: never)"""
    diverge_min_ev: float = MIN_EXPLAINED_VARIANCE
    """diverged if held-out EV < this; -inf: never"""
    stream: str | None = None
    """run the extractor with ARGS into --cache (default: off)"""
    disk_budget: str | None = None
    """--stream's disk limit, e.g. 40G (default: no bound)"""
    stream_window: int = 4
    """with --stream: shards mixed per batch"""
    mesh: str | None = None
    """data=N,model=M: batch on N devices, latents on M (default: one device)"""
    sweep: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """KEY=V1,V2,...: one SAE per value, a grid over every --sweep, in one vmapped step"""

    def __post_init__(self) -> None:
        """In Python, ``sweep`` may also be a mapping ``{"lambda": [1.5, 3], "seed": [0, 1]}``;
        it is kept in the command line's form, which run folders record."""
        if isinstance(self.sweep, Mapping):
            grid = cast(Mapping[str, Any], self.sweep)
            self.sweep = [
                f"{key}={','.join(as_flag(v) for v in values)}" for key, values in grid.items()
            ]

    tensorboard: bool = False
    """also log to <run>/tensorboard/"""
    wandb: str | None = None
    """also log to this Weights & Biases project (default: off)"""

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
        parse_sweep(self.sweep)  # a bad --sweep fails before the cache is opened
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


def value_identity(value: Any) -> tuple[str, Any]:
    """What makes two parsed values the same value: 1 and 1.0 are one number, true is not 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", "nan" if value != value else value)
    return ("json", json.dumps(value, sort_keys=True))


def as_flag(value: Any) -> str:
    """A value as ``--set`` and ``--sweep`` read it back (JSON, strings bare)."""
    return value if isinstance(value, str) else json.dumps(value)


def parse_sweep(items: list[str]) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` items of ``--sweep`` -> {key: values}, in the given order. A value given
    twice (also as 1 and 1.0) would train the same member twice, so it is refused."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        raw = [v.strip() for v in text.split(",") if v.strip()]
        values = [parse_value(v) for v in raw]
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {item!r} is not KEY=V1,V2,... (e.g. lambda=0.01,0.02)")
        if key in grid:
            raise ConfigError(f"--sweep names {key!r} twice; give all its values in one list")
        seen: dict[tuple[str, Any], str] = {}
        for text_value, value in zip(raw, values, strict=True):
            identity = value_identity(value)
            if identity in seen:
                first = seen[identity]
                same = (
                    f"{first} is given twice"
                    if first == text_value
                    else (f"{first} and {text_value} are the same value")
                )
                raise ConfigError(f"--sweep {key} repeats a value: {same}; give each value once")
            seen[identity] = text_value
        grid[key] = values
    return grid


def field_docs(cls: type) -> dict[str, str]:
    """The doc string under each field of dataclass ``cls``, on one line (what ``--help`` shows
    and tyro reads; a field without one is left out)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        string = getattr(after, "value", None)
        named = isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
        if named and isinstance(string, ast.Constant) and isinstance(string.value, str):
            docs[node.target.id] = " ".join(string.value.split())
    return docs


UNSET = re.compile(r"^(?P<text>.*?);? ?\(default: (?P<unset>[^()]*(?:\([^()]*\)[^()]*)*)\)$")
"""A field doc ending in "(default: what an unset value means)" (a None default)."""


def split_default(doc: str) -> tuple[str, str | None]:
    """(the meaning, what the field's unset default means or None) of a one-line field doc."""
    match = UNSET.match(doc)
    return (match["text"], match["unset"]) if match else (doc, None)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


@functools.cache
def field_types() -> dict[str, Any]:
    """Each TrainConfig field's type (``int | None``, ``list[str]``, ...)."""
    return typing.get_type_hints(TrainConfig)


def describe(value: Any) -> str:
    """A value as a config file holds it, for messages: 'the string "2"', 'the number 100.0'."""
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {json.dumps(value)}"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the number {value!r}"
    if isinstance(value, list):
        return f"the list {json.dumps(value, default=str)}"
    if isinstance(value, dict):
        return f"the mapping {json.dumps(value, default=str)}"
    return f"the {type(value).__name__} {value}"


def whole_number(value: Any) -> int | None:
    """The integer a float or a numeric string stands for (100.0, "1e2", "2"), if any."""
    if isinstance(value, str):
        try:
            value = float(value.strip().replace("_", ""))
        except ValueError:
            return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


class SettingTypeError(ConfigError):
    """A config-file value of the wrong type; the caller adds the file's name."""


def check_setting(name: str, value: Any, toml: bool = False) -> Any:
    """``value`` of setting ``name`` as TrainConfig's field type holds it (an integer where a
    float is expected becomes a float); SettingTypeError naming the expected type otherwise."""
    kind = field_types()[name]
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    optional = type(None) in options
    (kind,) = [option for option in options if option is not type(None)]
    origin = typing.get_origin(kind) or kind

    def written(literal: str) -> str:
        return f"{name} = {literal}" if toml else f"{name}: {literal}"

    fix: str | None  # how to correct the value; None from a check that accepted it
    if value is None:
        if optional:
            return None
        unset = "leave it out" if toml else "leave it out (an empty value is null)"
        fix = f"give a value or {unset}"
    elif origin in CHECKS:
        accepted, fix = CHECKS[origin](value, written, toml)
        if fix is None:
            return accepted
    else:  # a field type added without a check here
        raise SettingTypeError(
            f"{name!r} must be a {kind}, got {describe(value)}; see train.py --help"
        )
    raise SettingTypeError(
        f"{name!r} must be {EXPECTED.get(origin, 'a value')}, got {describe(value)}; {fix}"
    )


Written = Callable[[str], str]
"""``written(literal)``: how the setting with that value is written in the file."""


def _bool(value: Any, written: Written, toml: bool) -> tuple[Any, str | None]:
    if isinstance(value, bool):
        return value, None
    text = str(value).strip().lower()
    literal = {"true": "true", "false": "false", "yes": "true", "no": "false"}.get(text)
    if literal:
        return None, f"write {written(literal)} without quotes"
    return None, f"write {written('true')} or {written('false')}"


def _int(value: Any, written: Written, toml: bool) -> tuple[Any, str | None]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    whole = whole_number(value)
    if whole is not None:
        return None, f"write {written(str(whole))}"
    return None, f"write a whole number, e.g. {written('2')}"


def _float(value: Any, written: Written, toml: bool) -> tuple[Any, str | None]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, str) and value.strip().lower().lstrip("+-.") in ("inf", "infinity"):
        sign = "-" if value.strip().startswith("-") else ""
        return None, f"write {written(sign + ('inf' if toml else '.inf'))}"
    return None, "write a number without quotes"


def _str(value: Any, written: Written, toml: bool) -> tuple[Any, str | None]:
    if isinstance(value, str):
        return value, None
    scalar = isinstance(value, int | float | datetime.date | datetime.time)
    quoted = json.dumps(str(value)) if scalar else '"..."'
    return None, f"write it in quotes, e.g. {written(quoted)}"


def _dict(value: Any, written: Written, toml: bool) -> tuple[Any, str | None]:
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return value, None
    return None, "write e.g. " + ("[hparams] k = 64" if toml else written("{k: 64}"))


def _list(value: Any, written: Written, toml: bool) -> tuple[Any, str | None]:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value, None
    item = value if isinstance(value, str) else "lambda=0.01,0.02"
    return None, f"write e.g. {written(f'[{json.dumps(item)}]')}"


CHECKS: dict[type, Callable[[Any, Written, bool], tuple[Any, str | None]]] = {
    bool: _bool,
    int: _int,
    float: _float,
    str: _str,
    dict: _dict,
    list: _list,
}
"""One check per kind of TrainConfig field: (the accepted value, None) or (None, the fix)."""
EXPECTED = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a mapping of KEY: VALUE (string keys)",
    list: "a list of strings",
}
"""How messages name the type of each kind of TrainConfig field."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML or TOML file (keys: TrainConfig fields, dashes or underscores),
    each checked against its field's type: a quoted "false" must not pass as true, nor a
    string "2" reach the cache as a layer."""
    path = Path(path)
    if path.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"--config {path}: use a {' or '.join(CONFIG_SUFFIXES)} file")
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    toml = path.suffix == ".toml"
    try:
        text = path.read_text()
        data = tomllib.loads(text) if toml else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).splitlines()[0]
        raise ConfigError(f"--config {path} is not valid {path.suffix[1:]}: {reason}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"--config {path} must hold a mapping of settings (e.g. layer: 12), got "
            f"{describe(data)}"
        )
    fields = config_fields()
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name not in fields:
            raise ConfigError(
                f"--config {path}: unknown setting {key!r}; valid: {', '.join(fields)}"
            )
        if name in settings:
            raise ConfigError(f"--config {path} gives {name!r} twice (with - and _); keep one")
        try:
            settings[name] = check_setting(name, value, toml)
        except SettingTypeError as error:
            raise ConfigError(f"--config {path}: {error}") from None
    if settings.get("steps") is not None and settings.get("tokens") is not None:
        raise ConfigError(f"--config {path} gives steps and tokens; keep one of them")
    return settings


def write_config_file(path: Path, config: TrainConfig) -> None:
    """The resolved config as YAML (atomically: a kill leaves the old file or the new one)."""
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
