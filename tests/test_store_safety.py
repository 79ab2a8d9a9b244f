"""The store never loses a version and never touches a path outside itself (issue 21): gc, recovery and every
command on damaged chains, links out of the store, names from hand-edited files, and verify's advice."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import tree_snapshot

from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.lifecycle import gc, remove_concept, verify
from edgecp.store import Store


def _reseal(vdir: Path) -> None:
    """What a careful hand editor does after editing a manifest: recompute the seal (so only the content checks
    can catch the edit)."""
    digest = hashlib.sha256((vdir / "manifest.json").read_bytes()).hexdigest()
    (vdir / "manifest.json.sha256").write_text(digest + "\n")


def _edit_manifest(vdir: Path, reseal: bool, **changes) -> None:
    m = json.loads((vdir / "manifest.json").read_text())
    for k, v in changes.items():
        m[k] = v(m[k]) if callable(v) else v
    (vdir / "manifest.json").write_text(json.dumps(m))
    if reseal:
        _reseal(vdir)


def _flip_last_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


# -- no deletion without proof ------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [None, 1])
def test_gc_deletes_nothing_when_head_manifest_is_truncated(store_copy, capsys, keep):
    """Case 1: a truncated HEAD manifest used to make gc delete v0001 and v0002... all history."""
    (store_copy / "HEAD").write_text("v0002\n")
    f = store_copy / "versions" / "v0002" / "manifest.json"
    f.write_bytes(f.read_bytes()[:40])
    before = tree_snapshot(store_copy)
    with pytest.raises(DamagedStoreError, match="gc deleted nothing: HEAD v0002 is damaged"):
        gc(store_copy, keep=keep)
    assert tree_snapshot(store_copy) == before
    code, _, err = run_cli(capsys, "gc", "--store", store_copy, *(["--keep", str(keep)] if keep else []))
    assert_one_line_error(code, err, "gc deleted nothing", "rollback")
    assert code == 4 and tree_snapshot(store_copy) == before


def test_gc_deletes_nothing_when_a_head_file_is_flipped(store_copy):
    """Case 2: one flipped byte in HEAD's adapter, then gc --keep 1, used to delete v0001 and v0002."""
    _flip_last_byte(store_copy / "versions" / "v0002" / "adapter.safetensors")
    before = tree_snapshot(store_copy)
    with pytest.raises(DamagedStoreError, match="adapter.safetensors does not match its sha256"):
        gc(store_copy, keep=1)
    assert tree_snapshot(store_copy) == before


def test_gc_refuses_a_chain_whose_parent_vanished_but_follows_one_cut_by_gc(store_copy):
    """The whole parent chain must read: a parent deleted by hand is damage, one deleted by gc is recorded."""
    s = Store.open(store_copy)
    import shutil

    shutil.copytree(store_copy, store_copy.parent / "twin")
    shutil.rmtree(store_copy / "versions" / "v0001")  # by hand: not in the reflog
    before = tree_snapshot(store_copy)
    with pytest.raises(DamagedStoreError, match="v0002's parent v0001 is missing"):
        gc(store_copy)
    assert tree_snapshot(store_copy) == before
    twin = store_copy.parent / "twin"
    assert gc(twin, keep=1)["deleted"] == ["v0001"]  # gc's own cut is recorded in the reflog ...
    assert gc(twin)["deleted"] == [] and Store.open(twin).chain() == ["v0002"]  # ... and the chain stays provable
    assert s.versions() == ["v0000", "v0002"]


def test_gc_refuses_a_hand_edited_manifest_on_heads_line(store_copy):
    """A hand edit of an ancestor's manifest (its parent pointer) breaks the seal: no proof, no deletion."""
    _edit_manifest(store_copy / "versions" / "v0001", reseal=False, parent=None)
    before = tree_snapshot(store_copy)
    with pytest.raises(DamagedStoreError, match="history cannot be proven.*changed after it was written"):
        gc(store_copy, keep=1)
    assert tree_snapshot(store_copy) == before


