"""The one interface every continual strategy implements, so that `add_concept` has one loop.

Life of task n (see docs/architecture.md):
    method.prepare(ctx)          initialise this task's trainable state (continue / re-init / orthogonal ...)
    loop: loss = denoise(D_n, c_n) + w * denoise(prior, c_0) + method.penalty(ctx)
    method.consolidate(ctx)      phases after training (DSC, Fisher update, merge, MagMax ...)
    method.files(ctx)            what the version stores, as named safetensors
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from edgecp.adapters import lora
from edgecp.config import AdapterConfig, TrainConfig, replace
from edgecp.diffusion import LatentSet
from edgecp.model.base import Components
from edgecp.model.quant import Precision, precision_of
from edgecp.model.shape import base_shape
from edgecp.personal import ADAPTER_FILE, DELTA_FILE, fold_base_delta, read_tensors
from edgecp.planner import BaseShape
from edgecp.progress import Progress


@dataclass
class TaskContext:
    """Everything a method may read or change while concept n is learned."""

    index: int  # n, 1-based
    name: str
    token: str
    class_word: str | None
    prompt: str  # c_n, e.g. "a photo of a <my-dog> dog"
    prior_prompt: str  # c_0
    previous: list[dict]  # committed concepts c_1..c_{n-1} (manifest entries)
    prev_dir: Path  # the version this task starts from
    train: TrainConfig
    comps: Components
    device: torch.device
    noise_scheduler: object = None  # the DDPM training scheduler
    token_row: torch.nn.Parameter | None = None
    instance: LatentSet | None = None
    prior: LatentSet | None = None
    extra: dict = field(default_factory=dict)  # method scratch space
    plan: object = None  # the memory plan (edgecp.planner.Plan): precision, checkpointing, micro-batch, DC chunk




@dataclass(frozen=True)
class NoParams:
    pass


class Method:
    """Base class: LoRA sequential behaviour (continue the previous adapter, no penalty, no consolidation)."""

    name: ClassVar[str] = ""
    # what the method does and costs, in plain words, for `edgecp methods`; `paper`: the paper's name for it
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    adapter_kind: ClassVar[str] = "lora"  # the adapter the method requires
    default_rank: ClassVar[int] = 16
    # how `edgecp remove-concept` can take a concept out: "exact" when the method stores each concept's contribution
    # apart (remove_concept below rebuilds the model without it); "token-only" when one state mixes all concepts
    removal: ClassVar[str] = "token-only"
    # paper 000's evaluation prompt is "a photo of a V*"; "for CD and TI, we additionally include the concept name"
    bench_class_word: ClassVar[bool] = False
    # whether the method reads the prior images itself (then they are drawn even with prior_weight 0)
    needs_prior_images: ClassVar[bool] = False
    # whether the method trains its adapted layers' base weights (Custom Diffusion, CNS): they then stay fp32 in
    # 16/8-bit plans; the methods that fold adapters into them say what through `base_changes`
    trains_base: ClassVar[bool] = False

    def __init__(self, params, adapter: AdapterConfig):
        self.params = params
        self.adapter = adapter

    def manifest_extra(self, ctx: TaskContext) -> dict:
        """Extra manifest entries of the version (e.g. the effective adapter rank)."""
        return {}

    def base_changes(self, prev_dir: Path | None) -> dict[str, torch.Tensor]:
        """What this task starts from on top of the base weights: state-dict key (module.weight) -> fp32 delta, from
        the previous version `prev_dir` (its base_delta; C-LoRA and MagMax: the LoRAs they fold in). `edgecp.train`
        passes them to the loader, which folds them in fp32 before the plan's cast (`quant.load_planned`); `prepare`
        then folds whatever the loader did not."""
        return read_tensors(prev_dir, DELTA_FILE) if prev_dir else {}

    def prepare(self, ctx: TaskContext) -> None:
        """Fold earlier changes of base weights (if the method makes any), then continue the previous adapter."""
        ctx.extra["base_delta"] = fold_base_delta(ctx.comps.unet, ctx.prev_dir)
        lora.attach(ctx.comps.unet, self.adapter, seed=ctx.train.seed + ctx.index)
        prev = read_tensors(ctx.prev_dir, ADAPTER_FILE)
        if prev:
            lora.load_adapter_state(ctx.comps.unet, prev)
        lora.set_trainable(ctx.comps.unet, True)

    def tensors(self, ctx: TaskContext) -> dict[str, torch.nn.Parameter]:
        """The UNet tensors this method trains (the adapter's by default), by state-dict key."""
        return lora.adapter_parameters(ctx.comps.unet)

    def n_trainable(self, ctx: TaskContext) -> int:
        """How many UNet numbers a task trains (the paper's N_param Train, before dividing by the UNet size)."""
        return sum(p.numel() for p in self.tensors(ctx).values())

    def param_groups(self, ctx: TaskContext) -> list[dict]:
        groups = [{"params": list(self.tensors(ctx).values()), "lr": ctx.train.lr}] if self.tensors(ctx) else []
        if ctx.token_row is not None and ctx.train.token_lr > 0:
            groups.append({"params": [ctx.token_row], "lr": ctx.train.token_lr, "weight_decay": 0.0})
        return groups

    def penalty(self, ctx: TaskContext) -> torch.Tensor | None:
        return None

    # -- what the memory planner needs (edgecp/planner.py), without a model ------------------------------------
    def phase_rows(self, n_previous: int) -> dict[str, int]:
        """UNet rows per training image in one call of each phase (train: the instance and its prior row)."""
        return {"train": 2}

    def trainable_numbers(self, target_in_out: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        """(adapter numbers, base weights) a task trains, from the (in, out) of each target layer."""
        r = self.adapter.rank
        if self.adapter_kind == "vera":
            return sum(o + r for _, o in target_in_out), 0
        if self.adapter_kind == "lora":
            return sum(r * (i + o) for i, o in target_in_out), 0
        return 0, 0

    def adapted_layers(self) -> tuple[str, ...]:
        """UNet layers the method adapts or trains: never 8-bit in a plan (peft wraps a plain nn.Linear)."""
        return () if self.adapter_kind == "none" else tuple(self.adapter.targets)

    def keep_full_precision(self) -> tuple[str, ...]:
        """UNet layers whose base weights stay fp32 in a 16/8-bit plan: the adapted layers when the method trains
        their base weights (`trains_base`), where a 16-bit weight would round a small update away. Otherwise a frozen
        target is held in the plan's 16-bit dtype, which autocast casts it to at every call anyway; the methods that
        fold adapters into it have them folded in fp32 while the base loads (`base_changes`, model/quant.py)."""
        return self.adapted_layers() if self.trains_base else ()

    def precision(self, plan) -> Precision:
        """How a memory plan holds the frozen base for this method (model/quant.py); with `plan.host_trained` the
        base weights the method trains stay in host memory (model/host.HostLinear)."""
        host = self.keep_full_precision() if getattr(plan, "host_trained", False) else ()
        return replace(precision_of(plan), keep=self.keep_full_precision(), plain=self.adapted_layers(), host=host)

    def held_bytes(self, n_previous: int) -> float:
        """Bytes per trained number the method holds during training beside the number itself, its gradient and
        AdamW's two moments (planner.Workload.held_per_number): 0 here; the start copy of Custom Diffusion and CNS,
        EWC's anchor and Fisher, CNS's masks in the subclasses."""
        return 0.0

    def base_shape(self, spec) -> BaseShape:
        """The base's shape as the planner counts it for this method: its adapted layers, fp32 or not."""
        return base_shape(spec, self.adapted_layers(), bool(self.keep_full_precision()))

    def consolidate(self, ctx: TaskContext, progress: Progress | None = None) -> None:
        return None

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        return {ADAPTER_FILE: lora.adapter_state(ctx.comps.unet)}

    def remove_concept(self, files: dict[str, dict[str, torch.Tensor]], position: int, manifest: dict) -> dict:
        """Take concept `position` (0-based in the manifest's concepts) out of a version's tensor files, in place
        (the token is removed by the caller); return manifest entries to update. Default: the method keeps one
        state that mixes every concept, which cannot be separated, so nothing but the token goes."""
        return {}
