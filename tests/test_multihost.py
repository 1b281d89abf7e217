"""One training command over two processes (``jax_sae.parallel.distributed``), each with one CPU
device, joined through gloo on localhost: the same weights as one process, one writer of the run
files,
resume, divergence on every process; plus the settings, row blocks and per-process loader rows."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import train
from jax_sae.data.loader import Loader, LoaderError
from jax_sae.parallel.distributed import DistributedError, initialize_from_env, one_block
from jax_sae.report import runs as runs_module
from tests.test_loader import TEMPORAL_KEYS, index_of, take
from tests.test_loader import write_cache as write_marked_cache
from tests.test_train_cli import args, write_cache

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
VARIANTS = {"standard": (), "topk": ("k=8",)}
MULTI = [("standard", "data=2"), ("topk", "data=2"), ("topk", "model=2")]
"""Two processes: each reads half of every batch (data=2), or all of it while each holds half of
the latents (model=2: the final weights are gathered from both)."""
SETS = ("d_sae=64", "warmup_steps=5", "lr=0.01")


# ------------------------------------------------------------------------------ settings


def test_no_settings_stay_one_process():
    assert initialize_from_env({}) is False
    assert jax.process_count() == 1


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, "set JAX_NUM_PROCESSES, JAX_PROCESS_ID too"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "set JAX_COORDINATOR_ADDRESS too"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES",
        ),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
            "must be integers",
        ),
    ],
)
def test_incomplete_settings_are_one_line_errors(environ, message):
    with pytest.raises(DistributedError, match=message) as error:
        initialize_from_env(environ)
    assert "\n" not in str(error.value)
    assert jax.process_count() == 1


def test_row_spans_of_a_process_must_form_one_block():
    assert one_block([(8, 16), (0, 8), (0, 8)]) == slice(0, 16)
    with pytest.raises(DistributedError, match=r"rows \[\(0, 8\), \(16, 24\)\].*not one block"):
        one_block([(16, 24), (0, 8)])


# ------------------------------------------------------------------------------ loader rows


@pytest.fixture(scope="module")
def marked_cache(tmp_path_factory):
    rng = np.random.default_rng(1)
    shards = [list(rng.integers(3, 30, size=k)) for k in (9, 4, 12)]
    return write_marked_cache(tmp_path_factory.mktemp("cache") / "c", shards)


@pytest.mark.parametrize("start", [0, 5])
def test_row_blocks_of_all_processes_make_the_whole_batch(marked_cache, start):
    """Batches cross buffers and epochs; each process's loader yields only its rows."""
    kw = {"batch_size": 37, "eval_tokens": 50, "chunk_tokens": 40, "buffer_chunks": 3, "seed": 7}
    kw |= {"batch_keys": TEMPORAL_KEYS}
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    whole = take(Loader(marked_cache, 2, **kw).host_batches(start), 12)
    parts = [
        take(Loader(marked_cache, 2, sharding=sharding, rows=rows, **kw).host_batches(start), 12)
        for rows in (slice(0, 20), slice(20, 37))
    ]
    for batch, first, second in zip(whole, *parts, strict=True):
        assert len(index_of(first)) == 20
        for key in TEMPORAL_KEYS:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), batch[key])


def test_rows_need_a_sharding_and_a_place_in_the_batch(marked_cache):
    with pytest.raises(LoaderError, match="must lie in a batch of 8 and come with a sharding"):
        Loader(marked_cache, 2, batch_size=8, rows=slice(0, 4))
    with pytest.raises(LoaderError, match="must lie in a batch of 8"):
        Loader(marked_cache, 2, batch_size=8, rows=slice(4, 12), sharding=object())


# ------------------------------------------------------------------------------ 2 processes


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("cache") / "c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(argv: list[str]) -> list[subprocess.CompletedProcess]:
    """``train.py argv`` as processes 0 and 1 of one job, one CPU device each."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", "JAX_NUM_PROCESSES": "2"}
    env["JAX_COORDINATOR_ADDRESS"] = f"localhost:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "train.py"), *argv],
            cwd=REPO,
            env=env | {"JAX_PROCESS_ID": str(index)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        done = [(proc, *proc.communicate(timeout=120)) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, out, err in done]


def run_args(cache: Path, out: Path, variant: str, *extra: str) -> list[str]:
    sets = (*SETS, *VARIANTS[variant], *(["lambda=0.003"] if variant == "standard" else []))
    return args(cache, out, "--steps", str(STEPS), *extra, variant=variant, sets=sets)


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory) -> dict[str, Path]:
    """Run folders by variant (one process, no mesh) and by (variant, mesh) (two processes)."""
    out = tmp_path_factory.mktemp("runs")
    folders: dict = {}
    for variant in VARIANTS:
        folders[variant] = out / variant
        assert train.main(run_args(cache, folders[variant], variant)) == 0
    for variant, mesh in MULTI:
        folders[variant, mesh] = out / f"{variant}_{mesh}"
        done = two_processes(run_args(cache, folders[variant, mesh], variant, "--mesh", mesh))
        assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
    return folders


def assert_same_weights(actual: Path, expected: Path) -> None:
    got, want = (
        load_file(actual / "sae_params.safetensors"),
        load_file(expected / "sae_params.safetensors"),
    )
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("variant, mesh", MULTI)
def test_two_processes_train_the_weights_of_one(runs, variant, mesh):
    assert_same_weights(runs[variant, mesh], runs[variant])


@pytest.mark.parametrize("variant, mesh", MULTI)
def test_only_the_primary_writes_the_run_files(runs, variant, mesh):
    """Each interval logged once (two writers would log it twice); every final file there."""
    multi = runs[variant, mesh]
    records = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert json.loads((multi / "status.json").read_text())["state"] == "finished"
    assert json.loads((multi / "config.json").read_text())["mesh"] == mesh
    assert (multi / "final_info.json").is_file() and (multi / "plots").is_dir()
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["10", "20"]


def test_two_processes_resume_from_their_checkpoint(runs, cache, tmp_path):
    """The state as a kill after step 10 leaves it; resumed by two processes, the same end."""
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["topk", "data=2"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "20")
    (resumed / "sae_params.safetensors").unlink()
    done = two_processes(run_args(cache, resumed, "topk", "--mesh", "data=2", "--resume"))
    assert [p.returncode for p in done] == [0, 0], done[0].stderr[-3000:]
    assert "resuming" in done[0].stderr and "at step 10 of 20" in done[0].stderr
    assert_same_weights(resumed, runs["topk"])


def test_divergence_stops_every_process(cache, tmp_path):
    out = tmp_path / "diverged"
    done = two_processes(run_args(cache, out, "standard", "--mesh", "data=2", "--set", "lr=1000"))
    assert [p.returncode for p in done] == [2, 2]
    for proc in done:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "the run diverged" in errors[0], proc.stderr[-3000:]
    assert json.loads((out / "status.json").read_text())["state"] == "diverged"


def test_an_error_of_the_primary_stops_the_other_process(cache, tmp_path):
    """Only the primary takes the run folder's lock: when it cannot, both processes stop."""
    out = tmp_path / "busy"
    lock = runs_module.RunLock(out)
    lock.acquire()
    try:
        done = two_processes(run_args(cache, out, "standard", "--mesh", "data=2"))
    finally:
        lock.release()
    assert [p.returncode for p in done] == [2, 2]
    assert "error:" in done[0].stderr and "is in use by another trainer" in done[0].stderr
    assert "error: process 0 stopped with an error (see its output)" in done[1].stderr