def test_dry_run_changes_nothing_at_all(store_copy):
    """Case 13: gc --dry-run deleted staging leftovers (through the recovery every open runs)."""
    staged = store_copy / "staging" / "0123456789ab"
    staged.mkdir(parents=True)
    (staged / "0000.png").write_bytes(b"photo")
    (store_copy / "versions" / ".tmp-v0009-abcd1234").mkdir()
    Store.open(store_copy, recover=False)
    before = tree_snapshot(store_copy)
    r = gc(store_copy, keep=1, dry_run=True)
    assert r["deleted"] == ["v0001"] and r["dry_run"] and r["bytes_freed"]["leftovers"] == 5
    assert sorted(r["leftovers"]) == ["staging/0123456789ab", "versions/.tmp-v0009-abcd1234"]
    assert tree_snapshot(store_copy) == before and staged.is_dir()


def test_recovery_keeps_a_pending_version_that_anything_names(store_copy):
    """`.pending` left over and naming a version HEAD's line holds (a stale file, an edit): that is no proof of an
    interrupted commit, so the version stays."""
    (store_copy / ".pending").write_text(json.dumps({"version": "v0001", "parent": "v0000"}))
    Store.open(store_copy)
    assert Store.open(store_copy).versions() == ["v0000", "v0001", "v0002"]
    assert not (store_copy / ".pending").exists()


# -- nothing outside the store ------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["exports", "staging", "priors", "versions", "HEAD"])
def test_a_store_with_a_top_level_link_is_refused_and_the_target_untouched(store_copy, tmp_path, capsys, entry):
    """Case 3: `ln -s D S/exports` made `concepts` delete D/.hidden-user-dir and gc delete D/family-photos."""
    import shutil

    outside = tmp_path / "D"
    (outside / ".hidden-user-dir").mkdir(parents=True)
    (outside / ".hidden-user-dir" / "keep.txt").write_text("mine")
    (outside / "family-photos").mkdir()
    (outside / "family-photos" / "a.jpg").write_bytes(b"jpg")
    (outside / "0123456789ab").mkdir()  # a staging-like name: still never deleted through a link
    target = store_copy / entry
    if target.is_dir():
        shutil.copytree(target, outside, dirs_exist_ok=True)
        shutil.rmtree(target)
    elif target.exists():
        shutil.copy(target, outside / entry)
        target.unlink()
        outside = outside / entry
    target.symlink_to(outside)
    before = tree_snapshot(outside.parent if outside.is_file() else outside)
    for args in (["concepts"], ["gc"], ["gc", "--keep", "1"], ["history"], ["rollback", "v0001"]):
        code, _, err = run_cli(capsys, *args, "--store", store_copy)
        assert_one_line_error(code, err, f"{entry} is a symbolic link", "never follows a link")
    r = verify(store_copy)
    assert not r["ok"] and "replace the link" in r["suggestion"]
    assert tree_snapshot(outside.parent if outside.is_file() else outside) == before


def test_links_inside_versions_and_exports_are_never_followed(store_copy, tmp_path):
    outside = tmp_path / "D"
    (outside / "v9").mkdir(parents=True)
    (outside / "v9" / "manifest.json").write_text("{}")
    (store_copy / "versions" / "v0009").symlink_to(outside / "v9")
    (store_copy / "exports").mkdir()
    (store_copy / "exports" / "cpu-fp32-v0001").symlink_to(outside)
    (store_copy / "exports" / ".cpu-fp32-v0001-abcd1234").symlink_to(outside)  # a temp-export name, as a link
    s = Store.open(store_copy)  # recovery unlinks the temp-named link, never follows it
    assert s.versions() == ["v0000", "v0001", "v0002"]  # a link is never a version
    assert not (store_copy / "exports" / ".cpu-fp32-v0001-abcd1234").is_symlink()
    r = gc(store_copy, keep=1)
    assert r["deleted"] == ["v0001"] and r["left_alone"] == ["exports/cpu-fp32-v0001"]
    assert (outside / "v9" / "manifest.json").is_file()
    assert any("versions/v0009 is a symbolic link" in p for p in verify(store_copy)["problems"])


