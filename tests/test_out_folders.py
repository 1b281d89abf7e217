"""Where output goes: a run never lands in an activation cache or on a file, and a comparison
never lands in a run folder; each refusal is one line and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

import train
from jax_sae.report import compare
from tests.test_train_cli import args, one_error_line, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("out") / "c")


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("where", ["the cache", "inside the cache"])
def test_a_run_is_refused_inside_the_activation_cache(cache, capsys, where):
    before = listing(cache)
    out = cache if where == "the cache" else cache / "L1" / "run"
    assert train.main(args(cache, out, "--steps", "4")) == 2
    assert "is inside the activation cache" in one_error_line(capsys)
    assert listing(cache) == before


def test_a_run_is_refused_on_a_file(cache, tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    assert train.main(args(cache, file, "--steps", "4")) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert file.read_text() == "mine"


def test_a_comparison_is_refused_in_a_run_folder_or_on_a_file(cache, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(args(cache, run, "--steps", "4", "--diverge-min-ev=-inf")) == 0
    capsys.readouterr()
    before = listing(run)
    assert compare.main([str(run), "--out", str(run)]) == 2
    assert "is a run folder" in one_error_line(capsys)
    assert listing(run) == before
    (tmp_path / "file").write_text("x")
    assert compare.main([str(run), "--out", str(tmp_path / "file")]) == 2
    assert "is a file, not a folder" in one_error_line(capsys)
    assert compare.main([]) == 2
    assert "required: runs" in one_error_line(capsys)
