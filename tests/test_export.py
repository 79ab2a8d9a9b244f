import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_util import assert_one_line_error, run_cli
from PIL import Image

from edgecp.errors import EdgecpError
from edgecp.export.onnx_export import export_onnx


@pytest.fixture(scope="module")
def fp32_export(fp32_export_dir) -> Path:
    return fp32_export_dir  # conftest: one export of trained_store per session (read-only)


def test_onnx_layout_and_parity(fp32_export, trained_store):
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert (fp32_export / part / "model.onnx").is_file() and (fp32_export / part / "config.json").is_file()
    assert (fp32_export / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((fp32_export / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    index = json.loads((fp32_export / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    meta = json.loads((fp32_export / "edgecp.json").read_text())
    assert meta["version"] == "v0002" and [c["name"] for c in meta["concepts"]] == ["alpha", "beta"]
    for name, r in meta["models"].items():
        assert r["max_abs_diff"] < 1e-4, name  # fp32 is near-exact


def test_onnx_images_match_torch_images_for_the_same_seed(fp32_export, trained_store, tmp_path):
    from edgecp.generate import GenerateConfig, generate_from_onnx, generate_from_store

    cfg = GenerateConfig(n=2, seed=5, steps=3)
    prompt = "a photo of <alpha> dog. Posing with <beta> mug"
    a = generate_from_store(trained_store, prompt, cfg, tmp_path / "t")
    b = generate_from_onnx(fp32_export, prompt, cfg, tmp_path / "o")
    for pa, pb in zip(a[:2], b[:2]):
        x = np.asarray(Image.open(pa), dtype=np.float32)
        y = np.asarray(Image.open(pb), dtype=np.float32)
        assert np.abs(x - y).max() <= 2.0  # same latents, same scheduler, fp32 graph: at most rounding apart
        assert x.std() > 1.0  # not a blank image


def test_onnx_generation_path_imports_no_torch(fp32_export, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
        "from edgecp.cli import main\n"
        f"sys.argv = ['edgecp', 'generate', 'a photo of <alpha>', '--backend', 'onnx', '--onnx-dir', {str(fp32_export)!r},"
        f" '-n', '1', '--steps', '2', '--out', {str(tmp_path / 'o')!r}]\n"
        "main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in (tmp_path / "o").iterdir()) == [
        "a-photo-of-alpha-v0002-s0-onnx-0.png", "a-photo-of-alpha-v0002-s0-onnx-grid.png"]


def test_export_refused_beyond_tolerance_leaves_nothing(trained_store, tmp_path):
    strict = tmp_path / "strict.toml"
    strict.write_text('name = "strict"\ndescription = "zero tolerance"\natol = 0.0\nrtol = 0.0\n')
    out = tmp_path / "out"
    with pytest.raises(EdgecpError, match="export refused: .* differs from PyTorch"):
        export_onnx(trained_store, str(strict), out)
    assert not out.exists() and not list(tmp_path.glob(".out-*"))


@pytest.mark.parametrize("profile", ["edge-int8", "cuda-fp16"])
def test_reduced_precision_profiles_export_and_run(trained_store, tmp_path, profile):
    from edgecp.generate import GenerateConfig, generate_from_onnx

    report = export_onnx(trained_store, profile, tmp_path / profile)
    assert all(r["max_abs_diff"] <= r["tolerance"] for r in report["models"].values())
    assert ("vae_encoder" in report["models"]) == (profile != "edge-int8")
    files = generate_from_onnx(tmp_path / profile, "a photo of <beta>", GenerateConfig(n=1, steps=2), tmp_path / "o")
    assert np.asarray(Image.open(files[0])).std() > 1.0


def test_generate_onnx_without_export_says_what_to_run(trained_store, capsys):
    code, _, err = run_cli(capsys, "generate", "a photo of <alpha>", "--store", trained_store, "--backend", "onnx")
    assert_one_line_error(code, err, "no ONNX export of version v0002", "edgecp export")


def test_diffusers_format_loads_in_diffusers_and_matches(trained_store, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from edgecp.export.ort_runner import initial_latents
    from edgecp.generate import GenerateConfig, torch_generate
    from edgecp.model.tiny import tiny_path
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    code, _, err = run_cli(capsys, "export", "--store", trained_store, "--format", "diffusers", "--out", tmp_path / "d")
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(tiny_path(), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(tmp_path / "d")
    for name in ("alpha", "beta"):
        pipe.load_textual_inversion(tmp_path / "d" / f"{name}.safetensors")
    prompt = "a photo of a <alpha> dog"
    lat = torch.from_numpy(initial_latents(0, 1, 4, 16, 16))
    theirs = pipe(prompt, num_inference_steps=3, latents=lat, output_type="np").images[0] * 255
    model = PersonalModel.load(Store.open(trained_store), device=torch.device("cpu"))
    ours = np.asarray(torch_generate(model.comps, prompt, GenerateConfig(n=1, steps=3), model.device)[0], dtype=np.float32)
    assert np.abs(theirs - ours).max() <= 1.0
