"""The store: one personal model as a folder of committed versions. Torch-free (the ONNX path reads it too).

Layout::

    STORE/
      store.json            identity and settings, written once by `init`
      HEAD                  name of the current version; replaced by rename at commit
      versions/v0003/       manifest.json + the method's safetensors (adapter, tokens, fisher, ...)
      priors/<key>/         prior-class images the base model generated (not user data)
      staging/<txn>/        copies of the user's images while a concept trains; deleted after commit
      exports/              ONNX exports, PROFILE-VERSION/ with edgecp.json (per-file sha256s) written last
      reflog.jsonl          HEAD moves that are not commits (rollback), and what gc deleted
      .pending              the version a commit is writing, until HEAD names it
      .lock                 flock'd by the one writer

A version is written as `versions/.tmp-*`, fsynced, and renamed to `vNNNN` with `manifest.json` (which records the
sha256 of every other file) inside; then HEAD is replaced by rename. `.pending` names the version between the
two renames, so recovery can tell an interrupted commit (a version HEAD never named: removed) from a HEAD
moved back by `rollback` or by hand (the later versions are kept until `gc`). A complete version is never
deleted except by `gc`, which renames it to `versions/.trash-*` first. Whoever next opens the store while no
writer holds the lock removes temporary folders, interrupted commits and orphaned staged photos.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from edgecp.errors import DamagedStoreError, EdgecpError, StoreLockedError
from edgecp.integrity import check_files, remove_if_abandoned, sha256_file

FORMAT = 1
STORE_FILE = "store.json"
MANIFEST = "manifest.json"
PENDING = ".pending"
REFLOG = "reflog.jsonl"
VERSION_RE = re.compile(r"v[0-9]{4,}")


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


def check_version_name(version: str) -> str:
    if not VERSION_RE.fullmatch(version or ""):
        raise EdgecpError(f"'{version}' is not a version name such as v0003: see `edgecp history --store STORE`")
    return version


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
        try:
            info = json.loads(f.read_text())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise DamagedStoreError(
                f"store '{root}' is damaged: {STORE_FILE} cannot be read ({type(e).__name__}); restore it from a backup "
                f"(it is written once by `edgecp init`), then run `edgecp verify --store {root}`"
            ) from None
        if info.get("format") != FORMAT:
            raise EdgecpError(f"store '{root}' has format {info.get('format')}, this edgecp reads format {FORMAT}")
        store = cls(root, info)
        store._recover_if_idle()
        return store

    # -- reading --------------------------------------------------------------------------------------------
    def head_or_none(self) -> str | None:
        """What HEAD names, or None when HEAD is missing, empty or not a version name (a damaged store)."""
        try:
            name = (self.root / "HEAD").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None
        return name if VERSION_RE.fullmatch(name) else None

    @property
    def head(self) -> str:
        """The current version; a damaged HEAD raises DamagedStoreError naming what to run."""
        name = self.head_or_none()
        if name is None:
            raise DamagedStoreError(
                f"store '{self.root}' is damaged: HEAD is missing, empty or not a version name; run "
                f"`edgecp verify --store {self.root}` and then `edgecp rollback --store {self.root} VERSION` with "
                f"the version to make current ({self._newest_hint()})"
            )
        if not (self.root / "versions" / name / MANIFEST).is_file():
            raise DamagedStoreError(
                f"store '{self.root}' is damaged: HEAD names version {name}, which does not exist; run "
                f"`edgecp rollback --store {self.root} VERSION` ({self._newest_hint()})"
            )
        return name

    def _newest_hint(self) -> str:
        vs = self.versions()
        return f"the newest complete version is {vs[-1]}" if vs else "no complete version is left"

    def version_dir(self, version: str | None = None) -> Path:
        return self.root / "versions" / (check_version_name(version) if version else self.head)

    def manifest(self, version: str | None = None) -> dict:
        f = self.version_dir(version) / MANIFEST
        try:
            m = json.loads(f.read_text())
            if not isinstance(m, dict) or not isinstance(m.get("concepts"), list):
                raise ValueError("not an edgecp manifest")
            return m
        except (OSError, ValueError) as e:
            name = version or self.head_or_none()
            raise DamagedStoreError(
                f"store '{self.root}' is damaged: {name}/{MANIFEST} cannot be read ({type(e).__name__}); run "
                f"`edgecp verify --store {self.root}`, then `edgecp rollback --store {self.root} VERSION` to an intact one"
            ) from None

    def versions(self) -> list[str]:
        """Complete versions (a folder vNNNN holding manifest.json), oldest first."""
        d = self.root / "versions"
        if not d.is_dir():
            return []
        names = [p.name for p in d.iterdir() if VERSION_RE.fullmatch(p.name) and (p / MANIFEST).is_file()]
        return sorted(names, key=lambda n: int(n[1:]))

    def version_problems(self, version: str, full: bool = True) -> list[str]:
        """What is wrong with a version's files against the sha256s its manifest recorded (empty when intact).
        Versions written before edgecp recorded hashes have no `files` and give no problems here."""
        files = self.manifest(version).get("files")
        return check_files(self.version_dir(version), files, full) if files else []

    def check_version(self, version: str | None = None) -> str:
        """Refuse a version whose files fail their recorded hashes (generate, export and add-concept call it)."""
        version = version or self.head
        problems = self.version_problems(version)
        if problems:
            raise DamagedStoreError(
                f"version {version} of store '{self.root}' is damaged: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + f"; run `edgecp verify --store {self.root}` and `edgecp rollback --store {self.root} VERSION` to an "
                "intact version"
            )
        return version

    def concepts(self) -> list[dict]:
        return self.manifest()["concepts"]

    def concept(self, name: str) -> dict | None:
        return next((c for c in self.concepts() if c["name"] == name), None)

    # -- writing --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, check_head: bool = True) -> Iterator[Store]:
        """Hold the store's exclusive lock (released by the OS if the process dies), recover, then write.
        `check_head`: refuse unless HEAD names an intact version (rollback and gc pass False: they repair)."""
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
            if check_head:
                self.check_version(self.head)
            yield self
        finally:
            os.close(fd)  # closing releases the flock

    def _leftovers(self) -> bool:
        """Anything an interrupted write or a crash may have left (cheap: a few stats)."""
        r = self.root
        return ((r / "staging").exists() or (r / PENDING).exists() or any(r.glob(".HEAD.*"))
                or any(p.name.startswith(".") for p in (r / "versions").iterdir())
                or any(p.name.startswith(".") for p in (r / "exports").glob(".*")))

    def _recover_if_idle(self) -> None:
        """When nobody holds the writer lock, run recovery now, so that e.g. the staged copies of the user's photos
        a crash left behind do not outlive it until the next write. Readers never wait: if a writer is active, skip."""
        try:
            if not self._leftovers():
                return
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.recover()
        except OSError:
            pass
        finally:
            os.close(fd)

    def recover(self) -> list[str]:
        """Finish or undo what an interrupted write left (call with the lock held): the version of an interrupted
        commit (named by .pending, never named by HEAD), temporary and trashed folders, half-written exports
        whose writer is gone, and staged photos. Never removes a version HEAD has named."""
        removed = []
        versions = self.root / "versions"
        head = self.head_or_none()
        pending_file = self.root / PENDING
        if pending_file.exists():
            try:
                pending = json.loads(pending_file.read_text()).get("version", "")
            except (OSError, ValueError, AttributeError):
                pending = ""  # torn while written: the version was not renamed into place yet
            if head is not None:
                if VERSION_RE.fullmatch(pending or "") and pending != head and (versions / pending).exists():
                    self._trash(pending)
                    removed.append(pending)
                pending_file.unlink(missing_ok=True)
        for p in versions.iterdir() if versions.is_dir() else []:
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
        for p in self.root.glob(".HEAD.*"):
            p.unlink(missing_ok=True)
        for p in (self.root / "priors").glob(".*"):
            shutil.rmtree(p, ignore_errors=True)  # a prior cache interrupted while written (not user data)
        for p in (self.root / "exports").glob(".*"):
            if p.is_dir() and remove_if_abandoned(p):
                removed.append(f"exports/{p.name}")
        staging = self.root / "staging"
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            removed.append("staging")
        return removed

    def _trash(self, version: str) -> Path:
        """Take a version out of the store atomically (rename), then delete it; recovery finishes a crashed delete."""
        d = self.root / "versions" / version
        trash = self.root / "versions" / f".trash-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(d, trash)
        _fsync_dir(self.root / "versions")
        shutil.rmtree(trash, ignore_errors=True)
        return trash

    def next_version(self) -> str:
        """One above every version this store has ever had (gc'd ones included), so a name is never reused."""
        nums = [int(v[1:]) for v in self.versions()]
        nums += [int(v[1:]) for e in self.reflog() for v in e.get("deleted", []) if VERSION_RE.fullmatch(v)]
        return f"v{max(nums, default=0) + 1:04d}"

    # -- HEAD moves and the reflog --------------------------------------------------------------------------
    def set_head(self, version: str, event: dict | None = None) -> None:
        """Point HEAD at a complete version, atomically (call inside `writer()`); log `event` if given."""
        tmp_head = self.root / f".HEAD.{uuid.uuid4().hex}"
        with open(tmp_head, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_head, self.root / "HEAD")
        _fsync_dir(self.root)
        if event is not None:
            self.log({**event, "head": version})

    def log(self, event: dict) -> None:
        """Append an event to reflog.jsonl (informational: a line torn by a crash is skipped when read)."""
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **event}, sort_keys=True)
        with open(self.root / REFLOG, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def reflog(self) -> list[dict]:
        try:
            text = (self.root / REFLOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        events = []
        for line in text.splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict):
                events.append(e)
        return events

    def _write_version(self, name: str, files: dict[str, bytes | Path], manifest: dict) -> Path:
        versions = self.root / "versions"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=versions))
        recorded = {}
        for fname, content in files.items():
            if fname == MANIFEST or "/" in fname:
                raise ValueError(f"a version cannot hold a file named '{fname}'")
            dst = tmp / fname
            if isinstance(content, Path):
                shutil.copyfile(content, dst)
            else:
                dst.write_bytes(content)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
            recorded[fname] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        _write_json_durable(tmp / MANIFEST, {**manifest, "files": recorded})
        _fsync_dir(tmp)
        final = versions / name
        os.rename(tmp, final)
        _fsync_dir(versions)
        return final

    def commit(self, files: dict[str, bytes | Path], manifest: dict) -> str:
        """Write a new version and make it current, atomically. Call inside `writer()`.

        The manifest gets version, parent, time and the sha256 of every file. `removed` (concepts removed with
        traces left in the model) carries over from the parent unless the new manifest sets it."""
        name = self.next_version()
        parent = self.head
        manifest = {**manifest, "version": name, "parent": parent,
                    "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest.pop("files", None)
        if "removed" not in manifest:
            removed = self.manifest(parent).get("removed")
            if removed:
                manifest["removed"] = removed
        _write_json_durable(self.root / PENDING, {"version": name, "parent": parent})
        _fsync_dir(self.root)
        self._write_version(name, files, manifest)
        self.set_head(name)
        (self.root / PENDING).unlink(missing_ok=True)
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
