"""One training command over several hosts: one process per host, joined by ``jax.distributed``.

Every process runs the same ``train.py`` command with three environment variables:

    JAX_COORDINATOR_ADDRESS=host0:1234  (process 0's host and a free port, the same everywhere)
    JAX_NUM_PROCESSES=2                 (how many processes)
    JAX_PROCESS_ID=0                    (this process: 0 .. JAX_NUM_PROCESSES - 1)

and optionally JAX_INIT_TIMEOUT (seconds to wait for every process to join, default 300).

JAX 0.10 reads only the first of them by itself (the other two it detects on SLURM, Open MPI or
Kubernetes alone), so ``initialize_from_env`` reads all three and passes them on. CPU processes
exchange data through gloo. The mesh's devices then span every process: each process takes
only the rows of a batch that its own devices hold (``local_rows``; the loader still reads whole
chunks from disk, see ``jax_sae.data.loader``) and makes them part of one global array
(``global_batch``). Process 0, the primary, alone writes the run folder's files; checkpoints are
written by every process through orbax, which needs a filesystem all hosts share.

Processes that disagree would wait for each other forever in their first collective, so
``same_everywhere`` compares the resolved configuration of all of them through the coordinator's
key-value store before any collective. The join itself is watched (progress lines, one error line
at the timeout), and SIGTERM ends a joined process at once, even inside a collective: JAX's
runtime can neither abort a join nor leave a collective whose peer is gone, so both exits are
``os._exit`` after one line.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from jax.sharding import Sharding

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TIMEOUT_VAR = "JAX_INIT_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
"""Seconds to wait for every process to join, and for each to report its configuration."""
PROGRESS_EVERY = 10.0
"""Seconds between the progress lines of a wait (the first comes after one second)."""
JOIN_FAILED, TERMINATED = 2, 143
KEY_PREFIX = "jax_sae"
T = TypeVar("T")

_checks = itertools.count()
_stopping = threading.Lock()
_limit = {"timeout": DEFAULT_TIMEOUT}  # the joined processes' JAX_INIT_TIMEOUT


class DistributedError(RuntimeError):
    """Bad multi-process settings, or another process that stopped; the message says which."""


def initialize_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Join the processes named by ``ENV_VARS`` (True), or stay a single process when none is
    set (False). Must run before any JAX computation: JAX fixes its devices at the first one.
    Every setting is checked before JAX is touched; a join that times out ends the process."""
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
    host, port = parse_address(address)
    timeout = join_timeout(environ)
    if int(index) == 0 and not environ.get("JAX_COORDINATOR_BIND_ADDRESS"):
        check_port_free(address, port)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # its SIGTERM handler only records a preemption, which nothing here polls: the process
    # would then ignore SIGTERM
    jax.config.update("jax_enable_preemption_service", False)
    stop_on_sigterm(int(index), int(count))
    join(address, host, int(count), int(index), timeout)
    _limit["timeout"] = timeout
    atexit.register(_announce_exit, int(index))
    return True


