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
from dataclasses import dataclass, field
from typing import Annotated

import tyro

from jax_sae.model.variants import VARIANTS, format_variant_help
from jax_sae.parallel.distributed import initialize_from_env
from jax_sae.report import runs
from jax_sae.training import ONE_LINE_ERRORS, TrainConfig, Trainer
from jax_sae.training.config import parse_overrides, read_config_file


@dataclass
class Command:
    train: Annotated[TrainConfig, tyro.conf.OmitArgPrefixes]
    set: Annotated[list[str], tyro.conf.UseAppendAction] = field(default_factory=list)
    """KEY=VALUE: a variant hyper-parameter or d_sae (value parsed as JSON, else a string); each
    replaces that key of the --config file's hparams, the file's other keys stay"""
    config: str | None = None
    """YAML or TOML file of TrainConfig settings; flags given next to it win (--sweep replaces the
    file's sweep list, --steps or --tokens its run length)"""
    help_variant: str | None = None
    """print every hyper-parameter of this variant with its default and meaning, then exit"""


def description() -> str:
    variants = "\n".join(f"  {name:<11} {spec.description}" for name, spec in VARIANTS.items())
    return (
        f"{__doc__.splitlines()[0]}\n\nvariants (hyper-parameters: --help-variant NAME; formulas "
        f"and defaults: docs/variants.md; the library: docs/training.md):\n{variants}"
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
    default = Command(train=TrainConfig(**settings), config=path)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            command = tyro.cli(Command, args=argv, default=default, description=description())
    except SystemExit as exit_:
        if exit_.code:
            print(f"error: {one_line(captured.getvalue())} (see train.py --help)", file=sys.stderr)
        raise
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
        for key, label in (("explained_variance", "EV (SAEBench)"), ("l0", "L0")):
            if key in fast:
                numbers.append(f"{label} {fast[key]:.4g}")
        if "dead_frac" in fast:
            numbers.append(f"dead {fast['dead_frac']:.3f}")
        print(f"done: {run.out}: {', '.join(numbers)}", file=sys.stderr)
    failed = [run for run in finished if run.status != runs.FINISHED]
    return 2 if failed and len(failed) == len(finished) else 0


if __name__ == "__main__":
    sys.exit(main())
