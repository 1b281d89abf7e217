"""Train one SAE, or a sweep of SAEs, on one layer of an activation cache.

    python train.py --cache DIR --layer L --variant NAME [--set KEY=VALUE ...]
                    [--steps N | --tokens N] [--sweep KEY=V1,V2 ...] [--config run.yaml]

A thin command line over ``jax_sae.training`` (``Trainer(TrainConfig(...)).fit()``): every flag
is a TrainConfig field. Writes runs/<variant>_L<layer>/ (a sweep: one such folder per member
under runs/<variant>_L<layer>_sweep/, plus sweep.md and pareto.png). --resume continues a
killed run or sweep bit for bit. Errors are one ``error: ...`` line with exit status 2.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import tyro

from jax_sae.model.variants import VARIANTS, format_variant_help
from jax_sae.parallel.distributed import initialize_from_env
from jax_sae.report import runs
from jax_sae.training import ONE_LINE_ERRORS, TrainConfig, Trainer
from jax_sae.training.config import (
    field_docs,
    parse_overrides,
    read_config_file,
    split_default,
)


@dataclass
class Command:
    """The command line: the run's TrainConfig and the options that only the command has."""

    train: TrainConfig
    set: list[str] = field(default_factory=list)
    """a hyper-parameter (--help-variant) or d_sae, JSON value"""
    config: str | None = None
    """YAML/TOML file of these settings; flags win over it"""
    help_variant: str | None = None
    """list a variant's hyper-parameters and defaults, then exit"""


SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("cache", "layer", "normalize", "eval_tokens", "allow_incomplete", "data_seed"),
    "model": ("variant", "set", "help_variant", "sweep", "seed"),
    "optimisation": ("steps", "tokens", "batch_size", "diverge_loss_factor", "diverge_min_ev"),
    "run": (
        "out",
        "resume",
        "resume_if_exists",
        "config",
        "checkpoint_every",
        "log_every",
        "tensorboard",
        "wandb",
    ),
    "scale": ("compute_dtype", "mesh", "stream", "disk_budget", "stream_window"),
}
"""The groups of ``--help``: every flag once (TrainConfig's fields but ``hparams``, which is
``--set``, and Command's own)."""
METAVARS = {
    "cache": "PATH",
    "out": "PATH",
    "config": "PATH",
    "variant": "NAME",
    "help_variant": "NAME",
    "set": "KEY=VALUE",
    "sweep": "K=V1,V2",
    "compute_dtype": "DTYPE",
    "mesh": "LAYOUT",
    "stream": "ARGS",
    "disk_budget": "SIZE",
    "wandb": "PROJECT",
}
"""A flag's placeholder in --help; others by type: N (integer), X (number)."""
TYPE_METAVARS = {int: "N", float: "X", str: "TEXT"}


def _default_hint(unset: str | None) -> Callable[[str], str]:
    """tyro's hint after a flag's help: its default once, in words where it is unset (None);
    "(required)" for a setting without which nothing trains."""

    def hint(label: str) -> str:
        if label != "None":  # a value, also one from --config
            return f"(default: {label})"
        if unset is None:
            return ""
        return "(required)" if unset == "required" else f"(default: {unset})"

    return hint


def _flag(owner: type, name: str, docs: dict[str, str]) -> tuple[str, Any, Any]:
    """One field of a --help section: ``owner``'s field ``name`` with its help, placeholder and
    default (the section classes only group the flags: the names stay TrainConfig's)."""
    spec = {f.name: f for f in fields(owner)}[name]
    kind = get_type_hints(owner, include_extras=True)[name]
    text, unset = split_default(docs[name])
    if text.endswith("; required"):
        text, unset = text.removesuffix("; required"), "required"
    plain = get_args(kind)[0] if get_origin(kind) is Annotated else kind
    if isinstance(plain, types.UnionType):
        plain = next(option for option in get_args(plain) if option is not type(None))
    repeatable = get_origin(plain) is list
    arg = tyro.conf.arg(
        help=text,
        metavar=METAVARS.get(name, TYPE_METAVARS.get(plain)) if plain is not bool else None,
        help_behavior_hint=None if repeatable else _default_hint(unset),
    )
    if repeatable:
        kind = Annotated[kind, tyro.conf.UseAppendAction]
    default = (
        field(default_factory=spec.default_factory)
        if spec.default_factory is not MISSING
        else field(default=spec.default)
    )
    return name, Annotated[kind, arg], default


def _sections() -> dict[str, type]:
    """One dataclass per entry of SECTIONS, holding its flags."""
    docs = {**field_docs(TrainConfig), **field_docs(Command)}
    owners = {f.name: TrainConfig for f in fields(TrainConfig)} | {
        f.name: Command for f in fields(Command) if f.name != "train"
    }
    listed = [name for names in SECTIONS.values() for name in names]
    assert sorted(listed) == sorted(set(owners) - {"hparams"}), "every flag in one section"
    sections = {}
    for title, names in SECTIONS.items():
        flags = [_flag(owners[name], name, docs) for name in names]
        sections[title] = make_dataclass(f"{title.title()}Flags", flags)
        sections[title].__doc__ = ""  # no description line in the section's box
    return sections


