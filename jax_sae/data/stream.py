"""Streaming: train on more tokens than the disk holds (docs/scaling.md, "Streaming").

The extractor (the producer: ``python -m extract --disk-budget 40G``, started by
``start_producer``) writes shards into a bounded cache while the trainer (the consumer: a
``StreamingLoader`` over a ``StreamCache``) reads them. After each checkpoint the trainer releases
the shards no step from there on reads (``release_before``); the extractor, the only writer of the
cache, deletes released shards when the next shard would not fit in the budget, and keeps them
listed in the manifest, marked deleted.

The token order is a pure function of the seed, the window ``W`` and the shard sizes, so a stream
and a complete cache of the same extraction give the same batches, however the two sides are timed:

* held out: the first shards, as many as hold ``eval_tokens`` tokens;
* training shard ``t`` (counted from the first shard after those) is cut into ``W`` random pieces
  (seeded by ``(seed, t)``); phase ``j`` is the union of piece ``j - t`` of each training shard
  ``t`` in ``(j - W, j]``, visited in a random order (seeded by ``(seed, j)``);
* the phases follow one another and batches of ``batch_size`` tokens are cut from them (a batch
  may span two phases), so batch ``s`` starts at token ``s * batch_size`` of the stream.

Every training token is visited once, each phase mixes ``W`` consecutive shards, and training
shard ``t`` is read last by phase ``t + W - 1``. The held-out shards and the first training shard
are pinned (never deleted): evaluation, ``sample`` and ``StreamCache.layer_stats`` read them, so a
resumed trainer initialises and evaluates exactly as the first one did.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jax_sae.data.cache import (
    MANIFEST,
    PRODUCER_OPEN,
    PRODUCER_WAIT,
    STORAGE_DTYPES,
    CacheError,
    ShardedArray,
    check_layer,
    layer_kind,
    open_shard,
    read_manifest,
    read_release,
    shard_file,
    verify_shard,
    write_release,
)
from jax_sae.data.loader import Prefetcher, cut_batches, device_batches, finish_batch
from jax_sae.data.source import (
    BatchSpec,
    LoaderError,
    SourceDescription,
    batch_spec,
    settings_sha256,
)
from jax_sae.util.disk import human_bytes

DEFAULT_WINDOW = 4
ANNOUNCE_AFTER_S = 2.0  # a training loop waiting this long for a shard is told why...
ANNOUNCE_EVERY_S = 60.0  # ...at most this often (extraction is often the slower side)
LOG = "extract.log"  # the producer's output, in the cache folder
_REPO = Path(__file__).resolve().parents[1]


class StreamError(LoaderError):
    """The stream cannot deliver what the trainer needs; the message is one line naming why."""


# ------------------------------------------------------------------------------------ producer


@dataclasses.dataclass
class Producer:
    """An extractor process writing a streamed cache (see ``start_producer``)."""

    process: subprocess.Popen
    cache: Path
    log: Path
    log_offset: int  # where this process's output starts in the log

    def last_line(self) -> str:
        """The last line this process printed (its ``error:`` line when it failed)."""
        with open(self.log, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(self.log_offset, end - 4096))
            text = f.read().decode(errors="replace")
        lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
        return lines[-1] if lines else "(no output)"

    def stopped(self) -> str | None:
        """One line saying how the extractor ended, or None while it runs."""
        code = self.process.poll()
        if code is None:
            return None
        how = f"exit status {code}" if code >= 0 else f"killed by signal {-code}"
        return f"the extractor writing {self.cache} stopped ({how}): {self.last_line()}"

    def wait_until_open(self, poll_s: float = 0.2, report_every_s: float = 10.0) -> None:
        """Return once the extractor has accepted the cache (its settings match a cache already
        there, or it started a new one); raise StreamError, in one line, when it stopped instead.

        Without this a refused extractor (a complete cache made with other settings) would go
        unnoticed: the trainer would train on the old cache and record settings it never used.
        """
        marker = self.cache / PRODUCER_OPEN
        started = time.monotonic()
        next_report = started + report_every_s
        while True:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(marker.read_text()).get("pid") == self.process.pid:
                    return
            if (how := self.stopped()) is not None:
                if self.process.returncode == 0:
                    return
                raise StreamError(f"{how}; training did not start")
            if time.monotonic() >= next_report:
                waited = time.monotonic() - started
                print(
                    f"waiting for the extractor to open {self.cache} ({waited:.0f} s)",
                    file=sys.stderr,
                )
                next_report += report_every_s
            time.sleep(poll_s)

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the extractor (SIGTERM, then SIGKILL): every write it makes is atomic, so a later
        ``start_producer`` with the same arguments continues at the exact next token."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_producer(extract_args: Sequence[str], python: str = sys.executable) -> Producer:
    """Start ``python -m extract EXTRACT_ARGS --resume --quiet`` writing the cache ``--out``.

    Pass ``--disk-budget`` among the arguments to bound the cache. The extractor's output is
    appended to ``<out>/extract.log``; it exits when this process exits (``--parent-pid``, Linux),
    so call this from the thread that lives as long as the trainer (the main thread).
    """
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--out", type=Path)
    out = parser.parse_known_args(list(extract_args))[0].out
    if out is None:
        raise StreamError("streaming needs the cache folder: pass --out DIR to the extractor")
    out.mkdir(parents=True, exist_ok=True)
    log = out / LOG
    command = [python, "-m", "extract", *extract_args, "--resume", "--quiet"]
    command += ["--parent-pid", str(os.getpid())]
    paths = [str(_REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}
    with open(log, "ab") as output:
        offset = output.tell()
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env
        )
    return Producer(process, out, log, offset)


# ----------------------------------------------------------------------------------- the cache


class StreamCache:
    """The trainer's view of a cache that an extractor may still be writing and deleting from.

    It follows the manifest as it grows (``wait_for_shards``) and opens each shard file when it
    is first needed, checking it (CRC32, NaN/inf) as ``ActivationCache`` does. A wait ends in a
    one-line StreamError, not a hang, when the ``producer`` it was given stopped, or when the
    extractor waits for room that only this trainer can make while the training loop waits for
    data (``trainer_waiting_since``, set by ``StreamingLoader.batches``) for ``deadlock_s``. A
    training loop that waits says so on stderr (``waiting for extractor: shard N of PATH``).

    Offers what a trainer reads from ``ActivationCache``: ``path``, ``manifest`` (the latest read),
    ``layers``, ``d_model``, ``dtype``, ``complete`` and ``layer_stats``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        producer: Producer | None = None,
        *,
        poll_s: float = 0.5,
        deadlock_s: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.producer = producer
        self.poll_s = poll_s
        self.deadlock_s = deadlock_s
        self.trainer_waiting_since: float | None = time.monotonic()
        release = read_release(self.path)
        self.released_below: int | None = release["released_below"] if release else None
        self._lock = threading.Lock()  # the shard maps
        self._manifest_lock = threading.Lock()
        self._manifest: dict | None = None
        self._maps: dict[tuple[str, int], np.ndarray] = {}
        self._checked: set[tuple[str, int]] = set()
        self._stats: dict[int, dict] = {}
        self._announced_at = -ANNOUNCE_EVERY_S
        try:
            self.wait_for_shards(1)
        finally:
            self.trainer_waiting_since = None
        self.layers: list[int] = list(self.manifest["layers"])
        self.d_model: int = int(self.manifest["d_model"])
        self.dtype = STORAGE_DTYPES[self.manifest["dtype"]]

    @property
    def manifest(self) -> dict:
        """The most advanced manifest read so far, whichever thread read it."""
        assert self._manifest is not None  # __init__ waits for the first one (or raises)
        return self._manifest

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def _keep(self, manifest: dict) -> None:
        """Keep ``manifest`` unless a thread already kept a later one: a manifest only grows
        (shards are appended, then marked deleted, and the cache is marked complete)."""
        with self._manifest_lock:
            if self._manifest is None or _progress(manifest) >= _progress(self._manifest):
                self._manifest = manifest

    def wait_for_shards(self, count: int, cancel: threading.Event | None = None) -> dict:
        """The manifest, once it lists ``count`` shards or the extraction is complete."""
        while True:
            stopped = self.producer.stopped() if self.producer else None  # before the read
            if self._manifest is not None:
                self._check_still_there()
            manifest = read_manifest(self.path) if (self.path / MANIFEST).exists() else None
            if manifest and (len(manifest["shards"]) >= count or manifest.get("complete")):
                self._keep(manifest)
                return manifest
            if stopped:
                raise StreamError(stopped)
            listed = len(manifest["shards"]) if manifest else 0
            self._check_deadlock(listed)
            self._announce(count - 1)
            if cancel is None:
                time.sleep(self.poll_s)
            elif cancel.wait(self.poll_s):
                raise StreamError(f"stopped waiting for shard {count - 1} of {self.path}")

    def _announce(self, shard: int) -> None:
        since, now = self.trainer_waiting_since, time.monotonic()
        if since is None or now - since < ANNOUNCE_AFTER_S:
            return
        if now - self._announced_at >= ANNOUNCE_EVERY_S:
            tqdm.write(f"waiting for extractor: shard {shard} of {self.path}", sys.stderr)
            self._announced_at = now

    def _check_deadlock(self, listed: int) -> None:
        """StreamError when the extractor, having read this trainer's latest release, still has
        no room for the shard the training loop has waited on for ``deadlock_s``."""
        since = self.trainer_waiting_since
        if since is None or time.monotonic() - since < self.deadlock_s:
            return
        try:
            wait = json.loads((self.path / PRODUCER_WAIT).read_text())
        except FileNotFoundError:
            return
        if wait["shard"] != listed or wait["released_below"] != self.released_below:
            return
        raise StreamError(
            f"the extractor and the trainer wait on each other: shard {listed} does not fit in "
            f"the disk budget ({human_bytes(wait['on_disk'])} of {human_bytes(wait['budget'])} "
            "hold shards the trainer still needs, and it releases shards only at checkpoints); "
            "raise --disk-budget or checkpoint more often"
        )

    def shard(self, kind: str, index: int) -> np.ndarray:
        """One file of a listed shard, memory-mapped; checked on first use in this process."""
        with self._lock:
            array = self._maps.get((kind, index))
            if array is None:
                array = self._open(kind, index)
                self._maps[(kind, index)] = array
            return array

    def _open(self, kind: str, index: int) -> np.ndarray:
        entry = self.manifest["shards"][index]
        layer = kind.startswith("L")
        row_shape, dtype = ((self.d_model,), self.dtype) if layer else ((), np.dtype(np.int32))
        if entry.get("deleted"):
            raise StreamError(self._deleted(index))
        try:
            array = open_shard(self.path, kind, entry, row_shape, dtype)
        except CacheError:
            self._check_still_there()
            if read_manifest(self.path)["shards"][index].get("deleted"):  # deleted since read
                raise StreamError(self._deleted(index)) from None
            raise
        if (kind, index) not in self._checked:
            first_row = sum(s["n_tokens"] for s in self.manifest["shards"][:index])
            verify_shard(
                self.path / shard_file(kind, index), array, entry["crc32"].get(kind), first_row
            )
            self._checked.add((kind, index))
        return array

    def _check_still_there(self) -> None:
        """StreamError when the cache folder or its manifest went away under a running stream
        (someone deleted it): every later read would fail with a less helpful message."""
        if not (self.path / MANIFEST).is_file():
            raise StreamError(
                f"the streamed cache {self.path} was deleted while this run read it; stream "
                "into a new --cache (--resume continues the run from its last checkpoint only "
                "with the same cache)"
            )

    def _deleted(self, index: int) -> str:
        release = read_release(self.path)
        step = f" at step {release['step']}" if release else ""
        return (
            f"shard {index} of {self.path} was deleted: a trainer released it{step} and this run "
            "still reads it; resume from the latest checkpoint, or stream into a new --out"
        )

    def forget(self, below: int) -> None:
        """Unmap the shards with an index below ``below`` (the disk space of a deleted file is
        freed only when no process maps it); a later ``shard`` call maps them again."""
        with self._lock:
            for key in [key for key in self._maps if key[1] < below]:
                del self._maps[key]

    def layer_stats(self, layer: int) -> dict:
        """Mean activation and mean squared norm of a layer over the cache's first shard.

        The manifest's running totals grow while a stream is written, so an input scale taken
        from them would depend on timing; the first shard is pinned and the same for every run.
        """
        check_layer(self.path, self.layers, layer)
        if layer not in self._stats:
            acts = self.shard(layer_kind(layer), 0)
            total, sum_sq_norm = np.zeros(self.d_model), 0.0
            for start in range(0, len(acts), 8192):
                block = np.asarray(acts[start : start + 8192], np.float32)
                total += block.sum(0, dtype=np.float64)
                sum_sq_norm += float(np.einsum("ij,ij->i", block, block).sum(dtype=np.float64))
            mean = (total / len(acts)).astype(np.float32)
            self._stats[layer] = {"mean": mean, "mean_sq_norm": sum_sq_norm / len(acts)}
        return self._stats[layer]

    def release(self, released_below: int, pinned: Sequence[int], step: int) -> None:
        """Let the extractor delete the shards below ``released_below`` but ``pinned``."""
        self._check_still_there()
        write_release(self.path, released_below, pinned, step)
        self.released_below = released_below


