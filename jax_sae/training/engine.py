"""The compiled step of a group of SAEs that share every batch: one run plainly, a sweep vmapped.

A sweep group stacks its members' states along a leading member axis and runs them through one
``jax.vmap``-ed step. Hyper-parameters that differ between members enter the step as arrays
(one value per member, ``Variant.with_hparams``); all others stay Python constants, so a
member computes exactly what the same single run computes. A hyper-parameter that sets a shape
or steers Python control flow cannot be an array: ``traceable`` finds out by tracing, and the
trainer then puts such members in separate groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_sae.model.variants import Variant
from jax_sae.parallel.layout import shard_train_step, state_shardings
from jax_sae.training.diagnostics import grad_shares_body
from jax_sae.training.optim import make_optimizer
from jax_sae.training.step import train_step_body

TrainState = dict[str, Any]
"""``{"params", "opt_state", "reg_state", "rng"}``: everything a checkpoint holds."""

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def optimizer_for(hp: Mapping[str, Any], steps: int) -> optax.GradientTransformation:
    """The run's optimizer from its hyper-parameters (ValueError for invalid ones)."""
    return make_optimizer(
        lr=hp["lr"],
        warmup_steps=hp["warmup_steps"],
        total_steps=steps,
        decay=hp["lr_decay"],
        b1=hp["adam_b1"],
        b2=hp["adam_b2"],
        eps=hp["adam_eps"],
        grad_clip_norm=hp["grad_clip_norm"],
    )


def initial_state(
    variant: Variant, seed: int, steps: int, data_sample: np.ndarray | None
) -> TrainState:
    """Fresh training state of one run; also the structure a checkpoint is restored into
    (``data_sample`` None: without the data-dependent init, which changes no shape)."""
    init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
    params = variant.init_params(init_key, data_sample=data_sample)
    return {
        "params": params,
        "opt_state": optimizer_for(variant.hparams, steps).init(params),
        "reg_state": variant.init_state(),
        "rng": rng,
    }


def abstract_state(variant: Variant, steps: int) -> TrainState:
    """The shapes and dtypes of a run's training state, placed on one device, computing nothing:
    what a checkpoint is read into outside training (``checkpoint.read_step``)."""
    shapes = jax.eval_shape(lambda: initial_state(variant, 0, steps, None))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def swept_hparam_arrays(variants: Sequence[Variant]) -> dict[str, jax.Array]:
    """The hyper-parameters on which members differ, as one float32 array each ([N])."""
    keys = [k for k in variants[0].hparams if len({v.hparams[k] for v in variants}) > 1]
    return {k: jnp.asarray([v.hparams[k] for v in variants], jnp.float32) for k in keys}


def vmap_members(
    build: Callable[[Variant], Callable], variants: Sequence[Variant], member_args: int
) -> Callable:
    """``build(variant)`` for every member at once: vmapped over the leading member axis of the
    first ``member_args`` arguments, the other arguments shared by all members."""
    base, values = variants[0], swept_hparam_arrays(variants)

    def one(hp: dict, *args: Any) -> Any:
        return build(base.with_hparams(hp))(*args)

    def every(*args: Any) -> Any:
        shared = len(args) - member_args
        in_axes = (0, *[0] * member_args, *[None] * shared)
        return jax.vmap(one, in_axes=in_axes)(values, *args)

    return every


def stack_members(trees: Sequence[Any], vmapped: bool) -> Any:
    """The group's state from its members' states (a sweep stacks them on a leading axis)."""
    if not vmapped:
        (tree,) = trees
        return tree
    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)


@dataclass(frozen=True)
class Engine:
    """A group's jitted step and gradient-share diagnostics over the stacked (or plain) state."""

    step: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]
    grad_shares: Callable[[TrainState, dict, jax.Array], dict]
    place: Callable[[TrainState], TrainState]
    """Put a state where the step wants it: onto the mesh's layout (identity on one device), as
    global arrays when the mesh spans several processes."""
    size: int
    vmapped: bool

    def member(self, tree: Any, index: int) -> Any:
        """Member ``index``'s slice of a state or of metrics."""
        return jax.tree.map(lambda x: x[index], tree) if self.vmapped else tree


def make_engine(
    variants: Sequence[Variant],
    steps: int,
    compute_dtype: str,
    vmapped: bool,
    mesh: Mesh | None = None,
    example: TrainState | None = None,
    batch_size: int = 0,
) -> Engine:
    """The engine of one group: ``vmapped`` for a sweep (any size), plain for one run. With a
    ``mesh`` the state is laid out by ``parallel.state_shardings`` (the structure and shapes of
    ``example``) and batches split over its ``data`` axis (``batch_size`` must divide)."""
    dtype = COMPUTE_DTYPES[compute_dtype]

    def build_step(v: Variant) -> Callable:
        return train_step_body(v, optimizer_for(v.hparams, steps), dtype)

    def build_shares(v: Variant) -> Callable:
        return grad_shares_body(v, dtype)

    if vmapped:
        body = vmap_members(build_step, variants, member_args=3)
        shares = vmap_members(build_shares, variants, member_args=2)
    else:
        (variant,) = variants
        body, shares = build_step(variant), build_shares(variant)
    jitted_shares = jax.jit(shares)
    jitted_step: Callable
    if mesh is None:
        jitted_step = jax.jit(body, donate_argnums=(0, 1, 2))

        def place(state: TrainState) -> TrainState:
            return state

    else:
        assert example is not None, "a mesh lays out the state after the example's shapes"
        keys = ("params", "opt_state", "reg_state")
        layout = state_shardings(
            mesh, tuple(example[k] for k in keys), variants[0].d_sae, member_axis=vmapped
        )
        jitted_step = shard_train_step(body, mesh, layout, batch_size)

        def place(state: TrainState) -> TrainState:
            if jax.process_count() > 1:  # jax 0.10.2: a device array put onto several
                state = jax.device_get(state)  # processes has shards orbax cannot read
            placed = jax.device_put(tuple(state[k] for k in keys), layout)
            rest = {k: v for k, v in state.items() if k not in keys}  # the RNG key: replicated
            rest = jax.device_put(rest, NamedSharding(mesh, P()))
            return rest | dict(zip(keys, placed, strict=True))

    def step(state: TrainState, batch: dict, index: jax.Array) -> tuple[TrainState, dict]:
        params, opt_state, reg_state, metrics = jitted_step(
            state["params"], state["opt_state"], state["reg_state"], batch, index
        )
        return state | {"params": params, "opt_state": opt_state, "reg_state": reg_state}, metrics

    def grad_shares(state: TrainState, batch: dict, index: jax.Array) -> dict:
        return jitted_shares(state["params"], state["reg_state"], batch, index)

    return Engine(step, grad_shares, place, len(variants), vmapped)


def traceable(engine: Engine, state: TrainState, batch: dict) -> str | None:
    """None if the engine's step traces with these inputs, else the reason it cannot (a
    hyper-parameter that sets a shape or a Python branch differs between members)."""
    try:
        jax.eval_shape(engine.step, state, batch, jnp.int32(0))
    except (
        jax.errors.ConcretizationTypeError,
        jax.errors.TracerBoolConversionError,
        jax.errors.TracerIntegerConversionError,
    ) as error:
        return str(error).splitlines()[0]
    return None
