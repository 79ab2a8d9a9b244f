"""A probe of bad input, damage and misuse against the store (issue 21): every case the issue's probe found, and
variants of each of its principles. Each scenario copies a template store, damages or misuses it, runs `edgecp`
commands in this process (through `edgecp.cli.main`, the console script's own error handling), and checks:
  - a refusal is one line starting with "error:", no traceback, a non-zero exit;
  - nothing is lost: the store's files (and any folder outside it the scenario set up) are byte-identical
    afterwards, unless the scenario's point is a change (then that change is checked);
  - where the issue names the cause, the line names it.

    python tools/probe_store.py                 # every scenario, on a template it trains (3 concepts, ~1 min)
    python tools/probe_store.py --short         # the scenarios that need no training or export (CI runs this)
    python tools/probe_store.py --template S    # on a copy of an existing lora-sequential store (2+ concepts)

Prints one line per scenario and "N tried, N handled"; writes probe-results.json in --work; exits 1 if any
scenario was not handled.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

SCENARIOS: list[tuple[str, str, bool, Callable]] = []  # (principle, name, slow, fn(store, work) -> None)


def scenario(principle: str, slow: bool = False):
    def add(fn):
        SCENARIOS.append((principle, fn.__name__, slow, fn))
        return fn
    return add


class Failed(AssertionError):
    pass


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)


# -- running the CLI in this process -------------------------------------------------------------------------
def cli(*args) -> tuple[int, str, str]:
    from edgecp.cli import main

    old = sys.argv
    sys.argv = ["edgecp", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a traceback is the failure this probe looks for
        code, err = -1, io.StringIO(traceback.format_exc())
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def refused(args: list, *needles: str, code: int | None = None) -> str:
    c, _, err = cli(*args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    joined = " ".join(ln.strip() for ln in lines)
    expect("Traceback" not in err and c != -1, f"`{' '.join(map(str, args[:2]))}` gave a traceback: {err[-300:]}")
    expect(c != 0, f"`{' '.join(map(str, args[:2]))}` was not refused")
    expect(code is None or c == code, f"exit {c}, expected {code}")
    expect(joined.startswith("error:"), f"not an error line: {joined[:200]}")
    for n in needles:
        expect(n in joined, f"the line does not say {n!r}: {joined[:300]}")
    return joined


def ok(args: list) -> str:
    c, out, err = cli(*args)
    expect(c == 0, f"`{' '.join(map(str, args[:2]))}` failed ({c}): {err[-300:]}")
    return out


def files_of(root: Path) -> dict[str, str]:
    """Every file under root (links not followed) with its sha256: the 'nothing lost' check."""
    out = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            if n == ".lock":
                continue
            rel = p.relative_to(root).as_posix()
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@contextlib.contextmanager
def unchanged(*roots: Path):
    before = [files_of(r) for r in roots]
    yield
    for r, b in zip(roots, before):
        now = files_of(r)
        lost = sorted(set(b) - set(now))
        changed = sorted(k for k in b if k in now and now[k] != b[k])
        expect(not lost and not changed, f"{r.name}: lost {lost[:3]} changed {changed[:3]}")


def outside(work: Path) -> Path:
    """A folder outside the store holding a person's files: nothing may touch it."""
    d = work / "D"
    for rel in (".hidden-user-dir/keep.txt", "family-photos/a.jpg", "0123456789ab/x.png", "v0001/manifest.json"):
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text("mine")
    return d


def flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


def truncate(f: Path, n: int = 40) -> None:
    f.write_bytes(f.read_bytes()[:n])


def edit_manifest(vdir: Path, reseal: bool = True, **changes) -> None:
    m = json.loads((vdir / "manifest.json").read_text())
    for k, v in changes.items():
        m[k] = v(m[k]) if callable(v) else v
    (vdir / "manifest.json").write_text(json.dumps(m))
    if reseal:
        (vdir / "manifest.json.sha256").write_text(hashlib.sha256((vdir / "manifest.json").read_bytes()).hexdigest())


def head(s: Path) -> Path:
    return s / "versions" / (s / "HEAD").read_text().strip()


def parent_of_head(s: Path) -> str:
    return json.loads((head(s) / "manifest.json").read_text())["parent"]


