"""EWC on the one LoRA carried from task to task (paper 000 Sec. 3.1): LoRA EWC and EWC DC.

Task n trains with the penalty lambda * sum F (theta - theta*)^2 (F, theta* from task n-1), then the Fisher phase
(Algo 2) computes F_n on D_n (plain denoising loss, or Eq. 5 with DC scores) and online EWC updates F.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgecp.consolidation.ewc import ewc_penalty, online_fisher
from edgecp.methods.base import Method, TaskContext
from edgecp.methods.phases import fisher_phase, phase_iterations
from edgecp.personal import ADAPTER_FILE, read_tensors

FISHER_FILE = "fisher.safetensors"


@dataclass(frozen=True)
class EwcParams:
    ewc_weight: float = 1e6  # lambda_ewc (paper App. H, after C-LoRA)
    fisher_decay: float = 1.0  # online EWC: F <- decay * F + F_n (the paper does not state it; 1 keeps all tasks)
    consolidation_ratio: float = 0.2  # Fisher iterations = 0.2 x training iterations (App. H.2.1)


@dataclass(frozen=True)
class EwcDcParams(EwcParams):
    k: int = 5  # |S|: c_0, c_n and k-2 previous concepts (Sec. 3.1)
    delta: float = 0.5  # weight of the DC cross-entropy term in Eq. 5 (App. H.2.2)
    tau: float = 1.0  # DC temperature


class EwcMixin:
    """Online EWC on top of any method (place it first among the bases): penalty from the previous version's
    Fisher and anchor during training; after the method's own consolidation, the Fisher phase (Algo 4 order)."""

    use_dc = False

    def prepare(self, ctx: TaskContext) -> None:
        super().prepare(ctx)
        self._load_ewc(ctx)

    def consolidate(self, ctx: TaskContext, progress=None) -> None:
        super().consolidate(ctx, progress)
        self._fisher_update(ctx, progress)

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        return {**super().files(ctx), FISHER_FILE: ctx.extra["fisher"]}

    def phase_rows(self, n_previous: int) -> dict[str, int]:
        rows = 2 + min(self.params.k - 2, n_previous) if self.use_dc else 1  # S = {c_0, c_n} + earlier concepts
        return {**super().phase_rows(n_previous), "fisher": rows}

    def _load_ewc(self, ctx: TaskContext) -> None:
        fisher = read_tensors(ctx.prev_dir, FISHER_FILE)
        anchor = self.anchor(ctx)
        ctx.extra["fisher_prev"] = fisher
        ctx.extra["ewc"] = ({k: v.to(ctx.device) for k, v in fisher.items()},
                            {k: v.to(ctx.device) for k, v in anchor.items()}) if fisher else None

    def anchor(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """theta*: the trained tensors as the previous task left them (the previous version's adapter)."""
        return read_tensors(ctx.prev_dir, ADAPTER_FILE)

    def penalty(self, ctx: TaskContext) -> torch.Tensor | None:
        if not ctx.extra.get("ewc"):
            return None
        fisher, anchor = ctx.extra["ewc"]
        return ewc_penalty(self.tensors(ctx), anchor, fisher, self.params.ewc_weight)

    def _fisher_update(self, ctx: TaskContext, progress) -> None:
        p = self.params
        iters = phase_iterations(ctx, p.consolidation_ratio)
        dc = dict(k=p.k, delta=p.delta, tau=p.tau) if self.use_dc else {}
        f_n = fisher_phase(ctx, self.tensors(ctx), iters, self.use_dc, progress=progress, **dc)
        ctx.extra["fisher"] = online_fisher(ctx.extra.get("fisher_prev"), {k: v.cpu() for k, v in f_n.items()}, p.fisher_decay)


class LoraEwc(EwcMixin, Method):
    name = "lora-ewc"
    summary = "one LoRA + online EWC penalty, Fisher from the denoising loss (000's LoRA EWC)"
    Params = EwcParams


class EwcDc(LoraEwc):
    name = "ewc-dc"
    summary = "one LoRA + online EWC whose Fisher uses DC scores over k concepts (000's EWC DC, Algo 2)"
    Params = EwcDcParams
    use_dc = True
