"""Bad inputs a new user meets: image modes, duplicates, huge images, too many images, names, markup in paths,
--purge-source on links."""

import os

import numpy as np
import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos, tree_snapshot
from PIL import Image

from edgecp.diffusion import load_square
from edgecp.errors import EdgecpError
from edgecp.images import validate_images


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    a = np.full((40, 40), 32768, dtype=np.uint16)  # mid grey in 16 bits
    f = tmp_path / "grey16.png"
    Image.fromarray(a).save(f)
    assert Image.open(f).mode.startswith("I")
    x = load_square(f, 32)
    assert x.shape == (3, 32, 32) and abs(float(x.mean())) < 0.01  # 128/255 -> ~0 in [-1, 1]; clipping gave 1.0


def test_transparency_is_composited_on_neutral_grey(tmp_path):
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[..., :3] = 255  # white hidden under fully transparent pixels
    rgba[:20, :, 3] = 255
    rgba[:20, :, :3] = (255, 0, 0)  # an opaque red top half
    f = tmp_path / "t.png"
    Image.fromarray(rgba, "RGBA").save(f)
    x = load_square(f, 40)
    assert float(x[:, 30:, :].abs().max()) < 0.01  # transparent half -> grey (0), not the hidden white (1)
    assert float(x[0, :10].mean()) > 0.99 and float(x[1, :10].mean()) < -0.99


def test_duplicates_by_content_count_once(tmp_path):
    a = make_photos(tmp_path / "p", n=2)
    os.link(a[0], tmp_path / "hard.png")
    (tmp_path / "copy.png").write_bytes(a[1].read_bytes())
    got = validate_images([a[0], a[1], tmp_path / "hard.png", tmp_path / "copy.png"])
    assert got == a


def test_too_many_and_too_large_images_name_the_limit(tmp_path, monkeypatch):
    import edgecp.images as images

    monkeypatch.setattr(images, "MAX_IMAGES", 3)
    with pytest.raises(EdgecpError, match="4 images given, at most 3 per concept"):
        validate_images(make_photos(tmp_path / "many", n=4))
    big = tmp_path / "big.png"
    Image.new("L", (9000, 8000)).save(big)  # 72 Mpx, above edgecp's limit (and PIL's bomb warning)
    with pytest.raises(EdgecpError, match="9000x8000 px .*too large.*64,000,000 pixels"):
        validate_images([big])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's own bomb error, raised before our check
    with pytest.raises(EdgecpError, match="too large: resize it to at most"):
        validate_images(make_photos(tmp_path / "one", n=1))


def test_concept_name_with_a_trailing_newline_is_refused(store_copy, tmp_path, capsys):
    before = tree_snapshot(store_copy)
    code, _, err = run_cli(capsys, "add-concept", "dog\n", *make_photos(tmp_path / "p", n=1), "--store", store_copy)
    assert_one_line_error(code, err, "'dog\\n'", "lowercase")
    assert tree_snapshot(store_copy) == before


def test_paths_with_markup_are_shown_literally(store_copy, tmp_path, capsys):
    odd = tmp_path / "a[/]b" / "x[b]y.png"
    code, _, err = run_cli(capsys, "add-concept", "newc", odd, "--store", store_copy)
    assert_one_line_error(code, err, "a[/]b/x[b]y.png", "does not exist")
    code, out, err = run_cli(capsys, "generate", "a photo of <alpha>", "--store", store_copy, "-n", "1", "--steps", "1",
                             "--out", tmp_path / "o[b]ut")
    assert code == 0, err
    assert "o[b]ut" in out


def test_purge_source_on_a_symlink_deletes_the_photo_and_says_so(store_copy, tmp_path, capsys):
    photo = make_photos(tmp_path / "real", n=1, seed=9)[0]
    link = tmp_path / "link.png"
    link.symlink_to(photo)
    code, out, err = run_cli(capsys, "add-concept", "gamma", link, "--store", store_copy, "--steps", "1",
                             "--purge-source")
    assert code == 0, err
    assert not photo.exists() and not link.is_symlink()
    assert f"source files deleted: {photo}, {link}" in out and "not deleted" not in out


def test_purge_reports_a_hard_link_that_keeps_the_bytes(tmp_path):
    from edgecp.images import purge_sources

    photo = make_photos(tmp_path / "p", n=1)[0]
    os.link(photo, tmp_path / "other.png")
    r = purge_sources([photo])
    assert r["deleted"] == [str(photo)]
    assert r["not_deleted"] == [{"path": str(photo), "reason": "its bytes survive in 1 other hard link(s) outside the "
                                                               f"folders searched ({photo.parent})"}]
    second = make_photos(tmp_path / "q", n=1)[0]
    os.link(second, second.parent / "beside.png")  # found beside it: named
    os.link(second, second.parent / "given-too.png")  # given as well: deleted, so no survivor of the count
    r = purge_sources([second, second.parent / "given-too.png"])
    assert r["deleted"] == [str(second), str(second.parent / "given-too.png")]
    assert r["not_deleted"] == [{"path": str(second.parent / "beside.png"),
                                 "reason": f"a hard link to {second} that was not given: the photo's bytes survive here"}]
