"""Where export and generate write (issue 21): outside the store, not over a file or someone else's folder, relative
paths made absolute first; names from store files stay plain; generate reads HEAD once; generate's bounds."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.outputs import check_output_dir, put_in_place


@pytest.fixture
def fake_store(tmp_path) -> Path:
    """A store's folder layout (check_output_dir reads paths only)."""
    s = tmp_path / "S"
    for d in ("versions/v0003", "staging/abc", "exports/cpu-fp32-v0003", "priors"):
        (s / d).mkdir(parents=True)
    (s / "store.json").write_text("{}")
    (s / "exports" / "cpu-fp32-v0003" / "edgecp.json").write_text("{}")
    return s


def _refused(match: str, *args, **kwargs) -> str:
    with pytest.raises(EdgecpError, match=match) as e:
        check_output_dir(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("kind", ["onnx", "diffusers", "images"])
@pytest.mark.parametrize("rel", [".", "staging/x", "versions/v0004", "versions/v0003/sub", "versions", "exports",
                                 "exports/.tmp-x", "exports/new/deeper", "priors/p"])
def test_no_output_inside_the_store(fake_store, kind, rel):
    out = fake_store / rel
    msg = _refused("inside the store|is the store", out, fake_store, allow_exports_subdir=kind == "onnx", kind=kind)
    assert str(out.resolve()) in msg or str(out) in msg
    assert "outside the store" in msg
    assert not (fake_store / "versions" / "v0004").exists() and not (fake_store / "staging" / "x").exists()


def test_a_new_folder_directly_under_exports_only_for_the_onnx_export(fake_store):
    new = fake_store / "exports" / "mine"
    assert check_output_dir(new, fake_store, allow_exports_subdir=True) == new.resolve()
    _refused("inside the store", new, fake_store, kind="diffusers")  # case 4: gc would delete it
    _refused("inside the store", new, fake_store, kind="images")
    # the default place of an export that exists: only with overwrite (it holds edgecp.json)
    old = fake_store / "exports" / "cpu-fp32-v0003"
    _refused("not empty: pass --overwrite", old, fake_store, allow_exports_subdir=True)
    assert check_output_dir(old, fake_store, overwrite=True, allow_exports_subdir=True) == old.resolve()


def test_links_are_resolved_before_the_store_check(fake_store, tmp_path):
    (tmp_path / "into-versions").symlink_to(fake_store / "versions")
    (tmp_path / "into-store").symlink_to(fake_store)
    (tmp_path / "dangling").symlink_to(fake_store / "staging" / "later")
    for out in (tmp_path / "into-versions", tmp_path / "into-versions" / "v0009", tmp_path / "into-store" / "x",
                tmp_path / "dangling"):
        msg = _refused("inside the store", out, fake_store, kind="onnx", allow_exports_subdir=True)
        assert "resolves to" in msg
    # the store reached through a link: the same folders
    (tmp_path / "store-link").symlink_to(fake_store)
    _refused("inside the store", fake_store / "staging" / "y", tmp_path / "store-link")
    # a link to a folder outside the store is that folder
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "to-elsewhere").symlink_to(tmp_path / "elsewhere")
    assert check_output_dir(tmp_path / "to-elsewhere", fake_store) == (tmp_path / "elsewhere").resolve()


