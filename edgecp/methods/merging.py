"""Paper 001's merging strategies: merge & re-init, merge & orthogonal init, magnitude-based selection (MagMax).

Merge & (orthogonal) init change the base weights after every task; the version keeps only the changed tensors
(`base_delta.safetensors`: module.weight -> W - W_base, the attention K/V projections) and every consumer
(training, generation, export) folds them into the base like any adapter.
"""

from __future__ import annotations

import torch

from edgecp.adapters import lora
from edgecp.consolidation.merge import magmax, orthogonal_rows
from edgecp.methods.base import Method, TaskContext
from edgecp.personal import ADAPTER_FILE, DELTA_FILE, fold_base_delta, read_tensors

ACCUMULATED_A_FILE = "accumulated_a.safetensors"


def add_deltas(base: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in base.items()}
    for k, v in new.items():
        out[k] = out[k] + v if k in out else v.clone()
    return out


def lora_weight_deltas(unet, scaling: float) -> dict[str, torch.Tensor]:
    """module.weight -> scaling * B A of the live LoRA (the keys of the base weights it would merge into)."""
    return {f"{m}.weight": d for m, d in lora.lora_delta(lora.adapter_state(unet), scaling).items()}  # CPU tensors


class MergeReinit(Method):
    name = "merge-reinit"
    summary = ("folds each concept's adapter into the model and starts a fresh one for the next: no extra training, "
               "files of a fixed size")
    paper = "001 merge & initialization"

    def prepare(self, ctx: TaskContext) -> None:
        ctx.extra["base_delta"] = fold_base_delta(ctx.comps.unet, ctx.prev_dir)
        lora.attach(ctx.comps.unet, self.adapter, seed=ctx.train.seed + ctx.index)  # A ~ init, B = 0
        lora.set_trainable(ctx.comps.unet, True)

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        scaling = self.adapter.alpha / self.adapter.rank
        return {DELTA_FILE: add_deltas(ctx.extra["base_delta"], lora_weight_deltas(ctx.comps.unet, scaling))}


class MergeOrthogonal(MergeReinit):
    name = "merge-orthogonal"
    summary = ("merge-reinit, each new adapter started in directions the earlier ones did not use: no extra "
               "training")
    paper = "001 merge & orthogonal initialization"

    def prepare(self, ctx: TaskContext) -> None:
        super().prepare(ctx)
        acc = read_tensors(ctx.prev_dir, ACCUMULATED_A_FILE)
        ctx.extra["accumulated_a"] = acc
        if acc:
            params = lora.adapter_parameters(ctx.comps.unet)
            with torch.no_grad():
                for m, a_acc in acc.items():
                    a = params[f"{m}.lora_A.weight"]
                    a.copy_(orthogonal_rows(a_acc.to(a), a))

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        state = lora.adapter_state(ctx.comps.unet)
        new_a = {m: state[f"{m}.lora_A.weight"] for m in lora.lora_modules(state)}
        return {**super().files(ctx), ACCUMULATED_A_FILE: add_deltas(ctx.extra["accumulated_a"], new_a)}


class MagMax(Method):
    name = "magmax"
    summary = ("a fresh adapter per concept, then, weight by weight, the larger of the old and the new value is "
               "kept: no extra training")
    paper = "001 MagMax (magnitude-based selection)"

    def base_changes(self, prev_dir) -> dict[str, torch.Tensor]:
        selected = read_tensors(prev_dir, ADAPTER_FILE) if prev_dir else {}
        return lora.weight_deltas(lora.lora_delta(selected, self.adapter.alpha / self.adapter.rank)) if selected else {}

    def prepare(self, ctx: TaskContext) -> None:
        selected = read_tensors(ctx.prev_dir, ADAPTER_FILE)
        ctx.extra["selected"] = selected
        if selected:  # "temporarily merged into the frozen base model" (by the loader, in fp32, where it ran)
            lora.fold_into_base(ctx.comps.unet, lora.lora_delta(selected, self.adapter.alpha / self.adapter.rank))
        lora.attach(ctx.comps.unet, self.adapter, seed=ctx.train.seed + ctx.index)
        lora.set_trainable(ctx.comps.unet, True)

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        new = lora.adapter_state(ctx.comps.unet)
        sel = ctx.extra["selected"]
        return {ADAPTER_FILE: {k: magmax(sel[k], v) if k in sel else v for k, v in new.items()}}
