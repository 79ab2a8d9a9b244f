"""The personal model's lifecycle: history, rollback, remove a concept, verify, reclaim space (gc).

Every command that writes takes the writer lock and changes the store by one atomic step: a new version (remove a
concept), a HEAD replaced by rename (rollback), or versions renamed to `versions/.trash-*` before they are deleted
(gc). A SIGKILL at any instant leaves the old state or the new one; recovery finishes or undoes the rest.

Choices the issue leaves open (also in docs/architecture.md):
- `rollback VERSION` points HEAD at an existing version (older or newer); the versions above it stay until `gc`.
- `gc` keeps every version reachable from HEAD (HEAD and its parents) and v0000, the empty store; `--keep N`
  keeps only HEAD and its N-1 nearest parents (and v0000). Versions left by a rollback, exports of deleted
  versions (concept updates included: an update counts as its to-version), and incomplete exports are deleted. The
  bytes freed are reported.
- `remove-concept` makes a new version without the concept (history is append-only). Methods that store each
  concept's contribution apart remove it exactly; the others refuse unless told `--mode rollback` (HEAD goes to
  the version before the concept; the later concepts are named) or `--mode token-only` (the token and the image
  hashes go, the shared state keeps traces: recorded as `removed: [{name, mode, traces: true}]`). Exact methods
  refuse token-only: their stored parts must stay one per remaining concept so later removals stay exact. Earlier versions
  still hold the concept until `gc --keep 1` deletes them; the result says which.
- `verify` checks every version (its files against the sha256s its manifest recorded), HEAD, store.json and every
  export. Versions written before edgecp recorded hashes are reported as such, not as damaged.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.torch import save

from edgecp import resumable
from edgecp.config import AdapterConfig, from_dict
from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.export.update_format import MANIFEST as UPDATE_MANIFEST
from edgecp.export.update_format import read_update
from edgecp.integrity import EXPORT_META, WRITING_MARK, check_files, read_export_meta, tree_bytes
from edgecp.methods import build_method, method_class, method_names
from edgecp.personal import RECORD_FILE, TOKENS_FILE, read_tensors
from edgecp.store import MANIFEST, STORE_FILE, VERSION_RE, Store, check_version_name, link_problem

REMOVE_MODES = ("exact", "token-only", "rollback")


# -- what each method can remove ---------------------------------------------------------------------------
def removal_support(method: str) -> str:
    """'exact' or 'token-only' (rollback works for every method)."""
    return method_class(method).removal


def removal_table() -> list[dict]:
    """Per method: how `remove-concept` works, for `edgecp methods` and the README."""
    rows = []
    for name in method_names():
        cls = method_class(name)
        modes = (["exact"] if cls.removal == "exact" else []) + ["token-only", "rollback"]
        rows.append({"method": name, "default": cls.removal if cls.removal == "exact" else None, "modes": modes})
    return rows


# -- history ------------------------------------------------------------------------------------------------
def _describe(m: dict, parent: dict | None) -> dict:
    """What a version did: an explicit `action` (remove-concept) or the difference of concepts to its parent."""
    if m.get("action"):
        return m["action"]
    if m.get("parent") is None:
        return {"kind": "init"}
    names = [c["name"] for c in m["concepts"]]
    if parent is None:  # the parent was deleted by gc: the newest concept is the one added
        return {"kind": "add", "concept": names[-1]} if names else {"kind": "unknown"}
    before = [c["name"] for c in parent["concepts"]]
    added = [n for n in names if n not in before]
    removed = [n for n in before if n not in names]
    if added and not removed:
        return {"kind": "add", "concept": added[-1]}
    return {"kind": "change", "added": added, "removed": removed}


def describe_action(a: dict) -> str:
    k = a.get("kind")
    if k == "init":
        return "created the store"
    if k == "add":
        return f"added {a['concept']}"
    if k == "remove":
        return f"removed {a['concept']} ({a['mode']})"
    return f"added {', '.join(a.get('added', [])) or '-'}; removed {', '.join(a.get('removed', [])) or '-'}"


def history(root: str | Path) -> dict:
    """Every version (oldest first): name, parent, time, what it did, method, concepts, bytes, whether HEAD;
    and the HEAD moves that were not commits (rollbacks) from the reflog."""
    store = Store.open(root)
    head = store.head_or_none()
    manifests: dict[str, dict | None] = {}
    for v in store.versions():
        try:
            manifests[v] = store.manifest(v)
        except DamagedStoreError:
            manifests[v] = None
    rows = []
    for v, m in manifests.items():
        if m is None:
            rows.append({"version": v, "damaged": True, "head": v == head, "bytes": store.disk_bytes(v)})
            continue
        action = _describe(m, manifests.get(m.get("parent")))
        rows.append({
            "version": v, "parent": m.get("parent"), "committed": m.get("committed") or store.info.get("created"),
            "action": action, "what": describe_action(action),
            "method": (m.get("method") or store.info["method"])["name"],
            "concepts": [c["name"] for c in m["concepts"]], "bytes": store.disk_bytes(v), "head": v == head,
            "removed": m.get("removed", []),
            **({"check": m["check"]} if m.get("check") else {}),
        })
    events = [e for e in store.reflog() if e.get("action") in ("rollback", "remove-concept", "gc")]
    try:
        waiting = resumable.pending(store)
    except DamagedStoreError as e:
        waiting = {"damaged": str(e)}
    return {"store": str(store.root), "head": head, "versions": rows, "events": events,
            "bytes": tree_bytes(store.root / "versions"),
            "pending": None if not waiting else (waiting if "damaged" in waiting else {
                "name": waiting["name"], "head": waiting["head"], "checkpoint": waiting["checkpoint"],
                "steps": waiting["train"]["steps"], "images": len(waiting["images"]),
                "line": pending_line(store, waiting)})}


# -- rollback -----------------------------------------------------------------------------------------------
def rollback(root: str | Path, version: str) -> dict:
    """Point HEAD at `version`, atomically. The versions above it are kept until `gc`."""
    check_version_name(version)
    store = Store.open(root)
    with store.writer(check_head=False):
        versions = store.versions()
        if version not in versions:
            raise EdgecpError(f"version {version} does not exist in '{store.root}': it has {_span(versions)} "
                              f"(see `edgecp history --store {store.root}`)")
        old = store.head_or_none()
        if version == old:
            raise EdgecpError(f"HEAD of '{store.root}' is already {version}: nothing to roll back")
        store.check_version(version)
        store.set_head(version, {"action": "rollback", "from": old, "to": version})
        return _head_move(store, old, version)


def _span(versions: list[str]) -> str:
    return f"{versions[0]} .. {versions[-1]}" if versions else "no complete version"


def _names(store: Store, version: str | None) -> list[str]:
    try:
        return [c["name"] for c in store.manifest(version)["concepts"]] if version else []
    except DamagedStoreError:
        return []


def _head_move(store: Store, old: str | None, new: str) -> dict:
    before, after = _names(store, old), _names(store, new)
    return {"from": old, "to": new, "concepts": after, "dropped": [n for n in before if n not in after],
            "restored": [n for n in after if n not in before],
            "later_versions": [v for v in store.versions() if int(v[1:]) > int(new[1:])]}


# -- remove-concept -----------------------------------------------------------------------------------------
def version_before(store: Store, name: str) -> str:
    """The newest ancestor of HEAD without concept `name` (following parents from HEAD)."""
    v = store.head
    while name in _names(store, v):
        parent = store.manifest(v).get("parent")
        if parent is None or parent not in store.versions():
            raise EdgecpError(
                f"the version before concept '{name}' was added is gone (deleted by gc): remove it with "
                "--mode token-only instead"
            )
        v = parent
    return v


def remove_concept(root: str | Path, name: str, mode: str | None = None) -> dict:
    """Forget concept `name`; see the module docstring for the modes. Returns what was done."""
    if mode is not None and mode not in REMOVE_MODES:
        raise EdgecpError(f"--mode '{mode}' is unknown: use {', '.join(REMOVE_MODES)}")
    store = Store.open(root)
    with store.writer():
        head = store.head
        m = store.manifest()
        names = [c["name"] for c in m["concepts"]]
        if name not in names:
            raise EdgecpError(f"concept '{name}' is not in version {head} of '{store.root}': its concepts are "
                              f"{', '.join(names) or 'none'} (see `edgecp concepts`)")
        method = store.info["method"]["name"]
        support = removal_support(method)
        later = names[names.index(name) + 1:]
        if mode is None and support != "exact" or mode == "exact" and support != "exact":
            lost = f"loses the later concept(s) {', '.join(later)} (kept in history until gc)" if later else \
                "loses no other concept"
            raise EdgecpError(
                f"method {method} keeps every concept in one shared state, so '{name}' cannot be removed exactly; "
                f"choose --mode rollback (HEAD goes back to {version_before(store, name)}, the version before it; "
                f"{lost}) or --mode token-only (the token and image hashes go, the adapter keeps traces of it)"
            )
        if mode == "token-only" and support == "exact":
            raise EdgecpError(
                f"method {method} removes '{name}' exactly (its contribution is stored apart): drop --mode token-only; "
                "keeping its part of the model without its token would leave the store unable to remove it later"
            )
        mode = mode or "exact"
        if mode == "rollback":
            target = version_before(store, name)
            store.set_head(target, {"action": "remove-concept", "mode": "rollback", "concept": name,
                                    "from": head, "to": target})
            return {"mode": mode, "concept": name, **_head_move(store, head, target),
                    "still_in": _holding(store, name, exclude=None)}
        version = _commit_without(store, m, name, mode)
        return {"mode": mode, "concept": name, "from": head, "to": version, "traces": mode == "token-only",
                "concepts": _names(store, version), "still_in": _holding(store, name, exclude=version)}


def _holding(store: Store, name: str, exclude: str | None) -> list[str]:
    """Versions that still hold the concept (earlier history): `gc --keep 1` deletes them."""
    return [v for v in store.versions() if v != exclude and name in _names(store, v)]


def _commit_without(store: Store, m: dict, name: str, mode: str) -> str:
    vdir = store.version_dir()
    position = [c["name"] for c in m["concepts"]].index(name)
    entry = m["concepts"][position]
    tensors, other = {}, {}
    # only the files the manifest records (their hashes were checked by writer()): anything else in the folder, a
    # link or a file put there by hand, is never read or carried into the new version
    recorded = m.get("files")
    names = sorted(recorded) if recorded is not None else sorted(
        f.name for f in vdir.iterdir() if f.is_file() and not f.is_symlink() and f.name != MANIFEST)
    names = [n for n in names if n != RECORD_FILE]  # the record is the training of the version that added a concept
    for fname in names:
        f = vdir / fname
        if f.suffix == ".safetensors":
            tensors[f.name] = read_tensors(vdir, f.name)
        else:
            other[f.name] = f
    tokens = tensors.get(TOKENS_FILE, {})
    tokens.pop(entry["token"], None)
    info = store.info
    method = build_method(info["method"]["name"], info["method"]["params"],
                          from_dict(AdapterConfig, info["adapter"], "adapter"))
    # exact: the method takes the concept's contribution out. token-only on a method that cannot separate it: the
    # method still drops what it keeps apart (DSC's teacher-pool entry). token-only on a separable method, which
    # the user asked for explicitly: only the token goes.
    loaded = {f: ts for f, ts in tensors.items() if f != TOKENS_FILE}
    updates = method.remove_concept(tensors, position, m) if mode == "exact" or method.removal != "exact" else {}
    manifest = {k: v for k, v in m.items() if k not in ("version", "parent", "committed", "files", "action")}
    manifest["concepts"] = [c for c in m["concepts"] if c["name"] != name]  # the image hashes go with it
    for k, v in updates.items():
        if v is None:
            manifest.pop(k, None)
        else:
            manifest[k] = v
    record = {"name": name, "token": entry["token"], "mode": mode, "traces": mode == "token-only",
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    manifest["removed"] = list(m.get("removed", [])) + [record]
    manifest["action"] = {"kind": "remove", "concept": name, "mode": mode}
    n = manifest.get("n_param")
    if isinstance(n, dict) and n.get("unet"):
        stored = sum(t.numel() for f, ts in tensors.items() if f != TOKENS_FILE for t in ts.values())
        manifest["n_param"] = {**n, "store": stored, "store_pct": round(100 + 100 * stored / n["unet"], 4)}
    files: dict[str, bytes | Path] = dict(other)
    for f, ts in tensors.items():  # files the removal did not touch are copied byte for byte
        files[f] = vdir / f if loaded.get(f) is ts else save({k: v.contiguous() for k, v in ts.items()})
    return store.commit(files, manifest)


# -- verify -------------------------------------------------------------------------------------------------
def verify(root: str | Path) -> dict:
    """Check store.json, HEAD, every version's files and manifest against their recorded sha256s, and every export.
    Returns {ok, problems, notes, intact, foreign, suggestion}; never changes the store (no recovery either).

    Problems come in kinds, and the suggestion follows the kind, never trading a concept for a repair that does
    not need it: a damaged store.json is restored (the versions are untouched by that); entries edgecp did not
    write (`foreign`: files beside a version's recorded ones, links) are moved out, nothing else; damaged versions
    off HEAD's line can go with `gc`; a damaged version on HEAD's line is restored from a backup, and only a
    damaged HEAD suggests a rollback, naming the concepts it would take out of the model."""
    root = Path(root).expanduser()
    problems, notes, foreign = [], [], []
    info_problem = None
    try:
        store = Store.open(root, recover=False)
    except DamagedStoreError as e:
        info_problem = str(e)
        problems.append(info_problem)
        store = Store(root, {})
    link = link_problem(root)
    if link:  # the store refuses to open: say what, touch nothing
        return _verdict(store, problems, notes, [], foreign, info_problem, link=link)
    versions_dir = store.root / "versions"
    if not versions_dir.is_dir():
        problems.append("versions/ is missing")
        return _verdict(store, problems, notes, [], foreign, info_problem)
    leftovers = {p.name for p in store.leftovers()}
    for p in sorted(versions_dir.iterdir()):
        if p.name in leftovers:
            notes.append(f"versions/{p.name} is left from an interrupted write; the next write removes it")
        elif p.is_symlink():
            foreign.append(f"versions/{p.name} is a symbolic link (edgecp never follows one)")
        elif not VERSION_RE.fullmatch(p.name) or not p.is_dir():
            foreign.append(f"versions/{p.name} is not a version folder")
        elif not (p / MANIFEST).is_file():
            problems.append(f"{p.name} has no {MANIFEST}: damaged")
    intact = []
    for v in store.versions():
        try:
            files = store.manifest(v).get("files")
        except DamagedStoreError:
            problems += store.version_problems(v)  # the manifest's own damage, as "vNNNN/manifest.json ..."
            continue
        if files is None:
            notes.append(f"{v}: no recorded hashes (written by an older edgecp); its files were not checked")
            intact.append(v)
            continue
        bad = [f"{v}/{x}" for x in check_files(store.version_dir(v), files)]
        problems += bad
        foreign += [f"{v}/{x} was not written by edgecp (not in the manifest)" for x in store.foreign_files(v, files)]
        if not bad:
            intact.append(v)
    head = store.head_or_none()
    if head is None:
        problems.append("HEAD is missing, empty or not a version name")
    elif head not in store.versions():
        problems.append(f"HEAD names {head}, which is not a complete version")
    exports = store.root / "exports"
    for d in sorted(exports.iterdir()) if exports.is_dir() else []:
        if d.name.startswith("."):
            if d.name in leftovers:
                notes.append(f"exports/{d.name} is an export in progress or interrupted; the next write removes it")
            else:
                foreign.append(f"exports/{d.name} was not written by edgecp")
            continue
        if not d.is_symlink() and (d / UPDATE_MANIFEST).is_file() and not (d / EXPORT_META).exists():
            problems += [f"exports/{d.name}: {x}" for x in read_update(d)[1]]  # a concept update
            continue
        meta, bad = read_export_meta(d)
        if meta is None and not d.is_symlink() and not (d / EXPORT_META).exists():
            foreign.append(f"exports/{d.name} is not an edgecp export (no {EXPORT_META}); gc leaves it alone")
        elif meta is not None and "files" not in meta:
            notes.append(f"exports/{d.name}: no recorded hashes (written by an older edgecp)")
        else:
            problems += [f"exports/{d.name}: {x}" for x in bad]
    staging = store.root / "staging"
    if staging.is_dir():
        for p in sorted(staging.iterdir()):
            if p.name in leftovers:
                notes.append(f"staging/{p.name} holds photos of a write in progress or interrupted (recovery "
                             "purges them)")
            else:
                foreign.append(f"staging/{p.name} was not put there by edgecp")
    try:
        waiting = resumable.pending(store)
    except DamagedStoreError as e:
        waiting = None
        problems.append(str(e))
    if waiting:
        notes.append(pending_line(store, waiting))
    return _verdict(store, problems, notes, intact, foreign, info_problem)


def pending_line(store: Store, p: dict) -> str:
    """One line on a pending resumable concept: what it keeps, and the two ways out."""
    at = f"iteration {p['checkpoint']} of {p['train']['steps']}" if p.get("checkpoint") is not None else \
        "no checkpoint yet"
    return (f"concept '{p['name']}' is pending (resumable, started on {p['head']}, {at}); its {len(p['images'])} "
            f"photo(s) stay staged in {resumable.FOLDER}/ until it commits: continue with `edgecp add-concept "
            f"--resume --store {store.root}`, or delete them with `edgecp add-concept --abandon --store {store.root}`")


def _verdict(store: Store, problems: list[str], notes: list[str], intact: list[str], foreign: list[str],
             info_problem: str | None, link: str | None = None) -> dict:
    head = store.head_or_none()
    root = store.root
    problems = problems + [f"{f}: move it out of the store" for f in foreign]
    suggestion = None
    if link:
        problems.append(f"{link}: edgecp refuses the store until the real folder or file is in its place")
        suggestion = f"replace the link with what it points to (mv), then run `edgecp verify --store {root}` again"
    elif info_problem:
        suggestion = (f"restore {STORE_FILE} from a backup (`edgecp init` writes it, `edgecp set-method` "
                      "changes it); the versions are not affected")
    elif problems:
        damaged = {p.split("/")[0] for p in problems if VERSION_RE.fullmatch(p.split("/")[0])}
        line = store.chain_problem(head)[0] if head in intact else []
        steps = []
        if foreign:
            steps.append("move the entries edgecp did not write out of the store (nothing else is needed for them)")
        if head is not None and head in intact:
            on_line = sorted(damaged & set(line), key=lambda n: int(n[1:]))
            off_line = sorted(damaged - set(line), key=lambda n: int(n[1:]))
            if on_line:
                steps.append(f"restore {', '.join(on_line)} from a backup (earlier versions on HEAD's line; HEAD "
                             f"{head} is intact and in use)")
            if off_line:
                steps.append(f"{', '.join(off_line)} are not on HEAD's line: restore them from a backup, or delete "
                             f"them with `edgecp gc --store {root}`")
            if any(p.startswith("exports/") for p in problems):
                steps.append(f"export again (`edgecp export --store {root}`) over damaged exports")
        elif damaged or head not in intact:
            good = [v for v in intact if v != head]
            if head is not None and head in damaged:
                lost = [n for n in _names(store, head) if n not in _names(store, good[-1])] if good else []
                steps.append(f"restore HEAD {head}'s files from a backup"
                             + (f", or run `edgecp rollback --store {root} {good[-1]}` (the newest intact version"
                                + (f"; the model then lacks {', '.join(lost)}" if lost else "") + ")" if good else ""))
            elif good:
                steps.append(f"run `edgecp rollback --store {root} {good[-1]}` (the newest intact version)")
            else:
                steps.append("no intact version is left: restore the store from a backup")
        suggestion = "; ".join(steps) or "see the problems above"
    return {"store": str(root), "ok": not problems, "problems": problems, "notes": notes, "head": head,
            "intact": intact, "foreign": foreign, "suggestion": suggestion}


# -- gc -----------------------------------------------------------------------------------------------------
def gc(root: str | Path, keep: int | None = None, dry_run: bool = False) -> dict:
    """Delete versions HEAD cannot reach (and with `keep`, all but HEAD's N-1 nearest parents), edgecp's exports of
    deleted versions, and leftovers of interrupted writes. Returns what went (or, with `dry_run`, what would) and
    the bytes freed.

    No deletion without proof: gc first proves that HEAD's whole parent chain reads (every manifest matches its
    seal, every parent exists or was deleted by an earlier gc) and that HEAD's files match their hashes; otherwise
    it refuses in one line and deletes nothing. An export is deleted only when its edgecp.json reads (it is
    edgecp's) and names a version gc does not keep; a folder without one is reported, never deleted. `dry_run`
    changes nothing at all: not even the recovery every other command runs."""
    if keep is not None and keep < 1:
        raise EdgecpError(f"--keep {keep} must be >= 1 (HEAD is always kept)")
    root = Path(root).expanduser()
    store = Store.open(root, recover=False)
    leftovers = store.leftovers()
    leftover_bytes = sum(tree_bytes(p) for p in leftovers)
    with store.writer(check_head=False, recover=not dry_run):
        head = store.head
        problems = store.version_problems(head)
        if problems:
            raise DamagedStoreError(
                f"gc deleted nothing: HEAD {head} is damaged ({problems[0]}), so what it reaches cannot be proven; "
                f"run `edgecp verify --store {store.root}`, then restore the file from a backup or "
                f"`edgecp rollback --store {store.root} VERSION` to an intact version"
            )
        chain, damage = store.chain_problem(head)
        if damage:
            raise DamagedStoreError(
                f"gc deleted nothing: HEAD's history cannot be proven ({damage}); run `edgecp verify "
                f"--store {store.root}` and restore the damaged version from a backup"
            )
        chain = chain if keep is None else chain[:keep]
        kept = set(chain) | ({"v0000"} & set(store.versions()))
        versions_dir = store.root / "versions"
        doomed = sorted((p.name for p in versions_dir.iterdir() if VERSION_RE.fullmatch(p.name)
                         and p.name not in kept and p.is_dir() and not p.is_symlink()), key=lambda n: int(n[1:]))
        exports, left_alone = [], []
        for d in sorted((store.root / "exports").glob("*")):
            if d.name.startswith("."):
                continue
            meta, _ = read_export_meta(d)
            if meta is None and not d.is_symlink() and not (d / EXPORT_META).exists():
                update, _ = read_update(d)  # a concept update: its version is the one it turns the base into
                meta = {"version": update["to_version"]} if update else None
            if d.is_symlink() or not d.is_dir() or meta is None:
                left_alone.append(f"exports/{d.name}")  # not provably edgecp's: never deleted
            elif meta.get("version") not in kept:
                exports.append(d)
        freed = {"versions": sum(tree_bytes(versions_dir / v) for v in doomed),
                 "exports": sum(tree_bytes(d) for d in exports), "leftovers": leftover_bytes}
        result = {"store": str(store.root), "head": head, "kept": sorted(kept, key=lambda n: int(n[1:])),
                  "deleted": doomed, "exports_deleted": [d.name for d in exports], "left_alone": left_alone,
                  "leftovers": [p.relative_to(store.root).as_posix() for p in leftovers],
                  "bytes_freed": freed, "bytes_total": sum(freed.values()), "dry_run": dry_run}
        if dry_run:
            return result
        if doomed or exports:
            store.log({"action": "gc", "deleted": doomed, "exports": [d.name for d in exports]})
        for v in doomed:
            store.trash_version(v)
        for d in exports:
            (d / WRITING_MARK).write_text("gc")  # a crash mid-delete leaves it for recovery, provably edgecp's
            trash = d.parent / f".trash-{d.name}"
            d.rename(trash)
            store.remove_entry(trash)
    return result




# -- training record ------------------------------------------------------------------------------------------------
def concept_version(store: Store, name: str) -> str:
    """The version that added concept `name` (the oldest version holding it whose parent does not)."""
    for v in store.versions():
        try:
            m = store.manifest(v)
        except DamagedStoreError:
            continue
        if name in [c["name"] for c in m["concepts"]] and name not in _names(store, m.get("parent")):
            return v
    known = sorted({n for v in store.versions() for n in _names(store, v)})
    raise EdgecpError(f"no version of '{store.root}' added a concept '{name}': its concepts are "
                      f"{', '.join(known) or 'none'} (see `edgecp history`)")


def training_record(root: str | Path, name: str) -> dict:
    """The loss curves of concept `name`'s training (per phase, with what each number is) and its version."""
    store = Store.open(root)
    v = concept_version(store, name)
    store.check_version(v)  # the record is one of the version's hashed files
    m = store.manifest(v)
    if RECORD_FILE not in (m.get("files") or {}):
        raise EdgecpError(f"version {v} (concept '{name}') has no training record: it was written by an older "
                          "edgecp, before records were kept")
    record = json.loads((store.version_dir(v) / RECORD_FILE).read_text())
    entry = next(c for c in m["concepts"] if c["name"] == name)
    return {"version": v, "concept": name, "metrics": entry.get("metrics", {}), **record}


def plot_record(root: str | Path, name: str, out: str | Path) -> Path:
    """Draw concept `name`'s loss curves, one panel per phase, to `out` (.png) with matplotlib's object API
    (no pyplot: nothing of matplotlib's global state changes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out).expanduser()
    if out.suffix.lower() != ".png":
        raise EdgecpError(f"--plot '{out}' must be a .png file path")
    rec = training_record(root, name)
    phases = rec["phases"]
    fig = Figure(figsize=(6, 2.6 * max(len(phases), 1)), dpi=100)
    FigureCanvasAgg(fig)
    for i, (phase, p) in enumerate(phases.items()):
        ax = fig.add_subplot(len(phases), 1, i + 1)
        y = p["values"]
        ax.plot(range(1, len(y) + 1), y, lw=0.8, label="per iteration")
        if len(y) >= 10:
            w = max(len(y) // 20, 2)
            smooth = [sum(y[max(0, j - w + 1): j + 1]) / len(y[max(0, j - w + 1): j + 1]) for j in range(len(y))]
            ax.plot(range(1, len(y) + 1), smooth, lw=1.6, label=f"mean of {w}")
        ax.set_title(f"<{name}> {phase}: {p['metric']}", fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=7)
    fx = rec.get("metrics", {})
    if "loss_fixed_before" in fx:
        fig.suptitle(f"{rec['version']}: fixed-timestep loss {fx['loss_fixed_before']:.4f} -> "
                     f"{fx['loss_fixed_after']:.4f}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
