"""Elastic weight consolidation on adapter parameters (paper 000 Sec. 3.1, Eq. 4-5; online EWC)."""

from __future__ import annotations

import torch


def ewc_penalty(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                weight: float) -> torch.Tensor:
    """weight * sum_i F_i (theta_i - theta*_i)^2 over the parameters that have a Fisher entry."""
    total = None
    for name, f in fisher.items():
        term = (f * (params[name] - anchor[name]) ** 2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return weight * total


def online_fisher(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor], decay: float = 1.0,
                  update: str = "mean", tasks_before: int = 0) -> dict[str, torch.Tensor]:
    """The one Fisher that online EWC keeps across tasks; the first task's F is F_1.

    update="mean" (the default, paper 000 App. I: online EWC "maintains a single set of FIM weights that are updated
    continuously using a running average over tasks"): F <- (m F + F_n) / (m + 1), m = `tasks_before` tasks already
    averaged into F, so the penalty keeps the scale of one task's Fisher however long the sequence grows.
    update="sum" (Schwarz et al. 2018's form): F <- decay * F + F_n; with decay = 1 the penalty at task n is about
    n - 1 times one task's.
    """
    if update not in ("mean", "sum"):
        raise ValueError(f"fisher update '{update}' is not 'mean' or 'sum'")
    if not previous:
        return {k: v.clone() for k, v in new.items()}
    if update == "sum":
        return {k: decay * previous[k] + v for k, v in new.items()}
    m = max(tasks_before, 1)
    return {k: (m * previous[k] + v) / (m + 1) for k, v in new.items()}


def dc_ewc_loss(err: torch.Tensor, log_p: torch.Tensor, current: int, delta: float) -> torch.Tensor:
    """Eq. 5: L = denoise(x, c_n) + delta * sum_{i in S} s_i * H(p, c_i), s_n = +1, s_i = -1 otherwise.

    err: (B, k) errors of the batched DC call (the c_n column is exactly the denoising loss for c_n);
    log_p: (B, k) log DC scores; current: the column of c_n. H(p, c_i) = -log p_i.
    """
    k = err.shape[1]
    sign = -torch.ones(k, device=err.device)
    sign[current] = 1.0
    ce = -log_p  # (B, k): cross-entropy with each one-hot label
    return err[:, current].mean() + delta * (ce * sign).sum(dim=1).mean()


class FisherAccumulator:
    """Mean of squared gradients over iterations, accumulated without keeping any graph."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.sum = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
        self.count = 0

    def add_grads(self, grads) -> None:
        """One iteration's gradients (in the order of `params`), e.g. from `dc_scores.dc_grad`."""
        for (k, _), g in zip(self.params.items(), grads):
            if g is not None:
                self.sum[k] += g.detach().float() ** 2
        self.count += 1

    def mean(self) -> dict[str, torch.Tensor]:
        return {k: v / max(self.count, 1) for k, v in self.sum.items()}
