"""The starting noise and the sampling config rule shared by PyTorch's schedulers and the torch-free ONNX runner.
Torch-free, at the bottom of the layers, so that `model.base` (PyTorch) and `export.np_scheduler` (the device
runtime) both read it without importing each other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def ddim_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A base's scheduler config (any class: DDIM, PNDM, Euler...) as Stable Diffusion samples with it: the config
    every DDIM or DDPM scheduler edgecp builds from a base reads, PyTorch's (diffusers) and the runner's alike.

    - ``clip_sample`` is False and ``steps_offset`` is 1, whatever the file says: diffusers'
      ``StableDiffusionPipeline.__init__`` rewrites a scheduler it is given to exactly these two values (with a
      FutureWarning), so that is what PyTorch draws with. A config without ``clip_sample`` (stabilityai's SD 2.x 768-v
      EulerDiscreteScheduler config) read by ``DDIMScheduler.from_config`` would get DDIM's default True, and a
      runner reading that file would clip x0 to [-1, 1] where the pipeline does not (docs/history/core.md,
      "sampling"). Clipping latents is wrong for latent diffusion anyway: SD's own DDIM configs set it false.
    - ``set_alpha_to_one`` defaults to False when absent (our choice; diffusers' DDIM default is True): every SD 1.x
      and 2.x scheduler config (runwayml v1-5's PNDM, stabilityai 2-base / 2 / 2-1's DDIM, Euler and PNDM ones, the
      shipped ``model/assets/sd-configs``) sets it false, so a config that omits it is most likely a hand-written SD
      one. It only moves DDIM's last step; both sides read the same value.
    Every other key is kept. Pure and torch-free: the on-device runner applies it to the folder it reads too.
    """
    cfg = dict(config)
    cfg.setdefault("set_alpha_to_one", False)
    cfg["clip_sample"] = False
    cfg["steps_offset"] = 1
    return cfg


def initial_latents(seed: int, batch: int, channels: int, height: int, width: int) -> np.ndarray:
    """Starting noise, float32 (batch, channels, height, width), shared by the ONNX and PyTorch backends.

    One draw of the whole batch from ``np.random.default_rng(seed)``: image i gets slice i, so the first image
    of a batch has the same latents as a batch of one with that seed.
    """
    return np.random.default_rng(seed).standard_normal((batch, channels, height, width)).astype(np.float32)
