"""The store: one personal model as a folder of committed versions. Torch-free (the ONNX path reads it too).

Layout::

    STORE/
      store.json            identity and settings, written once by `init`
      HEAD                  name of the current version; replaced by rename at commit
      versions/v0003/       manifest.json + the method's safetensors (adapter, tokens, fisher, ...)
      priors/<key>/         prior-class images the base model generated (not user data)
      staging/<txn>/        copies of the user's images while a concept trains; deleted after commit
      .lock                 flock'd by the one writer

A commit writes the new version beside the old one, fsyncs it, then replaces HEAD by rename: a crash at any
instant leaves the store at the old version or the new one. Orphans of an interrupted commit are removed the
next time a writer opens the store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from edgecp.errors import EdgecpError, StoreLockedError

FORMAT = 1
STORE_FILE = "store.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json_durable(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Store:
    """A handle on a store folder. Reading needs no lock; writing happens inside `with store.writer():`."""

    def __init__(self, root: Path, info: dict):
        self.root = root
        self.info = info

    # -- creation and opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, info: dict) -> Store:
        """Create an empty store (version v0000 with no concepts). Refuses a non-empty folder."""
        root = Path(root).expanduser()
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise EdgecpError(f"'{root}' already exists and is not empty: choose a new folder for the store")
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-init-", dir=root.parent))
        try:
            info = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
            _write_json_durable(tmp / STORE_FILE, info)
            (tmp / "versions").mkdir()
            store = cls(tmp, info)
            store._write_version("v0000", {}, {"version": "v0000", "parent": None, "concepts": []})
            (tmp / "HEAD").write_text("v0000\n")
            if root.exists():
                root.rmdir()
            os.rename(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(root, info)

    @classmethod
    def open(cls, root: str | Path) -> Store:
        root = Path(root).expanduser()
        f = root / STORE_FILE
        if not f.is_file():
            raise EdgecpError(f"no edgecp store at '{root}': create one with `edgecp init {root} --base tiny`")
        info = json.loads(f.read_text())
        if info.get("format") != FORMAT:
            raise EdgecpError(f"store '{root}' has format {info.get('format')}, this edgecp reads format {FORMAT}")
        return cls(root, info)

    # -- reading --------------------------------------------------------------------------------------------
    @property
    def head(self) -> str:
        return (self.root / "HEAD").read_text().strip()

    def version_dir(self, version: str | None = None) -> Path:
        return self.root / "versions" / (version or self.head)

    def manifest(self, version: str | None = None) -> dict:
        return json.loads((self.version_dir(version) / "manifest.json").read_text())

    def versions(self) -> list[str]:
        return sorted(p.name for p in (self.root / "versions").iterdir() if p.name.startswith("v"))

    def concepts(self) -> list[dict]:
        return self.manifest()["concepts"]

    def concept(self, name: str) -> dict | None:
        return next((c for c in self.concepts() if c["name"] == name), None)

    # -- writing --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self) -> Iterator[Store]:
        """Hold the store's exclusive lock (released by the OS if the process dies), recover, then write."""
        lock_path = self.root / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    raise StoreLockedError(
                        f"store '{self.root}' is being written by another edgecp process (pid {holder}): "
                        "wait for it to finish"
                    ) from None
                raise
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            self.recover()
            yield self
        finally:
            os.close(fd)  # closing releases the flock

    def recover(self) -> list[str]:
        """Remove what an interrupted write left: temp versions, versions newer than HEAD, staging."""
        removed = []
        head = self.head
        for p in (self.root / "versions").iterdir():
            if p.name.startswith(".") or (p.name.startswith("v") and p.name > head):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        for p in self.root.glob(".HEAD.*"):
            p.unlink(missing_ok=True)
        staging = self.root / "staging"
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append("staging")
        return removed

    def next_version(self) -> str:
        return f"v{int(self.head[1:]) + 1:04d}"

    def _write_version(self, name: str, files: dict[str, bytes | Path], manifest: dict) -> Path:
        versions = self.root / "versions"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=versions))
        for fname, content in files.items():
            dst = tmp / fname
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            else:
                dst.write_bytes(content)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
        _write_json_durable(tmp / "manifest.json", manifest)
        _fsync_dir(tmp)
        final = versions / name
        os.rename(tmp, final)
        _fsync_dir(versions)
        return final

    def commit(self, files: dict[str, bytes | Path], manifest: dict) -> str:
        """Write a new version and make it current, atomically. Call inside `writer()`."""
        name = self.next_version()
        manifest = {**manifest, "version": name, "parent": self.head,
                    "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._write_version(name, files, manifest)
        tmp_head = self.root / f".HEAD.{uuid.uuid4().hex}"
        with open(tmp_head, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_head, self.root / "HEAD")
        _fsync_dir(self.root)
        return name

    # -- staging of user images -----------------------------------------------------------------------------
    def stage(self, images: list[Path]) -> Path:
        """Copy the user's images into a private staging folder; returns it."""
        d = self.root / "staging" / uuid.uuid4().hex[:12]
        d.mkdir(parents=True)
        for i, p in enumerate(images):
            shutil.copyfile(p, d / f"{i:04d}{p.suffix.lower()}")
        return d

    def purge_staging(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / "staging").rmdir()

    # -- caches that are not user data ----------------------------------------------------------------------
    def prior_dir(self, key: str) -> Path:
        return self.root / "priors" / key

    def disk_bytes(self, version: str | None = None) -> int:
        return sum(f.stat().st_size for f in self.version_dir(version).iterdir() if f.is_file())
