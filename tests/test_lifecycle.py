"""The personal model's lifecycle (history, rollback, remove-concept, verify, gc) and the damaged-store hardening."""

import json
import os
import shutil

import pytest
import torch
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos, new_store, tree_snapshot
from safetensors.torch import load_file

from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.lifecycle import gc, history, remove_concept, rollback, verify
from edgecp.store import Store


def _flip_last_byte(f):
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))


# -- store-level rules (no model) ----------------------------------------------------------------------------
def _store3(tmp_path):
    s = Store.create(tmp_path / "s", {"base": {"kind": "tiny", "locator": "tiny", "sha256": "x"},
                                      "method": {"name": "lora-sequential", "params": {}}, "adapter": {},
                                      "train": {}, "prior": {}})
    with s.writer():
        for i in range(3):
            s.commit({"a.bin": bytes([i])}, {"concepts": [{"name": f"c{j}"} for j in range(i + 1)]})
    return s


def test_empty_head_is_refused_and_deletes_nothing(tmp_path):
    s = _store3(tmp_path)
    (s.root / "HEAD").write_text("")
    before = tree_snapshot(s.root)
    with pytest.raises(DamagedStoreError, match="HEAD is missing, empty"), s.writer():
        pass
    assert tree_snapshot(s.root) == before and s.versions() == ["v0000", "v0001", "v0002", "v0003"]


def test_head_moved_back_by_hand_keeps_later_versions_and_never_reuses_a_name(tmp_path):
    s = _store3(tmp_path)
    (s.root / "HEAD").write_text("v0001\n")
    with s.writer():
        v = s.commit({"a.bin": b"new"}, {"concepts": [{"name": "x"}]})
    assert s.versions() == ["v0000", "v0001", "v0002", "v0003", "v0004"] and v == "v0004"
    assert s.manifest()["parent"] == "v0001"


def test_interrupted_commit_is_removed_but_a_rolled_back_version_is_not(tmp_path, monkeypatch):
    s = _store3(tmp_path)
    rollback(s.root, "v0002")  # v0003 was HEAD once: kept
    real = Store.set_head
    monkeypatch.setattr(Store, "set_head", lambda *a, **k: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError), s.writer():
        s.commit({"a.bin": b"x"}, {"concepts": []})
    monkeypatch.setattr(Store, "set_head", real)
    assert "v0004" in s.versions() and (s.root / ".pending").exists()  # what a SIGKILL here leaves
    Store.open(s.root)  # any command that opens the store recovers when no writer holds the lock
    assert s.versions() == ["v0000", "v0001", "v0002", "v0003"] and s.head == "v0002"
    assert not (s.root / ".pending").exists()


def test_manifest_records_file_hashes_and_damage_is_refused(tmp_path):
    s = _store3(tmp_path)
    m = s.manifest()
    assert m["files"]["a.bin"]["bytes"] == 1 and len(m["files"]["a.bin"]["sha256"]) == 64
    (s.version_dir() / "a.bin").write_bytes(b"\x07")  # same size, other bytes
    with pytest.raises(DamagedStoreError, match="v0003.*a.bin does not match its sha256.*edgecp verify"):
        s.check_version()
    r = verify(s.root)
    assert not r["ok"] and r["problems"] == ["v0003/a.bin does not match its sha256 (the bytes changed)"]
    # the damaged HEAD's recovery names what a rollback would take out of the model
    assert r["suggestion"] == (f"restore HEAD v0003's files from a backup, or run `edgecp rollback --store {s.root} "
                               "v0002` (the newest intact version; the model then lacks c2)")


