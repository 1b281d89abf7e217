"""Training batches from an activation cache.

The token order is a pure function of ``(seed, epoch, position)``:

* the training part of the cache (everything before the held-out tail) is cut into chunks of
  ``chunk_tokens`` consecutive tokens that never cross a shard, so each chunk is one contiguous
  read from one memory map;
* every epoch visits the chunks in a fresh random order, ``buffer_chunks`` at a time; the tokens
  of those chunks form one host buffer and are visited in a random permutation of the buffer;
* the stream of epochs is cut into batches of ``batch_size`` tokens (a batch may span two buffers
  or two epochs), so batch ``s`` starts at token position ``s * batch_size`` of the stream.

Resuming at step ``s`` therefore only locates that position and reads the one buffer it falls in:
nothing before it is replayed. Every training token is visited exactly once per epoch, and the
held-out tail is never part of any chunk.

Several processes (``jax_sae.parallel.distributed``) share each batch: every process follows the
same plan, and a loader given ``rows`` gathers, converts and transfers only those rows of every
batch,
which become its part of one global array. Its host buffers still hold whole chunks, the same on
every process: a batch's rows are spread over the whole buffer, and whole chunks keep the disk
reads contiguous. So every process reads the whole training part of the cache from disk; the
gathering, conversion and host-to-device transfer are split between the processes.

For the ``temporal`` variant each chunk read starts one row early, so every token's predecessor
comes from the same contiguous read; ``x_prev`` is that row (zero where ``seq_start``: the token
has no predecessor in its sequence). Batches are still mixed across the whole buffer.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jax_sae.data.cache import MANIFEST, ActivationCache, ShardedArray
from jax_sae.data.source import (
    BatchSpec,
    LoaderError,
    SourceDescription,
    batch_spec,
    file_sha256,
)
from jax_sae.parallel.distributed import global_batch

DEFAULT_CHUNK_TOKENS = 32_768
DEFAULT_BUFFER_CHUNKS = 8


def finish_batch(batch: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """On the host: storage dtype -> float32, input scale, zero predecessors at starts."""
    for key in ("x", "x_prev"):
        if key in batch:
            values = batch[key].astype(np.float32)
            if scale != 1.0:
                values *= np.float32(scale)
            batch[key] = values
    if "x_prev" in batch:
        batch["x_prev"][batch["seq_start"]] = 0.0
    return batch


def cut_batches(
    runs: Iterator[tuple[Any, int, int]], batch_size: int, rows: slice | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows from ``(buffer, lo, hi)`` runs: rows ``[lo, hi)`` of each
    buffer's visit order (``buffer.take``), a batch spanning buffers where one ends; a last
    partial batch is dropped. With ``rows`` only those rows of each batch are taken (the ones a
    process of a multi-host run puts on its devices)."""
    rows = rows or slice(0, batch_size)
    pending: list[dict[str, np.ndarray]] = []
    filled = 0  # rows of the current batch passed so far
    for buffer, lo, hi in runs:
        while lo < hi:
            take = min(batch_size - filled, hi - lo)
            first, stop = max(filled, rows.start), min(filled + take, rows.stop)
            if first < stop:
                pending.append(buffer.take(lo + first - filled, lo + stop - filled))
            lo, filled = lo + take, filled + take
            if filled == batch_size:
                if len(pending) == 1:
                    yield pending[0]
                else:
                    yield {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                pending, filled = [], 0


def device_batches(
    source: Iterator[dict[str, np.ndarray]],
    scale: float,
    sharding: jax.sharding.Sharding | None,
    prefetch: int,
    convert_on_device: bool | None = None,
    per_process: bool = False,
) -> Prefetcher:
    """Storage-dtype batches finished and put on the device on a thread, ``prefetch`` ahead.

    ``convert_on_device`` (default: on accelerators) transfers the storage dtype and converts
    there: half the bytes for bfloat16, and the accelerator converts faster than the host.
    ``per_process``: each batch holds this process's rows of a global batch of ``sharding``.
    """
    if convert_on_device is None:
        convert_on_device = jax.default_backend() != "cpu"
    if per_process:
        assert sharding is not None  # BatchSpec refuses ``rows`` without a sharding
        place = partial(global_batch, sharding=sharding)
    else:
        place = partial(jax.device_put, device=sharding)
    if convert_on_device:
        finish = partial(_finish_on_device, scale=scale)
        transform = lambda b: finish(place(b))  # noqa: E731
    else:
        transform = lambda b: place(finish_batch(b, scale))  # noqa: E731
    return Prefetcher(source, transform, prefetch)


def heldout_start(cache: ActivationCache, eval_tokens: int) -> int:
    """First held-out token: the last ``eval_tokens`` tokens, moved back to a sequence start.

    Starting the held-out part on a sequence boundary keeps every held-out sequence whole (and
    never splits one between training and evaluation); it holds out at least ``eval_tokens``.
    """
    if not 0 <= eval_tokens < cache.n_tokens:
        raise LoaderError(
            f"--eval-tokens {eval_tokens} must be >= 0 and below the cache's {cache.n_tokens} "
            "tokens; lower it or extract more tokens"
        )
    if eval_tokens == 0:
        return cache.n_tokens
    cut = cache.n_tokens - eval_tokens
    starts = np.flatnonzero(cache.sequence_starts()[: cut + 1])
    return int(starts[-1]) if starts[-1] > 0 else cut


class LayerStatistics(Protocol):
    """What ``norm_scale`` reads: a finished cache or a stream (``jax_sae.data.stream``)."""

    @property
    def path(self) -> Path: ...

    @property
    def d_model(self) -> int: ...

    def layer_stats(self, layer: int) -> dict: ...


def norm_scale(cache: LayerStatistics, layer: int) -> float:
    """Scalar s with E||s x||^2 = d_model, from the cache's per-layer statistics."""
    mean_sq_norm = cache.layer_stats(layer)["mean_sq_norm"]
    if not mean_sq_norm > 0:
        raise LoaderError(f"layer {layer} of {cache.path} has zero activations; cannot normalise")
    return math.sqrt(cache.d_model / mean_sq_norm)


def make_chunks(shard_sizes: Sequence[int], end: int, chunk_tokens: int) -> np.ndarray:
    """``[n, 2]`` (start, stop) token ranges covering ``[0, end)``; no chunk crosses a shard."""
    chunks: list[tuple[int, int]] = []
    shard_start = 0
    for size in shard_sizes:
        stop = min(shard_start + size, end)
        if stop > shard_start:
            pieces = -(-(stop - shard_start) // chunk_tokens)
            bounds = np.linspace(shard_start, stop, pieces + 1).round().astype(np.int64)
            chunks.extend(zip(bounds[:-1], bounds[1:], strict=True))
        shard_start += size
    return np.asarray(chunks, np.int64).reshape(-1, 2)


class BatchPlan:
    """Which training tokens make up batch ``step``: a pure function of the seed and the step."""

    def __init__(
        self, chunks: np.ndarray, *, batch_size: int, seed: int, buffer_chunks: int
    ) -> None:
        self.chunks = chunks
        self.batch_size = batch_size
        self.seed = seed
        self.buffer_chunks = buffer_chunks
        self.n_train = int((chunks[:, 1] - chunks[:, 0]).sum())

    def buffer_chunk_ids(self, epoch: int) -> list[np.ndarray]:
        """The chunks of each host buffer of an epoch, in the order the epoch visits them."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.chunks))
        return [order[i : i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]

    @lru_cache(maxsize=4)  # noqa: B019 - small, and a plan lives as long as its loader
    def _buffer_sizes(self, epoch: int) -> np.ndarray:
        ids = self.buffer_chunk_ids(epoch)
        return np.array([np.sum(self.chunks[i, 1] - self.chunks[i, 0]) for i in ids], np.int64)

    def buffer_permutation(self, epoch: int, buffer: int) -> np.ndarray:
        """Visit order of the buffer's tokens, as positions in its chunks' concatenation."""
        size = int(self._buffer_sizes(epoch)[buffer])
        return np.random.default_rng([self.seed, epoch, buffer]).permutation(size)

    def buffer_tokens(self, epoch: int, buffer: int) -> np.ndarray:
        """Token indices of a buffer's chunks, concatenated in chunk order (not yet permuted)."""
        ids = self.buffer_chunk_ids(epoch)[buffer]
        return np.concatenate([np.arange(a, b) for a, b in self.chunks[ids]])

    def runs(self, start_step: int) -> Iterator[tuple[int, int, int, int]]:
        """``(epoch, buffer, lo, hi)``: consecutive slices of the permuted stream from a step on."""
        position = start_step * self.batch_size
        epoch, offset = divmod(position, self.n_train)
        while True:
            ends = np.cumsum(self._buffer_sizes(epoch))
            buffer = int(np.searchsorted(ends, offset, side="right"))
            while buffer < len(ends):
                begin = int(ends[buffer - 1]) if buffer else 0
                yield epoch, buffer, offset - begin, int(ends[buffer]) - begin
                offset = int(ends[buffer])
                buffer += 1
            epoch, offset = epoch + 1, 0

    def batch_indices(self, step: int) -> np.ndarray:
        """Token indices of training batch ``step`` (for inspection and tests)."""
        parts, need = [], self.batch_size
        for epoch, buffer, lo, hi in self.runs(step):
            take = min(need, hi - lo)
            perm = self.buffer_permutation(epoch, buffer)[lo : lo + take]
            parts.append(self.buffer_tokens(epoch, buffer)[perm])
            need -= take
            if need == 0:
                return np.concatenate(parts)
        raise AssertionError("unreachable: the stream is infinite")


class _HostBuffer:
    """The rows of one buffer's chunks in storage dtype, read with one contiguous copy per chunk."""

    def __init__(
        self,
        raw: ShardedArray,
        chunks: np.ndarray,
        permutation: np.ndarray,
        seq_starts: np.ndarray | None,
    ) -> None:
        temporal = seq_starts is not None
        # A temporal read starts one row early so each chunk carries its first token's predecessor.
        reads = [(max(a - temporal, 0), a, b) for a, b in chunks]
        self.rows = np.empty((sum(b - lo for lo, _, b in reads), raw.shape[1]), raw.out_dtype)
        token_rows, out = [], 0
        for lo, a, b in reads:
            raw.read_into(lo, b, self.rows[out : out + b - lo])
            token_rows.append(np.arange(out + a - lo, out + b - lo))
            out += b - lo
        self.x_rows = np.concatenate(token_rows)[permutation]
        self.seq_start: np.ndarray | None = None
        self.prev_rows: np.ndarray | None = None
        if seq_starts is not None:
            tokens = np.concatenate([np.arange(a, b) for a, b in chunks])[permutation]
            self.seq_start = seq_starts[tokens]
            self.prev_rows = np.where(self.seq_start, 0, self.x_rows - 1)

    def take(self, lo: int, hi: int) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` of the buffer's visit order (storage dtype)."""
        batch = {"x": self.rows[self.x_rows[lo:hi]]}
        if self.prev_rows is not None:
            assert self.seq_start is not None  # both are set for a temporal read
            batch["x_prev"] = self.rows[self.prev_rows[lo:hi]]
            batch["seq_start"] = self.seq_start[lo:hi]
        return batch


class Loader:
    """Batches of one layer of a cache for training, plus the held-out tail for evaluation.

    A ``BatchSource`` that can be read for any number of epochs, each visiting every training
    token once; the cache's manifest checksums pin down what a run read.
    """

    single_pass = False
    releases_data = False

    def __init__(
        self,
        cache: ActivationCache,
        layer: int,
        spec: BatchSpec | None = None,
        *,
        eval_tokens: int = 0,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        buffer_chunks: int = DEFAULT_BUFFER_CHUNKS,
        **batch_settings: Any,
    ) -> None:
        """``spec``, or its fields as keywords (``batch_size=64, seed=1``); the cache's last
        ``eval_tokens`` tokens (from a sequence start) are held out."""
        spec = batch_spec(spec, batch_settings)
        batch_size = spec.batch_size
        if batch_size <= 0 or chunk_tokens <= 0 or buffer_chunks <= 0 or spec.seed < 0:
            raise LoaderError("batch size, chunk tokens and buffer chunks must be > 0, seed >= 0")
        self.spec = spec
        self.cache = cache
        self.layer = layer
        # storage dtype; each shard's checksum is checked on its first read (helper thread)
        self._raw = cache.raw_acts(layer)  # raises CacheError naming the available layers
        self.train_end = heldout_start(cache, eval_tokens)
        self.eval_tokens = eval_tokens
        self._seq_starts = cache.sequence_starts() if spec.temporal else None
        chunks = make_chunks(cache.shard_sizes, self.train_end, chunk_tokens)
        self.plan = BatchPlan(
            chunks, batch_size=batch_size, seed=spec.seed, buffer_chunks=buffer_chunks
        )
        if self.plan.n_train < batch_size:
            raise LoaderError(
                f"only {self.plan.n_train} training tokens in {cache.path} for batch size "
                f"{batch_size}; lower --batch-size or --eval-tokens, or extract more tokens"
            )

    @property
    def n_train(self) -> int:
        return self.plan.n_train

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size

    @property
    def d_model(self) -> int:
        return self.cache.d_model

    @property
    def heldout_tokens(self) -> int:
        """Tokens ``heldout`` yields (the cache's tail)."""
        return self.cache.n_tokens - self.train_end

    def describe(self) -> SourceDescription:
        identity = file_sha256(self.cache.path / MANIFEST)
        return SourceDescription.of_manifest(self.cache.path, self.cache.manifest, identity)

    def mean_sq_norm(self) -> float:
        return self.cache.layer_stats(self.layer)["mean_sq_norm"]

    def release_before(self, step: int) -> None:
        """Nothing to let go of: every epoch reads the whole cache again."""

    def record(self, step: int) -> None:
        """None: the cache's manifest hash in config.json names every shard and checksum."""
        return None

    def _load_buffer(self, epoch: int, index: int) -> _HostBuffer:
        ids = self.plan.buffer_chunk_ids(epoch)[index]
        perm = self.plan.buffer_permutation(epoch, index)
        return _HostBuffer(self._raw, self.plan.chunks[ids], perm, self._seq_starts)

    def _buffer_runs(self, start_step: int) -> Iterator[tuple[_HostBuffer, int, int]]:
        """``(buffer, lo, hi)`` for each buffer of the stream; the next buffer is read on a helper
        thread while this one is served, so a buffer switch does not stall the batches."""
        runs = self.plan.runs(start_step)
        with ThreadPoolExecutor(1, thread_name_prefix="buffer-read") as reader:
            epoch, index, lo, hi = next(runs)
            pending = reader.submit(self._load_buffer, epoch, index)
            for following in runs:
                buffer = pending.result()
                pending = reader.submit(self._load_buffer, *following[:2])
                yield buffer, lo, hi
                del buffer  # before the next read starts: two buffers in memory at most
                lo, hi = following[2:]

    def storage_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless batches in the cache's storage dtype (``seq_start`` bool) from a step on;
        only the loader's ``rows`` of each when it has them."""
        return cut_batches(self._buffer_runs(start_step), self.batch_size, self.spec.rows)

    def host_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless float32 numpy batches from ``start_step`` on."""
        return map(partial(finish_batch, scale=self.spec.scale), self.storage_batches(start_step))

    def batches(
        self,
        start_step: int = 0,
        stop_step: int | None = None,
        convert_on_device: bool | None = None,
    ) -> Prefetcher:
        """Device batches for steps ``[start_step, stop_step)``, read and put on a thread (see
        ``device_batches``). With ``rows``, each batch is the global array of ``sharding`` made
        of every process's rows."""
        source = self.storage_batches(start_step)
        if stop_step is not None:
            source = (b for _, b in zip(range(start_step, stop_step), source, strict=False))
        spec = self.spec
        return device_batches(
            source,
            spec.scale,
            spec.sharding,
            spec.prefetch,
            convert_on_device,
            per_process=spec.rows is not None,
        )

    def sample(self, n_tokens: int, windows: int = 16) -> np.ndarray:
        """About ``n_tokens`` scaled training rows from ``windows`` evenly spaced contiguous
        windows: a cheap, deterministic spread of the data (e.g. for TopK's b_dec init)."""
        per_window = max(min(n_tokens, self.n_train) // windows, 1)
        parts = []
        for a, _ in self.plan.chunks[
            np.linspace(0, len(self.plan.chunks) - 1, windows).astype(int)
        ]:
            stop = min(a + per_window, self.train_end)
            rows = np.empty((stop - a, self.cache.d_model), self.cache.dtype)
            self._raw.read_into(a, stop, rows)
            parts.append(rows)
        return finish_batch({"x": np.concatenate(parts)}, self.spec.scale)["x"]

    def heldout(self, batch_size: int) -> Iterator[np.ndarray]:
        """The held-out tail in cache order as raw float32 rows (no input scale), in batches."""
        for start in range(self.train_end, self.cache.n_tokens, batch_size):
            stop = min(start + batch_size, self.cache.n_tokens)
            rows = np.empty((stop - start, self.cache.d_model), self.cache.dtype)
            self._raw.read_into(start, stop, rows)
            yield rows.astype(np.float32)


@partial(jax.jit, static_argnames="scale")
def _finish_on_device(batch: dict[str, jax.Array], scale: float) -> dict[str, jax.Array]:
    """``finish_batch`` on the device (same float32 arithmetic, so the same values)."""
    out = dict(batch)
    for key in ("x", "x_prev"):
        if key in out:
            out[key] = out[key].astype(jnp.float32)
            if scale != 1.0:
                out[key] = out[key] * jnp.float32(scale)
    if "x_prev" in out:
        out["x_prev"] = jnp.where(out["seq_start"][:, None], 0.0, out["x_prev"])
    return out


_END = object()


class Prefetcher:
    """Runs an iterator on a background thread, ``depth`` items ahead, through ``transform``.

    Errors on the thread are re-raised in the consumer; ``close()`` (or leaving the ``with``
    block) stops the thread even when the consumer stops early.
    """

    def __init__(self, source: Iterator[Any], transform: Callable[[Any], Any], depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(source, transform), name="batch-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Any], transform: Callable[[Any], Any]) -> None:
        try:
            for item in source:
                if not self._put(transform(item)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer and raised there
            self._put(_Failure(e))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # keep answering StopIteration
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error
