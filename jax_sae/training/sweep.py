"""Sweeps: the grid of ``--sweep KEY=V1,V2`` items as members that train together.

A member is an ordinary run folder ``<sweep>/<member>/``; its settings are those of the single
run that computes the same weights: the sweep's settings with the member's values, and the
sweep's batch order (``data_seed``), which every member shares so that each batch is read once
for all of them. Members whose sizes or other non-float hyper-parameters differ cannot share a
vmapped step: they form separate groups, trained one group after the other.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jax_sae.training.config import ConfigError, TrainConfig, parse_sweep
from jax_sae.training.resolve import ResolvedRun

SWEEP_FILE = "sweep.json"
CONFIG_KEYS = ("seed",)
"""TrainConfig fields a sweep may vary besides the variant's hyper-parameters (and d_sae)."""


@dataclass(frozen=True)
class SweepMember:
    name: str
    swept: dict[str, Any]
    settings: TrainConfig


def member_name(swept: dict[str, Any]) -> str:
    """``lambda=0.01_seed=0``: readable, unique within the sweep, safe as a folder name."""
    return "_".join(f"{key}={json.dumps(value).strip(chr(34))}" for key, value in swept.items())


def member_identity(swept: dict[str, Any]) -> frozenset[tuple[str, str]]:
    """A member as its swept values, whatever the order of the keys or of their values."""
    return frozenset((key, json.dumps(value, sort_keys=True)) for key, value in swept.items())


def recorded_members(sweep_dir: Path) -> list[dict[str, Any]] | None:
    """The members ``sweep.json`` in ``sweep_dir`` lists (None for a new sweep folder)."""
    file = sweep_dir / SWEEP_FILE
    if not file.exists():
        return None
    try:
        members = json.loads(file.read_text())["members"]
        return [{"name": m["name"], "swept": dict(m["swept"])} for m in members]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{file} is unreadable ({error}); restore it or choose another --out"
        ) from None


def in_recorded_order(
    grid: dict[str, list[Any]], points: list[dict[str, Any]], sweep_dir: Path
) -> list[tuple[str, dict[str, Any]]]:
    """(name, swept) of each grid point: in the order and with the names of the sweep already in
    ``sweep_dir`` when it has the same members (its values may be given in another order: a
    member is its values, and its folder keeps them), else in grid order."""
    fresh = [(member_name(swept), swept) for swept in points]
    recorded = recorded_members(sweep_dir)
    if recorded is None:
        return fresh
    wanted = {member_identity(swept) for swept in points}
    if {member_identity(m["swept"]) for m in recorded} == wanted:
        return [(m["name"], m["swept"]) for m in recorded]
    keys: dict[str, list[Any]] = {}
    for member in recorded:
        for key, value in member["swept"].items():
            if value not in keys.setdefault(key, []):
                keys[key].append(value)
    had = " ".join(f"{k}={','.join(json.dumps(v) for v in vs)}" for k, vs in keys.items())
    given = " ".join(f"{k}={','.join(json.dumps(v) for v in vs)}" for k, vs in grid.items())
    raise ConfigError(
        f"{sweep_dir} holds a sweep over other values ({had}, not {given}); give its values "
        "to resume it or choose another --out for this one"
    )


def expand(cfg: TrainConfig, sweep_dir: Path) -> list[SweepMember]:
    """Every point of the grid, in the order of the ``--sweep`` items (last key fastest), or in
    the order of the sweep already in ``sweep_dir`` (which a resumed sweep must keep: members
    share vmapped steps in that order)."""
    grid = parse_sweep(cfg.sweep)
    points = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    named = in_recorded_order(grid, points, sweep_dir)
    names = [name for name, _ in named]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise ConfigError(f"--sweep values make two members named {twice!r}; give distinct values")
    members = []
    for name, swept in named:
        if "/" in name or name.startswith("."):
            raise ConfigError(f"--sweep value makes an unusable folder name {name!r}")
        hparams = {k: v for k, v in swept.items() if k not in CONFIG_KEYS}
        config_values = {k: v for k, v in swept.items() if k in CONFIG_KEYS}
        for key, value in config_values.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"--sweep {key}: values must be integers >= 0, got {value!r}")
        settings = cfg.replace(
            hparams={**cfg.hparams, **hparams},
            data_seed=cfg.batch_seed,
            out=str(sweep_dir / name),
            sweep=[],
            **config_values,
        )
        members.append(SweepMember(name, swept, settings))
    return members


def static_signature(run: ResolvedRun) -> tuple:
    """What must be equal for two members to share a vmapped step: the dictionary size and
    every hyper-parameter that is not a float (sizes, choices, switches)."""
    hp = run.variant.hparams
    return (run.variant.d_sae, *((k, v) for k, v in hp.items() if type(v) is not float))


def group_indices(resolved: Sequence[ResolvedRun]) -> list[list[int]]:
    """Members that can train in one vmapped step, in member order."""
    groups: dict[tuple, list[int]] = {}
    for index, run in enumerate(resolved):
        groups.setdefault(static_signature(run), []).append(index)
    return list(groups.values())


def sweep_record(cfg: TrainConfig, members: Sequence[SweepMember], groups: list[list[int]]) -> dict:
    """``sweep.json``: the grid and where each member lives."""
    return {
        "sweep": parse_sweep(cfg.sweep),
        "members": [{"name": m.name, "swept": m.swept, "folder": m.name} for m in members],
        "groups": [[members[i].name for i in group] for group in groups],
        "data_seed": cfg.batch_seed,
    }
