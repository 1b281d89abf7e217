"""One training command over several hosts: one process per host, joined by ``jax.distributed``.

Every process runs the same ``train.py`` command with three environment variables:

    JAX_COORDINATOR_ADDRESS=host0:1234  (process 0's host and a free port, the same everywhere)
    JAX_NUM_PROCESSES=2                 (how many processes)
    JAX_PROCESS_ID=0                    (this process: 0 .. JAX_NUM_PROCESSES - 1)

JAX 0.10 reads only the first of them by itself (the other two it detects on SLURM, Open MPI or
Kubernetes alone), so ``initialize_from_env`` reads all three and passes them on. CPU processes
exchange data through gloo. The mesh's devices then span every process: each process takes
only the rows of a batch that its own devices hold (``local_rows``; the loader still reads whole
chunks from disk, see ``jax_sae.data.loader``) and makes them part of one global array
(``global_batch``). Process 0, the primary, alone writes the run folder's files; checkpoints are
written by every process through orbax, which needs a filesystem all hosts share.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Sharding

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
T = TypeVar("T")


class DistributedError(RuntimeError):
    """Bad multi-process settings, or another process that stopped; the message says which."""


def initialize_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Join the processes named by ``ENV_VARS`` (True), or stay a single process when none is
    set (False). Must run before any JAX computation: JAX fixes its devices at the first one."""
    given = {name: environ.get(name, "") for name in ENV_VARS}
    if not any(given.values()):
        return False
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise DistributedError(f"set {', '.join(missing)} too, or none of {', '.join(ENV_VARS)}")
    address, count, index = given.values()
    if not (count.isdigit() and index.isdigit() and int(index) < int(count)):
        raise DistributedError(
            f"JAX_NUM_PROCESSES={count} and JAX_PROCESS_ID={index} must be integers with "
            "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=int(count), process_id=int(index))
    return True


def is_primary() -> bool:
    """Process 0 writes the run folder's files; the others only compute and checkpoint."""
    return jax.process_index() == 0


def local_rows(sharding: Sharding, batch_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that this process's devices hold under
    ``sharding``: the only rows it has to read (all of them when the batch is replicated)."""
    spans = sharding.addressable_devices_indices_map((batch_size,)).values()
    return one_block([span[0].indices(batch_size)[:2] for span in spans])


def one_block(spans: list[tuple[int, int]]) -> slice:
    """The (start, stop) row ranges of one process's devices as one slice; the loader reads one
    block per batch, so a process whose devices sit apart on the data axis is refused."""
    ordered = sorted(set(spans))
    start, stop = ordered[0]
    for lo, hi in ordered[1:]:
        if lo > stop:
            raise DistributedError(
                f"this process's devices hold rows {ordered} of each batch, not one block; give "
                "each host's devices consecutive places on the mesh's data axis"
            )
        stop = max(stop, hi)
    return slice(start, stop)


def global_batch(local: Mapping[str, np.ndarray], sharding: Sharding) -> dict[str, jax.Array]:
    """One global array per key from every process's own rows (``local_rows``) of the batch."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def host_value(tree: Any) -> Any:
    """Numpy copies of (global) arrays on every process; gathered when split across processes,
    where ``jax.device_get`` cannot read the other processes' shards."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def primary_only(write: Callable[[], T]) -> T | None:
    """``write()`` on the primary (None elsewhere), after every process has arrived (so none
    reads a file while it changes); if it raises, every process raises, so all stop together."""
    if jax.process_count() == 1:
        return write()
    multihost_utils.sync_global_devices("before a write of the primary")
    result, error = None, None
    if is_primary():
        try:
            result = write()
        except Exception as caught:  # re-raised below, once the others know
            error = caught
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if error is not None:
        raise error
    if failed:
        raise DistributedError("process 0 stopped with an error (see its output); stopping too")
    return result
