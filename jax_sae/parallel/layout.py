"""Multi-device training on a 2-D device mesh `data x model` (`--mesh data=N,model=M`).

The batch axis is split over `data` (data parallelism); the latent axis F over `model` (model
parallelism): W_enc columns, W_dec rows, b_enc, per-latent regulariser state and the optimizer
moments of all of them. GSPMD partitions the unchanged step of `train_step.make_train_step` from
these layouts and inserts the collectives. Sharding never changes what a step computes, only
where, so a layout rule can cost speed but not correctness.

Use in a training loop:

    mesh = make_mesh(parse_mesh("data=2,model=2"))
    shardings = state_shardings(mesh, (params, opt_state, reg_state), d_sae)
    params, opt_state, reg_state = jax.device_put((params, opt_state, reg_state), shardings)
    step_fn = shard_train_step(make_train_step(v, opt), mesh, shardings, batch_size)
    params, opt_state, reg_state, metrics = step_fn(params, opt_state, reg_state, batch, step)

Batches may be host arrays: jit splits them over `data`. To restore a checkpoint onto any mesh,
give orbax a target whose leaves carry the new layout, e.g.
`jax.ShapeDtypeStruct(shape, dtype, sharding=s)` with `s` from `state_shardings`.

The layout rule (`state_shardings`), per leaf of any state pytree (params, optax state,
regulariser state, RNG keys):

* the latent axis, the first axis of size d_sae, goes to `model`: W_dec [F, d] and [F, F]
  leaves (co-firing counts, pair scores) are split by rows, [F] leaves entirely;
* leaves named `W_enc*` (and their optimizer moments, which carry the same name) are [d, latents]:
  only their last axis can be latent; `b_dec` is [d] and never is. Names matter only when
  d_in == d_sae (the ReLU family's default), where shapes alone cannot tell the axes apart;
* everything else is replicated: b_dec, scalars, the Adam step count, and two_level's concept
  level (F_c = F / 64 latents: 1/64 of the work, and splitting it would add a second
  cross-shard top-k for no memory worth saving);
* with `member_axis=True` (vmapped sweeps) the leading axis is the sweep member and is never split;
  the rule applies to the rest of the shape.

Where GSPMD alone would move too much, the model's code runs under `shard_map` inside a step of
`shard_train_step` (which puts the mesh in context, `step_mesh`):

* GSPMD gathers the whole [B, F] operand of a `lax.top_k` to every device; the per-token top-k of
  the TopK family (`activations.topk`) goes through `sharded_top_k`, which moves only each
  shard's k candidates, and BatchTopK's batch-wide threshold (`activations.batch_kth_largest`)
  sums counts across shards;
* the sparse path's (token, latent) pairs (`jax_sae.model.sparse`): each device gathers and
  scatter-adds only its own latents' decoder and encoder rows, and the reconstruction is summed
  over `model`; GSPMD would all-reduce the gathered decoder rows [B k, d].

`collective_bytes_per_step` says what a step should move; `compiled_collective_bytes` reads what
the compiled program does (tests/test_mesh.py holds the two within 2x for the TopK family).
"""

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "model")
ENCODER_PREFIX = "W_enc"
INPUT_SPACE = frozenset({"b_dec"})


def parse_mesh(text: str, n_devices: int | None = None) -> dict[str, int]:
    """`"data=2,model=2"` -> {"data": 2, "model": 2}; an axis left out has size 1.

    The product must be the device count (default: all devices), so that no device sits idle.
    """
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"bad --mesh item {item!r}: write e.g. data=2,model=2")
        name = name.strip()
        if name not in sizes:
            raise ValueError(f"unknown mesh axis {name!r} in --mesh; valid: {', '.join(AXES)}")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} given twice in --mesh {text!r}")
        if int(value) < 1:
            raise ValueError(f"mesh axis {name}={value} must be >= 1")
        seen.add(name)
        sizes[name] = int(value)
    n_devices = jax.device_count() if n_devices is None else n_devices
    if sizes["data"] * sizes["model"] != n_devices:
        raise ValueError(
            f"--mesh {text} uses {sizes['data'] * sizes['model']} devices but {n_devices} are "
            "available: make data * model equal the device count"
        )
    return sizes