def _progress(manifest: dict) -> tuple[int, int, bool]:
    shards = manifest["shards"]
    return len(shards), sum(bool(s.get("deleted")) for s in shards), bool(manifest.get("complete"))


# ---------------------------------------------------------------------------- the token order


@dataclasses.dataclass(frozen=True)
class StreamOrder:
    """Which rows of which training shards each phase visits, and in what order (module
    docstring); pure functions of the seed, the window and the shard sizes."""

    seed: int
    window: int

    def piece_bounds(self, sizes: Sequence[int]) -> np.ndarray:
        """``[shards, W + 1]``: where each shard's pieces start in its random row order."""
        n = np.asarray(sizes, np.int64).reshape(-1, 1)
        return n * np.arange(self.window + 1) // self.window

    def phase_sizes(self, sizes: Sequence[int], ended: bool) -> np.ndarray:
        """Tokens of each phase the training shards of ``sizes`` define: the phases up to the last
        shard's, and those after it too once the stream has ``ended``."""
        pieces = np.diff(self.piece_bounds(sizes), axis=1)
        out = np.zeros(len(sizes) + self.window - 1, np.int64)
        shard, piece = np.indices(pieces.shape)
        np.add.at(out, (shard + piece).ravel(), pieces.ravel())
        return out if ended else out[: len(sizes)]

    def piece(self, t: int, n_tokens: int, k: int) -> np.ndarray:
        """Rows (ascending) of training shard ``t`` that phase ``t + k`` visits."""
        rows = np.random.default_rng([self.seed, 0, t]).permutation(n_tokens)
        lo, hi = self.piece_bounds([n_tokens])[0, k : k + 2]
        return np.sort(rows[lo:hi])

    def visit_order(self, phase: int, size: int) -> np.ndarray:
        """The order in which a phase visits its rows (pieces concatenated by shard)."""
        return np.random.default_rng([self.seed, 1, phase]).permutation(size)

    def released(self, sizes: Sequence[int], ended: bool, position: int) -> int:
        """How many leading training shards no stream position from ``position`` on reads."""
        ends = np.cumsum(self.phase_sizes(sizes, ended))
        done = int(np.searchsorted(ends, position, side="right"))  # phases ending by position
        return min(max(done - self.window + 1, 0), len(sizes))


