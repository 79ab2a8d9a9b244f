"""SDXL's ONNX export (issue 28): optimum's SDXL layout and names, both gates, optimum's own SDXL pipeline reading it,
the torch-free runner against diffusers' SDXL pipeline, and a concept update through both text encoders."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_photos
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of <alpha> dog"


def _optimum_python() -> Path | None:
    p = os.environ.get("EDGECP_OPTIMUM_PYTHON") or ROOT / ".venv-optimum" / "bin" / "python"
    return Path(p) if Path(p).is_file() else None


@pytest.fixture(scope="module")
def sdxl_store(tmp_path_factory) -> Path:
    """An sdxl-mini store with one LoRA concept (tests copy it before changing it)."""
    from edgecp.api import init_store
    from edgecp.train import add_concept

    spec = importlib.util.spec_from_file_location("make_sd_fixture", ROOT / "tools" / "make_sd_fixture.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tmp = tmp_path_factory.mktemp("sdxl-export")
    tool.write_fixture(tmp / "sdxl-mini", "sdxl-mini", log=lambda *_: None)
    root = tmp / "store"
    init_store(root, str(tmp / "sdxl-mini"), method="lora-sequential",
               train={"steps": 2, "resolution": 64, "grad_accum": 1}, prior={"num_images": 1, "steps": 2})
    add_concept(root, "alpha", make_photos(tmp / "a", seed=1), class_word="dog")
    return root


@pytest.fixture(scope="module")
def sdxl_export(sdxl_store, tmp_path_factory) -> tuple[Path, dict]:
    from edgecp.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("sdxl-onnx") / "cpu"
    return out, export_onnx(sdxl_store, "cpu-fp32", out)


def test_sdxl_export_has_optimums_layout_names_and_passes_both_gates(sdxl_export, sdxl_store):
    """The names optimum's exporter gives SDXL (CLIPTextOnnxConfig, CLIPTextWithProjectionOnnxConfig and UNetOnnxConfig
    with addition_embed_type text_time), written out here as optimum-onnx 0.1.0 prints them."""
    out, report = sdxl_export
    for d in ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder", "tokenizer", "tokenizer_2",
              "scheduler"):
        assert (out / d).is_dir(), d
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]

    def io(name):
        g = onnx.load(str(out / name / "model.onnx"), load_external_data=False).graph
        return [i.name for i in g.input], [o.name for o in g.output]

    layers = {n: json.loads((out / n / "config.json").read_text())["num_hidden_layers"]
              for n in ("text_encoder", "text_encoder_2")}
    hidden = lambda n: [f"hidden_states.{i}" for i in range(layers[n] + 1)]
    assert io("text_encoder") == (["input_ids"], ["last_hidden_state", "pooler_output", *hidden("text_encoder")])
    assert io("text_encoder_2") == (["input_ids"], ["text_embeds", "last_hidden_state", *hidden("text_encoder_2")])
    assert io("unet") == (["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"], ["out_sample"])
    # both tokenizers give the concept its id (the second pads with "!", id 0, as SDXL's does)
    for tok in ("tokenizer", "tokenizer_2"):
        assert json.loads((out / tok / "added_tokens.json").read_text()) == {"<alpha>": 49408}
    assert set(report["models"]) == {"unet", "text_encoder", "text_encoder_2", "vae_decoder", "vae_encoder"}
    assert all(m["max_abs_diff"] <= m["tolerance"] for m in report["models"].values())
    assert report["image_gate"]["psnr_db"] >= 40.0 and report["personal_token_rows"] == 64


def test_sdxl_runner_draws_diffusers_sdxl_image_without_torch(sdxl_export, sdxl_store, tmp_path):
    """The runner's SDXL conditioning (both encoders' penultimate states, the pooled text_embeds, time ids) against
    diffusers' StableDiffusionXLPipeline, which `generate --backend torch` runs; then the same command in a process
    where torch, diffusers and transformers cannot be imported."""
    from edgecp.export.onnx_export import psnr
    from edgecp.generate import GenerateConfig, generate_from_store

    out, _ = sdxl_export
    torch_png, _grid = generate_from_store(sdxl_store, PROMPT, GenerateConfig(n=1, steps=3, size=64, seed=5),
                                           tmp_path / "torch")
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None; sys.modules['transformers'] = None\n"
        "from edgecp.cli import main\n"
        f"sys.argv = ['edgecp', 'generate', {PROMPT!r}, '--backend', 'onnx', '--onnx-dir', {str(out)!r}, '-n', '1',"
        f" '--steps', '3', '--size', '64', '--seed', '5', '--out', {str(tmp_path / 'onnx')!r}]\n"
        "main()\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    assert p.returncode == 0, p.stderr
    onnx_png = next((tmp_path / "onnx").glob("*-onnx-0.png"))
    a, b = (np.asarray(Image.open(f).convert("RGB")) for f in (onnx_png, torch_png))
    assert psnr(a, b) >= 60.0  # fp32 both sides: rounding only (86 dB when written)


def test_sdxl_runner_paths_agree(sdxl_export):
    """The IO-bound loop (here on the CPU provider), one session at a time, a batch of two prompts and a non-square
    size draw the host loop's images; the time ids follow the size (diffusers' `_get_add_time_ids` order)."""
    from edgecp.export.ort_runner import OnnxStableDiffusion

    out, _ = sdxl_export
    host = OnnxStableDiffusion(out, providers=["CPUExecutionProvider"])
    cond = host.condition(["a", "b"], 64, 96)
    assert cond["time_ids"].tolist() == [[64, 96, 0, 0, 64, 96]] * 2
    widths = [json.loads((out / n / "config.json").read_text())["hidden_size"] for n in ("text_encoder", "text_encoder_2")]
    assert cond["encoder_hidden_states"].shape == (2, 77, sum(widths))  # both encoders' states, side by side
    assert cond["text_embeds"].shape == (2, json.loads((out / "text_encoder_2" / "config.json").read_text())[
        "projection_dim"])
    bound = OnnxStableDiffusion(out, providers=["CPUExecutionProvider"], io_binding=True)
    lean = OnnxStableDiffusion(out, providers=["CPUExecutionProvider"], reduce_memory=True)
    prompts = [PROMPT, "a red mug"]
    a = host(prompts, steps=2, seed=1, height=64, width=96)
    for other in (bound, lean):
        for x, y in zip(a, other(prompts, steps=2, seed=1, height=64, width=96)):
            assert np.abs(np.asarray(x, dtype=int) - np.asarray(y, dtype=int)).max() <= 1
    assert bound.io_binding_used and a[0].size == (96, 64)


@pytest.mark.skipif(_optimum_python() is None, reason="optimum's own venv is absent: run `make test`")
def test_optimum_sdxl_pipeline_reads_the_export_and_draws_the_runners_image(sdxl_export, tmp_path):
    from edgecp.export.onnx_export import psnr
    from edgecp.export.ort_runner import OnnxStableDiffusion, initial_latents

    out, _ = sdxl_export
    np.save(tmp_path / "lat.npy", initial_latents(0, 1, 4, 8, 8))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([str(_optimum_python()), str(ROOT / "tools" / "check_optimum_reader.py"), str(out),
                        "--prompt", PROMPT, "--steps", "2", "--latents", str(tmp_path / "lat.npy"),
                        "--out", str(tmp_path / "optimum.png")], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["pipeline"] == "ORTStableDiffusionXLPipeline" and got["transformers"].startswith("4.")
    runner = OnnxStableDiffusion(out, providers=["CPUExecutionProvider"])
    assert got["ids"] == runner.tokenizer.encode(PROMPT).ids and got["ids_2"] == runner.tokenizer_2.encode(PROMPT).ids
    assert 49408 in got["ids_2"] and got["ids_2"][-1] == 0  # the second tokenizer pads with "!"
    ours = np.asarray(runner([PROMPT], steps=2, seed=0, height=64, width=64)[0])
    theirs = np.asarray(Image.open(tmp_path / "optimum.png").convert("RGB"))
    assert psnr(ours, theirs) >= 60.0  # same graphs, same DDIM steps (100 dB when written)


def test_sdxl_concept_update_carries_both_token_tables(sdxl_export, sdxl_store, tmp_path):
    """A second concept as an update of the SDXL base export: each encoder's personal table changes (one tensor
    each), both tokenizers travel, and the image gate is drawn through base + update."""
    from edgecp.export.onnx_export import export_onnx
    from edgecp.export.ort_runner import OnnxStableDiffusion
    from edgecp.train import add_concept

    base, _ = sdxl_export
    store = tmp_path / "store"
    shutil.copytree(sdxl_store, store)
    add_concept(store, "beta", make_photos(tmp_path / "b", seed=2), class_word="mug")
    report = export_onnx(store, "cpu-fp32", tmp_path / "upd", update_for=base)
    u = report["update"]
    assert u["models"]["text_encoder"]["tensors"] == 1 and u["models"]["text_encoder_2"]["tensors"] == 1
    assert u["models"]["vae_decoder"]["tensors"] == 0 and u["fraction"] < 0.25
    assert {"tokenizer/added_tokens.json", "tokenizer_2/added_tokens.json"} <= set(u["carried_files"])
    assert report["image_gate"]["through"] == "base export + update" and report["image_gate"]["psnr_db"] >= 40.0
    runner = OnnxStableDiffusion(base, providers=["CPUExecutionProvider"], update=tmp_path / "upd")
    ids = runner.tokenizer_2.encode("a photo of <beta> mug").ids
    assert ids[:6] == runner.tokenizer.encode("a photo of <beta> mug").ids[:6] and 49409 in ids


def test_sdxl_desktop_exports_are_refused_in_one_line(sdxl_store, tmp_path):
    from edgecp.errors import EdgecpError
    from edgecp.export.checkpoint import export_checkpoint
    from edgecp.export.diffusers_format import export_diffusers
    from edgecp.export.webui import export_webui

    for call in (lambda: export_diffusers(sdxl_store, tmp_path / "d"),
                 lambda: export_webui(sdxl_store, tmp_path / "w"),
                 lambda: export_checkpoint(sdxl_store, tmp_path / "c")):
        with pytest.raises(EdgecpError, match="SDXL store is not built yet: export ONNX with `edgecp export"):
            call()
    assert not any((tmp_path / d).exists() for d in "dwc")
