"""EWC on the one LoRA carried from task to task (paper 000 Sec. 3.1): LoRA EWC and EWC DC.

Task n trains with the penalty lambda * sum F (theta - theta*)^2 (F, theta* from task n-1), then the Fisher phase
(Algo 2) computes F_n on D_n (plain denoising loss, or Eq. 5 with DC scores) and online EWC updates F as a running
average over tasks (App. I).

Scale-free weight (edgecp's choice; 000 gives the absolute lambda = 1e6, calibrated on SD 1.4). The task loss is a
per-element mean squared error, so the squared gradients that make the Fisher shrink with the latent size D and the
batch, and grow with the loss level: the same lambda is ~1000x too strong on the tiny base. Read as a Gaussian
likelihood (000's loss is the negative log-likelihood of eps up to the scale sigma^2 = the loss level L), the
per-image Fisher is b * D / L times the empirical Fisher of a b-image mean loss (b = the effective batch, in the
noise-dominated regime). edgecp stores that normalised Fisher F~ = F * b * D / L (L measured in the same Fisher
phase) and trains with `ewc_strength * sum F~ (theta - theta*)^2`, in units of the task loss. At SD 1.4 scale
(b = 8, D = 4*64*64, L ~ 0.1 [not measured here]) lambda = 1e6 is ewc_strength ~ 0.8. `ewc_weight` (absolute, e.g.
the paper's 1e6) replaces the normalisation when set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgecp.consolidation.dc_scores import REDUCTIONS
from edgecp.consolidation.ewc import ewc_penalty, online_fisher
from edgecp.errors import EdgecpError
from edgecp.methods.base import Method, TaskContext
from edgecp.methods.clora import previous_manifest
from edgecp.methods.phases import effective_batch, fisher_phase, latent_elements, phase_iterations
from edgecp.personal import ADAPTER_FILE, read_tensors, to_host

FISHER_FILE = "fisher.safetensors"
EWC_STRENGTH = 10.0  # the scale-free default, chosen on the procedural sequence (docs/architecture.md, "EWC strength")


@dataclass(frozen=True)
class EwcParams:
    ewc_strength: float = EWC_STRENGTH  # scale-free weight on the normalised Fisher (module docstring)
    ewc_weight: float | None = None  # absolute lambda_ewc on the raw Fisher (000 App. H: 1e6); replaces the strength
    fisher_update: str = "mean"  # online EWC across tasks: "mean" (running average, 000 App. I) or "sum"
    fisher_decay: float = 1.0  # with fisher_update="sum": F <- decay * F + F_n (Schwarz et al. 2018)
    consolidation_ratio: float = 0.2  # Fisher iterations = 0.2 x training iterations (App. H.2.1)

    def __post_init__(self) -> None:
        if self.fisher_update not in ("mean", "sum"):
            raise EdgecpError(f"fisher_update '{self.fisher_update}' is unknown: use -p fisher_update=mean (000's "
                              "running average) or sum")
        if self.ewc_strength < 0 or (self.ewc_weight is not None and self.ewc_weight < 0):
            raise EdgecpError(f"EWC weights must be >= 0 (ewc_strength={self.ewc_strength}, ewc_weight={self.ewc_weight})")


def check_reduction(value: str, name: str = "dc_reduction") -> None:
    if value not in REDUCTIONS:
        raise EdgecpError(f"{name} '{value}' is unknown: use -p {name}=sum (the paper's squared norm) or mean")


@dataclass(frozen=True)
class EwcDcParams(EwcParams):
    k: int = 5  # |S|: c_0, c_n and k-2 previous concepts (Sec. 3.1)
    delta: float = 0.5  # weight of the DC cross-entropy term in Eq. 5 (App. H.2.2)
    tau: float = 1.0  # DC temperature
    dc_reduction: str = "mean"  # DC errors: per-element mean, or Eq. 3's squared norm ("sum"); docs/architecture.md

    def __post_init__(self) -> None:
        super().__post_init__()
        check_reduction(self.dc_reduction)


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

    def held_bytes(self, n_previous: int) -> float:
        return super().held_bytes(n_previous) + (8.0 if n_previous else 0.0)  # the anchor and the Fisher, fp32

    def _load_ewc(self, ctx: TaskContext) -> None:
        fisher = read_tensors(ctx.prev_dir, FISHER_FILE)
        anchor = self.anchor(ctx)
        ctx.extra["fisher_prev"] = fisher
        ctx.extra["fisher_tasks"] = (previous_manifest(ctx).get("ewc") or {}).get("tasks", len(ctx.previous))
        live = {k: p.device for k, p in self.tensors(ctx).items()}  # the device, or host memory (HostLinear)
        ctx.extra["ewc"] = ({k: v.to(live.get(k, ctx.device)) for k, v in fisher.items()},
                            {k: v.to(live.get(k, ctx.device)) for k, v in anchor.items()}) if fisher else None

    def anchor(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """theta*: the trained tensors as the previous task left them (the previous version's adapter)."""
        return read_tensors(ctx.prev_dir, ADAPTER_FILE)

    def penalty(self, ctx: TaskContext) -> torch.Tensor | None:
        if not ctx.extra.get("ewc"):
            return None
        fisher, anchor = ctx.extra["ewc"]
        return ewc_penalty(self.tensors(ctx), anchor, fisher, self._weight())

    def _weight(self) -> float:
        p = self.params
        return p.ewc_weight if p.ewc_weight is not None else p.ewc_strength

    def _fisher_update(self, ctx: TaskContext, progress) -> None:
        p = self.params
        iters = phase_iterations(ctx, p.consolidation_ratio)
        dc = dict(k=p.k, delta=p.delta, tau=p.tau, reduction=p.dc_reduction) if self.use_dc else {}
        f_n = fisher_phase(ctx, self.tensors(ctx), iters, self.use_dc, progress=progress, **dc)
        loss = max(ctx.extra["fisher_loss"], 1e-12)
        scale = 1.0 if p.ewc_weight is not None else effective_batch(ctx) * latent_elements(ctx) / loss
        f_n = {k: v * scale for k, v in to_host(f_n).items()}  # CPU: combined with the stored Fisher
        ctx.extra["fisher"] = online_fisher(ctx.extra.get("fisher_prev"), f_n, p.fisher_decay, p.fisher_update,
                                            ctx.extra.get("fisher_tasks", 0))
        ctx.extra["ewc_info"] = {"tasks": ctx.extra.get("fisher_tasks", 0) + 1, "update": p.fisher_update,
                                 "fisher": "raw" if p.ewc_weight is not None else "normalised",
                                 "loss": round(loss, 6), "scale": scale}

    def manifest_extra(self, ctx: TaskContext) -> dict:
        return {**super().manifest_extra(ctx), "ewc": ctx.extra["ewc_info"]}


class LoraEwc(EwcMixin, Method):
    name = "lora-ewc"
    summary = ("one adapter, held back where earlier concepts need its weights (EWC): an extra pass of 1/5 of the "
               "training steps, and one more adapter-sized file")
    paper = "000 LoRA EWC"
    Params = EwcParams


class EwcDc(LoraEwc):
    name = "ewc-dc"
    summary = ("lora-ewc, but it finds what earlier concepts need by checking that the model still tells them apart "
               "(DC scores): the same extra pass, heavier")
    paper = "000 EWC DC (Algo 2)"
    Params = EwcDcParams
    use_dc = True