def parse_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) with a port JAX can bind and a host that resolves; JAX
    itself aborts, crashes or waits for minutes on anything else."""
    fix = "give process 0's host and a free port, e.g. JAX_COORDINATOR_ADDRESS=node0:8476"
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host:
        raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address} is not host:port; {fix}")
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise DistributedError(
            f"JAX_COORDINATOR_ADDRESS={address}: the port must be an integer from 1 to 65535; {fix}"
        )
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise DistributedError(
            f"JAX_COORDINATOR_ADDRESS={address}: host {host} does not resolve ({reason}); {fix}"
        ) from None
    return host, int(port)


def join_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """``JAX_INIT_TIMEOUT`` in seconds (default 300): how long to wait for the other processes."""
    text = environ.get(TIMEOUT_VAR, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise DistributedError(
            f"{TIMEOUT_VAR}={text} must be a positive number of seconds (default "
            f"{DEFAULT_TIMEOUT:g}); set it to how long processes may wait for each other to join"
        )
    return value


def check_port_free(address: str, port: int) -> None:
    """Process 0 runs the coordinator on ``port`` (all interfaces, as JAX binds it); a busy port
    would fail inside JAX."""
    for family, anywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((anywhere, port))
            except OSError as error:
                raise DistributedError(
                    f"JAX_COORDINATOR_ADDRESS={address}: process 0 cannot listen on port {port} "
                    f"({error.strerror}); choose a free port, the same on every host"
                ) from None
        return


def join(address: str, host: str, count: int, index: int, timeout: float) -> None:
    """``jax.distributed.initialize`` in a helper thread, so that this one can print progress
    and give up after ``timeout`` seconds with one line (JAX's own deadline, set later, would
    abort the process with a stack trace)."""
    failure: list[BaseException] = []

    def connect() -> None:
        try:
            jax.distributed.initialize(
                address,
                num_processes=count,
                process_id=index,
                initialization_timeout=math.ceil(timeout) + 60,
            )
        except BaseException as error:  # re-raised below as one line
            failure.append(error)

    worker = threading.Thread(target=connect, name="jax-sae-join", daemon=True)
    worker.start()
    who = f"process {index} of {count}"
    try:
        waited = wait_for(
            lambda: not worker.is_alive(),
            timeout,
            lambda s: (
                f"{who}: waiting for the other processes to join at {address}, "
                f"{s:.0f} s of {timeout:g} s ({TIMEOUT_VAR})"
            ),
        )
    except KeyboardInterrupt:  # a half-made join cannot be shut down: end here
        stop(f"interrupted while {who} waited for the others to join at {address}", 130)
    if not waited:
        stop(
            f"error: {who}: not every process joined at {address} within {timeout:g} s; "
            f"start the same command on every host with JAX_PROCESS_ID 0 to {count - 1} "
            f"(process 0 on {host}), or raise {TIMEOUT_VAR}",
            JOIN_FAILED,
        )
    if failure:
        reason = str(failure[0]).strip().splitlines()[0] if str(failure[0]).strip() else ""
        raise DistributedError(
            f"{who} could not join at {address} ({type(failure[0]).__name__}: {reason}); "
            "check JAX_COORDINATOR_ADDRESS and that every host reaches it"
        )


def wait_for(
    ready: Callable[[], bool],
    timeout: float,
    progress: Callable[[float], str],
    poll: float = 0.05,
) -> bool:
    """Poll ``ready`` every ``poll`` seconds until it holds (True) or ``timeout`` seconds pass
    (False), with a progress line on stderr after one second, then every ``PROGRESS_EVERY``."""
    start = time.monotonic()
    next_line = 1.0
    while not ready():
        elapsed = time.monotonic() - start
        if elapsed >= timeout:
            return False
        if elapsed >= next_line:
            print(progress(elapsed), file=sys.stderr, flush=True)
            next_line = (elapsed // PROGRESS_EVERY + 1) * PROGRESS_EVERY
        time.sleep(min(poll, max(0.0, timeout - elapsed)))
    return True


def stop(line: str, status: int) -> None:
    """Print ``line`` and end the process now, skipping exit handlers: JAX's would wait for the
    other processes (minutes), which is what the caller gives up on. Only the first caller
    prints; a second (SIGTERM during a timeout) waits for it."""
    _stopping.acquire()
    try:
        os.write(2, (line + "\n").encode())
    finally:
        os._exit(status)


def stop_on_sigterm(index: int, count: int) -> None:
    """End this process on SIGTERM with one line, also while its main thread waits inside a
    collective (where Python runs no signal handler): the C-level handler writes the signal to a
    pipe that a helper thread reads. Only possible from the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    line = (
        f"stopped by SIGTERM: process {index} of {count} ends now; the other processes stop "
        "when they miss it (or SIGTERM them too); continue from the last checkpoint with --resume"
    )

    def handler(signum: int, frame: Any) -> None:
        stop(line, TERMINATED)

    signal.signal(signal.SIGTERM, handler)
    read, write = os.pipe()
    os.set_blocking(write, False)
    if signal.set_wakeup_fd(write) != -1:  # someone else's (an event loop): keep it
        signal.set_wakeup_fd(-1)
        os.close(read)
        os.close(write)
        return

    def watch() -> None:
        while True:
            received = os.read(read, 64)
            if signal.SIGTERM in received:
                stop(line, TERMINATED)

    threading.Thread(target=watch, name="jax-sae-sigterm", daemon=True).start()


def _client() -> Any:
    return jax_distributed.global_state.client


