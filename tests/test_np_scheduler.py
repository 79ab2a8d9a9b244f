"""The numpy DDIM scheduler reproduces diffusers' DDIMScheduler (eta = 0)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from edgecp.export.np_scheduler import NumpyDDIMScheduler

SD15 = {  # runwayml/stable-diffusion-v1-5 scheduler_config.json (a PNDM config, read as DDIM)
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2_V = {  # stabilityai/stable-diffusion-2-1 style, with trailing spacing
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
    "rescale_betas_zero_snr": False,
}
LINSPACE = {"beta_schedule": "linear", "timestep_spacing": "linspace", "prediction_type": "sample"}
CLIPPED = {"beta_schedule": "linear", "clip_sample": True, "clip_sample_range": 0.5, "set_alpha_to_one": True}
CONFIGS = {"sd15": SD15, "sd2_v": SD2_V, "linspace": LINSPACE, "clipped": CLIPPED, "defaults": {}}


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_diffusers_over_a_loop(name: str, steps: int) -> None:
    cfg = CONFIGS[name]
    ref, ours = DDIMScheduler.from_config(cfg), NumpyDDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x.copy())
    for t in ours.timesteps:
        out = rng.standard_normal(x.shape).astype(np.float32)
        # the same inputs: one step agrees to float32 rounding
        step_ref = ref.step(torch.from_numpy(out), int(t), torch.from_numpy(x)).prev_sample.numpy()
        x_next = ours.step(out, t, x)
        assert x_next.dtype == np.float32 and x_next.shape == x.shape
        np.testing.assert_allclose(x_next, step_ref, rtol=1e-5, atol=1e-5)
        # and each chain run on its own state: random model outputs make latents grow to ~40, hence rtol
        x_ref = ref.step(torch.from_numpy(out), int(t), x_ref).prev_sample
        x = x_next
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_keys_are_ignored() -> None:
    sched = NumpyDDIMScheduler.from_config({**SD15, "some_future_key": 3, "_name_or_path": "x"})
    sched.set_timesteps(4)
    np.testing.assert_array_equal(sched.timesteps, [751, 501, 251, 1])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta_schedule", "squaredcos_cap_v2"),
        ("prediction_type", "flow"),
        ("timestep_spacing", "karras"),
        ("rescale_betas_zero_snr", True),
        ("thresholding", True),
    ],
)
def test_bad_config_names_the_value(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{key}={value!r}"):
        NumpyDDIMScheduler.from_config({**SD15, key: value})


def test_step_before_set_timesteps_and_bad_steps() -> None:
    sched = NumpyDDIMScheduler.from_config(SD15)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(x, 1, x)
    for bad in (0, 1001):
        with pytest.raises(ValueError, match=f"steps={bad}"):
            sched.set_timesteps(bad)
