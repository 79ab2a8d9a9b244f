"""Diffusion scores consolidation (DSC), paper 000 Eq. 6."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """H(a, b) = -sum_i a_i log b_i, averaged over the batch. p_teacher, log_p_student: (B, k)."""
    return -(p_teacher * log_p_student).sum(dim=-1).mean()


def dsc_loss(
    p_n: torch.Tensor, p_j: torch.Tensor, log_p_s: torch.Tensor,
    eps_n: torch.Tensor, eps_j: torch.Tensor, eps_s_n: torch.Tensor, eps_s_j: torch.Tensor,
    gamma: float, lam: float, mse_reduction: str = "mean",
) -> torch.Tensor:
    """gamma * [H(p_n, p_s) + H(p_j, p_s)] + lambda * [L_MSE(eps_n, eps_s(c_n)) + L_MSE(eps_j, eps_s(c_j))].

    p_n, p_j: (B, k) teacher DC scores (no grad); log_p_s: (B, k) student log DC scores; eps_*: (B, C, H, W).
    L_MSE per image, averaged over the batch: with `mse_reduction="sum"` Eq. 6's ||a - b||_2^2; with "mean" the
    per-element mean (diffusers' `F.mse_loss`), i.e. the squared norm divided by D = C*H*W.
    """
    kd = cross_entropy(p_n, log_p_s) + cross_entropy(p_j, log_p_s)
    if mse_reduction == "sum":
        mse = ((eps_s_n - eps_n) ** 2).flatten(1).sum(1).mean() + ((eps_s_j - eps_j) ** 2).flatten(1).sum(1).mean()
    elif mse_reduction == "mean":
        mse = F.mse_loss(eps_s_n, eps_n) + F.mse_loss(eps_s_j, eps_j)
    else:
        raise ValueError(f"MSE reduction '{mse_reduction}' is not 'mean' or 'sum'")
    return gamma * kd + lam * mse
