"""A synthetic world as a batch source: activations drawn on the training device, on the fly.

A world folder (``python -m synth.synthsaebench``; SynthSAEBench-16k) holds ``world.json`` and
``world.safetensors``: SAELens's world as flat tables. ``draw`` samples it as SAELens's
``SyntheticModel.sample_with_features`` does, step for step, in one compiled JAX program:

1. **Firing** through a Gaussian copula. Draw ``g = eps F^T + eta sqrt(d)``, with ``eps``
   ~ N(0, I_R) and ``eta`` ~ N(0, I_N). Feature i fires where ``g_i > Phi^-1(1 - p_i)``. Each
   feature then fires with probability p_i (the hierarchy-compensated rate), and features are
   correlated through the low-rank factor F. Without a factor, g = eta.
2. **Magnitudes:** ``relu(mu_i + sigma_i z)`` where a feature fires, 0 elsewhere.
3. **Hierarchy,** level by level from the roots. A feature at depth L is zeroed where its parent
   is 0. Where the parent fires, the feature is multiplied by ``parent / mu_parent``
   (``scale_children_by_parent``). Then each mutually exclusive sibling group whose parent is at
   depth L keeps one of its active members, uniformly at random, and zeroes the rest. The zeroed
   members' subtrees follow at the next level.
4. **Hidden vector:** ``h = x W + b``.

SAELens draws from torch's global generator; this draws from ``jax.random``. The draws differ,
the distribution is the same. ``tests/test_synthsaebench.py`` checks that against SAELens's own
sampler on the same world: firing rates, hierarchy constraints, co-firing and magnitudes.

Batch ``s`` of a run is ``draw(fold_in(key(seed), s))``: a pure function of the step, so a
resumed run reads the batches the first would have. Held-out rows come from another key.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri
from safetensors.numpy import load_file

from jax_sae.data.source import BatchSpec, LoaderError, SourceDescription

WORLD_JSON, WORLD_TABLES = "world.json", "world.safetensors"
FORMAT = "jax-sae-lab synthetic world v1"
NOMINAL_EPOCH = 1 << 24
"""Training tokens of "one epoch" of an endless world (what a run without --tokens trains on)."""
HELDOUT_STREAM, INIT_STREAM = 1, 2
"""Key streams of held-out rows and of the initialisation sample (training batches: 0)."""
NORM_ROWS = 16384
"""Rows of the fixed draw that measures a world's mean squared norm (its input scale)."""


Layout = tuple[tuple[int, ...], tuple[int, ...], int]
"""A regular hierarchy: the first feature and the number of features at each depth, and the
branching."""


class WorldError(ValueError):
    """A world folder that cannot be used; the message names the fix."""


def is_world(path: str | Path) -> bool:
    return (Path(path) / WORLD_JSON).is_file()