def photo(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"p{seed}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (72, 72, 3)).astype(np.uint8)).save(p)
    return p


# -- 1. no deletion without proof -----------------------------------------------------------------------------
@scenario("1 no deletion without proof")
def gc_truncated_head_manifest(s, w):
    truncate(head(s) / "manifest.json")
    with unchanged(s):
        refused(["gc", "--store", s], "gc deleted nothing", code=4)
        refused(["gc", "--keep", "1", "--store", s], "gc deleted nothing", code=4)


@scenario("1 no deletion without proof")
def gc_keep1_flipped_head_adapter(s, w):
    flip(head(s) / "adapter.safetensors")
    with unchanged(s):
        refused(["gc", "--keep", "1", "--store", s], "does not match its sha256", code=4)


@scenario("1 no deletion without proof")
def gc_flipped_head_tokens(s, w):
    flip(head(s) / "tokens.safetensors")
    with unchanged(s):
        refused(["gc", "--store", s], "gc deleted nothing", code=4)


@scenario("1 no deletion without proof")
def gc_missing_head_file(s, w):
    (head(s) / "tokens.safetensors").unlink()
    with unchanged(s):
        refused(["gc", "--keep", "1", "--store", s], "is missing", code=4)


@scenario("1 no deletion without proof")
def gc_parent_deleted_by_hand(s, w):
    shutil.rmtree(s / "versions" / parent_of_head(s))
    with unchanged(s):
        refused(["gc", "--store", s], "is missing or incomplete", code=4)


@scenario("1 no deletion without proof")
def gc_ancestor_manifest_hand_edited(s, w):
    edit_manifest(s / "versions" / parent_of_head(s), reseal=False, parent=None)
    with unchanged(s):
        refused(["gc", "--keep", "1", "--store", s], "changed after it was written", code=4)


@scenario("1 no deletion without proof")
def gc_parent_cycle(s, w):
    p = parent_of_head(s)
    edit_manifest(s / "versions" / p, parent=(s / "HEAD").read_text().strip())
    with unchanged(s):
        refused(["gc", "--store", s], "cycle", code=4)


@scenario("1 no deletion without proof")
def gc_empty_head(s, w):
    (s / "HEAD").write_text("")
    with unchanged(s):
        refused(["gc", "--store", s], "HEAD", code=4)


@scenario("1 no deletion without proof")
def gc_head_names_missing_version(s, w):
    (s / "HEAD").write_text("v0099\n")
    with unchanged(s):
        refused(["gc", "--keep", "1", "--store", s], "v0099", code=4)


@scenario("1 no deletion without proof")
def gc_dry_run_changes_nothing(s, w):
    (s / "staging" / "0123456789ab").mkdir(parents=True)
    (s / "staging" / "0123456789ab" / "0000.png").write_bytes(b"photo")
    (s / "versions" / ".tmp-v0042-abcdefgh").mkdir()
    with unchanged(s):
        out = ok(["gc", "--dry-run", "--keep", "1", "--store", s])
    expect("would delete" in out, out)


@scenario("1 no deletion without proof")
def stale_pending_naming_heads_parent_is_kept(s, w):
    p = parent_of_head(s)
    (s / ".pending").write_text(json.dumps({"version": p, "parent": None}))
    ok(["concepts", "--store", s])
    expect((s / "versions" / p / "manifest.json").is_file(), f"{p} was deleted by recovery")


@scenario("1 no deletion without proof")
def rollback_to_a_damaged_version_refused(s, w):
    p = parent_of_head(s)
    flip(s / "versions" / p / "tokens.safetensors")
    with unchanged(s):
        refused(["rollback", p, "--store", s], "damaged", code=4)


@scenario("1 no deletion without proof")
def remove_concept_on_a_damaged_head_refused(s, w):
    flip(head(s) / "adapter.safetensors")
    name = json.loads((head(s) / "manifest.json").read_text())["concepts"][0]["name"]
    with unchanged(s):
        refused(["remove-concept", name, "--mode", "token-only", "--store", s], "damaged", code=4)


@scenario("1 no deletion without proof")
def gc_after_rollback_deletes_only_unreachable(s, w):
    p = parent_of_head(s)
    h = (s / "HEAD").read_text().strip()
    ok(["rollback", p, "--store", s])
    out = ok(["gc", "--store", s])
    expect(h in out and not (s / "versions" / h).exists() and (s / "versions" / p).is_dir(), out)


# -- 2. nothing outside the store ------------------------------------------------------------------------------
def _link_top(s: Path, w: Path, entry: str) -> Path:
    d = outside(w)
    target = s / entry
    if target.is_dir():
        shutil.copytree(target, d, dirs_exist_ok=True, symlinks=True)
        shutil.rmtree(target)
    elif target.exists():
        shutil.copy(target, d / entry)
        target.unlink()
        target.symlink_to(d / entry)
        return d
    target.symlink_to(d)
    return d


for _entry in ("exports", "staging", "priors", "versions", "HEAD", "store.json", "reflog.jsonl"):
    def _fn(s, w, entry=_entry):
        d = _link_top(s, w, entry)
        with unchanged(s, d):
            for args in (["concepts"], ["gc"], ["gc", "--keep", "1"], ["history"], ["verify"]):
                c, _, err = cli(*args, "--store", s)
                expect(c != 0 and "Traceback" not in err and "symbolic link" in err, f"{args}: {c} {err[-200:]}")
    _fn.__name__ = f"top_level_{_entry.replace('.', '_')}_is_a_link_out"
    scenario("2 nothing outside the store")(_fn)


@scenario("2 nothing outside the store")
def link_in_versions_never_followed(s, w):
    d = outside(w)
    (s / "versions" / "v0099").symlink_to(d / "v0001")
    (s / "versions" / ".trash-v0098-abcdefgh").symlink_to(d)
    with unchanged(d):
        ok(["gc", "--keep", "1", "--store", s])
    expect((s / "versions" / "v0099").is_symlink(), "the link itself is reported, not removed by gc")


@scenario("2 nothing outside the store")
def link_in_exports_never_followed(s, w):
    d = outside(w)
    (s / "exports").mkdir(exist_ok=True)
    (s / "exports" / "cpu-fp32-v0001").symlink_to(d)
    (s / "exports" / ".cpu-fp32-v0001-abcdefgh").symlink_to(d)
    with unchanged(d):
        ok(["concepts", "--store", s])
        ok(["gc", "--keep", "1", "--store", s])


@scenario("2 nothing outside the store")
def user_folders_inside_the_store_survive(s, w):
    (s / "exports" / ".hidden-user-dir").mkdir(parents=True)
    (s / "exports" / ".hidden-user-dir" / "keep.txt").write_text("mine")
    (s / "exports" / "family-photos").mkdir()
    (s / "exports" / "family-photos" / "a.jpg").write_text("mine")
    (s / "exports" / ".pictures-abcdefgh").mkdir()  # shaped like a temp export, without edgecp's mark
    (s / "staging" / "my-notes").mkdir(parents=True)
    (s / "priors" / ".mine").mkdir(parents=True)
    before = files_of(s)
    ok(["concepts", "--store", s])
    ok(["gc", "--keep", "1", "--store", s])
    now = files_of(s)
    expect(all(now.get(k) == v for k, v in before.items() if "versions/" not in k), "a person's file was deleted")
    expect((s / "exports" / ".pictures-abcdefgh").is_dir() and (s / "priors" / ".mine").is_dir(), "a folder went")


@scenario("2 nothing outside the store")
def link_added_to_head_not_copied_forward(s, w):
    d = outside(w)
    (head(s) / "notes.safetensors").symlink_to(d / "family-photos" / "a.jpg")
    (head(s) / "extra.txt").write_text("by hand")
    name = json.loads((head(s) / "manifest.json").read_text())["concepts"][0]["name"]
    with unchanged(d):
        ok(["remove-concept", name, "--mode", "token-only", "--store", s])
    new = head(s)
    expect(not (new / "notes.safetensors").exists() and not (new / "extra.txt").exists(), "copied forward")


@scenario("2 nothing outside the store")
def recorded_file_replaced_by_a_link(s, w):
    d = outside(w)
    f = head(s) / "adapter.safetensors"
    shutil.copy(f, d / "adapter.safetensors")
    f.unlink()
    f.symlink_to(d / "adapter.safetensors")
    with unchanged(s, d):
        refused(["generate", "a photo", "-n", "1", "--steps", "1", "--store", s, "--out", w / "img"],
                "symbolic link", code=4)


for _i, _name in enumerate(("../escaped", "/abs/victim", "[/oops]", "..", "a/b", "x\u0000y", "UPPER")):
    def _fn(s, w, name=_name):
        edit_manifest(head(s), concepts=lambda cs: [{**cs[0], "name": name}, *cs[1:]])
        with unchanged(s):
            for args in (["concepts"], ["export", "--format", "diffusers", "--out", w / "lora"], ["history"]):
                c, _, err = cli(*args, "--store", s)
                if args[0] == "history":  # history lists every version: the damaged one is marked, not fatal
                    expect(c == 0 and "Traceback" not in err, f"history: {c} {err[-200:]}")
                    continue
                expect(c == 4 and "Traceback" not in err and "no valid name" in err, f"{args[0]}: {c} {err[-200:]}")
        expect(not (w / "escaped").exists() and not Path("/abs/victim").exists(), "a file was written outside")
    _fn.__name__ = f"concept_name_{_i}_from_a_resealed_manifest"
    scenario("2 nothing outside the store")(_fn)


for _i, _key in enumerate(("../../outside.bin", "/etc/passwd", "sub/x.bin", ".hidden", "manifest.json")):
    def _fn(s, w, key=_key):
        edit_manifest(head(s), files=lambda fs: {**fs, key: {"sha256": "0" * 64, "bytes": 1}})
        with unchanged(s):
            refused(["concepts", "--store", s], code=4)
    _fn.__name__ = f"file_key_{_i}_from_a_resealed_manifest"
    scenario("2 nothing outside the store")(_fn)


@scenario("2 nothing outside the store")
def version_name_from_head_with_a_path(s, w):
    (s / "HEAD").write_text("../../etc\n")
    with unchanged(s):
        refused(["concepts", "--store", s], code=4)
        refused(["gc", "--store", s], code=4)


# -- 3. outputs outside the store -------------------------------------------------------------------------------
def _out_refused(s: Path, w: Path, out: Path, *extra) -> None:
    with unchanged(s):
        for args in (["export", "--format", "diffusers", "--out", out],
                     ["generate", "a photo", "-n", "1", "--steps", "1", "--out", out]):
            refused([*args, *extra, "--store", s])


@scenario("3 outputs outside the store")
def out_in_staging(s, w):
    _out_refused(s, w, s / "staging" / "x")


@scenario("3 outputs outside the store")
def out_as_next_version(s, w):
    _out_refused(s, w, s / "versions" / "v0009")


@scenario("3 outputs outside the store")
def out_inside_head(s, w):
    _out_refused(s, w, head(s) / "sub")


@scenario("3 outputs outside the store")
def out_is_the_store(s, w):
    _out_refused(s, w, s)


@scenario("3 outputs outside the store")
def out_is_a_link_into_the_store(s, w):
    (w / "sneaky").symlink_to(s / "versions")
    _out_refused(s, w, w / "sneaky" / "new")


@scenario("3 outputs outside the store")
def diffusers_export_under_exports(s, w):
    with unchanged(s):
        refused(["export", "--format", "diffusers", "--out", s / "exports" / "my-lora", "--store", s])


@scenario("3 outputs outside the store")
def out_is_an_existing_file(s, w):
    f = w / "file.txt"
    f.write_text("mine")
    with unchanged(w):
        _out_refused(s, w, f)


@scenario("3 outputs outside the store")
def out_is_a_non_empty_folder(s, w):
    d = w / "full"
    d.mkdir()
    (d / "mine.txt").write_text("mine")
    with unchanged(d):
        refused(["export", "--format", "diffusers", "--out", d, "--store", s])


@scenario("3 outputs outside the store")
def out_relative_path_works(s, w):
    cwd = os.getcwd()
    os.chdir(w)
    try:
        ok(["export", "--format", "diffusers", "--out", "rel-lora", "--store", s])
    finally:
        os.chdir(cwd)
    expect((w / "rel-lora").is_dir() and any((w / "rel-lora").iterdir()), "nothing written to the relative --out")


# -- 4. a version is self-consistent or refused ------------------------------------------------------------------
@scenario("4 self-consistent versions")
def hand_edited_manifest_detected(s, w):
    edit_manifest(head(s), reseal=False, concepts=lambda cs: [{**c, "class_word": "cat"} for c in cs])
    with unchanged(s):
        refused(["concepts", "--store", s], "changed after it was written", code=4)
        c, _, err = cli("verify", "--store", s)
        expect(c == 1 and "changed after it was written" in err, err[-300:])


@scenario("4 self-consistent versions")
def removed_seal_detected(s, w):
    (head(s) / "manifest.json.sha256").unlink()
    with unchanged(s):
        refused(["concepts", "--store", s], "is missing", code=4)


@scenario("4 self-consistent versions")
def extra_files_not_carried_forward(s, w):
    (head(s) / "stray.safetensors").write_bytes(b"x")
    name = json.loads((head(s) / "manifest.json").read_text())["concepts"][-1]["name"]
    ok(["remove-concept", name, "--mode", "token-only", "--store", s])
    expect(not (head(s) / "stray.safetensors").exists(), "the stray file was copied into the new version")


for _i, (_edit, _needle) in enumerate((
    (lambda i: {**i, "train": {**i["train"], "steps": "many"}}, "train.steps"),
    (lambda i: {k: v for k, v in i.items() if k != "adapter"}, "'adapter' is missing"),
    (lambda i: {**i, "adapter": {**i["adapter"], "rank": -3}}, "rank"),
    (lambda i: {**i, "base": {}}, "base.locator"),
    (lambda i: {**i, "prompt_template": "no slot"}, "prompt_template"),
    (lambda i: {**i, "train": {**i["train"], "lr": "fast"}}, "train.lr"),
    (lambda i: [1, 2], "store.json cannot be read (not a JSON object)"),
)):
    def _fn(s, w, edit=_edit, needle=_needle):
        f = s / "store.json"
        f.write_text(json.dumps(edit(json.loads(f.read_text()))))
        with unchanged(s):
            for args in (["concepts"], ["plan"], ["gc"], ["add-concept", "zz", w / "none.png"]):
                refused([*args, "--store", s], needle)
            c, _, err = cli("verify", "--store", s)
            expect(c == 1 and "restore store.json" in err and "gc" not in err.split("restore")[-1], err[-300:])
    _fn.__name__ = f"store_json_schema_{_i}"
    scenario("4 self-consistent versions")(_fn)


@scenario("4 self-consistent versions")
def truncated_store_json(s, w):
    truncate(s / "store.json", 20)
    with unchanged(s):
        refused(["concepts", "--store", s], "store.json cannot be read", code=4)
        c, _, err = cli("verify", "--store", s)
        expect(c == 1 and "gc" not in err.split("error:")[-1], f"verify suggests gc: {err[-300:]}")


@scenario("4 self-consistent versions", slow=True)
def lr_inf_never_committed(s, w):
    with unchanged(s):
        refused(["add-concept", "zz", photo(w / "ph"), "--store", s, "--lr", "inf", "--steps", "2"], "lr")
        refused(["add-concept", "zz", photo(w / "ph"), "--store", s, "--lr", "1e30", "--steps", "2"])


# -- 5. every failure is one line ---------------------------------------------------------------------------------
@scenario("5 one line")
def read_only_store(s, w):
    real = os.open

    def ro(path, flags, *a, **kw):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **kw)

    os.open = ro
    try:
        with unchanged(s):
            refused(["gc", "--store", s], "Read-only file system")
            refused(["rollback", "v0001", "--store", s], "Read-only file system")
    finally:
        os.open = real