def make_mesh(axes: Mapping[str, int]) -> Mesh:
    """The `data x model` mesh with automatic (GSPMD) axes, so unannotated ops just propagate."""
    return jax.make_mesh(
        (axes["data"], axes["model"]), AXES, axis_types=(AxisType.Auto, AxisType.Auto)
    )


def _leaf_name(path: tuple[Any, ...]) -> str:
    """The innermost dict key on a leaf's path: a parameter or state name (also inside optax
    states, whose moments mirror the parameter dict)."""
    keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return str(keys[-1]) if keys else ""


def _latent_axis(name: str, shape: tuple[int, ...], d_sae: int) -> int | None:
    """The axis of a leaf that indexes latents (see the module docstring), or None."""
    if name in INPUT_SPACE or not shape:
        return None
    if name.startswith(ENCODER_PREFIX):
        return len(shape) - 1 if shape[-1] == d_sae else None
    return next((axis for axis, size in enumerate(shape) if size == d_sae), None)


def _leaf_spec(name: str, shape: tuple[int, ...], d_sae: int, member_axis: bool = False) -> P:
    """The PartitionSpec of one leaf under the module's rule."""
    lead = 1 if member_axis else 0
    axis = _latent_axis(name, shape[lead:], d_sae)
    if axis is None:
        return P()
    return P(*([None] * (lead + axis)), "model")


def state_shardings(
    mesh: Mesh | AbstractMesh, state_tree: Any, d_sae: int, member_axis: bool = False
) -> Any:
    """A NamedSharding per leaf of `state_tree` (arrays or ShapeDtypeStructs), same structure."""
    model = mesh.shape["model"]
    if d_sae % model:
        raise ValueError(
            f"d_sae={d_sae} is not divisible by the mesh's model size {model}: "
            "choose d_sae a multiple of it or a smaller model axis"
        )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(
            mesh, _leaf_spec(_leaf_name(path), jnp.shape(leaf), d_sae, member_axis)
        ),
        state_tree,
    )


def batch_sharding(mesh: Mesh | AbstractMesh, batch_size: int) -> NamedSharding:
    """Every batch array split along its leading (token) axis over `data`; checks the size
    up front, where XLA would fail at the first step without naming the fix."""
    data = mesh.shape["data"]
    if batch_size % data:
        raise ValueError(
            f"batch size {batch_size} is not divisible by the mesh's data size {data}: "
            "choose a batch size that is a multiple of it"
        )
    return NamedSharding(mesh, P("data"))


def shard_train_step(
    step_fn: Callable, mesh: Mesh, shardings: tuple[Any, Any, Any], batch_size: int
) -> Callable:
    """`step_fn(params, opt_state, reg_state, batch, step)` (plain, jitted or vmapped) jitted
    with fixed layouts: the state in and out under `shardings` (from `state_shardings` of the
    (params, opt_state, reg_state) triple), the batch split over `data`, step and metrics
    replicated. Fixed output layouts keep donation in place and every step on one compilation.
    """
    replicated = NamedSharding(mesh, P())

    def step_on_mesh(params, opt_state, reg_state, batch, step):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for `top_k`
            return step_fn(params, opt_state, reg_state, batch, step)

    return jax.jit(
        step_on_mesh,
        in_shardings=(*shardings, batch_sharding(mesh, batch_size), replicated),
        out_shardings=(*shardings, replicated),
        donate_argnums=(0, 1, 2),
    )


def splits(shape: tuple[int, ...], k: int, mesh: Mesh | AbstractMesh) -> bool:
    """x [B, F] splits into (data, model) blocks of at least k latents per row."""
    if len(shape) != 2:
        return False
    (rows, latents), model = shape, mesh.shape["model"]
    return rows % mesh.shape["data"] == 0 and latents % model == 0 and k <= latents // model


