"""The activation cache: the on-disk contract between extraction and training.

One folder per extraction run::

    manifest.json                 written atomically; lists only complete shards
    L{layer}/shard_{k:05d}.npy    [n_tokens, d_model] activations (bfloat16 by default)
    tokens/shard_{k:05d}.npy      int32 token ids
    positions/shard_{k:05d}.npy   int32 position inside the sequence

Each shard holds whole sequences in sequence order, so a token's predecessor is the row before it.
This module needs only numpy and ml_dtypes: the extractor (torch) writes through ``CacheWriter``
and the trainer (JAX) reads through ``ActivationCache`` without either importing the other.

A cache streamed to a trainer (``jax_sae.data.stream``) is bounded by a disk budget: the trainer
writes ``release.json`` (the shards no step it could resume from still reads), and the extractor,
which
alone writes the manifest and deletes files, deletes released shards when it needs room. The
manifest keeps listing them, marked ``"deleted": true``, so the token order stays defined.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from numpy.typing import DTypeLike

from jax_sae.util.disk import human_bytes, require_space
from jax_sae.util.files import TMP_SUFFIX, fsync_dir, write_atomic, write_json_atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
_CRC_BLOCK = 1 << 24  # bytes hashed per call; keeps memory flat on multi-GB shards
EXPONENT_MASKS = {2: np.uint16(0x7F80), 4: np.uint32(0x7F800000)}
"""Exponent bits of bfloat16 / float32 (float16 below): all ones means NaN or inf."""
FLOAT16_EXPONENT = np.uint16(0x7C00)
WRITE_OVERHEAD = 1 << 20  # .npy headers and the manifest, with room to spare
MANIFEST_FIELDS = {"layers": list, "d_model": int, "dtype": str, "shards": list, "stats": dict}
SHARD_FIELDS = {"index": int, "n_tokens": int, "crc32": dict}
RELEASE = "release.json"
"""Written by a streaming trainer after each checkpoint: shards with an index below
``released_below``, except those ``pinned``, are read by no step from checkpoint ``step`` on."""
RELEASE_FIELDS = {"released_below": int, "pinned": list, "step": int}
PRODUCER_OPEN = "producer_open.json"
"""Written by a streaming extractor once it accepted the cache (its settings match): its pid."""
PRODUCER_WAIT = "producer_wait.json"
"""Present while a budgeted extractor waits for room: the shard it holds back and the release it
last read, so the trainer can tell a deadlock (both sides waiting) from a slow extractor."""
NPY_HEADER_BOUND = 256  # bytes; np.save writes 128-byte headers for 1-D and 2-D arrays
_REEXTRACT = "the manifest is damaged or not written by this project, re-run the extraction"


class CacheError(ValueError):
    """A cache that cannot be written or trusted; the message names the problem and the fix."""


def hook_name(layer: int) -> str:
    """SAELens/TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def shard_file(kind: str, index: int) -> str:
    """Relative path of one shard: ``kind`` is ``L{layer}``, ``tokens`` or ``positions``."""
    return f"{kind}/shard_{index:05d}.npy"


def layer_kind(layer: int) -> str:
    return f"L{layer}"


def shard_kinds(layers: Sequence[int]) -> list[str]:
    """The folders each shard has one file in."""
    return [*(layer_kind(layer) for layer in layers), "tokens", "positions"]


def _array_crc32(array: np.ndarray) -> int:
    return scan_array(array, check_finite=False)[0]


def _non_finite_mask(raw: np.ndarray, dtype: np.dtype) -> np.ndarray | None:
    """Where a block of raw float bits is NaN/inf (exponent all ones); None for integer data."""
    if dtype.kind not in "fV":
        return None
    mask = FLOAT16_EXPONENT if dtype == np.float16 else EXPONENT_MASKS[dtype.itemsize]
    return (raw & mask) == mask