@scenario("5 one line")
def disk_full_during_a_commit(s, w):
    from edgecp import store as store_mod

    real = store_mod.Store._write_version

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    store_mod.Store._write_version = full
    name = json.loads((head(s) / "manifest.json").read_text())["concepts"][-1]["name"]
    try:
        with unchanged(s):
            refused(["remove-concept", name, "--mode", "token-only", "--store", s], "No space left")
    finally:
        store_mod.Store._write_version = real
    ok(["verify", "--store", s])


@scenario("5 one line")
def device_tpu(s, w):
    refused(["plan", "--device", "tpu", "--store", s], "tpu")


@scenario("5 one line")
def device_cuda_without_cuda(s, w):
    import torch

    if torch.cuda.is_available():
        return
    refused(["plan", "--device", "cuda", "--store", s], "CUDA")
    refused(["generate", "a photo", "-n", "1", "--device", "cuda", "--store", s, "--out", w / "img"], "CUDA")


@scenario("5 one line")
def plan_for_a_gpu_that_is_not_here(s, w):
    out = ok(["plan", "--device", "cuda", "--gpu-memory", "8GB", "--store", s])
    expect("predicted" in out, out)


@scenario("5 one line")
def init_targets_naming_no_module(s, w):
    refused(["init", w / "t", "--base", "tiny", "--targets", "no.such.module"], "no.such.module")
    expect(not (w / "t").exists(), "init left a store behind")