def step_mesh() -> AbstractMesh | None:
    """The mesh of the enclosing step of `shard_train_step` (which puts it in context), or None
    outside one and on a single device: where the model's collective-aware code paths apply."""
    mesh = jax.sharding.get_abstract_mesh()
    if not set(AXES) <= set(mesh.axis_names) or mesh.size == 1:
        return None
    return mesh


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)`, through `sharded_top_k` inside a step of `shard_train_step` (where the
    mesh is in context) when x [B, F] splits over it. GSPMD replicates the operand of a top-k:
    it would all-gather the whole [B, F] to every device, even one split along B only."""
    mesh = step_mesh()
    if mesh is not None and splits(x.shape, k, mesh):
        return sharded_top_k(x, k, mesh)
    return lax.top_k(x, k)


def sharded_top_k(x: jax.Array, k: int, mesh: Mesh | AbstractMesh) -> tuple[jax.Array, jax.Array]:
    """`lax.top_k(x, k)` of x [B, F] split as (data, model), without gathering x: a local top-k
    per model shard, an all-gather of the model * k candidates (values and global indices), and
    a top-k of those. Equal to the unsharded result, ties included (both prefer lower indices).
    """
    if not splits(x.shape, k, mesh):
        raise ValueError(
            f"top-{k} of {x.shape} on mesh {dict(mesh.shape)} needs [B, F] with B divisible by "
            "data, F by model and k <= F / model"
        )

    def local_then_merge(shard: jax.Array) -> tuple[jax.Array, jax.Array]:
        values, indices = lax.top_k(shard, k)
        indices = indices + lax.axis_index("model") * shard.shape[-1]
        values, indices = (
            lax.all_gather(a, "model", axis=1, tiled=True, to="invarying")
            for a in (values, indices)
        )
        best, position = lax.top_k(values, k)
        return best, jnp.take_along_axis(indices, position, axis=1)

    return jax.shard_map(
        local_then_merge, mesh=mesh, in_specs=P("data", "model"), out_specs=P("data", None)
    )(x)


def _ring_all_reduce(nbytes: float, devices: int) -> float:
    return 2 * nbytes * (devices - 1) / devices


def collective_bytes_per_step(
    d_in: int,
    d_sae: int,
    batch: int,
    data: int,
    model: int,
    k: int | None = None,
    k_aux: int | None = None,
    cofiring_k: int | None = None,
) -> dict[str, float]:
    """Bytes one device sends per training step under this module's layout, by formula.

    Ring algorithms: an all-reduce of n bytes over p devices sends 2 n (p - 1) / p per device,
    an all-gather whose result is n bytes sends n (p - 1) / p. float32 everywhere.

    * `gradient_all_reduce` (data parallelism): each device's gradient shard, W_enc, W_dec, b_enc
      split over `model` plus the replicated b_dec, summed over `data`;
    * `decoder_all_reduce` (model parallelism): each model shard decodes its own latents, so the
      reconstruction [B / data, d_in] is a sum over `model`; everything downstream of it
      (gradient w.r.t. x_hat, then the local latents) needs no more traffic;
    * `top_k_gather` (with k, model parallelism): the k candidates per token of each model shard,
      values and int32 indices, gathered by every shard (`sharded_top_k`);
    * `pair_all_reduce` (with k, the sparse path, `jax_sae.model.sparse`): the selected
      pre-activations [B / data, k] read by their owners and summed over `model`, and their
      gradient coming back from the decoder, the same size;
    * with `k_aux` (AuxK, only in steps where some latent is dead): its top-k gather and pair
      all-reduces with k_aux, its own reconstruction [B / data, d_in] over `model`, and, because
      its gradient is computed in a branch of its own (`lax.cond`), a second gradient all-reduce;
    * with `cofiring_k` (`hier_ortho`'s batch co-firing pairs): every token's k active decoder
      rows and their firing columns over the batch, [B / data, k, d_in + B] summed over `model`
      in chunks: pairs of latents on different shards must meet somewhere, so this term is
      inherent to the per-token pair sum, not to the layout.

    Left out: vectors of size d_in or F / model (the b_dec gradient's mat-vec, dead-latent
    counts, BatchTopK's threshold search) and scalars (loss, metrics). `compiled_collective_bytes`
    reads what XLA emits; tests/test_mesh.py checks the two agree within 2x on 4 CPU devices.
    """
    params_per_device = (2 * d_in * d_sae + d_sae) / model + d_in
    rows = batch / data

    def selection(width: int | None) -> tuple[float, float]:
        if width is None:
            return 0.0, 0.0
        return 8 * rows * width * (model - 1), 2 * _ring_all_reduce(4 * rows * width, model)

    gather, pairs = selection(k)
    aux_gather, aux_pairs = selection(k_aux)
    gradient = _ring_all_reduce(4 * params_per_device, data)
    decoder = _ring_all_reduce(4 * rows * d_in, model)
    aux = 0.0 if k_aux is None else gradient + decoder + aux_gather + aux_pairs
    cofiring = 0.0
    if cofiring_k is not None:
        cofiring = _ring_all_reduce(4 * rows * cofiring_k * (d_in + batch + 1), model)
    out = {
        "gradient_all_reduce": gradient,
        "decoder_all_reduce": decoder,
        "top_k_gather": gather,
        "pair_all_reduce": pairs,
        "auxk": aux,
        "cofiring_rows": cofiring,
    }
    return out | {"total": sum(out.values())}


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
"""Bytes per element of HLO types other than the 4-byte f32, s32, u32 (8 for *64)."""
_COLLECTIVE_LINE = re.compile(
    r"= (?P<shape>.+?) (?P<op>" + "|".join(COLLECTIVES) + r")(?:-start)?\((?P<rest>.*)$"
)
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def _array_bytes(shape: str) -> int:
    """Bytes of an HLO result shape, one array or a tuple of them ("(f32[4,8]{1,0}, f32[])")."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = math.prod(int(d) for d in dims.split(",") if d)
        total += size * (8 if dtype.endswith("64") else DTYPE_BYTES.get(dtype, 4))
    return total


def _group_size(attributes: str) -> int:
    """Devices per group of a collective, from any of XLA's three spellings of replica_groups:
    explicit `{{0,1},{2,3}}`, iota `[groups,size]<=[...]`, and `mesh[...] {'axis', ...}`."""
    if match := re.search(r"replica_groups=mesh\[([^\]]*)\].*?\{([^}]*)\}", attributes):
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", match.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", match.group(2)))
    if match := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes):
        return int(match.group(2))
    if match := re.search(r"replica_groups=\{\{([^}]*)\}", attributes):
        return len(match.group(1).split(","))
    raise ValueError(f"cannot read the replica groups of: {attributes[:200]}")


def compiled_collective_bytes(hlo_text: str) -> dict[str, float]:
    """Bytes one device sends per step by collective kind, read from a compiled program's HLO
    text (`jit(f).lower(...).compile().as_text()`), by the ring formulas of
    `collective_bytes_per_step`: all-reduce 2 n (p - 1) / p, all-gather and all-to-all
    n (p - 1) / p of the result, reduce-scatter n (p - 1) of its shard, a permute n.

    Each collective counts once as compiled: both branches of a `lax.cond` (AuxK when latents
    are dead), one iteration of a loop. The check that a step moves what the formula says.
    """
    out = dict.fromkeys(COLLECTIVES, 0.0)
    for line in hlo_text.splitlines():
        match = _COLLECTIVE_LINE.search(line)
        if match is None:
            continue
        op, nbytes = match.group("op"), _array_bytes(match.group("shape"))
        if op == "collective-permute":
            pairs = re.findall(r"\{(\d+),(\d+)\}", match.group("rest"))
            out[op] += nbytes if any(a != b for a, b in pairs) else 0.0
            continue
        p = _group_size(match.group("rest"))
        factor = {"all-reduce": 2 * (p - 1) / p, "reduce-scatter": p - 1}.get(op, (p - 1) / p)
        out[op] += nbytes * factor
    return out | {"total": sum(out.values())}
