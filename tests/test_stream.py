"""Streaming (jax_sae/data/stream.py): the token order, release and its bound, a budgeted extractor
and a trainer running side by side, SIGKILLs of both at random moments, and the one-line errors.

The order tests run on small synthetic caches whose layer-2 column 0 holds the global token index;
the rest runs the tiny model (``tests/stream_consumer.py`` is the stand-in trainer).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from extract.cli import parse_size
from extract.extractor import ExtractConfig, extract
from jax_sae.data.cache import (
    MANIFEST,
    PRODUCER_WAIT,
    RELEASE,
    ActivationCache,
    CacheError,
    CacheWriter,
    shard_file,
)
from jax_sae.data.stream import (
    StreamCache,
    StreamError,
    StreamingLoader,
    StreamOrder,
    start_producer,
)
from jax_sae.util.files import write_json_atomic
from tests import stream_consumer as consumer

REPO = Path(__file__).resolve().parents[1]
D = 8
KINDS = ("L2", "tokens", "positions")
TEMPORAL = ("x", "x_prev", "seq_start")


# ---------------------------------------------------------------- synthetic caches, token order


def write_stream(path: Path, shard_lengths: list[list[int]], complete: bool = True) -> Path:
    """A cache of layer 2 whose column 0 holds the global token index (one list of sequence
    lengths per shard); ``complete=False`` leaves it as an extractor still writing it."""
    rng = np.random.default_rng(0)
    writer = CacheWriter(
        path, layers=[2], d_model=D, dtype="float32", settings={"tokens": 10**6}, metadata={}
    )
    start = 0
    for lengths in shard_lengths:
        n = sum(lengths)
        acts = rng.normal(size=(n, D)).astype(np.float32)
        acts[:, 0] = np.arange(start, start + n)
        positions = np.concatenate([np.arange(1, m + 1) for m in lengths])
        writer.write_shard({2: acts}, np.arange(start, start + n), positions, len(lengths))
        start += n
    if complete:
        writer.finish()
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    shards = [list(rng.integers(3, 20, size=rng.integers(2, 6))) for _ in range(14)]
    return write_stream(tmp_path_factory.mktemp("synthetic") / "c", shards)


def loader_of(cache: Path, **kw) -> StreamingLoader:
    options = {"batch_size": 13, "seed": 3, "window": 3, "eval_tokens": 60} | kw
    return StreamingLoader(StreamCache(cache, poll_s=0.01), 2, **options)


def indices(batches: list[dict]) -> list[np.ndarray]:
    return [b["x"][:, 0].astype(np.int64) for b in batches]


def delete_shards(cache: Path, shards: range) -> None:
    """What a budgeted extractor does to released shards."""
    manifest = json.loads((cache / MANIFEST).read_text())
    for index in shards:
        manifest["shards"][index]["deleted"] = True
        for kind in KINDS:
            (cache / shard_file(kind, index)).unlink()
    write_json_atomic(cache / MANIFEST, manifest)


def test_every_training_token_once_from_a_window_of_shards(synthetic):
    loader = loader_of(synthetic, batch_keys=TEMPORAL)
    reference = ActivationCache(synthetic)
    offsets = np.cumsum([0, *reference.shard_sizes])
    batches = list(loader.host_batches())
    seen = np.concatenate(indices(batches))
    heldout = np.concatenate(list(loader.heldout(50)))[:, 0].astype(np.int64)
    # held out: the first shards holding >= 60 tokens, in cache order
    assert loader.first_train == int(np.searchsorted(offsets, 60)) and len(heldout) >= 60
    np.testing.assert_array_equal(heldout, np.arange(offsets[loader.first_train]))
    assert loader.heldout_tokens == len(heldout)
    # training: every token once (but the last partial batch), none of them held out
    assert len(batches) == loader.n_train // 13 and len(set(seen)) == len(seen)
    assert seen.min() >= len(heldout) and len(seen) > loader.n_train - 13
    # a batch spans at most two phases, so W + 1 = 4 consecutive shards
    shard_of = [np.searchsorted(offsets, i, side="right") - 1 for i in indices(batches)]
    assert max(s.max() - s.min() for s in shard_of) <= 3
    assert np.mean([len(set(s)) >= 2 for s in shard_of]) > 0.5  # shards are mixed
    # the predecessor of each token, zero at sequence starts
    starts = reference.sequence_starts()
    acts = reference.acts(2)[:]
    for batch, index in zip(batches, indices(batches), strict=True):
        np.testing.assert_array_equal(batch["seq_start"], starts[index])
        expected = np.where(starts[index, None], 0.0, acts[np.maximum(index - 1, 0)])
        np.testing.assert_array_equal(batch["x_prev"], expected)
    # deterministic for a seed, different for another
    again = indices(list(loader_of(synthetic, batch_keys=TEMPORAL).host_batches()))
    assert all(np.array_equal(a, b) for a, b in zip(indices(batches), again, strict=True))
    other = np.concatenate(indices(list(loader_of(synthetic, seed=4).host_batches())))
    assert not np.array_equal(seen, other)


@pytest.mark.parametrize("window", [1, 2, 5])
def test_resume_at_a_step_gives_the_same_following_batches(synthetic, window):
    full = indices(list(loader_of(synthetic, window=window).host_batches()))
    for start in (1, 9, len(full) - 1):
        resumed = indices(list(loader_of(synthetic, window=window).host_batches(start)))
        assert all(np.array_equal(a, b) for a, b in zip(full[start:], resumed, strict=True))


@pytest.mark.parametrize("fraction", [0.4, 0.7, 0.9])
def test_release_frees_exactly_the_shards_no_later_step_reads(synthetic, tmp_path, fraction):
    loader = loader_of(synthetic)
    full = indices(list(loader.host_batches()))
    step = int(fraction * len(full))
    loader.release_before(step)
    release = json.loads((synthetic / RELEASE).read_text())
    (synthetic / RELEASE).unlink()  # the module's cache stays as written
    assert release["pinned"] == list(range(loader.first_train + 1)) and release["step"] == step
    below = release["released_below"]
    assert below > loader.first_train + 1  # shards past the pinned ones were released
    cache = tmp_path / "c"
    shutil.copytree(synthetic, cache)
    delete_shards(cache, range(loader.first_train + 1, below))
    resumed = indices(list(loader_of(cache).host_batches(step)))
    assert all(np.array_equal(a, b) for a, b in zip(full[step:], resumed, strict=True))
    delete_shards(cache, range(below, below + 1))  # one more: a step from `step` on reads it
    with pytest.raises(StreamError, match=f"shard {below} of .* was deleted") as error:
        list(loader_of(cache).host_batches(step))
    assert "\n" not in str(error.value)


def test_order_is_a_function_of_the_shard_sizes():
    order = StreamOrder(seed=0, window=3)
    sizes = [10, 7, 12, 9]
    # while written, only phases up to the last shard's are defined; all once the stream ended
    np.testing.assert_array_equal(order.phase_sizes(sizes, ended=False), [3, 5, 10, 10])
    assert order.phase_sizes(sizes, ended=True).sum() == sum(sizes)
    pieces = [np.concatenate([order.piece(t, n, k) for k in range(3)]) for t, n in enumerate(sizes)]
    assert all(np.array_equal(np.sort(p), np.arange(n)) for p, n in zip(pieces, sizes, strict=True))
    # shard t is read last by phase t + 2: released once the stream is past the end of that phase
    ends = np.cumsum(order.phase_sizes(sizes, ended=True))
    assert [order.released(sizes, True, p) for p in (0, ends[2] - 1, ends[2], ends[-1])] == [
        0, 0, 1, 4
    ]  # fmt: skip


def test_corrupted_shard_is_refused_in_one_line(synthetic, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(synthetic, cache)
    file = cache / shard_file("L2", 5)
    data = bytearray(file.read_bytes())
    data[-20] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"checksum mismatch in .*L2/shard_00005.npy") as error:
        list(loader_of(cache).host_batches())
    assert "\n" not in str(error.value)


def test_both_sides_waiting_is_a_one_line_error_not_a_hang(tmp_path):
    cache = write_stream(tmp_path / "c", [[30, 20]] * 6, complete=False)
    wait = {"shard": 6, "needed": 1, "on_disk": 5000, "budget": 5001, "released_below": None}
    write_json_atomic(cache / PRODUCER_WAIT, wait)
    stream = StreamCache(cache, poll_s=0.01, deadlock_s=0.3)
    loader = StreamingLoader(stream, 2, batch_size=16, window=2)
    started = time.monotonic()
    with loader.batches(0, convert_on_device=False) as batches:
        watchdog = threading.Timer(20, batches.close)  # without the check: "stopped waiting"
        watchdog.start()
        with pytest.raises(StreamError, match="wait on each other") as error:
            for _ in batches:
                pass
        watchdog.cancel()
    assert "\n" not in str(error.value) and time.monotonic() - started < 10


def test_writer_keeps_to_its_budget_and_resume_removes_what_a_kill_left(tmp_path):
    cache = write_stream(tmp_path / "c", [[40]] * 4, complete=False)
    shard_bytes = sum((cache / shard_file(k, 0)).stat().st_size for k in KINDS)
    kw = {"layers": [2], "d_model": D, "dtype": "float32", "settings": {"tokens": 10**6}}
    with pytest.raises(CacheError, match="more than the whole --disk-budget"):
        writer = CacheWriter(cache, **kw, metadata={}, resume=True, disk_budget=shard_bytes // 2)
        writer.write_shard({2: np.zeros((40, D), np.float32)}, np.zeros(40), np.arange(40), 1)
    writer = CacheWriter(cache, **kw, metadata={}, resume=True, disk_budget=6 * shard_bytes)
    writer.poll_s = 0.01
    write_json_atomic(cache / RELEASE, {"released_below": 3, "pinned": [0], "step": 9})
    writer.write_shard({2: np.zeros((40, D), np.float32)}, np.zeros(40), np.arange(40), 1)
    manifest = json.loads((cache / MANIFEST).read_text())
    # 4 shards and a 5th fit: nothing is deleted before room is needed
    assert not any(s.get("deleted") for s in manifest["shards"])
    writer.write_shard({2: np.zeros((40, D), np.float32)}, np.zeros(40), np.arange(40), 1)
    manifest = json.loads((cache / MANIFEST).read_text())
    assert [bool(s.get("deleted")) for s in manifest["shards"]] == [False, True, True] + [False] * 3
    assert not (cache / shard_file("L2", 1)).exists()
    # a kill between the manifest's mark and the unlink: resume deletes the files
    (cache / shard_file("L2", 1)).write_bytes(b"left over")
    CacheWriter(cache, **kw, metadata={}, resume=True)
    assert not (cache / shard_file("L2", 1)).exists()
    with pytest.raises(CacheError, match="streamed under a disk budget"):
        ActivationCache(cache)


def test_a_producer_needs_its_cache_folder():
    with pytest.raises(StreamError, match="pass --out DIR"):
        start_producer(["--model", "m", "--disk-budget", "1G"])


def test_parse_size():
    assert parse_size("40G") == 40 * 2**30 and parse_size("512M") == 512 * 2**20
    assert parse_size("1.5t") == int(1.5 * 2**40) and parse_size("40GiB") == parse_size("40GB")
    assert parse_size("1000") == 1000
    for bad in ("G", "-1G", "lots"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)


# --------------------------------------------------------------------------- the tiny model


@dataclasses.dataclass
class Reference:
    args: list[str]  # extractor arguments but --out
    cache: Path  # the complete, unbudgeted cache of those arguments
    steps: int
    hashes: list[str]  # of every batch of the stand-in trainer
    run: Path
    budget: int


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_corpus, tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("stream")
    settings = {"layers": (2,), "tokens": 20_000, "ctx_len": 64, "batch_size": 4}
    settings |= {"shard_tokens": 300}
    cache = extract(
        ExtractConfig(
            model=str(tiny_model_dir), dataset=(str(tiny_corpus),), out=root / "complete",
            progress=False, **settings,
        )
    )  # fmt: skip
    args = ["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--layers", "2"]
    for key in ("tokens", "ctx_len", "batch_size", "shard_tokens"):
        args += [f"--{key.replace('_', '-')}", str(settings[key])]
    loader = consumer.open_stream(cache)
    steps = loader.n_train // consumer.BATCH
    (root / "run").mkdir()
    hashes = consumer.train(cache, root / "run", steps)
    # pinned shards, the window, the shard being read ahead and the one being written, and one
    # for the steps between checkpoints
    biggest = max(
        sum((cache / shard_file(kind, i)).stat().st_size for kind in KINDS)
        for i in range(len(ActivationCache(cache).shard_sizes))
    )
    budget = (loader.first_train + 1 + consumer.WINDOW + 3) * biggest
    return Reference(args, cache, steps, hashes, root / "run", budget)


def shard_bytes_on_disk(cache: Path) -> int:
    total = 0
    for kind in KINDS:
        for entry in os.scandir(cache / kind) if (cache / kind).exists() else ():
            with contextlib.suppress(FileNotFoundError):  # deleted since the listing
                total += entry.stat().st_size
    return total


def assert_same_run(cache: Path, run: Path, reference: Reference) -> None:
    """The streamed cache lists the reference's shards (same activations), and the stand-in
    trainer ended with the same weights and read the same shards."""
    ours, theirs = (json.loads((c / MANIFEST).read_text()) for c in (cache, reference.cache))
    for shard in ours["shards"]:
        shard.pop("deleted", None)
    for key in ("shards", "stats", "n_tokens", "n_sequences", "complete"):
        assert ours[key] == theirs[key], key
    final, expected = np.load(run / consumer.FINAL), np.load(reference.run / consumer.FINAL)
    for key in ("w", "heldout"):
        np.testing.assert_array_equal(final[key], expected[key], err_msg=key)
    seen, expected_seen = (
        json.loads((r / "shards_seen.json").read_text()) for r in (run, reference.run)
    )
    assert seen | {"cache": None} == expected_seen | {"cache": None}


@pytest.mark.slow
def test_budgeted_stream_stays_in_budget_and_trains_as_a_complete_cache(reference, tmp_path):
    cache, run = tmp_path / "stream", tmp_path / "run"
    run.mkdir()
    peak, done = [0], threading.Event()

    def watch_disk() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], shard_bytes_on_disk(cache))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch_disk)
    watcher.start()
    with start_producer(
        [*reference.args, "--out", str(cache), "--disk-budget", str(reference.budget)]
    ) as producer:
        try:
            hashes = consumer.train(cache, run, reference.steps, producer=producer)
        finally:
            done.set()
            watcher.join()
        assert producer.process.wait(60) == 0, producer.last_line()
    assert 0 < peak[0] <= reference.budget
    assert hashes == reference.hashes  # the same batches, one by one
    assert_same_run(cache, run, reference)
    manifest = json.loads((cache / MANIFEST).read_text())
    deleted = [bool(s.get("deleted")) for s in manifest["shards"]]
    assert sum(deleted) > len(deleted) // 2 and not any(deleted[:3])  # pinned: 2 held out, 1
    assert "deleted after training read them" in producer.last_line()


@pytest.mark.slow
def test_sigkill_both_sides_at_random_moments_then_resume(reference, tmp_path):
    seed = secrets.randbelow(2**32)
    print(f"kill moments drawn with seed {seed}")  # shown when the test fails
    rng = np.random.default_rng(seed)
    cache, run = tmp_path / "stream", tmp_path / "run"
    run.mkdir()
    args = [*reference.args, "--out", str(cache), "--disk-budget", str(reference.budget)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start_trainer() -> subprocess.Popen:
        argv = [
            sys.executable,
            "tests/stream_consumer.py",
            str(cache),
            str(run),
            str(reference.steps),
        ]
        with open(run / "trainer.log", "ab") as log:
            return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=log)

    def listed() -> int:
        try:
            return len(json.loads((cache / MANIFEST).read_text())["shards"])
        except (OSError, json.JSONDecodeError):
            return 0

    def checkpoint() -> int:
        try:
            return int(np.load(run / consumer.CHECKPOINT)["step"])
        except (OSError, ValueError, KeyError):
            return 0

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 90
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what} (seed {seed})"
            time.sleep(0.002)

    def kill(process: subprocess.Popen, what: str) -> None:
        time.sleep(rng.uniform(0, 0.03))
        assert process.poll() is None, f"{what} ended before its kill (seed {seed})"
        process.send_signal(signal.SIGKILL)
        process.wait()

    total = len(json.loads((reference.cache / MANIFEST).read_text())["shards"])
    # 1: the trainer dies mid-run; the extractor runs on until the budget stops it, and dies
    producer, trainer = start_producer(args), start_trainer()
    step = int(rng.integers(8, reference.steps // 3))
    wait_for(lambda: checkpoint() >= step or trainer.poll() is not None, f"step {step}")
    kill(trainer, "trainer")
    wait_for(lambda: (cache / PRODUCER_WAIT).exists(), "the extractor to wait for room")
    time.sleep(rng.uniform(0, 0.3))
    kill(producer.process, "extractor")
    # 2: both resume; the extractor dies after a few more shards, then the trainer
    producer, trainer = start_producer(args), start_trainer()
    shards = min(listed() + int(rng.integers(1, 5)), total - 1)
    wait_for(lambda: listed() >= shards or producer.process.poll() is not None, f"shard {shards}")
    kill(producer.process, "extractor")
    time.sleep(rng.uniform(0.05, 0.5))
    kill(trainer, "trainer")
    # 3: both resume and finish
    producer, trainer = start_producer(args), start_trainer()
    assert trainer.wait(120) == 0, (run / "trainer.log").read_text()[-2000:]
    assert producer.process.wait(60) == 0, producer.last_line()
    assert_same_run(cache, run, reference)


@pytest.mark.slow
def test_extractor_failure_ends_the_wait_in_one_line(tiny_model_dir, tiny_corpus, tmp_path):
    args = ["--model", str(tiny_model_dir), "--dataset", str(tiny_corpus), "--layers", "99"]
    producer = start_producer([*args, "--out", str(tmp_path / "c"), "--disk-budget", "1M"])
    errors = []

    def open_stream() -> None:  # on a thread: without the check it would wait forever
        try:
            StreamCache(tmp_path / "c", producer, poll_s=0.02)
        except StreamError as error:
            errors.append(str(error))

    with producer:
        waiting = threading.Thread(target=open_stream, daemon=True)
        waiting.start()
        waiting.join(90)
    assert errors, "the wait went on after the extractor had stopped"
    assert "stopped (exit status 2): error: layer 99 does not exist" in errors[0]
    assert "\n" not in errors[0]


@pytest.mark.slow
def test_extractor_exits_with_the_trainer_that_started_it(reference, tmp_path):
    cache = tmp_path / "c"
    args = [*reference.args, "--out", str(cache), "--disk-budget", str(reference.budget)]
    trainer = subprocess.Popen(
        [sys.executable, "-c", f"from jax_sae.data.stream import start_producer as s; "
         f"print(s({args!r}).process.pid, flush=True); import time; time.sleep(300)"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pid = int(trainer.stdout.readline())
        deadline = time.monotonic() + 90
        while not (cache / PRODUCER_WAIT).exists():  # blocked: no trainer releases shards
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        trainer.kill()
        trainer.wait()
    deadline = time.monotonic() + 10
    while running(pid):
        assert time.monotonic() < deadline, "the extractor outlived the trainer that started it"
        time.sleep(0.02)


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for a reaper that may not come)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_streamed_cache_deleted_mid_run_is_one_line(tmp_path):
    """rm -rf of the cache while a run streams it: the next read or release names the deletion."""
    cache = write_stream(tmp_path / "c", [[16, 16], [16, 16]], complete=False)
    stream = StreamCache(cache, poll_s=0.01)
    stream.wait_for_shards(1)
    shutil.rmtree(cache)
    with pytest.raises(StreamError, match="was deleted while this run read it"):
        stream.wait_for_shards(5)
    with pytest.raises(StreamError, match="was deleted while this run read it"):
        stream.shard("L2", 1)
    with pytest.raises(StreamError, match="was deleted while this run read it"):
        stream.release(1, [], step=10)
