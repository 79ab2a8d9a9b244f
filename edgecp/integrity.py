"""File hashes for versions and exports, and the lock an export in progress holds on its folder. Torch-free.

A version's manifest and an export's `edgecp.json` record `files`: relative path -> {"sha256", "bytes"} of every
other file in the folder. `check_files` compares a folder against that record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

from edgecp.atomic import write_json_atomic


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
        if f.is_file() and not f.is_symlink() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def relative_problem(rel: object) -> str | None:
    """Why a recorded relative path (from a manifest or edgecp.json) must not be used, or None: it must be a
    relative POSIX path of plain components (no '..', no absolute path, no backslash, printable)."""
    if not isinstance(rel, str) or not rel or not rel.isprintable() or "\\" in rel or rel.startswith("/"):
        return f"{rel!r} is not a relative file name"
    if any(part in ("", ".", "..") for part in rel.split("/")):
        return f"{rel!r} leaves its folder"
    return None


def _link_on_path(folder: Path, rel: str) -> str | None:
    cur = folder
    for part in rel.split("/"):
        cur = cur / part
        if cur.is_symlink():
            return cur.relative_to(folder).as_posix()
    return None


def check_files(folder: Path, files: dict[str, dict], full: bool = True) -> list[str]:
    """Problems of `folder` against its recorded `files` (empty when intact): a name that is not a plain relative
    path, a symbolic link on the way (edgecp writes none and follows none), missing, not a regular file, size or
    sha256 mismatch. `full=False` compares sizes only (cheap)."""
    problems = []
    if not isinstance(files, dict):
        return ["the file record is not an object"]
    for rel, rec in sorted(files.items()):
        bad = relative_problem(rel)
        if bad:
            problems.append(f"recorded file {bad}")
            continue
        link = _link_on_path(folder, rel)
        if link:
            problems.append(f"{link} is a symbolic link (edgecp writes none and follows none)")
            continue
        f = folder / rel
        try:
            st = f.lstat()
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        size = rec.get("bytes") if isinstance(rec, dict) else None
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{rel} is not a regular file")
        elif st.st_size != size:
            problems.append(f"{rel} has {st.st_size} bytes, {size} were written")
        elif full and sha256_file(f) != rec.get("sha256"):
            problems.append(f"{rel} does not match its sha256 (the bytes changed)")
    return problems


WRITING_MARK = ".edgecp-writing"  # inside an export folder being written: proof that edgecp made it


def lock_dir(folder: Path) -> int:
    """flock a folder in progress (an export being written) and mark it as edgecp's; the OS releases the lock when
    the process dies. Recovery removes a dot-folder of exports/ only if it holds this mark (or a complete
    edgecp.json) and no live process holds its lock: a folder a person put there is never matched."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    (folder / WRITING_MARK).write_text(str(os.getpid()))
    return fd


def unlock_dir(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def is_abandoned_export(folder: Path) -> bool:
    """A folder that edgecp's export wrote and did not finish, judged from its contents (the lock is checked by
    `remove_if_abandoned`): a real folder (not a link) holding the writing mark, or a complete edgecp.json whose
    files all match (renamed into place never, e.g. killed between the two). False for anything else."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    if (folder / WRITING_MARK).is_file() and not (folder / WRITING_MARK).is_symlink():
        return True
    meta, problems = read_export_meta(folder)
    return meta is not None and not problems


def remove_if_abandoned(folder: Path) -> bool:
    """Remove a temporary export folder that edgecp made (`is_abandoned_export`) unless a live process holds its
    lock (an export still running). Links are never followed. True if removed."""
    if not is_abandoned_export(folder):
        return False
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
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
    """Bytes of the regular files under `folder`; links are not followed (a link's target is not the store's)."""
    if folder.is_symlink() or not folder.exists():
        return 0
    total = 0
    for dirpath, _dirs, names in os.walk(folder):  # os.walk does not descend into linked folders
        for n in names:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


EXPORT_META = "edgecp.json"


def write_export_meta(folder: Path, meta: dict) -> dict:
    """Record the sha256 of every file of an export folder in edgecp.json, written last and fsynced: a folder
    whose edgecp.json is present and whose files match it is a complete export."""

    (folder / WRITING_MARK).unlink(missing_ok=True)  # complete from here on: edgecp.json proves it is edgecp's
    meta = {**meta, "files": hash_tree(folder, exclude=(EXPORT_META,))}
    write_json_atomic(folder / EXPORT_META, meta)
    return meta


def read_export_meta(folder: Path) -> tuple[dict | None, list[str]]:
    """(edgecp.json, problems) of an export folder: problems is empty when every recorded file matches."""
    if folder.is_symlink() or (folder / EXPORT_META).is_symlink():
        return None, ["it is a symbolic link: edgecp follows none"]
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
