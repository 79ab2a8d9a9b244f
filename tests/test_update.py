"""Concept updates of an ONNX export (issue 25): a base export plus megabytes, checked before use, never chained.

The base is the cpu-fp32 export of trained_store's v0001 (<alpha>); the update turns it into v0002 (<alpha>, <beta>),
whose full export is conftest's fp32_export_dir (made from the original store: two exports of one version)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import tree_snapshot
from safetensors.numpy import load_file, save_file

from edgecp.export.update_format import (
    MANIFEST,
    TENSORS,
    UpdateError,
    graph_initializers,
    open_update,
    read_safetensors,
)
from edgecp.integrity import hash_tree

MODEL_FILES = ("model.onnx", "model.onnx_data")


@pytest.fixture(scope="module")
def pair(trained_store, tmp_path_factory):
    """(store, base export of v0001, update to v0002, its report): the update under STORE/exports, its default."""
    from edgecp.export.onnx_export import export_onnx
    from edgecp.lifecycle import rollback

    root = tmp_path_factory.mktemp("update") / "store"
    shutil.copytree(trained_store, root)
    rollback(root, "v0001")
    base = root.parent / "base-v0001"
    export_onnx(root, "cpu-fp32", base)
    rollback(root, "v0002")
    report = export_onnx(root, "cpu-fp32", update_for=base)
    return root, base, Path(report["out"]), report


def models_of(folder: Path) -> dict[str, str]:
    return {rel: rec["sha256"] for rel, rec in hash_tree(folder).items() if rel.split("/")[-1] in MODEL_FILES}


def test_the_update_holds_the_merged_kv_and_the_personal_rows_only(pair, trained_store):
    """What a LoRA on attn2 K/V changes, found by comparing exports: one tensor per K/V projection (Linear weights as
    MatMul initializers, transposed) and the text encoder's personal table; the tokenizer files that name <beta>."""
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    root, base, upd, report = pair
    assert upd == root / "exports" / "cpu-fp32-v0002-from-v0001"
    manifest = json.loads((upd / MANIFEST).read_text())
    assert (manifest["from_version"], manifest["to_version"], manifest["profile"]) == ("v0001", "v0002", "cpu-fp32")
    comps = PersonalModel.load(Store.open(root), "v0002").comps
    kv = [m.weight.shape for n, m in comps.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    unet = [t for t in manifest["tensors"] if t["model"] == "unet"]
    assert sorted(tuple(t["shape"]) for t in unet) == sorted((s[1], s[0]) for s in kv)
    (te,) = [t for t in manifest["tensors"] if t["model"] == "text_encoder"]
    assert te["shape"] == [64, comps.text_encoder.config.hidden_size] and te["name"].endswith("personal")
    assert {t["model"] for t in manifest["tensors"]} == {"unet", "text_encoder"}  # the VAE is untouched
    assert manifest["carried_files"] == ["tokenizer/added_tokens.json", "tokenizer/tokenizer.json",
                                        "tokenizer/tokenizer_config.json"]
    assert report["update"]["bytes"] == sum(r["bytes"] for r in manifest["files"].values())
    assert report["update"]["bytes"] < 0.2 * report["update"]["full_export_bytes"]  # tiny: mostly tokenizer.json
    gate = manifest["image_gate"]
    assert gate["through"] == "base export + update" and gate["psnr_db"] >= gate["min_psnr_db"]
    assert manifest["base"] == models_of(base)
    assert "unet: 14 of 286 tensors" in report["update"]["why"] and "a LORA adapter on attn2.to_k" in report["update"]["why"]


def test_two_exports_of_a_version_and_base_plus_update_are_byte_identical(pair, fp32_export_dir, tmp_path, capsys,
                                                                          monkeypatch):
    """The update job's full export of v0002 (from a copy of the store) and conftest's (from the store) give the same
    model bytes, which is what lets exports be compared; `materialize` reproduces them and leaves the base as it was."""
    from edgecp.export.update import materialize

    _, base, upd, _ = pair
    before = tree_snapshot(base)
    manifest = json.loads((upd / MANIFEST).read_text())
    assert manifest["target"] == models_of(fp32_export_dir)
    meta = materialize(base, upd, tmp_path / "full")
    assert models_of(tmp_path / "full") == models_of(fp32_export_dir)
    monkeypatch.chdir(tmp_path)  # the command, with relative paths
    code, out, _ = run_cli(capsys, "materialize", os.path.relpath(base), os.path.relpath(upd), "--out", "cli")
    assert code == 0 and "byte for byte its full export" in " ".join(out.split())
    assert models_of(tmp_path / "cli") == models_of(fp32_export_dir)
    code, _, err = run_cli(capsys, "materialize", base, upd, "--out", base / "inside")
    assert_one_line_error(code, err, "overlaps the base export")
    assert {r for r in meta["files"]} == {r for r in hash_tree(fp32_export_dir) if r != "edgecp.json"}
    assert meta["version"] == "v0002"
    assert tree_snapshot(base) == before  # never written to


def test_base_plus_update_runs_as_the_full_export(pair, fp32_export_dir):
    """Text encoder and UNet outputs of base + update equal the full export's (fp32: same bytes, same graph), for the
    new concept and the one the base already had; the base alone does not know <beta>."""
    from edgecp.export.ort_runner import OnnxStableDiffusion

    _, base, upd, _ = pair
    a = OnnxStableDiffusion(base, providers=["CPUExecutionProvider"], update=upd)
    b = OnnxStableDiffusion(fp32_export_dir, providers=["CPUExecutionProvider"])
    plain = OnnxStableDiffusion(base, providers=["CPUExecutionProvider"])
    prompts = ["a photo of <beta> mug", "a photo of <alpha> dog"]
    ta, tb = a.encode_text(prompts), b.encode_text(prompts)
    np.testing.assert_array_equal(ta, tb)
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((2, a.latent_channels, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(a.predict_noise(lat, 500, ta), b.predict_noise(lat, 500, tb))
    assert not np.array_equal(plain.predict_noise(lat, 500, ta), b.predict_noise(lat, 500, tb))  # K/V changed
    assert "<beta>" not in plain.tokenizer.get_vocab() and "<beta>" in a.tokenizer.get_vocab()


def test_the_lean_runtime_generates_with_an_update(pair, fp32_export_dir, tmp_path):
    """`edgecp generate --onnx-dir BASE --update UPD` on the device install (no torch, onnx or safetensors): the full
    export's image, labelled with the update's version."""
    from PIL import Image

    _, base, upd, _ = pair
    before = tree_snapshot(base)
    block = ["torch", "diffusers", "transformers", "typer", "rich", "onnx", "safetensors", "peft", "click"]
    pre = f"import sys\nfor m in {block!r}: sys.modules[m] = None\nfrom edgecp.entry import main\n"
    args = ["generate", "a photo of <beta>", "-n", "1", "--steps", "2", "--size", "64"]
    for folder, extra, out in ((base, ["--update", str(upd)], "u"), (fp32_export_dir, [], "f")):
        argv = [*args, "--onnx-dir", str(folder), *extra, "--out", str(tmp_path / out)]
        p = subprocess.run([sys.executable, "-c", pre + f"sys.argv = ['edgecp', *{argv!r}]\nmain()\n"],
                           capture_output=True, text=True, env=os.environ.copy())
        assert p.returncode == 0, p.stderr
    u = np.asarray(Image.open(tmp_path / "u" / "a-photo-of-beta-v0002-s0-onnx-0.png"))
    f = np.asarray(Image.open(tmp_path / "f" / "a-photo-of-beta-v0002-s0-onnx-0.png"))
    np.testing.assert_array_equal(u, f)
    assert tree_snapshot(base) == before  # the base is only read


def _rewrite(upd: Path, tensors: dict[str, np.ndarray], edit) -> None:
    """An update whose tensors file and manifest agree with each other (hashes recomputed) but `edit` changed."""
    save_file(tensors, str(upd / TENSORS))
    m = json.loads((upd / MANIFEST).read_text())
    edit(m)
    for e in m["tensors"]:
        arr = tensors[f"{e['model']}/{e['name']}"]
        e["shape"], e["sha256"] = list(arr.shape), hashlib.sha256(np.ascontiguousarray(arr)).hexdigest()
    m["files"] = hash_tree(upd, exclude=(MANIFEST,))
    (upd / MANIFEST).write_text(json.dumps(m))


def test_a_wrong_base_or_a_damaged_update_runs_nothing(pair, fp32_export_dir, tmp_path, capsys):
    """One line naming the problem, exit 2, no image, for: another base; a flipped byte; a truncated tensors file; a
    tensor whose shape, or name, is not the base graph's (consistent with its own manifest)."""
    _, base, upd, _ = pair

    def copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(upd, dst)
        return dst

    flipped = copy("flipped")
    raw = bytearray((flipped / TENSORS).read_bytes())
    raw[-5] ^= 0xFF
    (flipped / TENSORS).write_bytes(bytes(raw))
    truncated = copy("truncated")
    (truncated / TENSORS).write_bytes((upd / TENSORS).read_bytes()[:-100])
    tensors = load_file(str(upd / TENSORS))
    key = next(k for k in tensors if k.startswith("unet/"))
    reshaped = copy("reshaped")
    _rewrite(reshaped, {**tensors, key: tensors[key].reshape(-1)[: tensors[key].size // 2].reshape(-1, 2)}, lambda m: m)
    renamed = copy("renamed")
    new_key = key + "_x"
    _rewrite(renamed, {**{k: v for k, v in tensors.items() if k != key}, new_key: tensors[key]},
             lambda m: [e.update(name=e["name"] + "_x") for e in m["tensors"] if f"unet/{e['name']}" == key])
    cases = [(base, flipped, "does not match its sha256"), (base, truncated, "damaged"),
             (base, reshaped, "the base's is"), (base, renamed, "is not an initializer"),
             (fp32_export_dir, upd, "was made for another base export")]
    for folder, bad, words in cases:
        with pytest.raises(UpdateError, match=words):
            open_update(folder, bad)
        out = tmp_path / f"o-{bad.name}-{folder.name}"
        code, _, err = run_cli(capsys, "generate", "x <beta>", "--backend", "onnx", "--onnx-dir", folder,
                               "--update", bad, "--out", out, "-n", "1", "--steps", "1")
        assert_one_line_error(code, err, words)
        assert not out.exists()


def test_update_for_refuses_other_bases_and_a_full_reserve_gives_a_full_export(pair, tmp_path, capsys):
    """Another profile's export, an export of an older edgecp (no personal table) or a damaged one: one line, before
    any model loads. A version with more tokens than the base's personal rows: a full export, and a note why."""
    from edgecp.export.onnx_export import ExportJob

    root, base, _, _ = pair

    def variant(name: str, edit) -> Path:
        dst = tmp_path / name
        shutil.copytree(base, dst)
        meta = json.loads((dst / "edgecp.json").read_text())
        edit(meta)
        (dst / "edgecp.json").write_text(json.dumps(meta))
        return dst

    old = variant("old", lambda m: m.pop("personal_token_rows"))
    other = variant("other", lambda m: m.update(profile="edge-int8"))
    damaged = tmp_path / "damaged"
    shutil.copytree(base, damaged)
    (damaged / "vae_decoder" / "model.onnx").write_bytes(b"x")
    for folder, words in ((old, "no personal token table"), (other, "is an export for profile 'edge-int8'"),
                          (damaged, "is not a complete, intact ONNX export")):
        code, _, err = run_cli(capsys, "export", "--store", root, "--update-for", folder, "--out",
                               tmp_path / f"u-{folder.name}")
        assert_one_line_error(code, err, words)
        assert not (tmp_path / f"u-{folder.name}").exists()
    full = variant("full", lambda m: m.update(personal_token_rows=1))
    job = ExportJob.open(root, "cpu-fp32", tmp_path / "grown", update_for=full)  # what run() then does: a full export
    assert "2 concept tokens, more than the 1 personal rows" in job.report["update_refused"]
    assert job.update_for is None and job.out == tmp_path / "grown"


def test_verify_and_gc_know_an_update_under_exports(pair, tmp_path):
    """An update in STORE/exports is edgecp's: verify checks its files, and gc deletes it with its version."""
    from edgecp.lifecycle import gc, verify

    root, _, upd, _ = pair
    store = tmp_path / "s"
    shutil.copytree(root, store)
    name = upd.name
    report = verify(store)
    assert not [x for x in report["problems"] + report.get("foreign", []) if name in x], report
    (store / "exports" / name / TENSORS).write_bytes(b"damaged")
    assert any(name in x for x in verify(store)["problems"])
    shutil.rmtree(store / "exports" / name)
    shutil.copytree(upd, store / "exports" / name)
    from edgecp.lifecycle import rollback

    rollback(store, "v0001")
    assert name in gc(store)["exports_deleted"]


def test_safetensors_reader_agrees_with_the_library(tmp_path):
    """The device's hand-written reader (no safetensors package on the runtime install) against safetensors.numpy."""
    rng = np.random.default_rng(0)
    arrays = {"a/f32": rng.standard_normal((3, 5)).astype(np.float32),
              "a/f16": rng.standard_normal((7,)).astype(np.float16), "b:i8": np.arange(-4, 4, dtype=np.int8),
              "u8": np.arange(6, dtype=np.uint8).reshape(2, 3), "i64": np.array([1, -2], dtype=np.int64),
              "scalar": np.array(0.5, dtype=np.float32)}
    save_file(arrays, str(tmp_path / "t.safetensors"))
    got, want = read_safetensors(tmp_path / "t.safetensors"), load_file(str(tmp_path / "t.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k])
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-3])
    with pytest.raises(UpdateError, match="outside the file"):
        read_safetensors(tmp_path / "short.safetensors")


def test_graph_initializers_reads_what_onnx_reads(fp32_export_dir):
    for name in ("text_encoder", "unet"):
        path = fp32_export_dir / name / "model.onnx"
        want = {t.name: (t.data_type, tuple(t.dims)) for t in onnx.load(str(path)).graph.initializer}
        assert graph_initializers(path) == want