def test_gc_finishes_an_interrupted_delete_and_exports_in_progress_survive_recovery(tmp_path):
    from edgecp.integrity import lock_dir, unlock_dir

    s = _store3(tmp_path)
    trash = s.root / "versions" / ".trash-v0001-dead"
    shutil.copytree(s.version_dir("v0001"), trash)  # a gc killed between rename and delete
    live = s.root / "exports" / ".cpu-fp32-v0003-live"
    dead = s.root / "exports" / ".cpu-fp32-v0003-dead"
    mine = s.root / "exports" / ".holiday-photos"  # a person's folder: not edgecp's, never deleted
    for d in (live, dead, mine):
        d.mkdir(parents=True)
        (d / "part.onnx").write_bytes(b"half")
    unlock_dir(lock_dir(dead))  # an export whose writer was killed: marked as edgecp's, lock released
    fd = lock_dir(live)  # an export still running (its writer holds the folder's lock)
    try:
        Store.open(s.root)
        assert not trash.exists() and not dead.exists() and live.exists() and mine.exists()
    finally:
        unlock_dir(fd)
    r = gc(s.root, keep=1)
    assert r["deleted"] == ["v0001", "v0002"] and r["kept"] == ["v0000", "v0003"] and not live.exists()
    assert r["bytes_freed"]["versions"] > 0
    with pytest.raises(EdgecpError, match="--keep 0 must be >= 1"):
        gc(s.root, keep=0)


def test_rollback_refuses_bad_versions_with_one_line_and_no_change(tmp_path, capsys):
    s = _store3(tmp_path)
    before = tree_snapshot(s.root)
    for arg, needle in (("v0009", "does not exist"), ("../x", "not a version name"), ("v0003", "already v0003")):
        code, _, err = run_cli(capsys, "rollback", arg, "--store", s.root)
        assert_one_line_error(code, err, needle)
    assert tree_snapshot(s.root) == before


# -- with the trained store (lora-sequential, alpha then beta) ----------------------------------------------
def test_history_rollback_and_gc_through_the_cli(store_copy, tmp_path, capsys):
    code, out, err = run_cli(capsys, "history", "--store", store_copy, "--json")
    h = json.loads(out)
    assert code == 0 and h["head"] == "v0002"
    assert [(v["version"], v["what"], v["head"]) for v in h["versions"]] == [
        ("v0000", "created the store", False), ("v0001", "added alpha", False), ("v0002", "added beta", True)]
    assert all(v["bytes"] > 0 and v["method"] == "lora-sequential" for v in h["versions"])
    code, out, err = run_cli(capsys, "rollback", "v0001", "--store", store_copy)
    assert code == 0 and "kept until `edgecp gc`: v0002" in out
    from edgecp.train import add_concept

    add_concept(store_copy, "gamma", make_photos(tmp_path / "g", n=1, seed=5), overrides={"steps": 1})
    s = Store.open(store_copy)
    assert s.head == "v0003" and s.versions() == ["v0000", "v0001", "v0002", "v0003"]
    assert [c["name"] for c in s.concepts()] == ["alpha", "gamma"]
    assert [e["action"] for e in history(store_copy)["events"]] == ["rollback"]
    code, out, err = run_cli(capsys, "gc", "--store", store_copy)
    assert code == 0 and "deleted 1 version(s) (v0002)" in out  # not reachable from HEAD any more
    code, out, err = run_cli(capsys, "verify", "--store", store_copy)
    assert code == 0 and "is intact: HEAD v0003" in out


