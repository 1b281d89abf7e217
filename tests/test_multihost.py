"""One training command over two processes (``jax_sae.parallel.distributed``), each with one CPU
device, joined through gloo on localhost: the same weights as one process, one writer of the run
files, resume, divergence on every process; processes that disagree, a peer that never joins and
SIGTERM each end in one line; plus the settings, row blocks and per-process loader rows."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import train
from jax_sae.data.loader import Loader, LoaderError
from jax_sae.parallel.distributed import (
    DistributedError,
    differences,
    initialize_from_env,
    one_block,
    same_everywhere,
)
from jax_sae.report import runs as runs_module
from tests.test_loader import TEMPORAL_KEYS, index_of, take
from tests.test_loader import write_cache as write_marked_cache
from tests.test_train_cli import args, write_cache

pytestmark = pytest.mark.multiprocess  # processes joined through jax.distributed

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


def refuse_to_join(*args, **kwargs):
    raise AssertionError("jax.distributed.initialize was called with settings that cannot work")


@pytest.mark.parametrize(
    "address, timeout, message",
    [
        ("notahost", "", "JAX_COORDINATOR_ADDRESS=notahost is not host:port"),
        ("localhost:abc", "", "the port must be an integer from 1 to 65535"),
        ("localhost:99999", "", "the port must be an integer from 1 to 65535"),
        ("no-such-host.invalid:1234", "", "host no-such-host.invalid does not resolve"),
        ("localhost:1234", "abc", "JAX_INIT_TIMEOUT=abc must be a positive number of seconds"),
        ("localhost:1234", "0", "JAX_INIT_TIMEOUT=0 must be a positive number of seconds"),
    ],
)
def test_bad_coordinator_settings_are_one_line_errors(monkeypatch, address, timeout, message):
    """Checked before JAX joins: it would raise a traceback, crash (a port that is no integer)
    or wait for minutes (a port above 65535) instead."""
    monkeypatch.setattr(jax.distributed, "initialize", refuse_to_join)
    environ = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    with pytest.raises(DistributedError, match=message) as error:
        initialize_from_env(environ | ({"JAX_INIT_TIMEOUT": timeout} if timeout else {}))
    assert "\n" not in str(error.value)
    assert jax.process_count() == 1


def test_a_busy_coordinator_port_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", refuse_to_join)
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        address = f"localhost:{busy.getsockname()[1]}"
        environ = {"JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2"}
        with pytest.raises(DistributedError, match="process 0 cannot listen on port"):
            initialize_from_env(environ | {"JAX_PROCESS_ID": "0"})


def test_differences_name_the_settings_before_what_follows_from_them():
    """The message of processes that disagree: the settings as given, then the resolved runs."""
    mine = {"settings": {"steps": 30, "seed": 0}, "runs": [{"tokens": 960, "seed": 0}]}
    theirs = {"settings": {"steps": 20, "seed": 0}, "runs": [{"tokens": 640, "seed": 0}]}
    assert differences(mine, theirs) == "differs in settings.steps: 30 vs 20 and 1 more"
    mine["settings"]["steps"] = 20
    assert differences(mine, theirs) == "differs in runs.0.tokens: 960 vs 640"
    same_everywhere("configuration", mine)  # one process: nothing to compare with


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


def process_env(index: int, address: str, **extra: str) -> dict[str, str]:
    """Process ``index`` of a 2-process job at ``address``, one CPU device."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env |= {"JAX_PLATFORMS": "cpu", "OMP_NUM_THREADS": "1", "JAX_NUM_PROCESSES": "2"}
    return env | {"JAX_COORDINATOR_ADDRESS": address, "JAX_PROCESS_ID": str(index)} | extra


