"""Diffusion classifier (DC) scores, paper 000 Eq. 3, computed the way training can afford.

For latents x0 (B images) and a concept subset S (k text embeddings):
  1. one trial per image: t ~ U[0, T), eps ~ N(0, I), shared by all k concepts;
  2. x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps;
  3. ONE batched UNet call on B*k rows (x_t repeated, the k cached text embeddings tiled);
  4. e[b, i] = ||eps - eps_hat[b, i]||^2 ("sum", Eq. 3's squared norm) or its mean over the C*H*W latent elements
     ("mean"): the `reduction`;  p[b, :] = softmax(-e[b, :] / tau).
The two reductions differ by the factor D = C*H*W, i.e. "mean" is "sum" at the temperature tau * D. Which one the
methods use is their `dc_reduction` hyperparameter (docs/architecture.md, "DC-score reduction").

When the B*k rows do not fit in memory at once, `dc_grad` runs them `chunk` rows at a time and keeps the gradient
exact with two passes: a no-grad pass gives every row's prediction, so the loss and its gradient with respect to
each prediction are known; then each chunk is recomputed with gradients and back-propagated with its slice of that
gradient (the chain rule summed over rows). The extra cost is one no-grad forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from edgecp.scaling import scaled_grad

# (x_t, t, text) -> eps_hat, e.g. lambda x, t, c: unet(x, t, c).sample
NoisePredictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


REDUCTIONS = ("mean", "sum")


def dc_forward(
    predict: NoisePredictor, scheduler, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors (B, k) and noise predictions (B, k, C, H, W) of every image under every concept, in one call.

    x0: (B, C, H, W) clean latents; text: (k, T, D) concept embeddings; t: (B,) timesteps; noise: like x0.
    """
    return dc_forward_chunked(predict, scheduler, x0, text, t, noise, chunk=None, reduction=reduction)


def _rows(scheduler, x0, text, t, noise):
    b, k = x0.shape[0], text.shape[0]
    xt = scheduler.add_noise(x0, noise, t)  # (B, C, H, W)
    rows_x = xt.repeat_interleave(k, dim=0)  # (B*k, C, H, W): image b at rows b*k .. b*k+k-1
    rows_t = t.repeat_interleave(k, dim=0)  # (B*k,)
    rows_c = text.repeat(b, 1, 1)  # (B*k, T, D): concepts 0..k-1 for every image
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return rows_x, rows_t, rows_c, target.float()


def dc_errors(target: torch.Tensor, eps_hat: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """e[b, i] (B, k) of predictions `eps_hat` (B, k, C, H, W) against the `target` (B, C, H, W) of each image:
    the squared norm ("sum", Eq. 3) or the per-element mean ("mean") of the difference."""
    sq = (target[:, None] - eps_hat) ** 2
    if reduction == "sum":
        return sq.sum(dim=(2, 3, 4))  # (B, k): ||eps - eps_hat||^2, Eq. 3
    if reduction == "mean":
        return sq.mean(dim=(2, 3, 4))  # (B, k)
    raise ValueError(f"DC reduction '{reduction}' is not one of {', '.join(REDUCTIONS)}")




def dc_forward_chunked(predict: NoisePredictor, scheduler, x0, text, t, noise, chunk: int | None,
                       reduction: str = "mean"):
    """`dc_forward` with the UNet called on at most `chunk` rows at a time (no gradient across chunks needed)."""
    b, k = x0.shape[0], text.shape[0]
    rows_x, rows_t, rows_c, target = _rows(scheduler, x0, text, t, noise)
    n = b * k
    step = n if not chunk or chunk >= n else chunk
    eps = torch.cat([predict(rows_x[i:i + step], rows_t[i:i + step], rows_c[i:i + step]).float()
                     for i in range(0, n, step)])
    eps_hat = eps.view(b, k, *x0.shape[1:])  # (B, k, C, H, W)
    return dc_errors(target, eps_hat, reduction), eps_hat


LossOfScores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (err (B, k), eps_hat (B, k, ...)) -> scalar


def dc_grad(predict: NoisePredictor, scheduler, x0, text, t, noise, loss_fn: LossOfScores,
            params: list[torch.Tensor], chunk: int | None = None,
            reduction: str = "mean", scale=None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(loss, d loss / d params) of `loss_fn` over the B*k rows, the UNet called `chunk` rows at a time.
    `scale` (`scaling.LossScale`, fp16 plans) scales what flows back through the UNet and unscales it in fp32.

    With `chunk` >= B*k (or None) this is one call and `torch.autograd.grad`; otherwise the exact two-pass
    gradient of the module docstring.
    """
    b, k = x0.shape[0], text.shape[0]
    n = b * k
    if not chunk or chunk >= n:
        err, eps_hat = dc_forward(predict, scheduler, x0, text, t, noise, reduction)
        loss = loss_fn(err, eps_hat)
        return loss.detach(), list(scaled_grad(loss, params, scale, allow_unused=True))
    rows_x, rows_t, rows_c, target = _rows(scheduler, x0, text, t, noise)
    with torch.no_grad():  # pass 1: every row's prediction
        eps = torch.cat([predict(rows_x[i:i + chunk], rows_t[i:i + chunk], rows_c[i:i + chunk]).float()
                         for i in range(0, n, chunk)])
    leaf = eps.view(b, k, *x0.shape[1:]).requires_grad_(True)
    loss = loss_fn(dc_errors(target, leaf, reduction), leaf)
    (g_eps,) = torch.autograd.grad(loss, leaf)  # (B, k, C, H, W): d loss / d prediction of every row
    g_rows = g_eps.reshape(n, *x0.shape[1:])
    grads: list[torch.Tensor | None] = [None] * len(params)
    for i in range(0, n, chunk):  # pass 2: each chunk with gradients, back-propagated with its slice
        out = predict(rows_x[i:i + chunk], rows_t[i:i + chunk], rows_c[i:i + chunk]).float()
        part = scaled_grad(out, params, scale, grad_outputs=g_rows[i:i + chunk], allow_unused=True)
        grads = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(grads, part)]
    return loss.detach(), grads


def dc_scores(err: torch.Tensor, tau: float) -> torch.Tensor:
    """p[b, i] = softmax_i(-err[b, i] / tau)."""
    return F.softmax(-err / tau, dim=-1)


def dc_log_scores(err: torch.Tensor, tau: float) -> torch.Tensor:
    return F.log_softmax(-err / tau, dim=-1)


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of p (B, k); log k is the uniform distribution's."""
    return -(p * p.clamp_min(1e-30).log()).sum(dim=-1)


def sample_subset(n_previous: int, k: int, generator: torch.Generator) -> list[int]:
    """Indices (0-based into c_1..c_{n-1}) of min(k-2, n-1) previous concepts, drawn without replacement."""
    m = min(max(k - 2, 0), n_previous)
    return torch.randperm(n_previous, generator=generator)[:m].tolist()


def trial(x0: torch.Tensor, num_train_timesteps: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One (t, eps) per image: t ~ U{0..T-1}, eps ~ N(0, I) (drawn on the CPU generator, moved to x0's device)."""
    t = torch.randint(0, num_train_timesteps, (x0.shape[0],), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    return t, noise