def test_remove_concept_where_the_method_cannot_separate_it(store_copy, capsys):
    before = tree_snapshot(store_copy)
    code, _, err = run_cli(capsys, "remove-concept", "alpha", "--store", store_copy)
    assert_one_line_error(code, err, "cannot be removed exactly", "--mode rollback", "v0000", "later concept(s) beta",
                          "--mode token-only")
    code, _, err = run_cli(capsys, "remove-concept", "alpha", "--store", store_copy, "--mode", "exact")
    assert_one_line_error(code, err, "cannot be removed exactly")
    code, _, err = run_cli(capsys, "remove-concept", "zeta", "--store", store_copy)
    assert_one_line_error(code, err, "'zeta' is not in version v0002", "alpha, beta")
    assert tree_snapshot(store_copy) == before

    code, out, err = run_cli(capsys, "remove-concept", "alpha", "--store", store_copy, "--mode", "token-only")
    assert code == 0 and "keeps traces" in out and "v0001, v0002" in out
    s = Store.open(store_copy)
    m = s.manifest()
    assert s.head == "v0003" and [c["name"] for c in m["concepts"]] == ["beta"]
    assert m["removed"][0]["name"] == "alpha" and m["removed"][0]["traces"] is True
    assert "<alpha>" not in load_file(str(s.version_dir() / "tokens.safetensors"))
    prev_images = {i["sha256"] for i in s.manifest("v0002")["concepts"][0]["images"]}
    assert not prev_images & {i["sha256"] for c in m["concepts"] for i in c["images"]}
    # the adapter (traces) is byte-identical to the previous version's
    assert (s.version_dir() / "adapter.safetensors").read_bytes() == (s.version_dir("v0002") / "adapter.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "generate", "a photo of <alpha>", "--store", store_copy, "--steps", "1")
    assert_one_line_error(code, err, "unknown concept <alpha>")

    # rollback mode goes to the newest version before beta on HEAD's line: v0001, which still had alpha
    r = remove_concept(store_copy, "beta", "rollback")
    assert r["to"] == "v0001" and r["concepts"] == ["alpha"] and r["restored"] == ["alpha"]
    assert Store.open(store_copy).head == "v0001"


def test_damaged_stores_give_one_line_saying_what_to_run(store_copy, tmp_path, capsys):
    photo = make_photos(tmp_path / "p", n=1)[0]
    adapter = store_copy / "versions" / "v0002" / "adapter.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[: len(good) // 2])  # truncated
    for args in (["generate", "x", "--store", store_copy, "--steps", "1"], ["add-concept", "newc", photo, "--store", store_copy],
                 ["export", "--store", store_copy, "--format", "diffusers", "--out", tmp_path / "d"]):
        code, _, err = run_cli(capsys, *args)
        assert_one_line_error(code, err, "v0002", "adapter.safetensors", "edgecp verify", "edgecp rollback")
    code, out, err = run_cli(capsys, "verify", "--store", store_copy)
    assert code == 1 and "adapter.safetensors has" in err and "edgecp rollback --store" in err and "v0001" in err
    adapter.write_bytes(good)

    head = (store_copy / "HEAD").read_text()
    (store_copy / "HEAD").write_text("")
    code, _, err = run_cli(capsys, "add-concept", "newc", photo, "--store", store_copy)
    assert_one_line_error(code, err, "HEAD is missing, empty", "edgecp rollback", "v0002")
    assert Store(store_copy, {}).versions() == ["v0000", "v0001", "v0002"]  # issue: nothing deleted
    (store_copy / "HEAD").unlink()
    code, _, err = run_cli(capsys, "generate", "x", "--store", store_copy, "--steps", "1")
    assert_one_line_error(code, err, "HEAD is missing")
    (store_copy / "HEAD").write_text("v0007\n")
    code, _, err = run_cli(capsys, "concepts", "--store", store_copy)
    assert_one_line_error(code, err, "HEAD names version v0007, which does not exist", "edgecp rollback")
    code, out, err = run_cli(capsys, "rollback", "v0002", "--store", store_copy)  # the repair
    assert code == 0 and (store_copy / "HEAD").read_text() == head

    info = (store_copy / "store.json").read_text()
    (store_copy / "store.json").write_text(info[:20])
    code, _, err = run_cli(capsys, "concepts", "--store", store_copy)
    assert_one_line_error(code, err, "store.json cannot be read", "backup")


def test_a_legacy_tensor_file_that_cannot_be_read_is_one_line(tmp_path):
    from edgecp.personal import read_tensors

    d = tmp_path / "s" / "versions" / "v0001"
    d.mkdir(parents=True)
    (d / "adapter.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(DamagedStoreError, match="v0001/adapter.safetensors cannot be read.*edgecp verify"):
        read_tensors(d, "adapter.safetensors")


def test_reading_commands_purge_orphaned_staging(store_copy, capsys):
    staged = store_copy / "staging" / "0123456789ab"  # add-concept's staging folder names: 12 hex digits
    staged.mkdir(parents=True)
    (staged / "0000.png").write_bytes(b"a user's photo left by a crash")
    code, _, _ = run_cli(capsys, "concepts", "--store", store_copy)
    assert code == 0 and not (store_copy / "staging").exists()
    other = store_copy / "staging" / "my-notes"  # not a name edgecp gives: left where it is, named by verify
    other.mkdir(parents=True)
    code, _, _ = run_cli(capsys, "concepts", "--store", store_copy)
    assert code == 0 and other.is_dir()
    assert any("staging/my-notes" in p for p in verify(store_copy)["problems"])


# -- exact removal: the model equals one that never learned the concept -----------------------------------
def _unet_out(store_root, prompts):
    from edgecp.personal import PersonalModel
    from edgecp.prompts import expand

    model = PersonalModel.load(Store.open(store_root), device=torch.device("cpu"))
    unet = model.comps.unet
    g = torch.Generator().manual_seed(0)
    n = unet.config.sample_size
    x = torch.randn(len(prompts), unet.config.in_channels, n, n, generator=g)
    with torch.no_grad():
        text = model.encode_text([expand(p, model.concepts) for p in prompts])
        return unet(x, torch.tensor([500] * len(prompts)), text).sample


def test_lora_merge_exact_removal_equals_a_store_that_never_learned_it(tmp_path, monkeypatch):
    """Store 1 learns a, b, c; store 2 learns a, c with c trained under the same seeds (task index 3, as in store
    1). Removing b from store 1 must give store 2's model: LoRA merge trains each task's LoRA from the base, so the
    only differences are float rounding of the B re-weighting (1/3 -> 1/2)."""
    from edgecp import train

    photos = {n: make_photos(tmp_path / n, n=1, seed=i + 1) for i, n in enumerate("abc")}
    abc, ac = tmp_path / "abc", tmp_path / "ac"
    for root in (abc, ac):
        new_store(root, method="lora-merge", train={"steps": 2})
    for n in "abc":
        train.add_concept(abc, n, photos[n], class_word="toy")
    real = train.TaskContext
    monkeypatch.setattr(train, "TaskContext", lambda **kw: real(**{**kw, "index": 3 if kw["name"] == "c" else kw["index"]}))
    for n in "ac":
        train.add_concept(ac, n, photos[n], class_word="toy")
    monkeypatch.undo()

    with pytest.raises(EdgecpError, match="removes 'b' exactly.*drop --mode token-only"):
        remove_concept(abc, "b", "token-only")
    r = remove_concept(abc, "b")
    assert r["mode"] == "exact" and r["to"] == "v0004" and r["still_in"] == ["v0002", "v0003"]
    got = load_file(str(abc / "versions" / "v0004" / "adapter.safetensors"))
    want = load_file(str(ac / "versions" / "v0002" / "adapter.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-8)
    m = Store.open(abc).manifest()
    assert m["adapter_rank"] == 32 and m["merge_weights"] == [0.5, 0.5] and m["removed"][0]["traces"] is False
    prompts = ["a photo of <a>", "a photo of <c>", "a photo"]
    torch.testing.assert_close(_unet_out(abc, prompts), _unet_out(ac, prompts), rtol=1e-5, atol=1e-5)
    assert verify(abc)["ok"]


@pytest.mark.parametrize("method", ["c-lora", "lora-merge"])
def test_exact_removal_drops_exactly_that_tasks_lora(method):
    """Without training: three random task LoRAs concatenated as the method stores them; removing the middle one
    leaves the sum of the other two (re-weighted 1/2 for lora-merge's mean)."""
    from edgecp.adapters import lora
    from edgecp.config import AdapterConfig
    from edgecp.methods import build_method

    g = torch.Generator().manual_seed(0)
    tasks = [{"m.lora_A.weight": torch.randn(2, 5, generator=g), "m.lora_B.weight": torch.randn(4, 2, generator=g)}
             for _ in range(3)]
    w = [1 / 3] * 3 if method == "lora-merge" else [1.0] * 3
    files = {"adapter.safetensors": lora.concat_loras(tasks, w)}
    manifest = {"concepts": [{"name": n} for n in "abc"], "merge_weights": w}
    m = build_method(method, {}, AdapterConfig(rank=2, alpha=2.0))
    extra = m.remove_concept(files, 1, manifest)
    keep = [1 / 2, 1 / 2] if method == "lora-merge" else [1.0, 1.0]
    want = lora.lora_delta(lora.concat_loras([tasks[0], tasks[2]], keep), 1.0)["m"]
    torch.testing.assert_close(lora.lora_delta(files["adapter.safetensors"], 1.0)["m"], want)
    assert extra["adapter_rank"] == 4


def test_methods_table_names_the_removal_of_every_method(capsys):
    from edgecp.lifecycle import removal_table

    rows = {r["method"]: r for r in removal_table()}
    assert {m for m, r in rows.items() if r["default"] == "exact"} == {"lora-merge", "c-lora", "textual-inversion",
                                                                               "custom-diffusion"}
    assert all("rollback" in r["modes"] and "token-only" in r["modes"] for r in rows.values())
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "token-only or rollback" in out


def test_export_folders_are_found_only_when_complete_and_intact(store_copy, fp32_export_dir):
    from edgecp.generate import find_export

    exports = store_copy / "exports"
    exports.mkdir()
    half = exports / ".cpu-fp32-v0002-k1ll3d"  # what a killed export leaves
    shutil.copytree(fp32_export_dir, half)
    (half / "edgecp.json").unlink()
    (half / ".edgecp-writing").write_text("1")  # lock_dir's mark: an export edgecp was writing
    with pytest.raises(EdgecpError, match="no ONNX export of version v0002 .* is complete and intact"):
        find_export(store_copy)
    assert not half.exists()  # recovered on open: no writer holds its lock
    good = exports / "cpu-fp32-v0002"
    shutil.copytree(fp32_export_dir, good)
    assert find_export(store_copy) == good
    meta = json.loads((good / "edgecp.json").read_text())
    assert "unet/model.onnx" in meta["files"] and len(meta["files"]["unet/model.onnx"]["sha256"]) == 64
    _flip_last_byte(good / "text_encoder" / "model.onnx")
    with pytest.raises(EdgecpError, match="text_encoder/model.onnx does not match its sha256"):
        find_export(store_copy)
    assert any("exports/cpu-fp32-v0002" in p for p in verify(store_copy)["problems"])
    assert gc(store_copy)["exports_deleted"] == []  # a damaged export of a kept version is reported, not deleted
    os.remove(good / "edgecp.json")  # no longer provably edgecp's: reported, never deleted
    r = gc(store_copy)
    assert r["exports_deleted"] == [] and r["left_alone"] == ["exports/cpu-fp32-v0002"] and good.is_dir()


def test_versions_from_an_older_edgecp_verify_with_a_note(tmp_path):
    s = _store3(tmp_path)
    f = s.version_dir("v0002") / "manifest.json"
    m = json.loads(f.read_text())
    del m["files"], m["sealed"]  # what an edgecp before per-file hashes wrote (and no manifest seal)
    f.write_text(json.dumps(m))
    (f.parent / "manifest.json.sha256").unlink()
    r = verify(s.root)
    assert r["ok"] and r["notes"] == ["v0002: no recorded hashes (written by an older edgecp); its files were not checked"]
    assert s.check_version("v0002") == "v0002"
