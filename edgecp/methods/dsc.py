"""Diffusion scores consolidation (paper 000 Sec. 3.2, Algo 3) alone and in the Algo 4 workflow with EWC.

After training task n >= 2, the adapter is distilled from two teachers: a frozen copy of itself (theta_n) and
theta_j drawn anew each iteration from the pool of the consolidated adapters of all previous tasks. The pool is
stored in the version (teachers.safetensors), one adapter per task.

DSC EWC [DC] (Algo 4): train with the EWC penalty -> DSC -> theta_n <- student -> Fisher update -> commit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgecp.adapters import lora
from edgecp.methods.base import Method, TaskContext
from edgecp.methods.ewc import EwcDcParams, EwcMixin, EwcParams, check_reduction
from edgecp.methods.phases import dsc_phase, phase_iterations
from edgecp.personal import join_tasks, read_tensors, split_tasks

TEACHERS_FILE = "teachers.safetensors"


@dataclass(frozen=True)
class DscParams:
    gamma: float = 0.1  # weight of the DC-score cross-entropies (App. H.2.3)
    lam: float = 1.5  # weight of the noise-prediction MSEs (App. H.2.3)
    tau_teacher: float = 0.05  # teachers' DC temperature: low-entropy targets
    tau_student: float = 1.0
    consolidation_ratio: float = 0.2  # DSC iterations = 0.2 x training iterations (App. H.2.1)
    # DC errors of the student (and of EWC DC's Eq. 5): per-element mean ("mean") or Eq. 3's squared norm ("sum");
    # the teachers' errors: "sum", so that their scores are the low-entropy targets 000 asks for (docs/architecture.md,
    # "DC-score reduction"); None: the same as dc_reduction
    dc_reduction: str = "mean"
    teacher_reduction: str | None = "sum"
    # DSC's noise-matching terms: Eq. 6's squared norm ("sum") or the per-element mean ("mean")
    mse_reduction: str = "mean"

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # the EWC checks, in DSC EWC [DC]
            parent()
        check_reduction(self.dc_reduction)
        if self.teacher_reduction is not None:
            check_reduction(self.teacher_reduction, "teacher_reduction")
        check_reduction(self.mse_reduction, "mse_reduction")


@dataclass(frozen=True)
class DscEwcParams(DscParams, EwcParams):
    pass


@dataclass(frozen=True)
class DscEwcDcParams(DscParams, EwcDcParams):
    pass


def read_pool(version_dir) -> list[dict[str, torch.Tensor]]:
    return split_tasks(read_tensors(version_dir, TEACHERS_FILE))[0]


def write_pool(pool: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return join_tasks(pool)


class Dsc(Method):
    name = "dsc"
    summary = ("one adapter, after each concept distilled towards itself and a copy kept from an earlier concept: an "
               "extra pass of 1/5 of the training steps, and a stored adapter copy per concept")
    paper = "000 DSC (Algo 3)"
    Params = DscParams

    def prepare(self, ctx: TaskContext) -> None:
        super().prepare(ctx)
        ctx.extra["pool"] = read_pool(ctx.prev_dir)

    def consolidate(self, ctx: TaskContext, progress=None) -> None:
        pool = ctx.extra["pool"]
        if pool:  # task n >= 2
            dsc_phase(ctx, pool, phase_iterations(ctx, self.params.consolidation_ratio), gamma=self.params.gamma,
                      lam=self.params.lam, tau_teacher=self.params.tau_teacher, tau_student=self.params.tau_student,
                      progress=progress, reduction=self.params.dc_reduction,
                      teacher_reduction=self.params.teacher_reduction or self.params.dc_reduction,
                      mse_reduction=self.params.mse_reduction)

    def phase_rows(self, n_previous: int) -> dict[str, int]:
        return {**super().phase_rows(n_previous), **({"dsc": 3} if n_previous else {})}  # S = {c_0, c_n, c_j}

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        theta_n = lora.adapter_state(ctx.comps.unet)
        return {**super().files(ctx), TEACHERS_FILE: write_pool(ctx.extra["pool"] + [theta_n])}

    def remove_concept(self, files: dict[str, dict[str, torch.Tensor]], position: int, manifest: dict) -> dict:
        """The concept's teacher-pool entry goes exactly (later DSC phases never draw it); the one adapter trained
        through every task keeps its traces (token-only for the model itself)."""
        flat = files.get(TEACHERS_FILE)
        if flat:
            pool = split_tasks(flat)[0]
            if position < len(pool):
                del pool[position]
            if pool:
                files[TEACHERS_FILE] = write_pool(pool)
            else:
                files.pop(TEACHERS_FILE)
        return super().remove_concept(files, position, manifest)


class DscEwc(EwcMixin, Dsc):
    name = "dsc-ewc"
    summary = "dsc and lora-ewc together: two extra passes of 1/5 of the training steps, an adapter copy per concept"
    paper = "000 Algo 4 with the denoising-loss Fisher"
    Params = DscEwcParams


class DscEwcDc(EwcMixin, Dsc):
    name = "dsc-ewc-dc"
    summary = ("the default: dsc and ewc-dc together, the DC-score paper's own method; about twice lora-sequential's "
               "training time on the tiny bench, and an adapter copy per concept")
    paper = "000's full method (Algo 4)"
    Params = DscEwcDcParams
    use_dc = True
