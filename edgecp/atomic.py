"""Atomic file writes, the one implementation: a temporary file in the same folder, fsynced, renamed over the
target (readers see the old file or the new one, never a torn one). Torch-free: the store and the device runtime
use it too."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the folder's own entry table)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], object], suffix: str = "") -> None:
    """`write(binary file)` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj, sort_keys: bool = False) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=sort_keys).encode()))