def test_a_link_added_to_heads_folder_is_not_copied_into_the_next_version(store_copy, tmp_path):
    """Case 7: a symlink added to HEAD's folder; remove-concept --mode token-only copied the outside file in."""
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the store")
    head = store_copy / "versions" / "v0002"
    (head / "notes.safetensors").symlink_to(secret)
    (head / "extra.txt").write_text("put here by hand")
    r = remove_concept(store_copy, "alpha", mode="token-only")
    new = store_copy / "versions" / r["to"]
    assert not (new / "notes.safetensors").exists() and not (new / "extra.txt").exists()
    assert set(json.loads((new / "manifest.json").read_text())["files"]) == {"adapter.safetensors", "tokens.safetensors"}
    v = verify(store_copy)
    assert not v["ok"] and "v0002/extra.txt was not written by edgecp (not in the manifest)" in v["foreign"]
    assert "rollback" not in v["suggestion"] and "move the entries" in v["suggestion"]


def test_a_recorded_file_that_became_a_link_is_damage(store_copy, tmp_path):
    head = store_copy / "versions" / "v0002"
    copy = tmp_path / "adapter.safetensors"
    os.replace(head / "adapter.safetensors", copy)
    (head / "adapter.safetensors").symlink_to(copy)  # same bytes, but outside the store
    with pytest.raises(DamagedStoreError, match="adapter.safetensors is a symbolic link"):
        Store.open(store_copy).check_version()


@pytest.mark.parametrize("name", ["../escaped", "/abs/victim", "[/oops]", "a\nb", ""])
def test_names_from_a_hand_edited_manifest_are_refused_even_resealed(store_copy, capsys, name):
    """Case 6: concept names `../escaped` and `/abs/victim` made the diffusers export write outside --out, and
    `[/oops]` crashed `concepts` with a rich markup traceback."""
    head = store_copy / "versions" / "v0002"
    _edit_manifest(head, reseal=True, concepts=lambda cs: [{**cs[0], "name": name}, *cs[1:]])
    before = tree_snapshot(store_copy)
    for args in (["concepts"], ["export", "--format", "diffusers", "--out", str(store_copy.parent / "lora")],
                 ["generate", "a photo", "-n", "1", "--steps", "1", "--out", str(store_copy.parent / "img")]):
        code, _, err = run_cli(capsys, *args, "--store", store_copy)
        assert_one_line_error(code, err, "manifest.json cannot be used", "has no valid name")
    assert tree_snapshot(store_copy) == before
    assert not (store_copy.parent / "escaped").exists()


@pytest.mark.parametrize("key", ["../../outside.bin", "/etc/passwd", "sub/dir.bin", ".hidden"])
def test_file_keys_from_a_manifest_never_become_paths_out_of_the_version(store_copy, key):
    head = store_copy / "versions" / "v0002"
    _edit_manifest(head, reseal=True, files=lambda fs: {**fs, key: {"sha256": "0" * 64, "bytes": 1}})
    with pytest.raises(DamagedStoreError, match="is not a plain name"):
        Store.open(store_copy).manifest()


def test_hand_edits_to_a_manifest_are_detected(store_copy, capsys):
    """Case 14c: a hand edit of a manifest went undetected; the seal beside it catches it."""
    _edit_manifest(store_copy / "versions" / "v0002", reseal=False,
                   concepts=lambda cs: [{**c, "class_word": "cat"} for c in cs])
    v = verify(store_copy)
    assert any("v0002/manifest.json cannot be used (it was changed after it was written" in p for p in v["problems"])
    code, _, err = run_cli(capsys, "concepts", "--store", store_copy)
    assert_one_line_error(code, err, "changed after it was written")
    (store_copy / "versions" / "v0001" / "manifest.json.sha256").unlink()  # a sealed manifest lost its seal
    assert any("v0001/manifest.json cannot be used (manifest.json.sha256 is missing)" in p
               for p in verify(store_copy)["problems"])


