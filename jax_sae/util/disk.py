"""Full disks as one line that names the path and the space needed (standard library only, so
the extractor, the trainer and the exporter all use it)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "RESOURCE_EXHAUSTED")
"""How a full disk reads in errors that lost their errno (tensorstore under orbax reports
``RESOURCE_EXHAUSTED``)."""
OUT_OF_MEMORY_TEXTS = ("out of memory", "failed to allocate", "resource_exhausted: oom")
"""How exhausted device or host memory reads (lower-cased): XLA reports it as
``RESOURCE_EXHAUSTED: Out of memory while trying to allocate N bytes``, the same status code a full
disk gets from tensorstore, so these texts decide between the two."""


class DiskFullError(RuntimeError):
    """A write failed for lack of space; earlier output is intact and the work resumes."""


def _chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and the errors it was raised from."""
    chain: list[BaseException] = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is exhausted device or host memory."""
    return any(
        isinstance(e, MemoryError) or any(t in str(e).lower() for t in OUT_OF_MEMORY_TEXTS)
        for e in _chain(error)
    )


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is a full disk or exhausted quota
    (never exhausted memory, which shares the ``RESOURCE_EXHAUSTED`` status)."""
    if is_out_of_memory(error):
        return False
    for e in _chain(error):
        if isinstance(e, DiskFullError):
            return True
        if isinstance(e, OSError) and e.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(e) for text in NO_SPACE_TEXTS):
            return True
    return False


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def free_bytes(path: Path) -> int:
    """Free space of the file system holding ``path`` (or its nearest existing ancestor)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _no_space(where: Path, what_needs: str, free: int, resume: str) -> DiskFullError:
    return DiskFullError(
        f"no space left on the disk holding {where}: {what_needs}, {human_bytes(free)} free; "
        f"free some space or move the output elsewhere, then {resume} (what was written so far "
        "is intact)"
    )


def disk_full_error(folder: Path, needed: int, error: BaseException, resume: str) -> DiskFullError:
    """The one-line error for a write into ``folder`` that failed for lack of space.

    ``needed`` is the caller's estimate of what the interrupted work still has to write;
    ``resume`` says how to continue once space is freed.
    """
    filename = getattr(error, "filename", None)
    where = Path(os.fsdecode(filename)) if filename else Path(folder)
    needs = f"about {human_bytes(needed)} still to write"
    return _no_space(where, needs, free_bytes(where), resume)


def require_space(folder: Path, needed: int, what: str, resume: str) -> None:
    """Raise DiskFullError before writing ``needed`` bytes of ``what`` into ``folder`` when the
    disk cannot hold them: failing before a write is clean, while libraries that hit a full disk
    mid-write (orbax, tensorstore) print tracebacks from their own threads."""
    free = free_bytes(folder)
    if free < needed:
        raise _no_space(Path(folder), f"{what} needs about {human_bytes(needed)}", free, resume)


class _DropDiskFull(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or not is_disk_full(error)


_DROP_DISK_FULL = _DropDiskFull()


def quiet_disk_full_in_threads() -> None:
    """Background writer threads (orbax's) log a full-disk traceback before the error reaches
    the main thread, which reports it in one line: drop that log record, keep all others."""
    logging.getLogger("absl").addFilter(_DROP_DISK_FULL)  # adding it twice keeps one
