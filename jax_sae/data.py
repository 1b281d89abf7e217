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
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
_CRC_BLOCK = 1 << 24  # bytes hashed per call; keeps memory flat on multi-GB shards


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
    view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    crc = 0
    for start in range(0, len(view), _CRC_BLOCK):
        crc = zlib.crc32(view[start : start + _CRC_BLOCK], crc)
    return crc


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
    """Atomically replace a JSON file (used for the manifest and run metadata)."""
    data = json.dumps(obj, indent=1).encode()
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
    except json.JSONDecodeError as e:
        raise CacheError(f"{file} is not valid JSON ({e}); re-run the extraction") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CacheError(
            f"{file} has format version {manifest.get('format_version')!r}, this code reads "
            f"{FORMAT_VERSION}; re-extract the cache with this version"
        )
    return manifest


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

    ``x[a:b]`` and ``x[index_array]`` read only the shards they touch. ``.shards`` gives the raw
    memory maps for callers that want large contiguous reads in the storage dtype.
    """

    def __init__(self, shards: list[np.ndarray], out_dtype: np.dtype) -> None:
        self.shards = shards
        self.out_dtype = np.dtype(out_dtype)
        self.offsets = np.cumsum([0] + [len(s) for s in shards])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.shards[0].shape[1:]) if self.shards else (0,)

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read_range(start, stop)
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
            out[rows] = self.shards[s][index[rows] - self.offsets[s]]
        return out

    def _read_range(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for s, shard in enumerate(self.shards):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo < hi:
                parts.append(shard[lo - self.offsets[s] : hi - self.offsets[s]])
        if not parts:
            return np.empty((0, *self.shape[1:]), self.out_dtype)
        return np.concatenate(parts).astype(self.out_dtype, copy=False)


class ActivationCache:
    """Read-only view of a cache folder, validated on open.

    Opening checks the manifest, every listed shard's presence, dtype and shape (a truncated file
    fails here); ``verify=True`` also recomputes checksums, which reads every byte.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
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

    def verify(self) -> None:
        """Recompute every shard checksum; raises CacheError naming the first bad file."""
        for kind, maps in self._maps.items():
            for shard, array in zip(self.manifest["shards"], maps, strict=True):
                if _array_crc32(array) != shard["crc32"][kind]:
                    file = self.path / shard_file(kind, shard["index"])
                    raise CacheError(
                        f"checksum mismatch in {file}; the cache is corrupted, re-extract it"
                    )

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise CacheError(
                f"layer {layer} is not in cache {self.path} (it has layers {self.layers}); "
                "pick one of those or extract that layer"
            )

    def acts(self, layer: int) -> ShardedArray:
        """Activations of one layer as float32 rows."""
        self._check_layer(layer)
        return ShardedArray(self._maps[_layer_kind(layer)], np.float32)

    def tokens(self) -> ShardedArray:
        return ShardedArray(self._maps["tokens"], np.int32)

    def positions(self) -> ShardedArray:
        return ShardedArray(self._maps["positions"], np.int32)

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
