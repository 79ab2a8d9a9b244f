"""Merging math of paper 001: orthogonal re-initialisation by SVD and magnitude-based selection (MagMax)."""

from __future__ import annotations

import torch


def orthogonal_rows(accumulated: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """A new LoRA A (r, in) whose rows are orthogonal to the rows of the accumulated A_{1..t-1} = sum_s A_s.

    001 Sec. 3 (3): SVD of the accumulated A, A = U S V^H; the right singular vectors of the smallest singular
    values span what A_{1..t-1} does not use. The new rows are the last r rows of V^H, each rescaled to the norm of
    the standard initialisation's row so that training starts at the usual scale. Needs in >= 2r.
    """
    r, d_in = init.shape
    if d_in < accumulated.shape[0] + r:
        raise ValueError(f"cannot find {r} directions orthogonal to a rank-{accumulated.shape[0]} A in {d_in} dims")
    _, _, vh = torch.linalg.svd(accumulated.double(), full_matrices=True)  # vh: (in, in), rows by singular value
    basis = vh[-r:].to(init.dtype)  # (r, in): smallest singular values -> the orthogonal complement
    return basis * init.norm(dim=1, keepdim=True)


def magmax(merged: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """MagMax selection (Marczak et al. 2024, as 001 Eq. 2 applies it per task): element-wise, keep the entry with
    the larger magnitude."""
    return torch.where(new.abs() > merged.abs(), new, merged)


def max_abs_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |cos| between any row of a and any row of b (the orthogonality check of 001)."""
    an = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((an @ bn.T).abs().max())
