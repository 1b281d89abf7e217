"""Step folders a kill leaves in ``checkpoints/``: an empty one is removed on resume, a partial one
is refused in one line; orbax would otherwise take either for the latest step and crash."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import pytest

import train
from jax_sae.training.checkpoint import CheckpointError, Checkpoints
from tests.test_train_cli import LAYER, REPO, STEPS, args, write_cache


def test_an_empty_step_folder_is_removed_and_the_last_good_step_restored(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    with Checkpoints(folder) as checkpoints:
        checkpoints.save(5, {"a": jnp.arange(3.0)}, {"config_hash": "h"})
    (folder / "10").mkdir()
    with Checkpoints(folder) as checkpoints:
        assert checkpoints.latest_step() == 5
        state, record = checkpoints.restore(5, {"a": jnp.zeros(3)}, "h")
    assert record["config_hash"] == "h" and state["a"].tolist() == [0.0, 1.0, 2.0]
    assert "removed the empty checkpoint folder" in capsys.readouterr().err
    assert not (folder / "10").exists()


def test_a_partial_step_folder_is_refused_and_kept(tmp_path):
    folder = tmp_path / "checkpoints"
    (folder / "10").mkdir(parents=True)
    (folder / "10" / "state").write_bytes(b"half")
    with pytest.raises(CheckpointError, match="incomplete .* move it out"):
        Checkpoints(folder)
    assert (folder / "10" / "state").read_bytes() == b"half"


@pytest.mark.slow
def test_train_resumes_past_an_empty_step_folder(tmp_path, capsys):
    cache = write_cache(tmp_path / "cache")
    out = tmp_path / "run"
    assert train.main(args(cache, out, "--steps", str(STEPS // 2))) == 0
    (out / "checkpoints" / str(STEPS)).mkdir()
    assert train.main(args(cache, out, "--steps", str(STEPS), "--resume")) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_corrupt_shard_is_refused_before_any_checkpoint_is_opened(tmp_path):
    """The data is read and checked before orbax's manager (and its threads) exist, so the
    refusal is one line, with no traceback from a thread outliving the exit."""
    cache = write_cache(tmp_path / "cache")
    shard = cache / f"L{LAYER}" / "shard_00001.npy"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0x01
    shard.write_bytes(bytes(raw))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", *args(cache, out, "--steps", "20")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checksum mismatch")
    assert not (out / "checkpoints").exists()
