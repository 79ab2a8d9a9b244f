"""The store: one personal model as a folder of committed versions. Torch-free (the ONNX path reads it too).

Layout::

    STORE/
      store.json            identity and settings, written by `init` (`set-method` rewrites it on a store without concepts)
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
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from edgecp.atomic import fsync_dir, write_json_atomic
from edgecp.config import CONCEPT_NAME_RE, AdapterConfig, PriorConfig, TrainConfig, from_dict
from edgecp.errors import DamagedStoreError, EdgecpError, StoreLockedError
from edgecp.integrity import check_files, is_abandoned_export, remove_if_abandoned, sha256_file

FORMAT = 1
STORE_FILE = "store.json"
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.json.sha256"  # the manifest's own sha256, written beside it: hand edits are detected
PENDING = ".pending"
REFLOG = "reflog.jsonl"
VERSION_RE = re.compile(r"v[0-9]{4,}")
# What a store holds at its top level; none of these may be a symbolic link (a store never reaches outside itself)
TOP_LEVEL = (STORE_FILE, "HEAD", "versions", "exports", "priors", "staging", REFLOG, ".lock", PENDING)
# The names edgecp's own temporary entries have; recovery removes nothing else (a user's folder is never matched)
TMP_VERSION_RE = re.compile(r"\.(tmp|trash)-v[0-9]{4,}-[A-Za-z0-9_]+")
TMP_HEAD_RE = re.compile(r"\.HEAD\.[0-9a-f]{32}")
TMP_PRIOR_RE = re.compile(r"\.[0-9a-f]{16}-[A-Za-z0-9_]+")
STAGING_RE = re.compile(r"[0-9a-f]{12}")
TMP_RESUMABLE_RE = re.compile(r"\.resumable-(tmp|trash)-[A-Za-z0-9_-]+")  # edgecp/resumable.py's half-made / deleted


def _write_json_durable(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def check_version_name(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise EdgecpError(f"'{version}' is not a version name such as v0003: see `edgecp history --store STORE`")
    return version


def check_plain_name(name: object, what: str) -> str:
    """A name read from a store file (a manifest's file key, a concept name, an export or version name) that is
    about to become part of a path: one path component, no separator, no '..', not hidden, printable. Anything
    else means the file was edited or damaged: DamagedStoreError, so no path built from it leaves its folder."""
    ok = (isinstance(name, str) and 0 < len(name) <= 255 and name not in (".", "..") and not name.startswith(".")
          and "/" not in name and "\\" not in name and name.isprintable())
    if not ok:
        raise DamagedStoreError(
            f"{what} {name!r} is not a plain file name (a store file was edited or damaged): edgecp will not use it "
            "as a path; run `edgecp verify --store STORE`"
        )
    return name


def link_problem(root: Path) -> str | None:
    """The first top-level entry of a store that is a symbolic link, described (None when there is none)."""
    for name in TOP_LEVEL:
        p = root / name
        if p.is_symlink():
            return f"{name} is a symbolic link (to '{os.readlink(p)}')"
    return None


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _check_fields(cls, d: dict, key: str) -> None:
    """Each value of `d` has the type of the dataclass field's default (JSON has no tuples: lists stand for them)."""
    for f in dataclasses.fields(cls):
        if f.name not in d or f.default is dataclasses.MISSING or f.default is None:
            continue
        v, default = d[f.name], f.default
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(default, (tuple, list)):
            ok = isinstance(v, (tuple, list))
        else:
            ok = isinstance(v, type(default))
        _expect(ok, f"{key}.{f.name} is {json.dumps(v)}, not a {type(default).__name__}")


def validate_info(info: object) -> dict:
    """store.json against its schema: the keys `edgecp init` writes, with their types, and the training, adapter and
    prior settings as their config classes accept them. Raises ValueError naming the first bad key."""
    _expect(isinstance(info, dict), "it is not a JSON object")
    for key in ("base", "method", "adapter", "train", "prior"):
        _expect(isinstance(info.get(key), dict), f"'{key}' is missing or not an object")
    base, method = info["base"], info["method"]
    _expect(isinstance(base.get("locator"), str) and isinstance(base.get("sha256"), str),
            "base.locator and base.sha256 must be strings")
    _expect(isinstance(method.get("name"), str) and isinstance(method.get("params", {}), dict),
            "method.name must be a string and method.params an object")
    template = info.get("prompt_template", "{}")
    _expect(isinstance(template, str) and "{}" in template, "prompt_template must be a string holding '{}'")
    budget = info.get("memory_budget")
    _expect(budget is None or isinstance(budget, int) and not isinstance(budget, bool) and budget > 0,
            "memory_budget must be a positive number of bytes")
    token_init = info.get("token_init")
    _expect(token_init is None or isinstance(token_init, str) and re.fullmatch(r"[a-z]{1,32}", token_init) is not None,
            "token_init must be null or one lowercase word (e.g. \"ktn\")")
    dset = info.get("defaults", {"set": "tiny"})
    _expect(isinstance(dset, dict) and dset.get("set") in ("paper", "tiny", "scale-free"),
            "defaults.set must be paper, tiny or scale-free")
    for key, cls in (("train", TrainConfig), ("adapter", AdapterConfig), ("prior", PriorConfig)):
        _check_fields(cls, info[key], key)
        try:
            from_dict(cls, dict(info[key]), key)
        except (EdgecpError, TypeError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None
    return info


def validate_manifest(m: object) -> dict:
    """A manifest's structure, and every name in it that edgecp turns into a path or a token (ValueError if not)."""
    _expect(isinstance(m, dict) and isinstance(m.get("concepts"), list), "not an edgecp manifest")
    for c in m["concepts"]:
        _expect(isinstance(c, dict) and isinstance(c.get("name"), str) and CONCEPT_NAME_RE.fullmatch(c["name"])
                and isinstance(c.get("token", ""), str), f"concept {json.dumps(c)[:60]} has no valid name")
    parent = m.get("parent")
    _expect(parent is None or isinstance(parent, str) and VERSION_RE.fullmatch(parent),
            f"parent {json.dumps(parent)} is not a version name")
    files = m.get("files")
    if files is not None:
        _expect(isinstance(files, dict), "files is not an object")
        for name, rec in files.items():
            try:
                check_plain_name(name, "file")
            except DamagedStoreError:
                raise ValueError(f"file name {name!r} is not a plain name") from None
            _expect(name not in (MANIFEST, MANIFEST_SUM), f"file name {name!r} is reserved")
            _expect(isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and isinstance(rec.get("bytes"), int),
                    f"file {name!r} has no sha256 and size")
    return m


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
        if root.is_symlink():  # a link to an empty folder: the store is made in that folder, the link keeps naming it
            target = Path(os.path.realpath(root))
            if not target.is_dir():
                raise EdgecpError(f"'{root}' is a link to '{target}', which is not a folder: create that folder or "
                                  "choose another path for the store")
            cls.create(target, info)
            return cls.open(root)
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
    def open(cls, root: str | Path, recover: bool = True) -> Store:
        """Open a store: refuse one whose top-level entries are links, and a store.json that fails its schema; then,
        when `recover` and no writer holds the lock, clean what an interrupted write left (`recover()`)."""
        root = Path(root).expanduser()
        f = root / STORE_FILE
        link = link_problem(root) if root.is_dir() else None
        if link:
            raise DamagedStoreError(
                f"store '{root}' is refused: {link}; edgecp never follows a link out of a store: put the real folder "
                "or file in its place (mv), then retry"
            )
        if not f.is_file():
            raise EdgecpError(f"no edgecp store at '{root}': create one with `edgecp init {root} --base tiny`")
        try:
            info = json.loads(f.read_text())
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            why = type(e).__name__ if isinstance(e, (OSError, json.JSONDecodeError)) else str(e)
            raise DamagedStoreError(
                f"store '{root}' is damaged: {STORE_FILE} cannot be read ({why}); restore it from a backup "
                f"(`edgecp init` writes it, `edgecp set-method` changes it), then run `edgecp verify --store {root}`"
            ) from None
        if info.get("format") != FORMAT:
            raise EdgecpError(f"store '{root}' has format {info.get('format')}, this edgecp reads format {FORMAT}")
        try:
            validate_info(info)
        except ValueError as e:
            raise DamagedStoreError(
                f"store '{root}' has a bad {STORE_FILE}: {e}; restore it from a backup (`edgecp init` "
                f"writes it, `edgecp set-method` changes it) or correct that value, then run `edgecp verify --store {root}`"
            ) from None
        store = cls(root, info)
        if recover:
            store._recover_if_idle()
        return store

    # -- reading --------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        """The base's family as `init` recorded it (tiny, sd1, sd2, sdxl, ...; "other" for a store without one)."""
        return str((self.info.get("defaults") or {}).get("family") or "other")

    def refuse_sdxl(self, what: str) -> None:
        """One line for the exports SDXL does not have yet (issue 28: generation and training work on SDXL)."""
        if self.family == "sdxl":
            raise EdgecpError(
                f"{what} of an SDXL store is not built yet: export ONNX with `edgecp export --store {self.root}` "
                f"(optimum's SDXL layout), generate with `edgecp generate --store {self.root}`, or use an SD 1.x/2.x "
                "store")

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
        """A version's manifest, checked: its own sha256 (the `manifest.json.sha256` beside it, which every
        manifest written since edgecp sealed them has: `sealed`), its structure, and every name in it that becomes
        a path or a token. Anything else raises DamagedStoreError."""
        vdir = self.version_dir(version)
        m, problem = self._read_manifest(vdir)
        if problem:
            raise DamagedStoreError(
                f"store '{self.root}' is damaged: {problem}; run `edgecp verify --store {self.root}`, then "
                f"`edgecp rollback --store {self.root} VERSION` to an intact one"
            )
        return m

    def _read_manifest(self, vdir: Path) -> tuple[dict | None, str | None]:
        try:
            if (vdir / MANIFEST).is_symlink():
                raise ValueError("it is a symbolic link")
            raw = (vdir / MANIFEST).read_bytes()
            m = validate_manifest(json.loads(raw))
            seal = self._seal_problem(vdir, raw, m)
            if seal:
                raise ValueError(seal)
            return m, None
        except (OSError, ValueError) as e:
            why = str(e) if isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError) else type(e).__name__
            return None, f"{vdir.name}/{MANIFEST} cannot be used ({why})"

    @staticmethod
    def _seal_problem(vdir: Path, raw: bytes, m: dict) -> str | None:
        f = vdir / MANIFEST_SUM
        if f.is_symlink():
            return f"{MANIFEST_SUM} is a symbolic link"
        try:
            recorded = f.read_text().strip()
        except FileNotFoundError:
            return f"{MANIFEST_SUM} is missing" if m.get("sealed") else None  # unsealed: written by an older edgecp
        except (OSError, UnicodeDecodeError):
            return f"{MANIFEST_SUM} cannot be read"
        if hashlib.sha256(raw).hexdigest() != recorded:
            return f"it was changed after it was written: its sha256 does not match {MANIFEST_SUM}"
        return None

    def versions(self) -> list[str]:
        """Complete versions (a real folder vNNNN holding manifest.json; links are never versions), oldest first."""
        d = self.root / "versions"
        if not d.is_dir():
            return []
        names = [p.name for p in d.iterdir() if VERSION_RE.fullmatch(p.name) and not p.is_symlink() and p.is_dir()
                 and (p / MANIFEST).is_file()]
        return sorted(names, key=lambda n: int(n[1:]))

    def version_problems(self, version: str, full: bool = True) -> list[str]:
        """What is wrong with a version's files against the sha256s its manifest recorded (empty when intact), its
        manifest's own seal included (a damaged manifest is one problem). Versions written before edgecp recorded
        hashes have no `files` and give no problems here. Files the manifest does not list are `foreign_files`."""
        m, problem = self._read_manifest(self.version_dir(version))
        if problem:
            return [problem]
        files = m.get("files")
        return check_files(self.version_dir(version), files, full) if files else []

    def foreign_files(self, version: str, files: dict) -> list[str]:
        """Entries of a version's folder that its manifest's `files` does not list (never read, never copied
        forward)."""
        return sorted(p.name for p in self.version_dir(version).iterdir()
                      if p.name not in (MANIFEST, MANIFEST_SUM) and p.name not in files)

    def chain(self, version: str | None = None) -> list[str]:
        """`version` (HEAD by default) and its parents, newest first, proven readable: every manifest reads and
        matches its seal, and every parent exists, is the empty store's root, or was deleted by `gc` (the reflog
        says so). Anything else raises DamagedStoreError naming the version."""
        chain, problem = self.chain_problem(version or self.head)
        if problem:
            raise DamagedStoreError(f"store '{self.root}' is damaged: {problem}")
        return chain

    def chain_problem(self, version: str) -> tuple[list[str], str | None]:
        """(`version` and the parents read so far, why the chain cannot be proven or None): `chain` without raising."""
        v = version
        existing = set(self.versions())
        deleted = {d for e in self.reflog() if e.get("action") == "gc" for d in e.get("deleted", [])
                   if isinstance(d, str)}
        out: list[str] = []
        while v is not None:
            if v in out:
                return out, f"the parents of {out[0]} form a cycle at {v}"
            if v not in existing:
                if out and v in deleted:
                    break  # history cut by gc --keep: proven by the reflog
                return out, f"{out[-1]}'s parent {v} is missing or incomplete" if out else f"{v} is missing or incomplete"
            m, problem = self._read_manifest(self.version_dir(v))
            if problem:
                return out, problem
            out.append(v)
            v = m.get("parent")
        return out, None

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
    def writer(self, check_head: bool = True, recover: bool = True) -> Iterator[Store]:
        """Hold the store's exclusive lock (released by the OS if the process dies), recover, then write.
        `check_head`: refuse unless HEAD names an intact version (rollback and gc pass False: they repair).
        `recover=False` (gc --dry-run) leaves every leftover where it is."""
        lock_path = self.root / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise EdgecpError(
                    f"store '{self.root}' is read-only ({e.strerror}): a command that changes the store needs "
                    "write access to it; fix its permissions or copy it to a writable disk"
                ) from None
            raise
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
            if recover:
                self.recover()
            if check_head:
                self.check_version(self.head)
            yield self
        finally:
            os.close(fd)  # closing releases the flock

    def leftovers(self) -> list[Path]:
        """What an interrupted write or a crash left and recovery removes: only entries with the names edgecp gives
        its own temporary files (cheap: a few directory reads). A pending commit is judged by `recover`."""
        r = self.root

        def matching(folder: str, pattern: re.Pattern) -> list[Path]:
            d = r / folder
            return [p for p in d.iterdir() if pattern.fullmatch(p.name)] if d.is_dir() else []

        out = [p for p in r.iterdir() if TMP_HEAD_RE.fullmatch(p.name) or TMP_RESUMABLE_RE.fullmatch(p.name)] \
            if r.is_dir() else []
        out += matching("versions", TMP_VERSION_RE) + matching("priors", TMP_PRIOR_RE) + matching("staging", STAGING_RE)
        out += [p for p in (r / "exports").glob(".*") if p.is_symlink() or is_abandoned_export(p)]
        return out

    def _leftovers(self) -> bool:
        return bool((self.root / PENDING).exists() or (self.root / "staging").is_dir() or self.leftovers())

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
        link_problem_now = link_problem(self.root)
        if link_problem_now:  # the store changed since it was opened: delete nothing
            raise DamagedStoreError(f"store '{self.root}' is refused: {link_problem_now}; put the real folder in its "
                                    "place, then retry")
        removed = []
        head = self.head_or_none()
        pending_file = self.root / PENDING
        if pending_file.exists() and head is not None:
            pending = self._abandoned_pending(head)
            if pending:
                self.trash_version(pending)
                removed.append(pending)
            pending_file.unlink(missing_ok=True)
        for p in self.leftovers():
            rel = p.relative_to(self.root).as_posix()
            if p.parent.name == "exports" and not p.is_symlink():
                if remove_if_abandoned(p):
                    removed.append(rel)
                continue
            self.remove_entry(p)
            removed.append(rel)
        staging = self.root / "staging"
        with contextlib.suppress(OSError):
            staging.rmdir()  # only when empty: anything edgecp did not put there stays (verify names it)
            removed.append("staging")
        return removed

    def _abandoned_pending(self, head: str) -> str | None:
        """The version `.pending` names, when it is proven to be an interrupted commit: HEAD never named it (not
        HEAD now, no reflog entry moved HEAD to it) and no version names it as its parent. None otherwise."""
        try:
            pending = json.loads((self.root / PENDING).read_text()).get("version", "")
        except (OSError, ValueError, AttributeError):
            return None  # torn while written: the version was not renamed into place yet
        if not isinstance(pending, str) or not VERSION_RE.fullmatch(pending) or pending == head:
            return None
        if pending not in self.versions():
            return None
        if any(pending in (e.get("head"), e.get("to")) for e in self.reflog()):
            return None
        for v in self.versions():
            if v != pending:
                try:
                    if self.manifest(v).get("parent") == pending:
                        return None
                except DamagedStoreError:
                    return None  # an unreadable manifest might name it: no proof
        return pending

    def inside(self, path: Path) -> bool:
        """`path` (built from self.root) lies inside the store with no symbolic link on the way."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        cur = self.root
        for part in rel.parts:
            if part in ("..", "."):
                return False
            cur = cur / part
            if cur.is_symlink():
                return False
        return True

    def remove_entry(self, path: Path) -> None:
        """Delete an entry of the store: a link is unlinked (never followed), a folder removed only when no link
        lies between the store and it (shutil.rmtree itself unlinks links inside and never follows them)."""
        if path.is_symlink():
            path.unlink()
            return
        if not self.inside(path):
            raise DamagedStoreError(f"store '{self.root}': '{path}' is reached through a symbolic link; edgecp deletes "
                                    "nothing outside the store")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def trash_version(self, version: str) -> Path:
        """Take a version out of the store atomically (rename), then delete it; recovery finishes a crashed delete."""
        d = self.root / "versions" / check_version_name(version)
        if d.is_symlink() or not d.is_dir() or not self.inside(d):
            raise DamagedStoreError(f"store '{self.root}': versions/{version} is not a folder of the store; edgecp "
                                    "deletes nothing it did not write")
        trash = self.root / "versions" / f".trash-{version}-{uuid.uuid4().hex[:8]}"
        os.rename(d, trash)
        fsync_dir(self.root / "versions")
        self.remove_entry(trash)
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
        fsync_dir(self.root)
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

    def _write_version(self, name: str, files: dict[str, bytes | Path], manifest: dict,
                       before_seal: Callable[[Path], dict] | None = None) -> Path:
        versions = self.root / "versions"
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=versions))
        recorded = {}
        for fname, content in files.items():
            if fname in (MANIFEST, MANIFEST_SUM) or fname != Path(fname).name or fname.startswith("."):
                raise ValueError(f"a version cannot hold a file named '{fname}'")
            dst = tmp / fname
            if isinstance(content, Path):
                if content.is_symlink() or not content.is_file():
                    raise DamagedStoreError(f"'{content}' is not a regular file: edgecp copies no links into a version")
                shutil.copyfile(content, dst)
            else:
                dst.write_bytes(content)
            with open(dst, "rb") as f:
                os.fsync(f.fileno())
            recorded[fname] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        if before_seal is not None:  # e.g. the forgetting check: reads the files, adds to the manifest
            manifest = {**manifest, **before_seal(tmp)}
            for fname, rec in recorded.items():  # what it read is what is sealed
                if sha256_file(tmp / fname) != rec["sha256"]:
                    raise DamagedStoreError(f"'{fname}' changed while the version was being written: nothing was "
                                            "committed; retry")
        _write_json_durable(tmp / MANIFEST, {**manifest, "files": recorded, "sealed": True})
        digest = sha256_file(tmp / MANIFEST)
        with open(tmp / MANIFEST_SUM, "w") as f:
            f.write(digest + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final = versions / name
        os.rename(tmp, final)
        fsync_dir(versions)
        return final

    def commit(self, files: dict[str, bytes | Path], manifest: dict,
               before_seal: Callable[[Path], dict] | None = None) -> str:
        """Write a new version and make it current, atomically. Call inside `writer()`.

        `before_seal(folder)` runs when the files are written in the version's temporary folder and before its
        manifest is: what it returns is added to the manifest (the forgetting check draws from the new version's
        files there). A failure in it commits nothing (recovery removes the temporary folder).

        The manifest gets version, parent, time and the sha256 of every file. `removed` (concepts removed with
        traces left in the model) carries over from the parent unless the new manifest sets it."""
        name = self.next_version()
        parent = self.head
        manifest = {**manifest, "version": name, "parent": parent,
                    "committed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        manifest.pop("files", None)
        manifest.pop("sealed", None)
        if "removed" not in manifest:
            removed = self.manifest(parent).get("removed")
            if removed:
                manifest["removed"] = removed
        _write_json_durable(self.root / PENDING, {"version": name, "parent": parent})
        fsync_dir(self.root)
        try:
            self._write_version(name, files, manifest, before_seal)
        except BaseException:  # nothing committed: the temporary folder and the .pending mark go now
            with contextlib.suppress(Exception):
                self.recover()
            raise
        self.set_head(name)
        (self.root / PENDING).unlink(missing_ok=True)
        return name

    def write_info(self, info: dict) -> None:
        """Replace store.json atomically (call inside `writer()`): `set-method` on a store without concepts. The new
        info passes the schema first, so a bad value never reaches the file."""
        try:
            validate_info(info)
        except ValueError as e:
            raise EdgecpError(f"store.json would be invalid: {e}") from None
        write_json_atomic(self.root / STORE_FILE, info, sort_keys=True)
        self.info = info

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
        return sum(f.lstat().st_size for f in self.version_dir(version).iterdir() if f.is_file() and not f.is_symlink())
