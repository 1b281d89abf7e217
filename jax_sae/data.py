"""The activation cache: the on-disk contract between extraction and training (SPEC 2).

One folder per extraction run::

    manifest.json                 written atomically; lists only complete shards
    L{layer}/shard_{k:05d}.npy    [n_tokens, d_model] activations (bfloat16 by default)
    tokens/shard_{k:05d}.npy      int32 token ids
    positions/shard_{k:05d}.npy   int32 position inside the sequence

Each shard holds whole sequences in sequence order, so a token's predecessor is the row before it.
This module needs only numpy and ml_dtypes: the extractor (torch) writes through ``CacheWriter``
and the trainer (JAX) reads through ``ActivationCache`` without either importing the other.
"""

from __future__ import annotations

import json
import os
import threading
import zlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jax_sae.disk import require_space

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


class CacheError(ValueError):
    """A cache that cannot be written or trusted; the message names the problem and the fix."""


def hook_name(layer: int) -> str:
    """SAELens/TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def shard_file(kind: str, index: int) -> str:
    """Relative path of one shard: ``kind`` is ``L{layer}``, ``tokens`` or ``positions``."""
    return f"{kind}/shard_{index:05d}.npy"


def _layer_kind(layer: int) -> str:
    return f"L{layer}"


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
        crc = zlib.crc32(memoryview(block.view(np.uint8)), crc)
        if bad_row is None and uint is not None:
            bad = _non_finite_mask(block.view(uint), array.dtype)
            if bad is not None and bad.any():
                bad_row = (start + int(np.argmax(bad))) // row_size
    return crc, bad_row


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> None:
    """Write through ``write(file)`` to a temp name, fsync, then rename: readers never see half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically replace a JSON file (used for the manifest and run metadata).

    Strict JSON: a NaN or inf raises ValueError here rather than writing a file other tools
    cannot parse.
    """
    data = json.dumps(obj, indent=1, allow_nan=False).encode()
    _write_atomic(Path(path), lambda f: f.write(data))
    _fsync_dir(Path(path).parent)


def _read_manifest(path: Path) -> dict:
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
    return manifest


def _check_fields(file: Path, where: str, entry: Any, fields: dict[str, type]) -> None:
    """Each of ``fields`` present in ``entry`` with its JSON type, else a CacheError naming it."""
    for name, kind in fields.items():
        value = entry.get(name) if isinstance(entry, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool):
            raise CacheError(
                f"{file} lacks a valid '{where}{name}' ({kind.__name__}); the manifest is "
                "damaged or not written by this project, re-run the extraction"
            )


class CacheWriter:
    """Appends complete shards to a cache folder; safe to kill at any point and resume.

    A shard's files are written under temp names and renamed, and only then is the shard added to
    the manifest (itself replaced atomically), so a kill leaves either the old or the new cache,
    never a listed half-shard. Per-layer mean and mean squared norm accumulate in float64 for
    input normalisation at training time.
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
    ) -> None:
        if dtype not in STORAGE_DTYPES:
            raise CacheError(f"storage dtype {dtype!r} unknown; use one of {list(STORAGE_DTYPES)}")
        self.path = Path(path)
        self.layers = sorted(int(layer) for layer in layers)
        self.d_model = int(d_model)
        self.dtype = STORAGE_DTYPES[dtype]
        if (self.path / MANIFEST).exists():
            if not resume:
                raise CacheError(
                    f"{self.path} already holds an activation cache; pass --resume to continue "
                    "it or choose another --out (nothing was overwritten)"
                )
            self.manifest = _read_manifest(self.path)
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
        """Remove temp files and shards a kill left behind after the last listed shard."""
        for file in self.path.glob("*/shard_*.npy*"):
            index = int(file.name.split(".")[0].removeprefix("shard_"))
            if file.suffix == ".tmp" or index >= self.n_shards:
                file.unlink()

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
            arrays[_layer_kind(layer)] = stored
        shard_bytes = sum(array.nbytes for array in arrays.values()) + WRITE_OVERHEAD
        require_space(self.path, shard_bytes, f"shard {index}", "resume the extraction (--resume)")
        checksums = {}
        for kind, array in arrays.items():
            (self.path / kind).mkdir(exist_ok=True)
            _write_atomic(self.path / shard_file(kind, index), lambda f, a=array: np.save(f, a))
            checksums[kind] = _array_crc32(array)
        for kind in arrays:
            _fsync_dir(self.path / kind)
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
        out_dtype: np.dtype,
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
        self.manifest = _read_manifest(self.path)
        self.layers: list[int] = list(self.manifest["layers"])
        self.d_model: int = int(self.manifest["d_model"])
        self.dtype = STORAGE_DTYPES[self.manifest["dtype"]]
        self.shard_sizes: list[int] = [s["n_tokens"] for s in self.manifest["shards"]]
        self.n_tokens: int = int(sum(self.shard_sizes))
        if self.n_tokens == 0:
            raise CacheError(f"activation cache {self.path} lists no complete shard; re-extract")
        kinds = {_layer_kind(layer): ((self.d_model,), self.dtype) for layer in self.layers}
        kinds |= {"tokens": ((), np.dtype(np.int32)), "positions": ((), np.dtype(np.int32))}
        self._maps = {
            kind: [self._open(kind, s, shape, dtype) for s in self.manifest["shards"]]
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

    def _open(self, kind: str, shard: dict, row_shape: tuple, dtype: np.dtype) -> np.ndarray:
        file = self.path / shard_file(kind, shard["index"])
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
            expected = shard["crc32"].get(kind)
            if expected is None:
                raise CacheError(f"manifest lists no checksum for {file}; re-extract the cache")
            crc, bad_row = scan_array(self._maps[kind][position])
            if crc != expected:
                raise CacheError(
                    f"checksum mismatch in {file}; the cache is corrupted, re-extract it"
                )
            if bad_row is not None:
                raise CacheError(
                    f"{file} row {bad_row} (cache row {sum(self.shard_sizes[:position]) + bad_row})"
                    " holds NaN/inf; the cache was written by a tool that does not check values, "
                    "re-extract it"
                )
            self._checked.add((kind, position))

    def verify(self) -> None:
        """Check every shard now (see ``check_shard``); raises CacheError naming the first bad
        file."""
        for kind, maps in self._maps.items():
            for position in range(len(maps)):
                self.check_shard(kind, position)

    def _array(self, kind: str, out_dtype: np.dtype) -> ShardedArray:
        check = partial(self.check_shard, kind) if self.check_on_read else None
        return ShardedArray(self._maps[kind], out_dtype, before_read=check)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise CacheError(
                f"layer {layer} is not in cache {self.path} (it has layers {self.layers}); "
                "pick one of those or extract that layer"
            )

    def acts(self, layer: int) -> ShardedArray:
        """Activations of one layer as float32 rows."""
        self._check_layer(layer)
        return self._array(_layer_kind(layer), np.float32)

    def raw_acts(self, layer: int) -> ShardedArray:
        """Activations of one layer in the storage dtype (checked on read like ``acts``)."""
        self._check_layer(layer)
        return self._array(_layer_kind(layer), self.dtype)

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