@dataclass(frozen=True)
class World:
    """A world's tables as device arrays (``tables``, a pytree ``draw`` takes), its record, and
    its hierarchy's ``regular_layout``."""

    path: Path
    record: dict[str, Any]
    tables: dict[str, Any]
    layout: Layout | None = None

    @property
    def name(self) -> str:
        return str(self.record.get("name", self.path.name))

    @property
    def d_model(self) -> int:
        return int(self.tables["feature_vectors"].shape[1])

    @property
    def num_features(self) -> int:
        return int(self.tables["feature_vectors"].shape[0])

    @cached_property
    def mean_sq_norm(self) -> float:
        """E||x||^2, from a fixed draw of NORM_ROWS rows (the same for every run; drawn once)."""
        rows = self.draw(jax.random.key(0), NORM_ROWS)[0]
        return float(jnp.mean(jnp.sum(rows * rows, axis=1)))

    def draw(self, key: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
        """(hidden activations, true codes) of ``batch`` samples (``draw``)."""
        scale = bool(self.record.get("scale_children_by_parent", True))
        return draw(self.tables, key, batch, scale, self.layout)


def load_world(path: str | Path) -> World:
    """Read and check a world folder: its tables' SHA-256 must match world.json."""
    path = Path(path)
    try:
        record = json.loads((path / WORLD_JSON).read_text())
    except (OSError, ValueError) as error:
        raise WorldError(f"cannot read {path / WORLD_JSON} ({error}); rebuild the world") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise WorldError(f"{path / WORLD_JSON} is not a world of this version; rebuild it")
    file = path / WORLD_TABLES
    if not file.is_file():
        raise WorldError(f"{file} is missing; rebuild the world")
    if hashlib.sha256(file.read_bytes()).hexdigest() != record.get("tables_sha256"):
        raise WorldError(f"checksum mismatch in {file}: it is damaged; rebuild the world")
    raw = load_file(file)
    return World(path, record, device_tables(raw), regular_layout(raw))


def device_tables(raw: dict[str, np.ndarray]) -> dict[str, Any]:
    """The arrays ``draw`` reads. The hierarchy is split by depth: ``levels[L]`` holds the
    features at depth L with their parents, and the sibling groups whose parent is at depth L."""
    probabilities = raw["firing_probabilities"].astype(np.float64)
    tables: dict[str, Any] = {
        "feature_vectors": jnp.asarray(raw["feature_vectors"]),
        "bias": jnp.asarray(raw["bias"]),
        "thresholds": jnp.asarray(ndtri(jnp.asarray(1.0 - probabilities)), jnp.float32),
        "mean": jnp.asarray(raw["mean_magnitudes"]),
        "std": jnp.asarray(raw["std_magnitudes"]),
    }
    if "correlation_factor" in raw:
        tables["factor"] = jnp.asarray(raw["correlation_factor"])
        tables["sqrt_diag"] = jnp.asarray(np.sqrt(raw["correlation_diag"]))
    depth, parent = raw["depth"], raw["parent"]
    group_depth = depth[raw["group_parent"]] if len(raw["group_parent"]) else np.zeros(0, int)
    levels = []
    for level in range(int(depth.max()) + 1 if depth.size and depth.max() >= 0 else 0):
        children = np.flatnonzero(depth == level) if level > 0 else np.zeros(0, np.int32)
        groups = np.flatnonzero(group_depth == level)
        members = raw["group_members"][groups]
        levels.append(
            {
                "children": jnp.asarray(children, jnp.int32),
                "parents": jnp.asarray(parent[children], jnp.int32),
                "group_parents": jnp.asarray(raw["group_parent"][groups], jnp.int32),
                "members": jnp.asarray(np.maximum(members, 0), jnp.int32),
                "member_valid": jnp.asarray(members >= 0),
            }
        )
    tables["levels"] = levels
    return tables


def _fire(tables: dict[str, Any], key: jax.Array, batch: int) -> jax.Array:
    """Step 1: [batch, N] booleans, feature i true with probability p_i."""
    n = tables["thresholds"].shape[0]
    key_low, key_own = jax.random.split(key)
    own = jax.random.normal(key_own, (batch, n))
    if "factor" in tables:
        low = jax.random.normal(key_low, (batch, tables["factor"].shape[1]))
        latent = low @ tables["factor"].T + own * tables["sqrt_diag"]
    else:
        latent = own
    return latent > tables["thresholds"]


def _hierarchy(
    tables: dict[str, Any], x: jax.Array, key: jax.Array, scale_children: bool
) -> jax.Array:
    """Step 3: parents gate (and scale) their children; exclusive siblings keep one member."""
    mean = tables["mean"]
    keys = jax.random.split(key, max(1, len(tables["levels"])))
    for level, key_level in zip(tables["levels"], keys, strict=False):
        if level["children"].shape[0]:
            up = x[:, level["parents"]]
            factor = up / mean[level["parents"]] if scale_children else 1.0
            gate = jnp.where(up > 0, factor, 0.0)
            x = x.at[:, level["children"]].multiply(gate)
        if level["members"].shape[0]:
            members = level["members"]
            alive = x[:, level["group_parents"]] > 0
            active = (x[:, members] > 0) & alive[:, :, None] & level["member_valid"]
            scores = jax.random.uniform(key_level, active.shape)
            winner = jnp.argmax(jnp.where(active, scores, -1.0), axis=-1)
            keep = jnp.arange(members.shape[1]) == winner[:, :, None]
            values = x[:, members]
            x = x.at[:, members].set(jnp.where(active & ~keep, 0.0, values))
    return x


def regular_layout(raw: dict[str, np.ndarray]) -> Layout | None:
    """The ``Layout`` of a hierarchy that is complete, numbered breadth first, and whose every
    sibling group is exclusive, as SAELens builds SynthSAEBench's: the children of the j-th
    feature at depth L are then features ``start[L+1] + S j ... + S - 1``, and the hierarchy
    runs on reshaped slices instead of gathers (``_regular_hierarchy``). None otherwise."""
    depth, parent, members = raw["depth"], raw["parent"], raw["group_members"]
    if not len(members) or (members < 0).any():
        return None
    branching = members.shape[1]
    starts: list[int] = []
    sizes: list[int] = []
    for level in range(int(depth.max()) + 1):
        at = np.flatnonzero(depth == level)
        if not len(at) or at[-1] - at[0] + 1 != len(at):
            return None
        if level and (
            len(at) != sizes[-1] * branching
            or (parent[at] != starts[-1] + (at - at[0]) // branching).any()
        ):
            return None
        starts.append(int(at[0]))
        sizes.append(len(at))
    inner = np.flatnonzero((depth >= 0) & (depth < len(starts) - 1))
    if not np.array_equal(np.sort(raw["group_parent"]), inner):
        return None
    return tuple(starts), tuple(sizes), branching


def _regular_hierarchy(
    tables: dict[str, Any],
    x: jax.Array,
    key: jax.Array,
    scale_children: bool,
    layout: Layout,
) -> jax.Array:
    """``_hierarchy`` on a regular layout: the same operations, in the same order, with the same
    random numbers, on contiguous slices (what makes the 16k world's draw fast)."""
    starts, sizes, branching = layout
    batch = x.shape[0]
    keys = jax.random.split(key, max(1, len(starts)))
    mean = tables["mean"]
    for level, start in enumerate(starts):
        size = sizes[level]
        if level:
            up_start, up_size = starts[level - 1], sizes[level - 1]
            up = x[:, up_start : up_start + up_size]
            factor = up / mean[up_start : up_start + up_size] if scale_children else 1.0
            gate = jnp.where(up > 0, factor, 0.0)
            block = x[:, start : start + size].reshape(batch, up_size, branching)
            x = x.at[:, start : start + size].set((block * gate[:, :, None]).reshape(batch, size))
        if level + 1 < len(starts):
            kid_start, kid_size = starts[level + 1], sizes[level + 1]
            kids = x[:, kid_start : kid_start + kid_size].reshape(batch, size, branching)
            alive = x[:, start : start + size] > 0
            active = (kids > 0) & alive[:, :, None]
            scores = jax.random.uniform(keys[level], active.shape)
            winner = jnp.argmax(jnp.where(active, scores, -1.0), axis=-1)
            keep = jnp.arange(branching) == winner[:, :, None]
            kids = jnp.where(active & ~keep, 0.0, kids)
            x = x.at[:, kid_start : kid_start + kid_size].set(kids.reshape(batch, kid_size))
    return x


@partial(jax.jit, static_argnames=("batch", "scale_children", "layout"))
def draw(
    tables: dict[str, Any],
    key: jax.Array,
    batch: int,
    scale_children: bool = True,
    layout: Layout | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(hidden activations [batch, d], true codes [batch, N]) of one draw of the world;
    ``scale_children``: the world's ``scale_children_by_parent``; ``layout``: its
    ``regular_layout`` (the same draw, computed faster), or None."""
    key_fire, key_size, key_tree = jax.random.split(key, 3)
    fires = _fire(tables, key_fire, batch)
    z = jax.random.normal(key_size, fires.shape)
    x = jnp.where(fires, jax.nn.relu(tables["mean"] + tables["std"] * z), 0.0)
    if layout is None:
        x = _hierarchy(tables, x, key_tree, scale_children)
    else:
        x = _regular_hierarchy(tables, x, key_tree, scale_children, layout)
    return x @ tables["feature_vectors"] + tables["bias"], x


def stream_key(seed: int, stream: int) -> jax.Array:
    return jax.random.fold_in(jax.random.key(seed), stream)


class SyntheticSource:
    """A ``BatchSource`` drawing a world's activations on the device (``jax_sae.data.source``).

    Endless: "one epoch" is ``n_train`` tokens (``NOMINAL_EPOCH`` unless given), so a run says
    how long it trains with ``--tokens`` or ``--steps``."""

    def __init__(
        self, world: World, spec: BatchSpec, eval_tokens: int, n_train: int = NOMINAL_EPOCH
    ) -> None:
        if spec.temporal:
            raise LoaderError(
                f"{world.path} draws independent samples, with no token order: a variant that "
                "reads each token's predecessor (temporal) cannot train on it"
            )
        self.world = world
        self._spec = spec
        self._eval_tokens = eval_tokens
        self._n_train = n_train

    @property
    def spec(self) -> BatchSpec:
        return self._spec

    @property
    def d_model(self) -> int:
        return self.world.d_model

    @property
    def n_train(self) -> int:
        return self._n_train

    @property
    def eval_tokens(self) -> int:
        return self._eval_tokens

    @property
    def heldout_tokens(self) -> int:
        return self._eval_tokens

    single_pass = False
    releases_data = False

    def describe(self) -> SourceDescription:
        return SourceDescription(
            path=self.world.path,
            identity="world:" + str(self.world.record["tables_sha256"]),
            complete=True,
            model_name=self.world.name,
            ctx_len=None,
            dataset="synthetic world (drawn on the device)",
            prepend_bos=None,
        )

    def _rows(self, key: jax.Array, n: int) -> jax.Array:
        return self.world.draw(key, n)[0]

    def mean_sq_norm(self) -> float:
        return self.world.mean_sq_norm

    def batches(
        self,
        start_step: int = 0,
        stop_step: int | None = None,
        convert_on_device: bool | None = None,
    ) -> _Draws:
        return _Draws(self, start_step, stop_step)

    def batch(self, step: int) -> dict[str, jax.Array]:
        """The batch of one step: this process's rows, scaled, placed as the spec says."""
        spec = self._spec
        key = jax.random.fold_in(stream_key(spec.seed, 0), step)
        x = self._rows(key, spec.batch_size) * spec.scale
        if spec.rows is not None:
            x = x[spec.rows]
        if spec.sharding is not None:
            x = jax.make_array_from_process_local_data(spec.sharding, np.asarray(x))
        return {"x": x}

    def sample(self, n_tokens: int, windows: int = 16) -> np.ndarray:
        key = stream_key(self._spec.seed, INIT_STREAM)
        return np.asarray(self._rows(key, n_tokens) * self._spec.scale)

    def heldout(self, batch_size: int) -> Iterator[np.ndarray]:
        key = stream_key(self._spec.seed, HELDOUT_STREAM)
        for index, start in enumerate(range(0, self._eval_tokens, batch_size)):
            n = min(batch_size, self._eval_tokens - start)
            yield np.asarray(self._rows(jax.random.fold_in(key, index + 1), n))

    def release_before(self, step: int) -> None:
        """Nothing to release: every batch is drawn anew."""

    def record(self, step: int) -> dict | None:
        return None


class _Draws:
    """The device batches of steps [start, stop): drawn when asked for, so nothing to stop."""

    def __init__(self, source: SyntheticSource, start: int, stop: int | None) -> None:
        self.source, self.step, self.stop = source, start, stop

    def __iter__(self) -> _Draws:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self.stop is not None and self.step >= self.stop:
            raise StopIteration
        self.step += 1
        return self.source.batch(self.step - 1)

    def close(self) -> None:
        self.stop = self.step

    def __enter__(self) -> _Draws:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def world_norm_scale(world: World) -> float:
    """Scalar s with E||s x||^2 = d_model (what ``--normalize`` applies to a cache)."""
    return math.sqrt(world.d_model / world.mean_sq_norm)
