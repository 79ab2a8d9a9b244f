"""Issue 27: the forgetting check, samples while learning, captions, resumable concepts, the training record."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos, tree_snapshot
from PIL import Image
from safetensors.torch import load_file

from edgecp import resumable
from edgecp.captions import caption_prompt, read_caption
from edgecp.errors import EdgecpError
from edgecp.forgetting import CheckConfig, ssim_drift
from edgecp.lifecycle import history, rollback, training_record, verify
from edgecp.store import Store
from edgecp.train import SampleConfig, abandon_concept, add_concept, resume_concept


# -- captions -------------------------------------------------------------------------------------------------------
def test_caption_placeholder_expands_like_a_prompt_and_is_prepended_when_absent():
    assert caption_prompt("a photo of [name] on a beach", "<rex>", "dog") == "a photo of <rex> dog on a beach"
    assert caption_prompt("[name] dog asleep", "<rex>", "dog") == "<rex> dog asleep"  # the class word is there
    assert caption_prompt("sitting on grass", "<rex>", None) == "<rex>, sitting on grass"
    assert caption_prompt("[name] with a <b> tag", "<rex>", "dog") == "<rex> dog with a <b> tag"  # not a concept


def test_caption_files_are_refused_in_one_line(tmp_path):
    img = make_photos(tmp_path, n=1)[0]
    assert read_caption(img) is None
    img.with_suffix(".txt").write_text("  a photo of [name]\n on   grass ")
    assert read_caption(img) == "a photo of [name] on grass"
    for content, needle in ((b"   \n", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8")):
        img.with_suffix(".txt").write_bytes(content)
        with pytest.raises(EdgecpError, match=needle):
            read_caption(img)


def test_captions_train_each_photo_on_its_caption_and_only_their_hashes_stay(store_copy, tmp_path, monkeypatch):
    import edgecp.train as train

    seen = []
    real = train.encode_text
    monkeypatch.setattr(train, "encode_text", lambda comps, prompts, dev: seen.append(list(prompts)) or
                        real(comps, prompts, dev))
    ph = make_photos(tmp_path / "p", n=2, seed=7)
    ph[0].with_suffix(".txt").write_text("a photo of [name] on zebragrass")
    m = add_concept(store_copy, "gamma", ph, class_word="cup", purge_source=True)
    trained = [p for batch in seen for p in batch]
    assert "a photo of <gamma> cup on zebragrass" in trained  # photo 0's rows
    assert m["concepts"][-1]["prompt"] in trained  # photo 1 (no caption): the method's prompt
    images = m["concepts"][-1]["images"]
    want = hashlib.sha256(b"a photo of [name] on zebragrass").hexdigest()
    assert images[0]["caption"] == {"sha256": want, "bytes": 31} and "caption" not in images[1]
    assert not any(b"zebragrass" in f.read_bytes() for f in store_copy.rglob("*") if f.is_file())
    assert not ph[0].with_suffix(".txt").exists()  # purged with its photo
    assert str(ph[0].with_suffix(".txt")) in m["purged"]["deleted"]


# -- resumable concepts ---------------------------------------------------------------------------------------------
def _tensors(root: Path, version: str) -> dict:
    vdir = root / "versions" / version
    return {f"{f.name}:{k}": v for f in sorted(vdir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_a_crash_or_a_sigterm_resumes_to_the_uninterrupted_result(trained_store, tmp_path):
    """Kill points drawn at random; the committed tensors equal the uninterrupted run's, bit for bit. The
    uninterrupted run also draws samples: they change nothing of the training either."""
    roots = {}
    for k in ("whole", "crash", "term"):
        roots[k] = tmp_path / k
        shutil.copytree(trained_store, roots[k])
    ph = make_photos(tmp_path / "p", n=2, seed=9)
    kw = dict(class_word="cup", overrides={"steps": 6}, resumable_=True, checkpoint_every=2)
    notices = []
    add_concept(roots["whole"], "gamma", ph, samples=SampleConfig(3, tmp_path / "samples"), on_notice=notices.append,
                **kw)
    assert "stay staged" in notices[0] and "--abandon" in notices[0]
    assert not (roots["whole"] / resumable.FOLDER).exists()  # committed: the staged photos are gone
    assert sorted(p.name.split("-step")[1] for p in (tmp_path / "samples").iterdir()) == \
        ["00000-s0-0.png", "00003-s0-0.png", "00006-s0-0.png"]
    want = _tensors(roots["whole"], "v0003")

    rng = random.Random(27)
    crash_at, term_at = rng.randint(1, 5), rng.randint(1, 5)

    def crash(ev):
        if ev.phase == "train" and ev.step == crash_at:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        add_concept(roots["crash"], "gamma", ph, progress=crash, **kw)
    pending = resumable.pending(Store.open(roots["crash"]))
    # the crash came as iteration crash_at was reported, before its checkpoint: the last periodic one stays
    assert pending["name"] == "gamma" and pending["checkpoint"] == 2 * ((crash_at - 1) // 2)
    assert any("pending" in n for n in verify(roots["crash"])["notes"])
    assert history(roots["crash"])["pending"]["name"] == "gamma"
    with pytest.raises(EdgecpError, match="is pending"):
        add_concept(roots["crash"], "delta", ph)
    m = resume_concept(roots["crash"])
    assert m["version"] == "v0003" and not (roots["crash"] / resumable.FOLDER).exists()

    def term(ev):
        if ev.phase == "train" and ev.step == term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(resumable.ConceptInterrupted, match=f"iteration {term_at} of 6") as e:
        add_concept(roots["term"], "gamma", ph, progress=term, **kw)
    assert e.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    assert resumable.pending(Store.open(roots["term"]))["checkpoint"] == term_at
    resume_concept(roots["term"])
    for k in ("crash", "term"):
        got = _tensors(roots[k], "v0003")
        assert got.keys() == want.keys()
        assert all(torch.equal(got[n], want[n]) for n in want), k
    assert Store.open(roots["crash"]).manifest("v0003")["concepts"][-1]["images"] == \
        Store.open(roots["whole"]).manifest("v0003")["concepts"][-1]["images"]


def test_resume_refuses_a_moved_head_and_abandon_deletes_the_photos(store_copy, tmp_path, capsys):
    ph = make_photos(tmp_path / "p", n=2, seed=4)

    def crash(ev):
        if ev.phase == "train" and ev.step == 1:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        add_concept(store_copy, "gamma", ph, class_word="cup", overrides={"steps": 2}, resumable_=True, progress=crash)
    staged = list((store_copy / resumable.FOLDER / "photos").iterdir())
    assert len(staged) == 2
    Store.open(store_copy)  # opening (recovery) keeps a pending concept's photos
    assert all(p.exists() for p in staged)
    rollback(store_copy, "v0001")
    code, _, err = run_cli(capsys, "add-concept", "--resume", "--store", store_copy)
    assert_one_line_error(code, err, "moved from v0002 to v0001", "--abandon")
    code, out, _ = run_cli(capsys, "add-concept", "--abandon", "--store", store_copy)
    assert code == 0 and "2 staged photo(s)" in out
    assert not (store_copy / resumable.FOLDER).exists()
    with pytest.raises(EdgecpError, match="no pending concept"):
        abandon_concept(store_copy)


# -- the forgetting check and the training record ---------------------------------------------------------------------
def test_ssim_drift_matches_the_hand_computed_ssim_of_flat_images():
    """Two flat images: SSIM is its luminance term (2 mx my + C1) / (mx^2 + my^2 + C1), C1 = (0.01 * 255)^2."""
    a = Image.new("RGB", (16, 16), (100, 100, 100))
    b = Image.new("RGB", (16, 16), (150, 150, 150))
    c1 = (0.01 * 255) ** 2
    assert ssim_drift(a, b) == pytest.approx(1 - (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), rel=1e-6)
    assert ssim_drift(a, a) == pytest.approx(0.0, abs=1e-12)


def test_the_check_runs_on_the_new_versions_files_and_warns_naming_the_rollback(store_copy, tmp_path, capsys):
    ph = make_photos(tmp_path / "p", n=2, seed=5)
    sheet = tmp_path / "out" / "sheet.png"
    code, out, err = run_cli(capsys, "add-concept", "gamma", *ph, "--store", store_copy, "--class-word", "cup",
                             "--steps", "2", "--check-images", "1", "--check-steps", "2",
                             "--check-threshold", "0.000001", "--contact-sheet", sheet)
    assert code == 0, err
    m = Store.open(store_copy).manifest("v0003")
    chk = m["check"]
    assert [r["name"] for r in chk["concepts"]] == ["alpha", "beta"] and chk["from"] == "v0002"
    for r in chk["concepts"]:
        assert 0 < r["drift"] <= 2 and r["dc_before"] in (0.0, 1.0) and r["dc_after"] in (0.0, 1.0)
        assert -1 <= r["evaluator_similarity"] <= 1
    assert chk["warn"] == ["alpha", "beta"]
    joined = " ".join(err.split())
    assert "warning: <alpha> drifted" in joined and f"edgecp rollback v0002 --store {store_copy}" in joined
    assert "fixed-timestep loss" in out and "forgetting check" in out
    assert verify(store_copy)["ok"]  # the check's result is inside the sealed manifest
    assert history(store_copy)["versions"][-1]["check"]["warn"] == ["alpha", "beta"]
    with Image.open(sheet) as im:  # two rows of (before | after), 64 px images
        assert im.size[0] >= 2 * 64 and im.size[1] >= 2 * 64
    rec = training_record(store_copy, "gamma")
    assert rec["version"] == "v0003" and len(rec["phases"]["train"]["values"]) == 2
    assert rec["phases"]["train"]["metric"].startswith("denoising loss")
    code, out, err = run_cli(capsys, "history", "gamma", "--plot", tmp_path / "curve.png", "--store", store_copy)
    assert code == 0, err
    assert "added in v0003" in out and "2 iterations of denoising loss" in " ".join(out.split())
    with Image.open(tmp_path / "curve.png") as im:
        assert np.asarray(im).std() > 0
    code, out, _ = run_cli(capsys, "concepts", "--store", store_copy)
    assert code == 0 and "drift at v0003" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "history", "--store", store_copy)
    assert "warned: alpha, beta" in " ".join(out.split())


def test_a_failing_check_commits_nothing(store_copy, tmp_path, monkeypatch):
    import edgecp.train as train

    before = tree_snapshot(store_copy)

    def boom(*a, **k):
        raise RuntimeError("the check failed")

    monkeypatch.setattr(train, "run_check", boom)
    with pytest.raises(RuntimeError):
        add_concept(store_copy, "gamma", make_photos(tmp_path / "p", seed=3), overrides={"steps": 1})
    Store.open(store_copy)
    assert tree_snapshot(store_copy) == before
    assert not [p for p in (store_copy / "versions").iterdir() if p.name.startswith(".")]


def test_first_concept_and_check_off_record_what_was_done(tmp_path):
    from conftest import new_store

    new_store(tmp_path / "s")
    m = add_concept(tmp_path / "s", "one", make_photos(tmp_path / "p"), check=CheckConfig(images=2))
    assert m["check"]["concepts"] == [] and m["check"]["warn"] == []
    assert m["concepts"][-1]["metrics"]["loss_fixed_before"] > 0
    with pytest.raises(EdgecpError, match="--check-threshold"):
        CheckConfig(threshold=0)
    json.dumps(m)  # the manifest handed back holds no images
