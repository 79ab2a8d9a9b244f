"""Diffusion classifier (DC) scores, paper 000 Eq. 3, computed the way training can afford.

For latents x0 (B images) and a concept subset S (k text embeddings):
  1. one trial per image: t ~ U[0, T), eps ~ N(0, I), shared by all k concepts;
  2. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
  3. ONE batched UNet call on B*k rows (x_t repeated, the k cached text embeddings tiled);
  4. e[b, i] = mean((eps - eps_hat[b, i])^2);  p[b, :] = softmax(-e[b, :] / tau).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# (x_t, t, text) -> eps_hat, e.g. lambda x, t, c: unet(x, t, c).sample
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def dc_forward(
    predict: NoisePredictor, scheduler, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors (B, k) and noise predictions (B, k, C, H, W) of every image under every concept, in one call.

    x0: (B, C, H, W) clean latents; text: (k, T, D) concept embeddings; t: (B,) timesteps; noise: like x0.
    """
    b, k = x0.shape[0], text.shape[0]
    xt = scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
    rows_x = xt.repeat_interleave(k, dim=0)  # (B*k, C, H, W): image b at rows b*k .. b*k+k-1
    rows_t = t.repeat_interleave(k, dim=0)  # (B*k,)
    rows_c = text.repeat(b, 1, 1)  # (B*k, T, D): concepts 0..k-1 for every image
    eps_hat = predict(rows_x, rows_t, rows_c).float().view(b, k, *x0.shape[1:])  # (B, k, C, H, W)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    err = ((target.float()[:, None] - eps_hat) ** 2).mean(dim=(2, 3, 4))  # (B, k)
    return err, eps_hat


def dc_scores(err: torch.Tensor, tau: float) -> torch.Tensor:
    """p[b, i] = softmax_i(-err[b, i] / tau)."""
    return F.softmax(-err / tau, dim=-1)


def dc_log_scores(err: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(-err / tau, dim=-1)


def sample_subset(n_previous: int, k: int, generator: torch.Generator) -> list[int]:
    """Indices (0-based into c_1..c_{n-1}) of min(k-2, n-1) previous concepts, drawn without replacement."""
    m = min(max(k - 2, 0), n_previous)
    return torch.randperm(n_previous, generator=generator)[:m].tolist()


def trial(x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One (t, eps) per image: t ~ U{0..T-1}, eps ~ N(0, I) (drawn on the CPU generator, moved to x0's device)."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    return t, noise