def start(argv: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def two_processes(
    argv: list[str], second: list[str] | None = None, timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """``train.py argv`` as processes 0 and 1 of one job, one CPU device each (process 1 runs
    ``second`` instead when given)."""
    address = f"localhost:{free_port()}"
    procs = [
        start([str(REPO / "train.py"), *command], process_env(index, address))
        for index, command in enumerate([argv, argv if second is None else second])
    ]
    try:
        done = [(proc, *proc.communicate(timeout=timeout)) for proc in procs]
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


# ------------------------------------------------------------------------------ disagreement, joins


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-3000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_processes_with_different_settings_stop_at_the_start(cache, tmp_path):
    """Before the fix they waited for each other in their first collective (for good)."""
    out = tmp_path / "differ"
    argv = args(cache, out, "--steps", "20")
    started = time.monotonic()
    done = two_processes(argv, second=args(cache, out, "--steps", "30"), timeout=60)
    assert time.monotonic() - started < 45
    assert [p.returncode for p in done] == [2, 2]
    for proc in done:
        [line] = error_lines(proc.stderr)
        assert line.startswith("error: process 1 runs another configuration than process 0 ")
        assert "differs in settings.steps: 30 vs 20" in line
        assert line.endswith("give every process the same command and settings")
    assert not (out / "checkpoints").exists()


def test_a_process_that_stops_early_stops_the_others(cache, tmp_path):
    """Process 1 fails on its own settings before the comparison; process 0 does not wait."""
    out = tmp_path / "early"
    argv = args(cache, out, "--steps", "20")
    done = two_processes(argv, second=[*argv, "--batch-size", "0"], timeout=60)
    assert [p.returncode for p in done] == [2, 2]
    assert error_lines(done[1].stderr) == ["error: --batch-size must be > 0, got 0"]
    assert error_lines(done[0].stderr) == [
        "error: process 1 stopped before comparing its configuration (see its output); stopping too"
    ]


@pytest.mark.parametrize("index", [0, 1])
def test_a_peer_that_never_joins_ends_in_one_line(index):
    """Process 0 or 1 alone, with a 3 s join timeout: progress, then one line (before the fix:
    silence for 5 minutes, then an abort with a stack trace)."""
    address = f"localhost:{free_port()}"
    proc = start(["train.py"], process_env(index, address, JAX_INIT_TIMEOUT="3"))
    started = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=40)
    finally:
        proc.kill()
    assert time.monotonic() - started < 30
    assert proc.returncode == 2, stderr[-3000:]
    assert f"process {index} of 2: waiting for the other processes to join at {address}" in stderr
    assert error_lines(stderr) == [
        f"error: process {index} of 2: not every process joined at {address} within 3 s; start "
        "the same command on every host with JAX_PROCESS_ID 0 to 1 (process 0 on localhost), or "
        "raise JAX_INIT_TIMEOUT"
    ]


def stderr_lines(proc: subprocess.Popen) -> list[str]:
    """The lines ``proc`` writes to stderr, filled in by a reader thread while it runs."""
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return lines


def wait_for_line(lines: list[str], text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not any(text in line for line in lines):
        assert time.monotonic() < deadline, f"no line with {text!r} in {lines}"
        time.sleep(0.05)


def assert_stops_on_sigterm(proc: subprocess.Popen, lines: list[str], index: int) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 143
    stopped = [line for line in lines if line.startswith("stopped by SIGTERM")]
    assert stopped == [
        f"stopped by SIGTERM: process {index} of 2 ends now; the other processes stop when they "
        "miss it (or SIGTERM them too); continue from the last checkpoint with --resume\n"
    ]


def test_sigterm_ends_a_process_waiting_to_join():
    proc = start(["train.py"], process_env(1, f"localhost:{free_port()}", JAX_INIT_TIMEOUT="60"))
    try:
        lines = stderr_lines(proc)
        wait_for_line(lines, "waiting for the other processes to join")
        assert_stops_on_sigterm(proc, lines, 1)
    finally:
        proc.kill()


JOIN_AND_WAIT = """
import sys, time
from jax_sae.parallel.distributed import initialize_from_env
initialize_from_env()
import jax
from jax.experimental import multihost_utils

print("joined", file=sys.stderr, flush=True)
if jax.process_index() == 0:
    multihost_utils.sync_global_devices("a collective process 1 never enters")
time.sleep(60)
"""


def test_sigterm_ends_a_process_inside_a_collective():
    """Process 0 waits inside a collective (no Python signal handler runs there, and JAX's
    preemption service took SIGTERM before the fix); SIGTERM ends it at once."""
    address = f"localhost:{free_port()}"
    procs = [start(["-c", JOIN_AND_WAIT], process_env(index, address)) for index in range(2)]
    try:
        lines = stderr_lines(procs[0])
        wait_for_line(lines, "joined")
        time.sleep(0.5)  # inside sync_global_devices by now
        assert procs[0].poll() is None
        assert_stops_on_sigterm(procs[0], lines, 0)
    finally:
        for proc in procs:
            proc.kill()
