"""Base models other than `tiny`: a diffusers folder, a .safetensors file, a hub id; identity by sha256."""

import shutil

import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos

from edgecp.errors import EdgecpError
from edgecp.model.base import resolve_base


def test_a_diffusers_folder_works_as_a_base_and_a_changed_one_is_refused(tmp_path, capsys):
    base = tmp_path / "my-sd"
    shutil.copytree(resolve_base("tiny").path, base)
    code, out, err = run_cli(capsys, "init", tmp_path / "s", "--base", base, "--train", "steps=1",
                             "--train", "grad_accum=1", "--prior-images", "2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "add-concept", "dog", *make_photos(tmp_path / "p", n=1), "--store", tmp_path / "s")
    assert code == 0, err
    weights = next((base / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the UNet's weights
    weights.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "generate", "a photo of <dog>", "--store", tmp_path / "s", "--steps", "1")
    assert_one_line_error(code, err, "has changed", "new store")


def test_unpicklable_and_missing_bases_are_refused_clearly(tmp_path, monkeypatch):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not a pickle you want to load")
    with pytest.raises(EdgecpError, match="never unpickles"):
        resolve_base(str(ckpt))
    with pytest.raises(EdgecpError, match="not a diffusers Stable Diffusion folder"):
        resolve_base(str(tmp_path))
    with pytest.raises(EdgecpError, match="neither 'tiny'"):
        resolve_base(str(tmp_path / "nothing" / "here"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EdgecpError, match="when offline, pass a local diffusers folder"):
        resolve_base("someone/some-model")


def test_a_single_file_that_is_not_sd_gives_a_clear_error(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file

    from edgecp.model.base import load_components

    f = tmp_path / "weird.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EdgecpError, match="not a Stable Diffusion checkpoint"):
        load_components(resolve_base(str(f)))