@scenario("5 one line")
def init_on_a_link_to_an_empty_folder(s, w):
    (w / "real").mkdir()
    (w / "link").symlink_to(w / "real")
    ok(["init", w / "link", "--base", "tiny", "--method", "lora-sequential"])
    expect((w / "real" / "store.json").is_file(), "not created through the link")


@scenario("5 one line")
def init_on_a_dangling_link(s, w):
    (w / "dangling").symlink_to(w / "nowhere")
    refused(["init", w / "dangling", "--base", "tiny"], "is a link to")


@scenario("5 one line")
def unknown_version_names(s, w):
    with unchanged(s):
        refused(["rollback", "../v0001", "--store", s], "not a version name")
        refused(["rollback", "v9999", "--store", s], "does not exist")


# -- 6. what is printed is true ----------------------------------------------------------------------------------
@scenario("6 printed is true")
def purge_source_names_a_kept_duplicate(s, w):
    a = photo(w / "ph", 1)
    b = w / "ph" / "copy.png"
    shutil.copy(a, b)
    c, out, err = cli("add-concept", "dup", w / "ph", "--store", s, "--steps", "1", "--purge-source")
    expect(c == 0, err[-300:])
    expect(not b.exists() or "copy.png" in out + err, "a byte-identical copy survived unreported")