# -- store.json, init, read-only ----------------------------------------------------------------------------
@pytest.mark.parametrize("edit, needle", [
    (lambda i: {**i, "train": {**i["train"], "steps": "many"}}, 'train.steps is "many", not a int'),
    (lambda i: {k: v for k, v in i.items() if k != "adapter"}, "'adapter' is missing"),
    (lambda i: {**i, "adapter": {**i["adapter"], "rank": 0}}, "adapter: adapter rank 0"),
    (lambda i: {**i, "method": "lora"}, "'method' is missing or not an object"),
    (lambda i: {**i, "train": {**i["train"], "nonsense": 1}}, "unknown train setting 'nonsense'"),
])
def test_store_json_is_validated_with_one_line_errors(store_copy, capsys, edit, needle):
    f = store_copy / "store.json"
    f.write_text(json.dumps(edit(json.loads(f.read_text()))))
    for args in (["concepts"], ["plan"], ["gc"]):
        code, _, err = run_cli(capsys, *args, "--store", store_copy)
        assert_one_line_error(code, err, "bad store.json", needle)
    v = verify(store_copy)
    assert "restore store.json from a backup" in v["suggestion"] and "gc" not in v["suggestion"]


def test_verify_on_a_truncated_store_json_never_suggests_gc(store_copy):
    """Case 14a: with store.json truncated, verify recommended `gc --keep 1`."""
    f = store_copy / "store.json"
    f.write_bytes(f.read_bytes()[:20])
    v = verify(store_copy)
    assert not v["ok"] and "gc" not in v["suggestion"] and "restore store.json" in v["suggestion"]
    assert v["intact"] == ["v0000", "v0001", "v0002"]  # the versions were still checked


def test_init_on_a_link_to_an_empty_folder(tmp_path, capsys):
    from conftest import new_store

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    s = new_store(link)
    assert s.root == link and (real / "store.json").is_file() and link.is_symlink()
    assert Store.open(link).head == "v0000"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    code, _, err = run_cli(capsys, "init", dangling, "--base", "tiny")
    assert_one_line_error(code, err, "is a link to", "which is not a folder")


def test_a_read_only_store_is_one_line(store_copy, monkeypatch, capsys):
    real_open = os.open

    def ro_open(path, flags, *a, **kw):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", ro_open)
    code, _, err = run_cli(capsys, "rollback", "v0001", "--store", store_copy)
    assert_one_line_error(code, err, "is read-only (Read-only file system)")
    code, out, _ = run_cli(capsys, "concepts", "--store", store_copy)  # reading needs no lock
    assert code == 0 and "alpha" in out


def test_relative_store_paths(store_copy, monkeypatch):
    monkeypatch.chdir(store_copy.parent)
    rel = Path(store_copy.name)
    assert verify(rel)["ok"]
    assert gc(rel, keep=1)["deleted"] == ["v0001"]
    with pytest.raises(EdgecpError, match="does not exist"):
        from edgecp.lifecycle import rollback

        rollback(rel, "v0001")


def test_the_probe_handles_every_short_scenario(trained_store, tmp_path):
    """tools/probe_store.py --short, in CI: every case of issue 21's probe that needs no training run or export,
    and variants of each principle, on a copy of the session's trained store."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "probe_store.py"
    spec = importlib.util.spec_from_file_location("probe_store", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    lines = []
    results = probe.run(trained_store, tmp_path, short=True, log=lines.append)
    assert len(results) >= 70 and {r["principle"][0] for r in results} == set("1234567")
    assert [r for r in results if not r["handled"]] == []
