"""File hashes for versions and exports, and the lock an export in progress holds on its folder. Torch-free.

A version's manifest and an export's `edgecp.json` record `files`: relative path -> {"sha256", "bytes"} of every
other file in the folder. `check_files` compares a folder against that record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
from pathlib import Path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """relative path -> {"sha256", "bytes"} of every file under `folder` (except the names in `exclude`)."""
    out = {}
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder).as_posix()
        if f.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def check_files(folder: Path, files: dict[str, dict], full: bool = True) -> list[str]:
    """Problems of `folder` against its recorded `files` (empty when intact): missing, size or sha256 mismatch.
    `full=False` compares sizes only (cheap)."""
    problems = []
    for rel, rec in sorted(files.items()):
        f = folder / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != rec.get("bytes"):
            problems.append(f"{rel} has {f.stat().st_size} bytes, {rec.get('bytes')} were written")
        elif full and sha256_file(f) != rec.get("sha256"):
            problems.append(f"{rel} does not match its sha256 (the bytes changed)")
    return problems


def lock_dir(folder: Path) -> int:
    """flock a folder in progress (an export being written); the OS releases it when the process dies."""
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def unlock_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def remove_if_abandoned(folder: Path) -> bool:
    """Remove a temporary folder unless a live process holds its lock (an export still running). True if removed."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        shutil.rmtree(folder, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def tree_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


EXPORT_META = "edgecp.json"


def write_export_meta(folder: Path, meta: dict) -> dict:
    """Record the sha256 of every file of an export folder in edgecp.json, written last and fsynced: a folder
    whose edgecp.json is present and whose files match it is a complete export."""
    import json

    meta = {**meta, "files": hash_tree(folder, exclude=(EXPORT_META,))}
    tmp = folder / f".{EXPORT_META}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / EXPORT_META)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return meta


def read_export_meta(folder: Path) -> tuple[dict | None, list[str]]:
    """(edgecp.json, problems) of an export folder: problems is empty when every recorded file matches."""
    import json

    try:
        meta = json.loads((folder / EXPORT_META).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None, [f"no {EXPORT_META}: not a complete edgecp export"]
    except (OSError, ValueError) as e:
        return None, [f"{EXPORT_META} cannot be read ({type(e).__name__})"]
    if not isinstance(meta.get("files"), dict):
        return meta, [f"{EXPORT_META} records no file hashes (written by an older edgecp): export again"]
    return meta, check_files(folder, meta["files"])
