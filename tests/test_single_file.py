"""Single-file checkpoints load offline from edgecp's shipped configs; init refuses what it cannot load."""

import numpy as np
import pytest
import torch
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos
from safetensors.numpy import save_file

from edgecp.errors import EdgecpError
from edgecp.model.ldm_layout import pipeline_to_single_file
from edgecp.model.single_file import (
    CONFIGS,
    V1_KEY,
    V2_KEY,
    XL_KEY,
    XL_REFINER_KEY,
    config_folder,
    detect_family,
)

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"


@pytest.mark.parametrize("family, unet, vae, text", [
    ("sd1", 859_520_964, 83_653_863, 123_060_480),  # SD 1.5: UNet, VAE, CLIP ViT-L/14 text encoder
    ("sd2-base", 865_910_724, 83_653_863, 340_387_840),  # SD 2.x: OpenCLIP ViT-H text encoder (23 layers)
    ("sd2-v", 865_910_724, 83_653_863, 340_387_840),
])
def test_shipped_configs_build_the_published_architectures(family, unet, vae, text):
    """Every shipped config instantiates (on the meta device, no memory) with the parameter counts of the
    published SD checkpoints."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    d = CONFIGS / family
    with torch.device("meta"):
        u = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(d, subfolder="unet"))
        v = AutoencoderKL.from_config(AutoencoderKL.load_config(d, subfolder="vae"))
        t = CLIPTextModel(CLIPTextConfig.from_pretrained(d, subfolder="text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(u), count(v), count(t)) == (unet, vae, text)
    sched = DDIMScheduler.from_pretrained(d, subfolder="scheduler")
    assert sched.config.prediction_type == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert u.config.sample_size * 8 == (768 if family == "sd2-v" else 512)


def _fake_checkpoint(path, **shapes):
    save_file({k: np.zeros(s, dtype=np.uint8) for k, s in shapes.items()}, str(path))
    return path


def test_a_family_edgecp_wrote_in_the_metadata_wins_over_the_file_name(tmp_path):
    sd2 = {UNET_KEY: (320, 4, 3, 3), V2_KEY: (320, 1024)}
    path = tmp_path / "my-model.safetensors"  # the name alone says v-prediction (768)
    save_file({k: np.zeros(s, dtype=np.uint8) for k, s in sd2.items()}, str(path), metadata={"edgecp_family": "sd2-base"})
    assert detect_family(path) == "sd2-base"
    save_file({k: np.zeros(s, dtype=np.uint8) for k, s in sd2.items()}, str(path), metadata={"edgecp_family": "nope"})
    assert detect_family(path) == "sd2-v"


def test_the_family_is_read_from_the_header_and_unusable_checkpoints_are_refused(tmp_path):
    sd1 = {UNET_KEY: (320, 4, 3, 3), V1_KEY: (320, 768)}
    sd2 = {UNET_KEY: (320, 4, 3, 3), V2_KEY: (320, 1024)}
    assert detect_family(_fake_checkpoint(tmp_path / "v1-5.safetensors", **sd1)) == "sd1"
    assert detect_family(_fake_checkpoint(tmp_path / "v2-1_768-ema.safetensors", **sd2)) == "sd2-v"
    assert detect_family(_fake_checkpoint(tmp_path / "v2-1_512-ema.safetensors", **sd2)) == "sd2-base"
    assert detect_family(_fake_checkpoint(tmp_path / "xl.safetensors", **{UNET_KEY: (320, 4, 3, 3), XL_KEY: (1280,)})) \
        == "sdxl"  # issue 28
    for name, shapes, needle in (
        ("xl-inpaint.safetensors", {UNET_KEY: (320, 9, 3, 3), XL_KEY: (1280,)}, "SDXL UNet with 9 input channels"),
        ("xl-refiner.safetensors", {UNET_KEY: (384, 4, 3, 3), XL_REFINER_KEY: (1280,)}, "SDXL refiner"),
        ("xl-no-unet.safetensors", {XL_KEY: (1280,)}, "SDXL checkpoint without a UNet"),
        ("inpaint.safetensors", {UNET_KEY: (320, 9, 3, 3), V1_KEY: (320, 768)}, "9 input channels"),
        ("other.safetensors", {"x": (2,)}, "not a Stable Diffusion checkpoint"),
    ):
        with pytest.raises(EdgecpError, match=needle):
            detect_family(_fake_checkpoint(tmp_path / name, **shapes))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10not safetensors")
    with pytest.raises(EdgecpError, match="not a readable .safetensors"):
        detect_family(junk)


def test_sd2_config_folder_has_an_offline_tokenizer_padding_with_bang():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(config_folder("sd2-v") / "tokenizer", local_files_only=True)
    assert tok.pad_token == "!" and len(tok) == 49408
    assert tok("a photo").input_ids == [49406, 320, 1125, 49407]


def test_a_single_file_base_works_offline_and_init_refuses_an_unusable_one(tmp_path, capsys, monkeypatch):
    from edgecp.model.base import load_components, resolve_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt = tmp_path / "tiny-original-layout.safetensors"
    pipeline_to_single_file(resolve_base("tiny").path, ckpt)  # the tiny base in the original LDM layout
    assert detect_family(ckpt) == "tiny"
    comps = load_components(resolve_base(str(ckpt)))
    ref = load_components(resolve_base("tiny"))
    for name in ("unet", "vae", "text_encoder"):  # the conversion is exact
        a, b = getattr(comps, name).state_dict(), getattr(ref, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    store = tmp_path / "s"
    code, _, err = run_cli(capsys, "init", store, "--base", ckpt, "--train", "steps=1", "--prior-images", "1")
    assert code == 0, err
    code, _, err = run_cli(capsys, "add-concept", "dog", *make_photos(tmp_path / "p", n=1), "--store", store)
    assert code == 0, err
    refiner = _fake_checkpoint(tmp_path / "refiner.safetensors", **{UNET_KEY: (384, 4, 3, 3), XL_REFINER_KEY: (1280,)})
    code, _, err = run_cli(capsys, "init", tmp_path / "s2", "--base", refiner)
    assert_one_line_error(code, err, "SDXL refiner", "pass the SDXL base")
    assert not (tmp_path / "s2").exists()


def test_sdxl_config_folder_has_both_offline_tokenizers_and_the_pipeline_configs():
    from transformers import CLIPTokenizer

    d = config_folder("sdxl")
    first = CLIPTokenizer.from_pretrained(d / "tokenizer", local_files_only=True)
    second = CLIPTokenizer.from_pretrained(d / "tokenizer_2", local_files_only=True)
    assert (first.pad_token, second.pad_token) == ("<|endoftext|>", "!")
    assert first("a photo").input_ids == second("a photo").input_ids == [49406, 320, 1125, 49407]
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert (d / sub / "config.json").is_file(), sub
    assert (d / "scheduler" / "scheduler_config.json").is_file()