def _announce_exit(index: int) -> None:
    """Tell processes waiting in ``same_everywhere`` that this one will not come (it stopped
    before, e.g. with an error on bad settings), instead of letting them wait for the timeout."""
    with contextlib.suppress(Exception):  # the coordinator is gone already: nothing to tell
        _client().key_value_set(f"{KEY_PREFIX}/exited/{index}", "1")


def same_everywhere(what: str, payload: Any) -> None:
    """Compare ``payload`` (JSON-able: the resolved configuration) with every other process's
    through the coordinator, before any collective: processes that disagree on it would wait for
    each other forever. Raises one line naming the first process that differs from process 0."""
    count = jax.process_count()
    if count == 1:
        return
    client, me = _client(), jax.process_index()
    folder = f"{KEY_PREFIX}/check{next(_checks)}/"
    text = json.dumps(payload, default=str)  # in the caller's order, for the message
    client.key_value_set(f"{folder}{me}", text)
    reported: dict[int, str] = {}
    exited: set[int] = set()

    def ready() -> bool:
        # exits first, reports second: a process reports before it can exit, so one that
        # reported and then stopped (on seeing the difference) is never taken for one that
        # stopped without reporting
        exited.update(
            int(k.rsplit("/", 1)[1]) for k, _ in client.key_value_dir_get(f"{KEY_PREFIX}/exited/")
        )
        reported.update((int(k.rsplit("/", 1)[1]), v) for k, v in client.key_value_dir_get(folder))
        return len(reported) == count or bool(exited - set(reported))

    timeout = _limit["timeout"]
    done = wait_for(
        ready,
        timeout,
        lambda s: (
            f"process {me} of {count}: waiting for process(es) "
            f"{', '.join(str(i) for i in range(count) if i not in reported)} to report their "
            f"{what}, {s:.0f} s of {timeout:g} s ({TIMEOUT_VAR})"
        ),
        poll=0.25,
    )
    if gone := sorted(exited - set(reported)):
        raise DistributedError(
            f"process {gone[0]} stopped before comparing its {what} (see its output); stopping too"
        )
    if not done:
        late = [i for i in range(count) if i not in reported]
        raise DistributedError(
            f"process {late[0]} did not report its {what} within {timeout:g} s; check that it "
            f"still runs, or raise {TIMEOUT_VAR}"
        )
    first = canonical(reported[0])
    for index in range(1, count):
        if (theirs := canonical(reported[index])) != first:
            raise DistributedError(
                f"process {index} runs another {what} than process 0 (config hash "
                f"{digest(theirs)} vs {digest(first)}; "
                f"{differences(json.loads(reported[index]), json.loads(reported[0]))}); "
                "give every process the same command and settings"
            )


def canonical(text: str) -> str:
    """JSON with sorted keys: equal payloads give equal text whatever their order."""
    return json.dumps(json.loads(text), sort_keys=True)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def differences(mine: Any, theirs: Any, limit: int = 3) -> str:
    """Where two payloads differ, as ``key: a vs b``: up to ``limit`` entries of the first
    top-level part that differs (the settings as given come before what follows from them)."""
    flat_mine, flat_theirs = _flatten(mine), _flatten(theirs)
    keys = [k for k in {**flat_mine, **flat_theirs} if flat_mine.get(k) != flat_theirs.get(k)]
    part = keys[0].split(".")[0] if keys else ""
    shown = [k for k in keys if k.split(".")[0] == part][:limit]
    listed = [f"{k}: {_short(flat_mine.get(k))} vs {_short(flat_theirs.get(k))}" for k in shown]
    more = f" and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return "differs in " + ", ".join(listed) + more


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def is_primary() -> bool:
    """Process 0 writes the run folder's files; the others only compute and checkpoint."""
    return jax.process_index() == 0


def local_rows(sharding: Sharding, batch_size: int) -> slice:
    """The rows of a global batch of ``batch_size`` that this process's devices hold under
    ``sharding``: the only rows it has to read (all of them when the batch is replicated)."""
    spans = []
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        # JAX types the entries Optional, but they come from devices_indices_map: never None
        assert index is not None
        start, stop, _ = index[0].indices(batch_size)
        spans.append((start, stop))
    return one_block(spans)


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