@scenario("6 printed is true")
def verify_advice_with_extra_files(s, w):
    (head(s) / "notes.txt").write_text("mine")
    c, _, err = cli("verify", "--store", s)
    expect(c == 1 and "move" in err and "rollback" not in err.split("error:")[-1], err[-300:])


@scenario("6 printed is true")
def budget_minimum_in_its_unit(s, w):
    line = refused(["plan", "--memory-budget", "65MB", "--store", s])
    expect("MiB" in line or "67.1" in line or "67,108,864" in line, line)


# -- 7. counts have bounds ---------------------------------------------------------------------------------------
@scenario("7 bounds")
def steps_huge(s, w):
    with unchanged(s):
        refused(["add-concept", "zz", photo(w / "ph"), "--store", s, "--steps", "99999999999999999999"])
        refused(["add-concept", "zz", photo(w / "ph"), "--store", s, "--steps", "10000000"])
        refused(["add-concept", "zz", photo(w / "ph"), "--store", s, "--steps", "0"])


@scenario("7 bounds")
def generate_counts(s, w):
    for args in (["-n", "100000"], ["--steps", "0"], ["--steps", "100000"], ["--size", "7"], ["--guidance", "nan"]):
        refused(["generate", "a photo", *args, "--store", s, "--out", w / "img"])