def scan_array(array: np.ndarray, check_finite: bool = True) -> tuple[int, int | None]:
    """One streamed pass over an array's bytes: (CRC32, first row holding NaN/inf or None).

    Blocks of ``_CRC_BLOCK`` bytes keep memory flat on multi-GB memory-mapped shards; the finite
    check reads the float bits as integers, which costs about as much as the CRC itself.
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    uint = {2: np.uint16, 4: np.uint32}.get(flat.dtype.itemsize) if check_finite else None
    row_size = max(int(np.prod(array.shape[1:])), 1)
    step = max(_CRC_BLOCK // flat.dtype.itemsize, 1)
    crc, bad_row = 0, None
    for start in range(0, len(flat), step):
        block = flat[start : start + step]
        crc = zlib.crc32(block.view(np.uint8).data, crc)
        if bad_row is None and uint is not None:
            bad = _non_finite_mask(block.view(uint), array.dtype)
            if bad is not None and bad.any():
                bad_row = (start + int(np.argmax(bad))) // row_size
    return crc, bad_row


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not file.exists():
        raise CacheError(
            f"no {MANIFEST} in {path}: not an activation cache, or extraction never finished a "
            "shard; run `make extract` (or `python -m extract --resume`) first"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{file} is not valid JSON ({e}); re-run the extraction") from e
    if not isinstance(manifest, dict):
        raise CacheError(
            f"{file} holds a JSON {type(manifest).__name__}, not an object; the manifest is "
            "damaged, re-run the extraction"
        )
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{file} has format version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; re-extract the cache with this version"
        )
    _check_fields(file, "", manifest, MANIFEST_FIELDS)
    if manifest["dtype"] not in STORAGE_DTYPES:
        raise CacheError(
            f"{file} gives dtype {manifest['dtype']!r}, not one of {list(STORAGE_DTYPES)}; the "
            "manifest is damaged, re-run the extraction"
        )
    for position, shard in enumerate(manifest["shards"]):
        _check_fields(file, f"shards[{position}].", shard, SHARD_FIELDS)
        if not isinstance(shard.get("deleted", False), bool):
            where = f"shards[{position}].deleted"
            raise CacheError(f"{file} gives a non-boolean '{where}'; {_REEXTRACT}")
    return manifest


def _check_fields(
    file: Path, where: str, entry: Any, fields: dict[str, type], fix: str = _REEXTRACT
) -> None:
    """Each of ``fields`` present in ``entry`` with its JSON type, else a CacheError naming it."""
    for name, kind in fields.items():
        value = entry.get(name) if isinstance(entry, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CacheError(f"{file} lacks a valid '{where}{name}' ({kind.__name__}); {fix}")


def read_release(path: Path) -> dict | None:
    """The streaming trainer's ``RELEASE`` record of a cache, or None before its first one."""
    file = Path(path) / RELEASE
    try:
        release = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(
            f"{file} is not valid JSON ({e}); delete it only if no trainer streams from this cache"
        ) from e
    fix = "it is damaged; delete it only if no trainer streams from this cache"
    _check_fields(file, "", release, RELEASE_FIELDS, fix)
    return release


def write_release(path: Path, released_below: int, pinned: Sequence[int], step: int) -> None:
    """Let a budgeted extractor delete shards below ``released_below`` except ``pinned``."""
    record = {"released_below": released_below, "pinned": sorted(pinned), "step": step}
    write_json_atomic(Path(path) / RELEASE, record)


