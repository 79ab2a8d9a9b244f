import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos, tree_snapshot
from PIL import Image


def _bad_inputs(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    small = tmp_path / "small.png"
    Image.new("RGB", (10, 10)).save(small)
    empty = tmp_path / "empty"
    empty.mkdir()
    good = make_photos(tmp_path / "good", n=1)[0]
    return {
        "missing": (["newc", str(tmp_path / "nope.jpg")], ["nope.jpg", "does not exist"]),
        "corrupt": (["newc", str(good), str(corrupt)], ["corrupt.png", "cannot be decoded"]),
        "small": (["newc", str(small)], ["small.png", "10x10"]),
        "empty-folder": (["newc", str(empty)], ["empty", "holds no images"]),
        "bad-name": (["My Dog", str(good)], ["'My Dog'", "lowercase"]),
        "existing-name": (["alpha", str(good)], ["'alpha' already exists"]),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "small", "empty-folder", "bad-name", "existing-name"])
def test_bad_input_is_one_line_and_leaves_the_store_exactly_as_before(store_copy, tmp_path, capsys, case):
    args, needles = _bad_inputs(tmp_path)[case]
    before = tree_snapshot(store_copy)
    code, _, err = run_cli(capsys, "add-concept", *args, "--store", store_copy)
    assert_one_line_error(code, err, *needles)
    assert tree_snapshot(store_copy) == before


def test_missing_store_and_unknown_method(tmp_path, capsys, photos):
    code, _, err = run_cli(capsys, "add-concept", "x", photos[0], "--store", tmp_path / "none")
    assert_one_line_error(code, err, "no edgecp store", "edgecp init")
    code, _, err = run_cli(capsys, "init", tmp_path / "s", "--method", "magic")
    assert_one_line_error(code, err, "unknown method 'magic'", "lora-sequential")
    assert not (tmp_path / "s").exists()
    code, _, err = run_cli(capsys, "init", tmp_path / "s", "--train", "stepz=3")
    assert_one_line_error(code, err, "unknown", "stepz", "steps")


def test_traceback_only_with_edgecp_debug(tmp_path):
    cmd = [sys.executable, "-m", "edgecp.cli", "concepts", "--store", str(tmp_path / "none")]
    env = {**os.environ}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "no edgecp store" in p.stderr
    p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "EDGECP_DEBUG": "1"})
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_add_concept_commits_then_purges_staging_and_sources(store_copy, tmp_path, capsys):
    src = make_photos(tmp_path / "mine", n=2, seed=7)
    code, out, err = run_cli(capsys, "add-concept", "gamma", tmp_path / "mine", "--store", store_copy,
                             "--class-word", "cup", "--purge-source")
    assert code == 0, err
    assert not any(p.exists() for p in src)
    assert not (store_copy / "staging").exists()
    code, out, _ = run_cli(capsys, "concepts", "--store", store_copy, "--json")
    info = json.loads(out)
    assert info["version"] == "v0003"
    assert [c["name"] for c in info["concepts"]] == ["alpha", "beta", "gamma"]
    manifest = json.loads((store_copy / "versions" / "v0003" / "manifest.json").read_text())
    gamma = manifest["concepts"][-1]
    assert len(gamma["images"]) == 2 and all(len(i["sha256"]) == 64 for i in gamma["images"])
    assert "mine" not in json.dumps(manifest)  # no user paths
    suffixes = {p.suffix for p in (store_copy / "versions").rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".safetensors", ".sha256"}  # never pixels in a version (.sha256: the manifest seal)


def test_generate_torch_names_files_after_version_and_seed(trained_store, tmp_path, capsys):
    code, out, err = run_cli(capsys, "generate", "a photo of <alpha> with <beta>", "--store", trained_store,
                             "-n", "2", "--steps", "2", "--seed", "3", "--out", tmp_path / "o")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "o").iterdir())
    assert files == [f"a-photo-of-alpha-with-beta-v0002-s3-{s}.png" for s in ("0", "1", "grid")]
    a = Image.open(tmp_path / "o" / files[0])
    assert a.size == (64, 64)
    code, _, err = run_cli(capsys, "generate", "a photo of <zeta>", "--store", trained_store, "--steps", "1")
    assert_one_line_error(code, err, "unknown concept <zeta>", "<alpha>, <beta>")
    # --version: any complete version, no rollback; its concepts, its name in the files, HEAD untouched
    head = (trained_store / "HEAD").read_text()
    code, _, err = run_cli(capsys, "generate", "a photo of <alpha>", "--store", trained_store, "-n", "2", "--steps",
                           "2", "--seed", "3", "--out", tmp_path / "v1", "--version", "v0001")
    assert code == 0, err
    v1 = sorted(p.name for p in (tmp_path / "v1").iterdir())
    assert v1 == [f"a-photo-of-alpha-v0001-s3-{s}.png" for s in ("0", "1", "grid")]
    code, _, err = run_cli(capsys, "generate", "a photo of <alpha>", "--store", trained_store, "-n", "2", "--steps",
                           "2", "--seed", "3", "--out", tmp_path / "v2")
    assert code == 0, err
    older = np.asarray(Image.open(tmp_path / "v1" / v1[0]), dtype=np.int16)
    newer = np.asarray(Image.open(tmp_path / "v2" / "a-photo-of-alpha-v0002-s3-0.png"), dtype=np.int16)
    assert np.abs(older - newer).max() > 0  # lora-sequential trained on: v0001's <alpha> is not v0002's
    assert (trained_store / "HEAD").read_text() == head
    for args, needles in ((["--version", "v0009"], ["--version v0009 does not exist", "v0000 .. v0002"]),
                          (["--version", "latest"], ["'latest' is not a version name"]),
                          (["--version", "v0001", "--backend", "onnx"], ["--version is for --backend torch"])):
        code, _, err = run_cli(capsys, "generate", "a photo of <alpha>", "--store", trained_store, "--steps", "1",
                               "--out", tmp_path / "bad", *args)
        assert_one_line_error(code, err, *needles)
    code, _, err = run_cli(capsys, "generate", "a photo of <beta>", "--store", trained_store, "--steps", "1",
                           "--out", tmp_path / "bad", "--version", "v0001")
    assert_one_line_error(code, err, "unknown concept <beta>")  # v0001 had only <alpha>
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_profiles_and_methods_commands(capsys):
    code, out, _ = run_cli(capsys, "profiles")
    assert code == 0 and "cpu-fp32" in out and "edge-int8" in out
    code, out, _ = run_cli(capsys, "profiles", "show", "cuda-fp16")
    assert code == 0 and json.loads(out)["precision"] == "fp16"
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "lora-sequential" in out