class _PhaseBuffer:
    """One phase's rows in storage dtype, and the order it visits them in."""

    def __init__(self, parts: list[dict[str, np.ndarray]], order: np.ndarray) -> None:
        self.rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        self.order = order
        self.size = len(order)

    def take(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        index = self.order[lo:hi]
        return {key: rows[index] for key, rows in self.rows.items()}


# ---------------------------------------------------------------------------------- the loader


class StreamingLoader:
    """Training batches of one layer of a stream, in the order of the module docstring.

    A ``BatchSource`` read once: ``release_before``, called after each checkpoint, lets the
    extractor delete the shards no later step reads, and ``record`` says which shards a run read.
    Waits for shards not written yet; raises StreamError when the stream cannot deliver (see
    ``StreamCache``).
    """

    single_pass = True
    releases_data = True

    def __init__(
        self,
        cache: StreamCache,
        layer: int,
        spec: BatchSpec | None = None,
        *,
        window: int = DEFAULT_WINDOW,
        eval_tokens: int = 0,
        **batch_settings: Any,
    ) -> None:
        """``spec``, or its fields as keywords (``batch_size=64, seed=1``); the first shards,
        as many as hold ``eval_tokens`` tokens, are held out."""
        spec = batch_spec(spec, batch_settings)
        batch_size = spec.batch_size
        if batch_size <= 0 or window <= 0 or spec.seed < 0 or eval_tokens < 0:
            raise LoaderError("batch size and window must be > 0, seed and eval tokens >= 0")
        if spec.rows is not None:
            raise StreamError("--stream runs in one process; multi-host training needs a cache")
        check_layer(cache.path, cache.layers, layer)
        self.spec = spec
        self.cache = cache
        self.layer = layer
        self.order = StreamOrder(spec.seed, window)
        self.eval_tokens = eval_tokens
        self._kind = layer_kind(layer)
        cache.trainer_waiting_since = time.monotonic()
        try:
            self.first_train = self._count_heldout_shards(eval_tokens)
            shards = cache.wait_for_shards(self.first_train + 1)["shards"]
        finally:
            cache.trainer_waiting_since = None
        if len(shards) <= self.first_train:
            raise StreamError(
                f"stream {cache.path} ended with its held-out shards; lower --eval-tokens or "
                "extract more tokens"
            )
        self.pinned = list(range(self.first_train + 1))
        self.heldout_tokens = sum(s["n_tokens"] for s in shards[: self.first_train])
        if self.n_train < batch_size:
            raise LoaderError(
                f"only {self.n_train} training tokens in stream {cache.path} for batch size "
                f"{batch_size}; lower --batch-size or --eval-tokens, or extract more tokens"
            )

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def d_model(self) -> int:
        return self.cache.d_model

    def describe(self) -> SourceDescription:
        manifest = self.cache.manifest
        return SourceDescription.of_manifest(self.cache.path, manifest, settings_sha256(manifest))

    def mean_sq_norm(self) -> float:
        """Over the first shard, pinned: the same for every run and after a resume."""
        return self.cache.layer_stats(self.layer)["mean_sq_norm"]

    def _count_heldout_shards(self, eval_tokens: int) -> int:
        """How many leading shards hold ``eval_tokens`` tokens (waiting for them)."""
        count, tokens = 0, 0
        while tokens < eval_tokens:
            shards = self.cache.wait_for_shards(count + 1)["shards"]
            if len(shards) == count:
                raise StreamError(
                    f"--eval-tokens {eval_tokens} is more than stream {self.cache.path} holds "
                    f"({tokens} tokens); lower it or extract more tokens"
                )
            tokens += shards[count]["n_tokens"]
            count += 1
        return count

    def _train_sizes(self, manifest: dict) -> list[int]:
        return [s["n_tokens"] for s in manifest["shards"][self.first_train :]]

    @property
    def n_train(self) -> int:
        """Training tokens of the stream: as planned (the extractor's ``--tokens``) while it is
        written, as written once complete (less if the dataset ran out)."""
        manifest = self.cache.manifest
        planned = manifest["settings"].get("tokens")
        if not manifest.get("complete") and not isinstance(planned, int):
            raise StreamError(f"{self.cache.path} gives no planned token count (settings.tokens)")
        return (manifest["n_tokens"] if manifest.get("complete") else planned) - self.heldout_tokens

    def release_before(self, step: int) -> None:
        """Release the shards no step from ``step`` on reads, for the extractor to delete.

        Call it only once the checkpoint of ``step`` is durable (committed), never with a step
        later than the last checkpoint: a killed run resumes there and reads on from it.
        """
        manifest = self.cache.manifest
        sizes, ended = self._train_sizes(manifest), bool(manifest.get("complete"))
        released = self.order.released(sizes, ended, step * self.batch_size)
        self.cache.release(self.first_train + released, self.pinned, step)

    def record(self, step: int) -> dict:
        """What batches ``[0, step)`` and evaluation read: the shards with their token counts and
        checksums, and the order's parameters (for the run folder)."""
        manifest = self.cache.manifest
        shards, sizes = manifest["shards"], self._train_sizes(manifest)
        ends = np.cumsum(self.order.phase_sizes(sizes, bool(manifest.get("complete"))))
        last_phase = int(np.searchsorted(ends, step * self.batch_size - 1, side="right"))
        read = min(last_phase + 1, len(sizes)) if step else 0

        def entry(shard: dict) -> dict:
            return {key: shard[key] for key in ("index", "n_tokens", "crc32")}

        return {
            "cache": str(self.cache.path),
            "layer": self.layer,
            "seed": self.order.seed,
            "window": self.order.window,
            "batch_size": self.batch_size,
            "steps": step,
            "heldout_shards": [entry(s) for s in shards[: self.first_train]],
            "train_shards": [entry(s) for s in shards[self.first_train :][:read]],
        }

    def _locate(self, position: int, cancel: threading.Event | None) -> tuple[int, int]:
        """The phase holding stream position ``position``, and the offset in it."""
        count = self.first_train + 1
        while True:
            manifest = self.cache.wait_for_shards(count, cancel)
            ended = bool(manifest.get("complete"))
            ends = np.cumsum(self.order.phase_sizes(self._train_sizes(manifest), ended))
            if ended or ends[-1] > position:
                phase = int(np.searchsorted(ends, position, side="right"))
                return phase, position - (int(ends[phase - 1]) if phase else 0)
            count = len(manifest["shards"]) + 1

    def _read_piece(self, t: int, n_tokens: int, k: int) -> dict[str, np.ndarray]:
        index = self.first_train + t
        rows = self.order.piece(t, n_tokens, k)
        acts = self.cache.shard(self._kind, index)
        part = {"x": acts[rows]}
        if self.spec.temporal:
            positions = self.cache.shard("positions", index)
            prev = np.maximum(rows - 1, 0)
            part["x_prev"] = acts[prev]
            part["seq_start"] = (rows == 0) | (positions[rows] != positions[prev] + 1)
        return part

    def _load_phase(self, phase: int, cancel: threading.Event | None) -> _PhaseBuffer | None:
        """Read one phase (waiting for its shards); None after the last phase of the stream."""
        manifest = self.cache.wait_for_shards(self.first_train + phase + 1, cancel)
        sizes, window = self._train_sizes(manifest), self.order.window
        if phase >= len(self.order.phase_sizes(sizes, bool(manifest.get("complete")))):
            return None
        shards = range(max(phase - window + 1, 0), min(phase, len(sizes) - 1) + 1)
        parts = [self._read_piece(t, sizes[t], phase - t) for t in shards]
        self.cache.forget(self.first_train + phase - window + 2)  # no later phase reads those
        return _PhaseBuffer(parts, self.order.visit_order(phase, sum(len(p["x"]) for p in parts)))

    def _phase_runs(
        self, position: int, cancel: threading.Event | None
    ) -> Iterator[tuple[_PhaseBuffer, int, int]]:
        """``(phase, lo, hi)`` from a stream position on; the next phase is read on a helper
        thread while this one is served."""
        phase, offset = self._locate(position, cancel)
        with ThreadPoolExecutor(1, thread_name_prefix="phase-read") as reader:
            pending = reader.submit(self._load_phase, phase, cancel)
            for following in itertools.count(phase + 1):
                buffer = pending.result()
                if buffer is None:
                    return
                pending = reader.submit(self._load_phase, following, cancel)
                yield buffer, offset, buffer.size
                del buffer  # two phases in memory at most
                offset = 0

    def storage_batches(
        self, start_step: int = 0, cancel: threading.Event | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches in the storage dtype (``seq_start`` bool) from a step to the stream's end.

        Setting ``cancel`` ends a wait for shards (with a StreamError); without it, closing the
        iterator early waits for the phase being read.
        """
        return cut_batches(self._phase_runs(start_step * self.batch_size, cancel), self.batch_size)

    def host_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Float32 numpy batches from ``start_step`` to the stream's end."""
        return (finish_batch(b, self.spec.scale) for b in self.storage_batches(start_step))

    def batches(
        self,
        start_step: int = 0,
        stop_step: int | None = None,
        convert_on_device: bool | None = None,
    ) -> TrainerBatches:
        """Device batches for steps ``[start_step, stop_step)``, read and put on threads, as
        ``Loader.batches``; a StreamError when the stream ends before ``stop_step``."""
        cancel = threading.Event()
        source = self.storage_batches(start_step, cancel)
        if stop_step is not None:
            source = self._until(source, start_step, stop_step)
        spec = self.spec
        prefetcher = device_batches(
            source, spec.scale, spec.sharding, spec.prefetch, convert_on_device
        )
        return TrainerBatches(prefetcher, self.cache, cancel)

    def _until(
        self, source: Iterator[dict[str, np.ndarray]], start: int, stop: int
    ) -> Iterator[dict[str, np.ndarray]]:
        for step in range(start, stop):
            batch = next(source, None)
            if batch is None:
                raise StreamError(
                    f"stream {self.cache.path} ended after {self.n_train} training tokens, before "
                    f"step {step}; extract more tokens (--tokens) or train fewer steps"
                )
            yield batch

    def sample(self, n_tokens: int, windows: int = 16) -> np.ndarray:
        """About ``n_tokens`` scaled rows of the first training shard (pinned) from ``windows``
        evenly spaced contiguous windows: deterministic, and there after a resume."""
        acts = self.cache.shard(self._kind, self.first_train)
        per_window = max(min(n_tokens, len(acts)) // windows, 1)
        starts = np.linspace(0, len(acts) - per_window, windows).astype(int)
        rows = np.concatenate([acts[a : a + per_window] for a in starts])
        return finish_batch({"x": rows}, self.spec.scale)["x"]

    def heldout(self, batch_size: int) -> Iterator[np.ndarray]:
        """The held-out shards in cache order as raw float32 rows (no input scale), in batches."""
        rows = ShardedArray(
            [self.cache.shard(self._kind, i) for i in range(self.first_train)], np.float32
        )
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]


class TrainerBatches:
    """What ``StreamingLoader.batches`` returns: an iterator (and ``with`` block) of device
    batches that tells the cache while the training loop waits on it, the one state in which
    the two sides can deadlock, and that stops any wait for shards when closed."""

    def __init__(self, batches: Prefetcher, cache: StreamCache, cancel: threading.Event) -> None:
        self._batches = batches
        self._cache = cache
        self._cancel = cancel

    def __iter__(self) -> TrainerBatches:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._cache.trainer_waiting_since = time.monotonic()
        try:
            return next(self._batches)
        finally:
            self._cache.trainer_waiting_since = None

    def close(self) -> None:
        self._cancel.set()
        self._batches.close()

    def __enter__(self) -> TrainerBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
