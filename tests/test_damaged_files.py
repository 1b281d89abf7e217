"""A damaged config.json or status.json (half-written by another tool, edited by hand) ends every
command that reads it in one line naming the file, never a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import train
from jax_sae.export import saelens
from jax_sae.report import compare
from tests.test_train_cli import args, one_error_line, write_cache

DAMAGES = {"garbage": b"{oops", "empty": b"", "a list": b"[1, 2]", "a number": b"3"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("damaged")
    cache = write_cache(root / "cache")
    run = root / "run"
    assert train.main(args(cache, run, "--steps", "20", "--diverge-min-ev=-inf")) == 0
    return cache, run


def damaged_copy(run: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / name).write_bytes(content)
    return copy


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["config.json", "status.json"])
def test_export_names_the_damaged_file(finished, tmp_path, capsys, name, damage):
    run = damaged_copy(finished[1], tmp_path, name, DAMAGES[damage])
    assert saelens.main([str(run), "--out", str(tmp_path / "export")]) == 2
    line = one_error_line(capsys)
    assert f"{run / name} is damaged" in line and "--resume" in line


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_and_compare_name_the_damaged_config(finished, tmp_path, capsys, damage):
    cache, run = finished
    run = damaged_copy(run, tmp_path, "config.json", DAMAGES[damage])
    assert train.main(args(cache, run, "--steps", "30", "--resume")) == 2
    assert f"{run / 'config.json'} is damaged" in one_error_line(capsys)
    assert compare.main([str(run), "--out", str(tmp_path / "compare")]) == 2
    assert f"{run / 'config.json'} is damaged" in one_error_line(capsys)