def test_relative_paths_are_made_absolute(fake_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = check_output_dir("o", "S")
    assert got.is_absolute() and got == (tmp_path / "o").resolve()
    _refused("inside the store", "S/versions/v0004", "S")
    _refused("inside the store", "S/../S/staging/x", "S")
    monkeypatch.chdir(fake_store / "versions")
    _refused("inside the store", "v0004", "..")
    _refused("is the store", "..", "../../S")


def test_files_and_non_empty_folders(fake_store, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    for kind in ("onnx", "diffusers", "images"):
        _refused("is an existing file", f, fake_store, overwrite=True, kind=kind)
    _refused("'.*a-file' is a file, not a folder", f / "sub", fake_store)
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    _refused("not empty: pass --overwrite", full, fake_store, kind="onnx")
    _refused("not empty: pass --overwrite", full, fake_store, kind="diffusers")
    # overwrite replaces only an earlier export of the same kind, never another folder
    _refused("holds no earlier edgecp ONNX export", full, fake_store, overwrite=True, kind="onnx")
    _refused("holds no earlier edgecp diffusers export", full, fake_store, overwrite=True, kind="diffusers")
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    assert check_output_dir(lora, fake_store, overwrite=True, kind="diffusers") == lora.resolve()
    _refused("holds no earlier edgecp ONNX export", lora, fake_store, overwrite=True, kind="onnx")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty, fake_store) == empty.resolve()
    # an earlier export that holds the store is never replaced
    (fake_store.parent / "edgecp.json").write_text("{}")
    _refused("holds the store", fake_store.parent, fake_store, overwrite=True)


def test_generate_reuses_its_own_folder_and_needs_overwrite_for_others(fake_store, tmp_path):
    imgs = tmp_path / "edgecp-out"
    imgs.mkdir()
    for name in ("a-photo-of-alpha-v0002-s0-0.png", "a-photo-of-alpha-v0002-s0-grid.png", "image-v0010-s3-onnx-12.png",
                 ".DS_Store", "Thumbs.db"):
        (imgs / name).write_bytes(b"")
    assert check_output_dir(imgs, fake_store, kind="images") == imgs.resolve()
    (imgs / "holiday.jpg").write_bytes(b"")
    _refused("files other than edgecp generate's images: pass --overwrite", imgs, fake_store, kind="images")
    assert check_output_dir(imgs, fake_store, overwrite=True, kind="images") == imgs.resolve()


def test_put_in_place_replaces_an_earlier_export_whole(tmp_path):
    out, tmp = tmp_path / "o", tmp_path / ".o-new"
    out.mkdir()
    (out / "stale.onnx").write_text("old")
    tmp.mkdir()
    (tmp / "edgecp.json").write_text("new")
    put_in_place(tmp, out)
    assert sorted(p.name for p in out.iterdir()) == ["edgecp.json"] and sorted(os.listdir(tmp_path)) == ["o"]


# ------------------------------------------------------------------------------------------------ exports


FAST_INT8 = ('name = "fast-int8"\ndescription = "static int8 in a few steps (tests)"\nprecision = "int8"\n'
             'atol = 10.0\nrtol = 1.0\nvae_encoder = false\nquantization = ["static"]\ncalibration_steps = 1\n'
             'gate_steps = 2\nmin_psnr = 0.0\n')


def test_export_with_relative_paths_edge_int8_then_overwrite(trained_store, tmp_path, monkeypatch):
    """Issue 21 case 2: `--out o8` for static int8 crashed (FileNotFoundError '.o8-*/.scratch-unet/raw/int8-weights/
    calibration.onnx'): the quantizer runs with the working directory changed. Store and out relative here."""
    from edgecp.export.onnx_export import export_onnx
    from edgecp.integrity import read_export_meta

    (tmp_path / "fast-int8.toml").write_text(FAST_INT8)
    monkeypatch.chdir(tmp_path)
    store = os.path.relpath(trained_store, tmp_path)
    report = export_onnx(store, "fast-int8.toml", "o8")
    assert report["out"] == str(tmp_path / "o8") and report["quantization"] == "static"
    assert report["models"]["unet"]["quantization"] == "static"
    meta, problems = read_export_meta(tmp_path / "o8")
    assert problems == [] and meta["store"] == str(trained_store)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast-int8.toml", "o8"]  # no temporary folder left
    # the same folder again: refused before any work, then replaced whole with overwrite
    with pytest.raises(EdgecpError, match="'o8' exists and is not empty: pass --overwrite"):
        export_onnx(store, "cpu-fp32", "o8")
    (tmp_path / "o8" / "stale.txt").write_text("left by hand")
    report = export_onnx(store, "cpu-fp32", "o8", overwrite=True)
    meta, problems = read_export_meta(tmp_path / "o8")
    assert problems == [] and meta["profile"] == "cpu-fp32" and not (tmp_path / "o8" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast-int8.toml", "o8"]


def test_export_refuses_out_inside_the_store_before_loading(store_copy, tmp_path, monkeypatch):
    from conftest import tree_snapshot

    import edgecp.personal
    from edgecp.export.diffusers_format import export_diffusers
    from edgecp.export.onnx_export import export_onnx

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the --out check")

    monkeypatch.setattr(edgecp.personal.PersonalModel, "load", no_load)
    before = tree_snapshot(store_copy)
    for out in ("staging/x", "versions/v0004", "versions/v0002/sub", ".", "exports/.x"):
        with pytest.raises(EdgecpError, match="inside the store|is the store"):
            export_onnx(store_copy, "cpu-fp32", store_copy / out)
    for out in ("exports/x", "versions/v0004"):
        with pytest.raises(EdgecpError, match="inside the store"):
            export_diffusers(store_copy, store_copy / out)
    assert tree_snapshot(store_copy) == before


def test_diffusers_export_relative_and_overwrite_replaces_the_earlier_one(store_copy, tmp_path, monkeypatch):
    from edgecp.export.diffusers_format import export_diffusers

    monkeypatch.chdir(tmp_path)
    files = export_diffusers("store", "lora")
    assert [f.name for f in files] == ["pytorch_lora_weights.safetensors", "alpha.safetensors", "beta.safetensors"]
    assert all(f.is_absolute() and f.is_file() for f in files)
    (tmp_path / "lora" / "gamma.safetensors").write_bytes(b"a concept since removed")
    with pytest.raises(EdgecpError, match="not empty: pass --overwrite"):
        export_diffusers("store", "lora")
    export_diffusers("store", "lora", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == [
        "alpha.safetensors", "beta.safetensors", "pytorch_lora_weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("bad", ["../escaped", "/abs/victim", "a/b", "..", "..\\x", ".hidden", "nul\0", "", None, 3])
def test_concept_names_from_a_manifest_must_be_plain(bad):
    from edgecp.export.diffusers_format import concept_file_names

    if bad == "/abs/victim":
        bad = "/tmp/edgecp-victim-" + str(os.getpid())
    with pytest.raises(DamagedStoreError) as e:
        concept_file_names([{"name": "ok"}, {"name": bad}], "store 'S', v0002/manifest.json")
    assert "v0002/manifest.json" in str(e.value) and "\n" not in str(e.value)
    assert concept_file_names([{"name": "alpha"}, {"name": "my-dog_2"}], "x") == ["alpha.safetensors",
                                                                                 "my-dog_2.safetensors"]
    with pytest.raises(DamagedStoreError, match="appears twice"):
        concept_file_names([{"name": "alpha"}, {"name": "alpha"}], "x")
    with pytest.raises(EdgecpError, match="would overwrite the LoRA file"):
        concept_file_names([{"name": "pytorch_lora_weights"}], "x")


def test_a_hand_edited_manifest_cannot_make_the_diffusers_export_write_outside_out(store_copy, tmp_path, monkeypatch):
    """Case 5 of issue 21 at the exporter itself: Store.manifest is made to return names like '../escaped' and an
    absolute path (whatever the store's own manifest checks would say), and nothing is written anywhere."""
    from edgecp.export.diffusers_format import export_diffusers
    from edgecp.store import Store

    victim = tmp_path / "victim"
    original = Store.manifest
    for bad in ("../escaped", str(victim)):
        def crafted(self, version=None, bad=bad):
            m = original(self, version)
            return {**m, "concepts": [{**c, "name": bad if i == 1 else c["name"]} for i, c in enumerate(m["concepts"])]}

        monkeypatch.setattr(Store, "manifest", crafted)
        with pytest.raises(DamagedStoreError, match="is not a plain file name"):
            export_diffusers(store_copy, tmp_path / "out" / "lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # no out/, no escaped*, no victim*


# ---------------------------------------------------------------------------------------------- generate


def test_generate_relative_out_reuse_and_overwrite(trained_store, tmp_path, monkeypatch):
    from edgecp.generate import GenerateConfig, generate_from_store

    monkeypatch.chdir(tmp_path)
    store = os.path.relpath(trained_store, tmp_path)
    cfg = GenerateConfig(n=1, steps=1)
    files = generate_from_store(store, "a photo of <alpha>", cfg, "edgecp-out")
    assert files[0] == tmp_path / "edgecp-out" / "a-photo-of-alpha-v0002-s0-0.png"
    files = generate_from_store(store, "a photo of <beta>", cfg, "edgecp-out")  # the same folder: generate's own
    assert len(list((tmp_path / "edgecp-out").iterdir())) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"mine")
    with pytest.raises(EdgecpError, match="'mine' holds files other than edgecp generate's images"):
        generate_from_store(store, "a photo of <beta>", cfg, "mine")
    generate_from_store(store, "a photo of <beta>", cfg, "mine", overwrite=True)
    assert (tmp_path / "mine" / "holiday.jpg").read_bytes() == b"mine"
    assert len(list((tmp_path / "mine").iterdir())) == 3
    with pytest.raises(EdgecpError, match="inside the store"):
        generate_from_store(store, "a photo of <beta>", cfg, os.path.join(store, "versions", "pictures"))
    assert not (trained_store / "versions" / "pictures").exists()


def test_generate_onnx_keeps_out_of_the_exports_store_and_checks_the_recorded_version(fp32_export_dir, trained_store,
                                                                                      tmp_path):
    from edgecp.generate import GenerateConfig, generate_from_onnx

    cfg = GenerateConfig(n=1, steps=1)
    with pytest.raises(EdgecpError, match="inside the store"):  # the store its edgecp.json names
        generate_from_onnx(fp32_export_dir, "a photo of <alpha>", cfg, trained_store / "staging" / "x")
    edited = tmp_path / "edited"
    shutil.copytree(fp32_export_dir, edited)
    meta = json.loads((edited / "edgecp.json").read_text())
    (edited / "edgecp.json").write_text(json.dumps({**meta, "version": "../../escaped"}))
    with pytest.raises(EdgecpError, match="records version '../../escaped', not a version name"):
        generate_from_onnx(edited, "a photo of <alpha>", cfg, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob("**/escaped*"))


def test_generate_reads_head_once_and_labels_with_what_it_loaded(store_copy, tmp_path, monkeypatch):
    """Case 7 of issue 21: a rollback while generate runs. HEAD moves to v0001 (concept alpha only) after generate
    read it and before the model loads, and again after the load: the images come from v0002 (alpha and beta) and
    are labelled v0002."""
    import edgecp.generate
    from edgecp.generate import GenerateConfig, generate_from_store
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    loaded = []
    plan, load = edgecp.generate.plan_generate, PersonalModel.load.__func__

    def plan_then_rollback(store, *a, **k):
        Store.open(store_copy).set_head("v0001")
        return plan(store, *a, **k)

    def load_and_record(cls, store, version=None, **k):
        model = load(cls, store, version, **k)
        loaded.append([c["name"] for c in model.concepts])
        Store.open(store_copy).set_head("v0001")
        return model

    monkeypatch.setattr(edgecp.generate, "plan_generate", plan_then_rollback)
    monkeypatch.setattr(PersonalModel, "load", classmethod(load_and_record))
    files = generate_from_store(store_copy, "a photo of <beta>", GenerateConfig(n=1, steps=1), tmp_path / "o")
    assert loaded == [["alpha", "beta"]]
    assert [f.name for f in files] == ["a-photo-of-beta-v0002-s0-0.png", "a-photo-of-beta-v0002-s0-grid.png"]
    assert Store.open(store_copy).head == "v0001"


def test_exports_read_head_once(store_copy, tmp_path, monkeypatch):
    """HEAD moves after the export read it: the ONNX export loads the version it read, and the diffusers export
    writes that version's concepts."""
    import edgecp.outputs
    import edgecp.personal
    from edgecp.export.diffusers_format import export_diffusers
    from edgecp.export.onnx_export import export_onnx
    from edgecp.store import Store

    check = edgecp.outputs.check_output_dir

    def check_then_rollback(*a, **k):
        Store.open(store_copy).set_head("v0001")
        return check(*a, **k)

    monkeypatch.setattr(edgecp.outputs, "check_output_dir", check_then_rollback)
    files = export_diffusers(store_copy, tmp_path / "lora")
    assert sorted(f.name for f in files) == ["alpha.safetensors", "beta.safetensors", "pytorch_lora_weights.safetensors"]

    Store.open(store_copy).set_head("v0002")
    asked = []

    class Stop(Exception):
        pass

    def load(cls, store, version=None, **k):
        asked.append(version)
        raise Stop

    monkeypatch.setattr(edgecp.personal.PersonalModel, "load", classmethod(load))
    with pytest.raises(Stop):
        export_onnx(store_copy, "cpu-fp32", tmp_path / "onnx")
    assert asked == ["v0002"]


@pytest.mark.parametrize("field,value,needle", [
    ("n", 0, "-n 0 is out of range: n must be a whole number from 1 to 10000"),
    ("n", 10_001, "-n 10001 is out of range"),
    ("n", True, "-n True is out of range"),
    ("n", 2.0, "-n 2.0 is out of range"),
    ("steps", 0, "--steps 0 is out of range: steps must be a whole number from 1 to 1000"),
    ("steps", 1001, "--steps 1001"),
    ("seed", -1, "--seed -1 is out of range"),
    ("seed", 2**63, "--seed"),
    ("batch_size", 0, "batch_size 0"),
    ("size", 4104, "--size 4104 is out of range: use a multiple of 8 from 8 to 4096"),
    ("size", 0, "--size 0"),
    ("size", 100, "--size 100"),
    ("guidance", math.nan, "--guidance nan is out of range: use a finite number from -100 to 100"),
    ("guidance", math.inf, "--guidance inf"),
    ("guidance", 100.5, "--guidance 100.5"),
    ("guidance", -101, "--guidance -101"),
    ("guidance", "7.5", "--guidance '7.5'"),
])
def test_generate_config_bounds(field, value, needle):
    from edgecp.generate import GenerateConfig

    with pytest.raises(EdgecpError) as e:
        GenerateConfig(**{field: value})
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_generate_config_accepts_the_bounds_themselves():
    from edgecp.generate import GenerateConfig

    cfg = GenerateConfig(n=10_000, steps=1000, size=4096, guidance=100.0, seed=2**63 - 1, batch_size=10_000)
    assert cfg.n == 10_000 and cfg.size == 4096
    assert GenerateConfig(guidance=0, size=8, n=1, steps=1, seed=0).guidance == 0
    assert GenerateConfig(guidance=-100.0).guidance == -100.0


def test_images_written_into_an_edgecp_folder_are_pngs_named_as_the_rule_expects(trained_store, tmp_path):
    """The reuse rule recognises generate's own names: what generate_from_store writes matches IMAGE_NAME_RE."""
    from edgecp.generate import GenerateConfig, generate_from_store
    from edgecp.outputs import IMAGE_NAME_RE

    files = generate_from_store(trained_store, "Posing with <beta> (2)!", GenerateConfig(n=2, steps=1, seed=12),
                                tmp_path / "o")
    assert all(IMAGE_NAME_RE.fullmatch(f.name) for f in files), [f.name for f in files]
    assert np.asarray(Image.open(files[0])).shape == (64, 64, 3)
