"""Atomic file writes: a reader, or a run resumed after a kill, sees the old file or the new one,
never half of one. The one implementation every stage uses (standard library only)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_SUFFIX = ".tmp"
"""Suffix of the temporary files; a resumed writer may drop files that end in it."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write(file)`` to a unique temporary file beside ``path``, fsync it, give it
    the permissions of a normal new file, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)  # ours: made by mkstemp above
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Strict JSON: a NaN or inf raises ValueError here rather than writing a file other tools
    cannot parse. The bytes (indent 1, no final newline) are part of the format: a cache's
    identity is the hash of its manifest file."""
    write_bytes_atomic(path, json.dumps(obj, indent=1, allow_nan=False).encode())


class DamagedFileError(ValueError):
    """A JSON file that is not what its writer writes; the message names it and the fix."""


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; DamagedFileError (one line, ending in ``fix``) when the file
    is not valid JSON or holds something other than an object. A missing file is an OSError."""
    try:
        value = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(f"{path} is damaged (not valid JSON: {error}); {fix}") from None
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise DamagedFileError(f"{path} is damaged (a JSON {kind}, not an object); {fix}")
    return value
