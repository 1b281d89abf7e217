"""Will a training step fit in device memory? Checked before anything is allocated.

An SAE that does not fit fails inside XLA with RESOURCE_EXHAUSTED after minutes of set-up (or, on
a host, takes the machine into swap). The size of what a step holds is predictable from shapes
alone: the training state (parameters, Adam moments, regulariser state, measured with
`jax.eval_shape`, so nothing is allocated), one gradient of the parameters, and the [batch, d_sae]
activations of the forward and backward pass. `check_fits` compares that lower bound with what the
device has free and refuses a run that cannot fit, in one line that says what to change.
"""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jax_sae.model.variants import Variant
from jax_sae.training.config import ConfigError
from jax_sae.training.engine import optimizer_for
from jax_sae.util.disk import human_bytes

ACTIVATION_COPIES = 2
"""[batch, d_sae] float32 arrays a step holds at once at the least: the pre-activations and their
gradient (the dense path also keeps the code, the sparse path its gathered rows)."""
ADVICE = "lower d_sae or the batch size, or split the latents with --mesh model=N"


def tree_bytes(tree: Any) -> int:
    """Bytes of every array (or shape-dtype struct) in a pytree."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def state_bytes(variant: Variant, steps: int) -> tuple[int, int]:
    """(parameters, whole training state) of one run, in bytes, without allocating either."""

    def fresh(key: jax.Array) -> dict[str, Any]:
        params = variant.init_params(key)
        opt_state = optimizer_for(variant.hparams, steps).init(params)
        return {"params": params, "opt_state": opt_state, "reg_state": variant.init_state()}

    shapes = jax.eval_shape(fresh, jax.random.PRNGKey(0))
    return tree_bytes(shapes["params"]), tree_bytes(shapes)


def step_bytes(
    variants: Sequence[Variant], steps: int, batch_size: int, data: int = 1, model: int = 1
) -> int:
    """A lower bound on the bytes one device holds during a step of these members, with the batch
    split over `data` devices and the latents over `model`."""
    total = 0
    for variant in variants:
        params, state = state_bytes(variant, steps)
        activations = ACTIVATION_COPIES * batch_size * variant.d_sae * 4 // data
        total += (state + params) // model + activations // model
    return total


def host_memory_available() -> int | None:
    """Bytes this process may still allocate on the host: the least of the kernel's available
    memory, the cgroup's remaining limit and the address-space limit; None when none is known."""
    known = []
    meminfo = _read_ints(Path("/proc/meminfo"), "MemAvailable:")
    if meminfo is not None:
        known.append(meminfo * 1024)
    cgroup_limit = _read_number(Path("/sys/fs/cgroup/memory.max"))
    if cgroup_limit is not None:
        known.append(cgroup_limit - (_read_number(Path("/sys/fs/cgroup/memory.current")) or 0))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _read_ints(Path(f"/proc/{os.getpid()}/status"), "VmSize:")
        known.append(soft - (used or 0) * 1024)
    return max(min(known), 0) if known else None


def device_memory_available(device: jax.Device) -> int | None:
    """Free bytes of an accelerator (from its allocator), or of the host for a CPU device."""
    stats = None
    with contextlib.suppress(AttributeError, NotImplementedError, RuntimeError):
        stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return host_memory_available()


def check_fits(
    variants: Sequence[Variant],
    steps: int,
    batch_size: int,
    mesh_shape: dict[str, int] | None = None,
    device: jax.Device | None = None,
) -> None:
    """Refuse, in one line, members whose step cannot fit in the device's free memory."""
    device = device or jax.local_devices()[0]
    shape = mesh_shape or {}
    need = step_bytes(variants, steps, batch_size, shape.get("data", 1), shape.get("model", 1))
    free = device_memory_available(device)
    if free is not None and need > free:
        raise ConfigError(
            f"out of memory on {device_name(device)}: one training step needs at least "
            f"{human_bytes(need)} (parameters, Adam state and [batch, d_sae] activations) but "
            f"{human_bytes(free)} is free; {ADVICE}"
        )


def out_of_memory_message(device: jax.Device | None = None) -> str:
    """The one line for an allocation XLA refused although the estimate fitted."""
    device = device or jax.local_devices()[0]
    free = device_memory_available(device)
    free_text = f" ({human_bytes(free)} free now)" if free is not None else ""
    return (
        f"out of memory on {device_name(device)}{free_text}: the step's allocations did not fit; "
        f"{ADVICE}, or use --compute-dtype bfloat16; the last checkpoint is intact "
        "(rerun with --resume)"
    )


def device_name(device: jax.Device) -> str:
    kind = getattr(device, "device_kind", "") or device.platform
    return f"{device.platform}:{device.id} ({kind})" if kind != device.platform else device.platform


def _read_ints(path: Path, key: str) -> int | None:
    """The first integer after `key` in a /proc file, or None."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_number(path: Path) -> int | None:
    """A cgroup file's integer; None when absent or unlimited ("max")."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