SECTION_FLAGS = _sections()
FLAGS = make_dataclass(
    "Flags",
    [(title, Annotated[cls, tyro.conf.OmitArgPrefixes]) for title, cls in SECTION_FLAGS.items()],
)
"""What tyro parses: the sections nested with their flags unprefixed (``--cache``, not
``--data.cache``), so that ``--help`` shows one titled box per section."""
FLAGS.__doc__ = ""


def flags_from(command: Command) -> Any:
    """The sectioned flags holding a Command's values (the defaults tyro shows and parses onto)."""
    values = {**vars(command.train), **vars(command)}
    return FLAGS(
        **{
            title: cls(**{name: values[name] for name in SECTIONS[title]})
            for title, cls in SECTION_FLAGS.items()
        }
    )


def command_from(flags: Any, base: TrainConfig) -> Command:
    """The Command of parsed flags; ``base`` gives what no flag sets (the file's hparams)."""
    values = {
        name: getattr(getattr(flags, title), name)
        for title, names in SECTIONS.items()
        for name in names
    }
    own = {f.name for f in fields(Command)} - {"train"}
    train = base.replace(**{k: v for k, v in values.items() if k not in own})
    return Command(train=train, **{k: v for k, v in values.items() if k in own})


def description() -> str:
    variants = "\n".join(f"  {name:<11} {spec.description}" for name, spec in VARIANTS.items())
    return (
        f"{__doc__.splitlines()[0]}\n\nvariants (docs/variants.md):\n{variants}\n"
        "  (sizes, learning rate and warm-ups adapt to the cache and the run: see the start)"
    )


FRAME = set("╭╮╰╯│─-+| ")


def one_line(text: str) -> str:
    """tyro's framed error message as one line: the first paragraph inside the frame (the
    frame is drawn with box characters on a terminal, with dashes otherwise)."""
    paragraph: list[str] = []
    for line in text.splitlines()[1:]:  # the first line is the frame's title
        line = line.strip().strip("│|").strip()
        if not line or set(line) <= FRAME:
            if paragraph:
                break
            continue
        paragraph.append(line)
    return " ".join(paragraph) or "invalid arguments"


REPLACED_TOGETHER = (("sweep",), ("steps", "tokens"))
"""Settings that a command line replaces as a whole in a --config file: --sweep the file's sweep
list (a default list would be appended to), --steps or --tokens the file's run length (both are
one setting, given one way)."""


def config_path(argv: list[str]) -> str | None:
    """The last ``--config PATH`` (or ``--config=PATH``) of the command line."""
    path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
    return path


def parse_command(argv: list[str]) -> Command:
    """The command line, with --config's settings as defaults. Usage errors exit with status 2
    after one ``error:`` line; --help exits with 0."""
    path = config_path(argv)
    settings = read_config_file(path) if path is not None else {}
    names = [name for group in REPLACED_TOGETHER for name in group if name in settings]
    held = {name: settings.pop(name) for name in names}
    base = TrainConfig(**settings)
    default = flags_from(Command(train=base, config=path))
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            parsed = tyro.cli(
                FLAGS, prog="train.py", args=argv, default=default, description=description()
            )
    except SystemExit as exit_:
        if exit_.code:
            print(f"error: {one_line(captured.getvalue())} (see train.py --help)", file=sys.stderr)
        raise
    command = command_from(parsed, base)
    unset = TrainConfig()
    for group in REPLACED_TOGETHER:  # none of the group on the command line: the file's values
        if all(getattr(command.train, name) == getattr(unset, name) for name in group):
            given = {name: held[name] for name in group if name in held}
            command.train = command.train.replace(**given)
    return command


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        # one process per host (jax_sae.parallel.distributed); before any JAX work
        initialize_from_env()
        try:
            command = parse_command(argv)
        except SystemExit as exit_:  # --help, or a usage error already printed as one line
            return int(exit_.code or 0)
        if command.help_variant is not None:
            print(format_variant_help(command.help_variant))
            return 0
        overrides = parse_overrides(command.set)
        config = command.train.replace(hparams={**command.train.hparams, **overrides})
        finished = Trainer(config).fit()
    except ONE_LINE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint was saved, continue with --resume", file=sys.stderr)
        return 130
    for run in finished:
        fast = run.fast_eval or {}
        numbers = [f"status {run.status}"]
        if run.final_loss is not None:
            numbers.append(f"final loss {run.final_loss:.5g}")
        for key, label in (("explained_variance", "EV (1 - FVU)"), ("l0", "L0")):
            if key in fast:
                numbers.append(f"{label} {fast[key]:.4g}")
        if "dead_frac" in fast:  # not the progress bar's dead(train): docs/training.md
            numbers.append(f"dead (held-out) {fast['dead_frac']:.3f}")
        print(f"done: {run.out}: {', '.join(numbers)}", file=sys.stderr)
    failed = [run for run in finished if run.status != runs.FINISHED]
    return 2 if failed and len(failed) == len(finished) else 0


if __name__ == "__main__":
    sys.exit(main())