class CacheWriter:
    """Appends complete shards to a cache folder; safe to kill at any point and resume.

    A shard's files are written under temp names and renamed, and only then is the shard added to
    the manifest (itself replaced atomically), so a kill leaves either the old or the new cache,
    never a listed half-shard. Per-layer mean and mean squared norm accumulate in float64 for
    input normalisation at training time.

    With a ``disk_budget`` (bytes of shard files) the writer waits before each shard until it fits
    beside the shards still on disk, deleting the shards a streaming trainer released (see the
    module docstring), and polls every ``poll_s`` seconds; setting ``stop`` ends such a wait.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        layers: Sequence[int],
        d_model: int,
        dtype: str,
        settings: dict,
        metadata: dict,
        resume: bool = False,
        disk_budget: int | None = None,
        poll_s: float = 0.5,
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise CacheError(f"storage dtype {dtype!r} unknown; use one of {list(STORAGE_DTYPES)}")
        self.path = Path(path)
        self.layers = sorted(int(layer) for layer in layers)
        self.d_model = int(d_model)
        self.dtype = STORAGE_DTYPES[dtype]
        self.disk_budget = disk_budget
        self.poll_s = poll_s
        self.stop = threading.Event()
        if (self.path / MANIFEST).exists():
            if not resume:
                raise CacheError(
                    f"{self.path} already holds an activation cache; pass --resume to continue "
                    "it or choose another --out (nothing was overwritten)"
                )
            self.manifest = read_manifest(self.path)
            if self.manifest["settings"] != settings:
                diff = sorted(
                    k
                    for k in set(settings) | set(self.manifest["settings"])
                    if settings.get(k) != self.manifest["settings"].get(k)
                )
                raise CacheError(
                    f"cannot resume {self.path}: settings differ ({', '.join(diff)}); use the "
                    "original settings or a new --out"
                )
            self._drop_unlisted_files()
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            self.manifest = {
                "format_version": FORMAT_VERSION,
                **metadata,
                "layers": self.layers,
                "hook_names": {str(layer): hook_name(layer) for layer in self.layers},
                "d_model": self.d_model,
                "dtype": dtype,
                "settings": settings,
                "n_sequences": 0,
                "n_tokens": 0,
                "shards": [],
                "stats": {
                    str(layer): {"n": 0, "sum": [0.0] * self.d_model, "sum_sq_norm": 0.0}
                    for layer in self.layers
                },
                "complete": False,
            }
            write_json_atomic(self.path / MANIFEST, self.manifest)
        (self.path / PRODUCER_WAIT).unlink(missing_ok=True)  # left by a killed writer

    @property
    def n_tokens(self) -> int:
        return self.manifest["n_tokens"]

    @property
    def n_sequences(self) -> int:
        return self.manifest["n_sequences"]

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def _drop_unlisted_files(self) -> None:
        """Remove temp files and shards a kill left behind after the last listed shard, and the
        files of shards marked deleted whose removal a kill cut short."""
        deleted = {shard["index"] for shard in self.manifest["shards"] if shard.get("deleted")}
        for file in self.path.glob(f"*/.shard_*.npy.*{TMP_SUFFIX}"):  # write_atomic's temp files
            file.unlink()
        for file in self.path.glob("*/shard_*.npy*"):
            index = int(file.name.split(".")[0].removeprefix("shard_"))
            if file.suffix == TMP_SUFFIX or index >= self.n_shards or index in deleted:
                file.unlink()

    def _bytes_on_disk(self) -> int:
        """Bytes of the files of the listed shards not marked deleted."""
        total = 0
        for shard in self.manifest["shards"]:
            for kind in [] if shard.get("deleted") else shard_kinds(self.layers):
                file = self.path / shard_file(kind, shard["index"])
                try:
                    total += file.stat().st_size
                except FileNotFoundError:
                    raise CacheError(
                        f"missing shard file {file}; the cache is damaged, re-extract it"
                    ) from None
        return total

    def _delete_released(self, release: dict | None) -> bool:
        """Delete the shards the trainer released (False when there are none): marked in the
        manifest first, so a kill leaves files that resume removes, never a listed shard without
        its files."""
        if release is None:
            return False
        pinned = set(release["pinned"])
        doomed = [
            shard
            for shard in self.manifest["shards"]
            if shard["index"] < release["released_below"]
            and shard["index"] not in pinned
            and not shard.get("deleted")
        ]
        if not doomed:
            return False
        for shard in doomed:
            shard["deleted"] = True
        write_json_atomic(self.path / MANIFEST, self.manifest)
        for shard in doomed:
            for kind in shard_kinds(self.layers):
                (self.path / shard_file(kind, shard["index"])).unlink(missing_ok=True)
        return True

    def _make_room(self, index: int, needed: int) -> None:
        """Return once shard ``index`` (``needed`` bytes) fits in the disk budget; when it does not,
        delete released shards, or wait for the trainer to release more."""
        if self.disk_budget is None:
            return
        if needed > self.disk_budget:
            raise CacheError(
                f"shard {index} needs {human_bytes(needed)}, more than the whole --disk-budget "
                f"({human_bytes(self.disk_budget)}); raise the budget or lower --shard-tokens"
            )
        wait_file, waiting = self.path / PRODUCER_WAIT, None
        while True:
            on_disk = self._bytes_on_disk()
            if on_disk + needed <= self.disk_budget:
                wait_file.unlink(missing_ok=True)
                return
            release = read_release(self.path)
            if self._delete_released(release):
                continue
            state = {
                "shard": index,
                "needed": needed,
                "on_disk": on_disk,
                "budget": self.disk_budget,
                "released_below": release["released_below"] if release else None,
            }
            if waiting is None:
                print(
                    f"waiting for the trainer to release shards: shard {index} needs "
                    f"{human_bytes(needed)}, {human_bytes(on_disk)} of the "
                    f"{human_bytes(self.disk_budget)} disk budget are in use",
                    file=sys.stderr,
                    flush=True,
                )
            if state != waiting:
                write_json_atomic(wait_file, state)
                waiting = state
            if self.stop.wait(self.poll_s):
                raise CacheError(f"stopped while shard {index} waited for room in the disk budget")

    def write_shard(
        self,
        acts: dict[int, np.ndarray],
        tokens: np.ndarray,
        positions: np.ndarray,
        n_sequences: int,
    ) -> None:
        """Persist one shard of whole sequences, then list it in the manifest."""
        n = len(tokens)
        if sorted(acts) != self.layers:
            raise CacheError(f"shard has layers {sorted(acts)}, cache expects {self.layers}")
        if len(positions) != n:
            raise CacheError(f"shard has {n} tokens but {len(positions)} positions")
        index = self.n_shards
        arrays = {
            "tokens": np.asarray(tokens, np.int32),
            "positions": np.asarray(positions, np.int32),
        }
        sums = {}
        for layer, a in acts.items():
            if a.shape != (n, self.d_model):
                raise CacheError(
                    f"layer {layer} activations have shape {a.shape}, expected {(n, self.d_model)}"
                )
            stored = np.asarray(a).astype(self.dtype, copy=False)
            # One float32 view of what is stored (exact for bf16/f16) serves the NaN/inf check,
            # which also catches float16 overflow, and the statistics; float64 only per row.
            stored32 = stored.astype(np.float32, copy=False)
            if not np.isfinite(stored32).all():
                raise CacheError(
                    f"layer {layer} activations contain NaN/inf in shard {index}; check the model "
                    "dtype (try --model-dtype float32) or store float32 (--dtype float32)"
                )
            row_sq_norms = np.einsum("ij,ij->i", stored32, stored32)
            sums[layer] = (stored32.sum(0, dtype=np.float64), row_sq_norms.sum(dtype=np.float64))
            arrays[layer_kind(layer)] = stored
        self._make_room(index, sum(a.nbytes + NPY_HEADER_BOUND for a in arrays.values()))
        shard_bytes = sum(array.nbytes for array in arrays.values()) + WRITE_OVERHEAD
        require_space(self.path, shard_bytes, f"shard {index}", "resume the extraction (--resume)")
        checksums = {}
        for kind, array in arrays.items():
            (self.path / kind).mkdir(exist_ok=True)
            write_atomic(self.path / shard_file(kind, index), partial(np.save, arr=array))
            checksums[kind] = _array_crc32(array)
        for kind in arrays:
            fsync_dir(self.path / kind)
        for layer, (sum_vec, sum_sq_norm) in sums.items():
            stats = self.manifest["stats"][str(layer)]
            stats["n"] += n
            stats["sum"] = (np.asarray(stats["sum"]) + sum_vec).tolist()
            stats["sum_sq_norm"] += float(sum_sq_norm)
        self.manifest["shards"].append(
            {"index": index, "n_tokens": n, "n_sequences": int(n_sequences), "crc32": checksums}
        )
        self.manifest["n_tokens"] += n
        self.manifest["n_sequences"] += int(n_sequences)
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def finish(self) -> None:
        """Mark the cache complete; readers accept incomplete caches but report them."""
        self.manifest["complete"] = True
        write_json_atomic(self.path / MANIFEST, self.manifest)


def check_layer(path: Path, layers: Sequence[int], layer: int) -> None:
    """CacheError naming the cache's layers when ``layer`` is not one of them."""
    if layer not in layers:
        raise CacheError(
            f"layer {layer} is not in cache {path} (it has layers {list(layers)}); "
            "pick one of those or extract that layer"
        )


