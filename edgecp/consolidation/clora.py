"""C-LoRA's self-regularization (paper 000 Eq. 2, after Smith et al. 2024b).

L_forget = || |sum_{n'<n} A_n' B_n'| (.) A_n B_n ||_F^2, summed over the adapted layers: the new task's update
is penalized on the weight entries that earlier tasks' LoRAs occupy.
"""

from __future__ import annotations

import torch


def clora_penalty(occupied: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], weight: float) -> torch.Tensor:
    """weight * sum_m || occupied[m] (.) deltas[m] ||^2. occupied[m] = |sum of earlier deltas| (out, in)."""
    total = None
    for m, occ in occupied.items():
        term = ((occ * deltas[m]) ** 2).sum()
        total = term if total is None else total + term
    return weight * total if total is not None else torch.zeros(())


def relative_penalty(occupied: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], strength: float,
                     loss_ref: float, norm: float) -> torch.Tensor:
    """The scale-free form of Eq. 2 (edgecp's choice): strength * loss_ref * sum ||occ (.) delta||^2 / norm, with
    norm = sum ||occ (.) occ||^2. Writing an update as large as the earlier tasks' own, on their spots, costs
    `strength` times the task loss at the start of the task, whatever the layer sizes and weight magnitudes."""
    return clora_penalty(occupied, deltas, strength * loss_ref / max(norm, 1e-30))


def occupied_norm(occupied: dict[str, torch.Tensor]) -> float:
    return float(sum(((o.double() * o.double()) ** 2).sum() for o in occupied.values()))
