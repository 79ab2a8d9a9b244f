"""SD 2.x 768-v bases (issue 21, case 1): an EulerDiscreteScheduler config without `clip_sample`, v-prediction,
linear projections and per-block attention heads. Every DDIM/DDPM scheduler edgecp builds from a base goes through
`ddim_config`, so PyTorch (diffusers' pipeline) and the ONNX runner sample alike and the fp32 export passes its gate.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

from edgecp.export.np_scheduler import NumpyDDIMScheduler
from edgecp.model.base import ddim_config

# stabilityai/stable-diffusion-2 (768-v) scheduler/scheduler_config.json: Euler, no clip_sample key
SD2_768_V = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}


def test_ddim_config_sets_what_the_sd_pipeline_samples_with():
    raw = dict(SD2_768_V)
    cfg = ddim_config(raw)
    assert raw == SD2_768_V  # the input is not changed
    assert cfg["clip_sample"] is False and cfg["steps_offset"] == 1 and cfg["set_alpha_to_one"] is False
    assert {k: v for k, v in cfg.items() if k != "clip_sample"} == raw  # every other key kept
    # a config without set_alpha_to_one takes SD's false (diffusers' DDIM default would be True); an explicit value
    # is kept; clip_sample and steps_offset are what diffusers' pipeline forces whatever the file says
    assert ddim_config({})["set_alpha_to_one"] is False
    assert ddim_config({"set_alpha_to_one": True})["set_alpha_to_one"] is True
    assert ddim_config({"clip_sample": True, "steps_offset": 0}) == {
        "clip_sample": False, "steps_offset": 1, "set_alpha_to_one": False}


def test_the_cause_diffusers_pipeline_turns_clipping_off_that_the_runner_kept():
    """Why the fp32 gate failed: DDIMScheduler.from_config of the Euler config takes DDIM's default clip_sample=True,
    and that config was written into the export for the runner; diffusers' StableDiffusionPipeline (PyTorch's side)
    rewrites its scheduler to clip_sample=False with a FutureWarning. The reference here is diffusers itself."""
    sched = DDIMScheduler.from_config(SD2_768_V)
    assert sched.config.clip_sample is True  # what the export used to record
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=sched,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    assert sched.config.clip_sample is False  # what PyTorch sampled with
    assert any(issubclass(w.category, FutureWarning) and "clip_sample" in str(w.message) for w in caught)
    # ddim_config gives the runner the pipeline's config, so the two sample the same
    for key in ("clip_sample", "steps_offset", "set_alpha_to_one", "prediction_type"):
        assert ddim_config(SD2_768_V)[key] == sched.config[key], key


def _loop(step, timesteps, x, outs):
    for t, e in zip(timesteps, outs):
        x = step(e, t, x)
    return x


def test_runner_scheduler_equals_the_pipelines_and_differed_before():
    """The numpy scheduler on ddim_config(config) against diffusers' DDIMScheduler as the pipeline rewrote it, over
    a whole v-prediction loop with x0 well outside [-1, 1]; on the raw config (the old export) it clipped and did not."""
    ref = DDIMScheduler.from_config(SD2_768_V)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None, scheduler=ref,
                                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_timesteps(4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32) * 3
    outs = [rng.standard_normal(x.shape).astype(np.float32) * 3 for _ in range(4)]
    want = _loop(lambda e, t, s: ref.step(torch.from_numpy(e), t, torch.from_numpy(s)).prev_sample.numpy(),
                 ref.timesteps, x, outs)
    for cfg, same in ((ddim_config(SD2_768_V), True), (DDIMScheduler.from_config(SD2_768_V).config, False)):
        ours = NumpyDDIMScheduler.from_config(dict(cfg))
        ours.set_timesteps(4)
        got = _loop(ours.step, ours.timesteps, x, outs)
        assert np.allclose(got, want, rtol=1e-5, atol=1e-5) == same


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_numpy_step_clips_as_diffusers_does(prediction_type):
    """With clip_sample=True (a custom range too) the numpy step equals diffusers' DDIMScheduler.step: the runner's
    scheduler never deviated; the pipeline's rewrite did."""
    cfg = {**SD2_768_V, "_class_name": "DDIMScheduler", "clip_sample": True, "clip_sample_range": 0.7,
           "prediction_type": prediction_type}
    ref, ours = DDIMScheduler.from_config(cfg), NumpyDDIMScheduler.from_config(cfg)
    ref.set_timesteps(5)
    ours.set_timesteps(5)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 6, 6)).astype(np.float32) * 3
    for t in ours.timesteps:
        e = rng.standard_normal(x.shape).astype(np.float32) * 2
        want = ref.step(torch.from_numpy(e), int(t), torch.from_numpy(x)).prev_sample.numpy()
        got = ours.step(e, int(t), x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        x = want


# ----------------------------------------------------------------------------------------- a tiny SD 2.x base


def make_sd2_base(out: Path) -> Path:
    """The shipped tiny base laid out as SD 2.x 768-v: its UNet rebuilt with linear projections, a per-block
    attention head list and upcast attention (its trained weights carried over: 1x1 convolutions -> linear), an
    Euler v-prediction scheduler config without clip_sample, model_index naming EulerDiscreteScheduler."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from edgecp.model.tiny import tiny_path

    src = tiny_path()
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("evaluator", "*.png", "*.md", "train_report.json"))
    cfg = {k: v for k, v in json.loads((src / "unet" / "config.json").read_text()).items() if not k.startswith("_")}
    cfg.update(use_linear_projection=True, attention_head_dim=[4, 8], upcast_attention=True)
    unet = UNet2DConditionModel(**cfg)
    state = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    unet.load_state_dict({k: v.float()[:, :, 0, 0] if (".proj_in." in k or ".proj_out." in k) and v.dim() == 4
                          else v.float() for k, v in state.items()})
    shutil.rmtree(out / "unet")
    unet.save_pretrained(out / "unet", safe_serialization=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_768_V))
    index = json.loads((out / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "EulerDiscreteScheduler"]}))
    return out


@pytest.fixture(scope="module")
def sd2_base(tmp_path_factory) -> Path:
    return make_sd2_base(tmp_path_factory.mktemp("sd2") / "sd2-768-v")


def test_loading_an_sd2_base_gives_ddim_without_clipping_and_no_future_warning(sd2_base):
    from edgecp.model.base import load_components, resolve_base
    from edgecp.model.quant import Precision, load_planned

    spec = resolve_base(str(sd2_base))
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comps = load_components(spec)
        planned = load_planned(spec, Precision("fp32"))  # the memory planner's loader builds its own scheduler
        for cls in (DDPMScheduler, DDIMScheduler):  # generate --sampler, training's noise scheduler
            StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=None,
                                    scheduler=cls.from_config(comps.scheduler.config), safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    assert warnings.filters == filters  # nothing filtered globally
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message)[:80] for w in caught]
    assert comps.unet.config.use_linear_projection and list(comps.unet.config.attention_head_dim) == [4, 8]
    for sched in (comps.scheduler, planned.scheduler):
        assert type(sched) is DDIMScheduler
        assert (sched.config.clip_sample, sched.config.steps_offset, sched.config.prediction_type) == (
            False, 1, "v_prediction")


def test_sd2_layout_cpu_fp32_export_passes_its_image_gate(sd2_base, tmp_path):
    """Before the fix this export was refused (39.0 dB against the 40 dB gate here; ~25 dB on SD 2.x 768-v)."""
    from edgecp.api import init_store
    from edgecp.export.onnx_export import export_onnx
    from edgecp.export.ort_runner import OnnxStableDiffusion

    init_store(tmp_path / "s", str(sd2_base), method="lora-sequential")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(tmp_path / "s", "cpu-fp32", tmp_path / "o")
    assert not [w for w in caught if issubclass(w.category, FutureWarning) and "clip_sample" in str(w.message)]
    gate = report["image_gate"]
    print(f"SD 2.x-layout tiny base, cpu-fp32 image gate: {gate['psnr_db']} dB")
    assert gate["psnr_db"] >= 40.0 and gate["min_psnr_db"] == 40.0
    written = json.loads((tmp_path / "o" / "scheduler" / "scheduler_config.json").read_text())
    assert written["_class_name"] == "DDIMScheduler" and written["clip_sample"] is False
    assert written["prediction_type"] == "v_prediction"
    # an export whose file still says clip_sample true (or omits it: optimum's copy of the Euler config) is read by the
    # runner as the pipeline reads it
    (tmp_path / "o" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2_768_V))
    runner = OnnxStableDiffusion(tmp_path / "o", providers=["CPUExecutionProvider"])
    assert runner.scheduler_config["clip_sample"] is False and runner.scheduler_config["steps_offset"] == 1


def test_refusal_advice_is_true_for_each_profile(tmp_path):
    from edgecp.export.onnx_export import refusal_advice
    from edgecp.profiles import load_profile

    assert refusal_advice(load_profile("edge-int8")) == "try a higher-precision profile such as cpu-fp32"
    fp32 = load_profile("cpu-fp32")
    for advice in (refusal_advice(fp32), refusal_advice(fp32, model="unet")):
        assert "higher-precision" not in advice and "edgecp bug" in advice and "scheduler_config.json" in advice
    assert "the unet graph" in refusal_advice(fp32, model="unet")
    picky = tmp_path / "picky.toml"
    picky.write_text('name = "picky"\ndescription = "x"\nmin_psnr = 101.0\natol = 0.0\n')
    assert "lower the profile's min_psnr" in refusal_advice(load_profile(str(picky)))
    assert "loosen the profile's atol/rtol" in refusal_advice(load_profile(str(picky)), model="vae_decoder")
