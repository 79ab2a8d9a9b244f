"""Merging math: paper 001's orthogonal re-initialisation by SVD and magnitude-based selection (MagMax), and
Custom Diffusion's constrained merge of per-concept K/V weights (Kumari et al. 2023, Sec. 3.2, Eq. 4-5)."""

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


def regulariser_covariance(features: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """R = X^T X + ridge * tr(X^T X) / d * I for regularisation text features X (m, d). The ridge keeps R invertible
    when m < d (edgecp's choice; Kumari et al. use 1000 captions, edgecp 100 prompts and the prior prompt)."""
    x = features.double()
    r = x.T @ x
    return r + ridge * torch.trace(r) / r.shape[0] * torch.eye(r.shape[0], dtype=r.dtype)


def merge_targets(delta: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """T_i = (W_i - W0) C_i^T (out, s_i): all that the merge needs to keep of concept i's fine-tuned layer."""
    return delta.double() @ features.double().T


def constrained_merge(targets: list[torch.Tensor], features: list[torch.Tensor], reg_cov: torch.Tensor) -> torch.Tensor:
    """Kumari et al. 2023's closed form, as a change of the base weight W0 (out, in).

    min_W || (W - W0) X_reg^T ||_F^2  subject to  W C^T = V,  C = the stacked concept text features (s, in),
    V = [W_i C_i^T] the values each fine-tuned W_i gives its own concept's features:
        W - W0 = T (C R^-1 C^T)^+ C R^-1,   T = [T_i] = [(W_i - W0) C_i^T] (`merge_targets`),  R = X_reg^T X_reg.
    W0 cancels, so the merge needs only each concept's T_i (out x s_i) and C_i (s_i x in), never its full W_i. The
    pseudo-inverse (edgecp's choice, where Kumari et al. invert) gives the least-squares compromise when rows repeat
    across concepts (the shared "a photo of a" tokens) or when s > in on a narrow text encoder.
    """
    c = torch.cat([f.double() for f in features])  # (s, in)
    t = torch.cat([x.double() for x in targets], dim=1)  # (out, s)
    r_inv_ct = torch.linalg.solve(reg_cov.double(), c.T)  # R^-1 C^T (in, s)
    gram = c @ r_inv_ct  # (s, s), symmetric PSD
    return (t @ torch.linalg.pinv(gram, hermitian=True, rtol=1e-10) @ r_inv_ct.T).float()
