"""Every Python example in README.md and docs/ runs as printed.

Each block runs in a fresh namespace in a folder that holds what the examples name: a small cache
at ``activations_cache/gemma-2-2b__pile-uncopyrighted__L12`` (layer 12, width 16) and a finished
TopK run at ``runs/topk_L12``. Sizes meant for Gemma-2-2b are shrunk by the listed replacements,
each of which must still match its example (an edited example fails here until it is updated)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import train
from jax_sae.data.cache import CacheWriter

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CACHE_NAME = "activations_cache/gemma-2-2b__pile-uncopyrighted__L12"
SHRINK = {
    "16384": "64",
    "50_000_000": "4096",
    '"k": 64': '"k": 4',
    "k=64": "k=4",
    "warmup_steps=1000": "warmup_steps=10",
}
"""Gemma-scale sizes -> sizes that train in seconds on the 16-wide test cache."""


def python_blocks() -> list[tuple[str, str]]:
    """(file:line, code) of each fenced python block."""
    blocks = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{doc.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


BLOCKS = python_blocks()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    rng = np.random.default_rng(0)
    writer = CacheWriter(
        root / CACHE_NAME,
        layers=[12],
        d_model=16,
        dtype="bfloat16",
        settings={"ctx_len": 16},
        metadata={"model": "tiny", "ctx_len": 16},
    )
    directions = rng.normal(size=(32, 16))
    for _ in range(2):
        codes = rng.exponential(size=(4096, 32)) * (rng.random((4096, 32)) < 0.1)
        x = (codes @ directions + 0.05 * rng.normal(size=(4096, 16))).astype(np.float32)
        writer.write_shard({12: x}, rng.integers(0, 50, 4096), np.tile(np.arange(1, 17), 256), 256)
    writer.finish()
    argv = ["--cache", str(root / CACHE_NAME), "--layer", "12", "--variant", "topk", "--steps",
            "20", "--batch-size", "256", "--set", "d_sae=64", "--set", "k=4", "--out",
            str(root / "runs" / "topk_L12")]  # fmt: skip
    assert train.main(argv) == 0
    return root


def test_the_documents_hold_python_examples_and_every_shrink_still_applies():
    assert len(BLOCKS) >= 4, [where for where, _ in BLOCKS]
    unused = [big for big in SHRINK if not any(big in code for _, code in BLOCKS)]
    assert not unused, f"no example holds {unused} any more: update SHRINK"


@pytest.mark.parametrize("where, code", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_the_example_runs_as_printed(where, code, workdir, monkeypatch, capsys):
    for big, small in SHRINK.items():
        code = code.replace(big, small)
    monkeypatch.chdir(workdir)
    shutil.rmtree(workdir / "runs" / "topk_L12_sweep", ignore_errors=True)  # a new sweep each
    exec(compile(code, where, "exec"), {"__name__": "__doc_example__"})