# -- the runner ------------------------------------------------------------------------------------------------------
def build_template(root: Path) -> None:
    from edgecp.api import init_store
    from edgecp.train import add_concept

    init_store(root, "tiny", method="lora-sequential", train={"steps": 2}, prior={"num_images": 2, "steps": 2})
    for i, n in enumerate(("alpha", "beta", "gamma")):
        add_concept(root, n, [photo(root.parent / f"photos-{n}", i + 1)], class_word="dog")


def run(template: Path, work: Path, short: bool, only: str | None = None, log=print) -> list[dict]:
    results = []
    for principle, name, slow, fn in SCENARIOS:
        if (short and slow) or (only and only not in name):
            continue
        w = work / name
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        s = w / "store"
        shutil.copytree(template, s, symlinks=True)
        try:
            fn(s, w)
            handled, detail = True, ""
        except Failed as e:
            handled, detail = False, str(e)
        except Exception as e:  # noqa: BLE001 - a crash of the probe itself is a failure to report
            handled, detail = False, f"{type(e).__name__}: {e}"
        results.append({"principle": principle, "scenario": name, "handled": handled, "detail": detail})
        log(f"{'ok  ' if handled else 'FAIL'} [{principle}] {name}" + (f": {detail}" if detail else ""))
        if handled:
            shutil.rmtree(w, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--template", type=Path, help="a lora-sequential store with 2+ concepts (copied, never changed)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--short", action="store_true", help="skip the scenarios that train or export")
    ap.add_argument("--only", help="run the scenarios whose name contains this")
    args = ap.parse_args()
    work = (args.work or Path(tempfile.mkdtemp(prefix="edgecp-probe-"))).resolve()
    os.environ.setdefault("EDGECP_HOME", str(work / "home"))
    template = args.template
    if template is None:
        template = work / "template" / "store"
        if not (template / "store.json").exists():
            print(f"training the template store in {template} ...", flush=True)
            build_template(template)
    results = run(template.resolve(), work, args.short, args.only)
    handled = sum(r["handled"] for r in results)
    (work / "probe-results.json").write_text(json.dumps(results, indent=2))
    by = {}
    for r in results:
        by.setdefault(r["principle"], [0, 0])
        by[r["principle"]][0] += 1
        by[r["principle"]][1] += r["handled"]
    print("; ".join(f"{p}: {h}/{t}" for p, (t, h) in by.items()))
    print(f"{len(results)} tried, {handled} handled")
    sys.exit(0 if handled == len(results) else 1)


if __name__ == "__main__":
    main()