def open_shard(path: Path, kind: str, shard: dict, row_shape: tuple, dtype: np.dtype) -> np.ndarray:
    """Memory-map one file of a listed shard; CacheError when it is missing, cut short or of
    another shape or dtype than the manifest says (cheap: the contents are checked on read)."""
    file = path / shard_file(kind, shard["index"])
    if not file.exists():
        raise CacheError(f"missing shard file {file}; the cache is damaged, re-extract it")
    try:
        array = np.load(file, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise CacheError(f"shard {file} is truncated or corrupted ({e}); re-extract it") from e
    if array.dtype.kind == "V" and array.dtype.itemsize == dtype.itemsize:
        array = array.view(dtype)  # .npy stores bfloat16 as raw 2-byte void
    expected = (shard["n_tokens"], *row_shape)
    if array.shape != expected or array.dtype != dtype:
        raise CacheError(
            f"shard {file} has shape {array.shape} {array.dtype}, manifest says {expected} "
            f"{dtype}; the cache is damaged, re-extract it"
        )
    return array


def verify_shard(file: Path, array: np.ndarray, crc32: int | None, first_row: int) -> None:
    """Recompute a shard file's CRC32 and look for NaN/inf; CacheError naming the file (and the
    first bad row, counted in the shard and in the cache from ``first_row``) otherwise."""
    if crc32 is None:
        raise CacheError(f"manifest lists no checksum for {file}; re-extract the cache")
    crc, bad_row = scan_array(array)
    if crc != crc32:
        raise CacheError(f"checksum mismatch in {file}; the cache is corrupted, re-extract it")
    if bad_row is not None:
        raise CacheError(
            f"{file} row {bad_row} (cache row {first_row + bad_row}) holds NaN/inf; the cache "
            "was written by a tool that does not check values, re-extract it"
        )


class ShardedArray:
    """Several memory-mapped shards read as one array along axis 0, converted to a numpy dtype.

    ``x[a:b]`` and ``x[index_array]`` read only the shards they touch; ``np.asarray(x)`` reads all.
    ``.shards`` gives the raw memory maps for callers that want large contiguous reads in the
    storage dtype. ``before_read(s)``, if given, runs before any row of shard ``s`` is read (the
    cache uses it to check each shard once).
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        out_dtype: DTypeLike,
        before_read: Callable[[int], None] | None = None,
    ) -> None:
        self.shards = shards
        self.out_dtype = np.dtype(out_dtype)
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self.before_read = before_read

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.shards[0].shape[1:]) if self.shards else (0,)

    @property
    def dtype(self) -> np.dtype:
        """The dtype rows are returned in (not the storage dtype of ``.shards``)."""
        return self.out_dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        """``np.asarray(x)``: every row, as ``x[:]`` (always a fresh array)."""
        if copy is False:
            raise ValueError("a ShardedArray is read from disk; np.asarray cannot avoid a copy")
        rows = self[:]
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def _touch(self, shard: int) -> np.ndarray:
        if self.before_read is not None:
            self.before_read(shard)
        return self.shards[shard]

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            out = np.empty((max(stop - start, 0), *self.shape[1:]), self.out_dtype)
            self.read_into(start, stop, out)
            return out
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        if index.ndim != 1:
            raise IndexError("ShardedArray takes a slice or a 1-D integer index")
        index = np.where(index < 0, index + len(self), index)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} rows")
        out = np.empty((len(index), *self.shape[1:]), self.out_dtype)
        shard_of = np.searchsorted(self.offsets, index, side="right") - 1
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = self._touch(s)[index[rows] - self.offsets[s]]
        return out

    def read_into(self, start: int, stop: int, out: np.ndarray) -> None:
        """Copy rows ``[start, stop)`` straight from the memory maps into ``out`` (one copy)."""
        for s in range(len(self.shards)):
            lo, hi = max(start, int(self.offsets[s])), min(stop, int(self.offsets[s + 1]))
            if lo < hi:
                shard = self._touch(s)
                out[lo - start : hi - start] = shard[lo - self.offsets[s] : hi - self.offsets[s]]


class ActivationCache:
    """Read-only view of a cache folder, validated on open.

    Opening checks the manifest, every listed shard's presence, dtype and shape (a truncated file
    fails here). Reading checks the rest: the first time any row of a shard is read, the whole
    shard's CRC32 is recomputed and its values checked for NaN/inf (``check_on_read``, on by
    default), so nothing is ever returned from a corrupted shard, and each shard costs one extra
    streamed pass, once. ``verify=True`` checks every shard up front instead.
    """

    def __init__(
        self, path: str | os.PathLike, verify: bool = False, check_on_read: bool = True
    ) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CacheError(f"activation cache {self.path} does not exist; run `make extract`")
        self.manifest = read_manifest(self.path)
        deleted = [s["index"] for s in self.manifest["shards"] if s.get("deleted")]
        if deleted:
            raise CacheError(
                f"cache {self.path} was streamed under a disk budget: {len(deleted)} of its shards "
                f"(the first is {deleted[0]}) were deleted once a trainer had read them; stream "
                "from it (jax_sae.data.stream) or re-extract it without --disk-budget"
            )
        self.layers: list[int] = list(self.manifest["layers"])
        self.d_model: int = int(self.manifest["d_model"])
        self.dtype = STORAGE_DTYPES[self.manifest["dtype"]]
        self.shard_sizes: list[int] = [s["n_tokens"] for s in self.manifest["shards"]]
        self.n_tokens: int = int(sum(self.shard_sizes))
        if self.n_tokens == 0:
            raise CacheError(f"activation cache {self.path} lists no complete shard; re-extract")
        kinds: dict[str, tuple[tuple[int, ...], np.dtype]] = {
            layer_kind(layer): ((self.d_model,), self.dtype) for layer in self.layers
        }
        kinds |= {"tokens": ((), np.dtype(np.int32)), "positions": ((), np.dtype(np.int32))}
        self._maps = {
            kind: [open_shard(self.path, kind, s, shape, dtype) for s in self.manifest["shards"]]
            for kind, (shape, dtype) in kinds.items()
        }
        self.check_on_read = check_on_read
        self._checked: set[tuple[str, int]] = set()
        self._check_lock = threading.Lock()
        if verify:
            self.verify()

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def check_shard(self, kind: str, position: int) -> None:
        """Recompute one shard's CRC32 and look for NaN/inf, once per cache object.

        Raises CacheError naming the file (and the first bad row): a flipped byte or a
        non-finite row must stop the reader before it hands out anything from that shard.
        """
        if (kind, position) in self._checked:
            return
        with self._check_lock:  # the loader reads on a helper thread
            if (kind, position) in self._checked:
                return
            shard = self.manifest["shards"][position]
            file = self.path / shard_file(kind, shard["index"])
            first_row = sum(self.shard_sizes[:position])
            verify_shard(file, self._maps[kind][position], shard["crc32"].get(kind), first_row)
            self._checked.add((kind, position))

    def verify(self) -> None:
        """Check every shard now (see ``check_shard``); raises CacheError naming the first bad
        file."""
        for kind, maps in self._maps.items():
            for position in range(len(maps)):
                self.check_shard(kind, position)

    def _array(self, kind: str, out_dtype: DTypeLike) -> ShardedArray:
        check = partial(self.check_shard, kind) if self.check_on_read else None
        return ShardedArray(self._maps[kind], out_dtype, before_read=check)

    def _check_layer(self, layer: int) -> None:
        check_layer(self.path, self.layers, layer)

    def acts(self, layer: int) -> ShardedArray:
        """Activations of one layer as float32 rows."""
        self._check_layer(layer)
        return self._array(layer_kind(layer), np.float32)

    def raw_acts(self, layer: int) -> ShardedArray:
        """Activations of one layer in the storage dtype (checked on read like ``acts``)."""
        self._check_layer(layer)
        return self._array(layer_kind(layer), self.dtype)

    def tokens(self) -> ShardedArray:
        return self._array("tokens", np.int32)

    def positions(self) -> ShardedArray:
        return self._array("positions", np.int32)

    def sequence_starts(self) -> np.ndarray:
        """True where a token has no predecessor in the cache (its position is not prev + 1).

        Shards hold whole sequences, so consecutive rows belong to one sequence exactly when the
        positions count up by one; dropped BOS/pad tokens therefore also start a new run.
        """
        pos = self.positions()[:]
        starts = np.ones(len(pos), bool)
        starts[1:] = pos[1:] != pos[:-1] + 1
        return starts

    def layer_stats(self, layer: int) -> dict:
        """Mean activation and mean squared norm of a layer, for input normalisation."""
        self._check_layer(layer)
        stats = self.manifest["stats"][str(layer)]
        n = max(stats["n"], 1)
        return {
            "mean": (np.asarray(stats["sum"]) / n).astype(np.float32),
            "mean_sq_norm": stats["sum_sq_norm"] / n,
        }
