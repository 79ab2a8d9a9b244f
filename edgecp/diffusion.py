"""The diffusion primitives every training path shares: cached VAE posteriors (`LatentSet`), encoding images into
them, drawing (noise, t), and the denoising loss. A leaf below the training orchestration and the methods, so that
`train`, `methods/` and the bench import it without importing one another."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgecp.images import fit_square, open_rgb


@dataclass
class LatentSet:
    """Cached VAE posteriors of a set of images: sample with `draw`. Dropped after the commit."""

    mean: torch.Tensor  # (N, C, h, w)
    std: torch.Tensor  # (N, C, h, w)
    scale: float

    def __len__(self) -> int:
        return self.mean.shape[0]

    def draw(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(self.mean[idx].shape, generator=generator).to(self.mean)
        return (self.mean[idx] + self.std[idx] * noise) * self.scale


ENCODE_CHUNK = 1  # images per VAE call when caching latents, and the mirror images in a call of their own: the
# encoder holds about 5 values per pixel-channel of its widest level per row (tools/count_activations.py: 1.5 GB for
# one 1024 px row of SDXL's VAE in bf16), and encoding is once per task, so one row at a time costs nothing that counts


def load_square(path: Path, size: int) -> torch.Tensor:
    """RGB image (`images.open_rgb`), centre-cropped to a square and resized to `size` (`images.fit_square`): a
    float tensor (3, size, size) in [-1, 1]. Here, not in `images`, so that `images` stays torch-free (the
    evaluation's torch-free modules read photos through it)."""
    arr = np.asarray(fit_square(open_rgb(path), size), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@torch.no_grad()
def encode_images(comps, paths: list[Path], size: int, device, flip: bool, chunk: int = ENCODE_CHUNK) -> LatentSet:
    """VAE posterior (mean, std) of each image (and of its mirror image when `flip`, in a call of its own), `chunk`
    images per call; the order: every image, then every mirror image."""
    plain, flipped = [], []  # (mean, std) per call
    for i in range(0, len(paths), chunk):
        px = torch.stack([load_square(p, size) for p in paths[i:i + chunk]])
        for j, rows in enumerate([px, px.flip(-1)] if flip else [px]):
            dist = comps.vae.encode(rows.to(device, comps.vae.dtype)).latent_dist
            (flipped if j else plain).append((dist.mean.float(), dist.std.float()))
    pairs = plain + flipped  # every image, then every mirror image
    return LatentSet(torch.cat([m for m, _ in pairs]), torch.cat([s for _, s in pairs]),
                     float(comps.vae.config.scaling_factor))


def draw_noise(latents: torch.Tensor, scheduler, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise, t) for every row: eps ~ N(0, I), t ~ U{0..T-1}, in this order from `generator`."""
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    return noise, t.to(latents.device)


def denoise_loss(unet, scheduler, latents, text, generator, noise_t=None) -> torch.Tensor:
    """Per-row epsilon-prediction MSE (B,) at a random timestep per row (the standard LDM objective)."""
    noise, t = noise_t if noise_t is not None else draw_noise(latents, scheduler, generator)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, text).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
