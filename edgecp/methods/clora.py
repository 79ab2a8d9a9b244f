"""C-LoRA (Smith et al. 2024b; paper 000 Eq. 2): a new LoRA per task, earlier LoRAs frozen into the weights,
the new one penalised for writing where the earlier ones already did.

The weight of Eq. 2 (000 App. H: 1e8, after the C-LoRA authors) is calibrated to SD's layer sizes and LoRA
magnitudes: L_forget is of fourth order in the weights. edgecp's default is scale-free (consolidation/clora.py,
`relative_penalty`): `strength` x the task's starting loss x L_forget / sum |occ|^4. `weight` (absolute, e.g. 1e8)
replaces it when set.

W_n = W_init + sum_{n'<n} A_n' B_n' + A_n B_n. The version stores all task LoRAs as ONE LoRA whose rank is the
sum of theirs (A's stacked, B's side by side): the same model for inference and export, and the per-task LoRAs
are recovered by slicing. |sum of earlier deltas| is computed once per task, so a penalty evaluation costs the
same with 2 or 50 earlier tasks (the paper's implementation recomputes it and grows with the task count).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from edgecp.adapters import lora
from edgecp.consolidation.clora import clora_penalty, occupied_norm, relative_penalty
from edgecp.methods.base import Method, TaskContext
from edgecp.methods.phases import reference_loss
from edgecp.personal import ADAPTER_FILE, read_tensors

CLORA_STRENGTH = 0.1  # the scale-free default, chosen on the procedural sequence (docs/architecture.md)


@dataclass(frozen=True)
class CLoraParams:
    strength: float = CLORA_STRENGTH  # scale-free coefficient of L_forget (module docstring)
    weight: float | None = None  # absolute coefficient of L_forget (000 App. H: 1e8); replaces `strength` when set


def previous_manifest(ctx: TaskContext) -> dict:
    return json.loads((ctx.prev_dir / "manifest.json").read_text())


class CLora(Method):
    name = "c-lora"
    summary = ("a new adapter per concept, penalised where earlier ones changed the model: a little extra work per "
               "step, and the store grows with each concept")
    paper = "000 C-LoRA (Eq. 2)"
    Params = CLoraParams

    def previous_tasks(self, prev_dir) -> list[dict[str, torch.Tensor]]:
        prev = read_tensors(prev_dir, ADAPTER_FILE) if prev_dir else {}
        return lora.split_lora(prev, self.adapter.rank) if prev else []

    def summed(self, tasks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """module -> the earlier tasks' summed LoRA delta (what this task starts from)."""
        return lora.lora_delta(lora.concat_loras(tasks, [1.0] * len(tasks)), self.adapter.alpha / self.adapter.rank)

    def base_changes(self, prev_dir) -> dict[str, torch.Tensor]:
        tasks = self.previous_tasks(prev_dir)
        return lora.weight_deltas(self.summed(tasks)) if tasks else {}

    def prepare(self, ctx: TaskContext) -> None:
        unet = ctx.comps.unet
        tasks = self.previous_tasks(ctx.prev_dir)
        if tasks:
            summed = self.summed(tasks)
            lora.fold_into_base(unet, summed)  # what the loader has not folded
            ctx.extra["occupied"] = {m: d.abs().to(ctx.device) for m, d in summed.items()}
            ctx.extra["occupied_norm"] = occupied_norm(ctx.extra["occupied"])
        ctx.extra["tasks"] = tasks
        lora.attach(unet, self.adapter, seed=ctx.train.seed + ctx.index)
        lora.set_trainable(unet, True)
        if tasks and self.params.weight is None:
            ctx.extra["loss_ref"] = reference_loss(ctx)  # B = 0: the model as the previous task left it

    def penalty(self, ctx: TaskContext) -> torch.Tensor | None:
        occupied = ctx.extra.get("occupied")
        if not occupied:
            return None
        p = lora.adapter_parameters(ctx.comps.unet)
        s = self.adapter.alpha / self.adapter.rank
        deltas = {m: s * p[f"{m}.lora_B.weight"] @ p[f"{m}.lora_A.weight"] for m in occupied}
        if self.params.weight is not None:
            return clora_penalty(occupied, deltas, self.params.weight)
        return relative_penalty(occupied, deltas, self.params.strength, ctx.extra["loss_ref"], ctx.extra["occupied_norm"])

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        tasks = ctx.extra["tasks"] + [lora.adapter_state(ctx.comps.unet)]
        return {ADAPTER_FILE: lora.concat_loras(tasks, [1.0] * len(tasks))}

    def manifest_extra(self, ctx: TaskContext) -> dict:
        extra = {"adapter_rank": self.adapter.rank * (len(ctx.extra["tasks"]) + 1)}
        if "loss_ref" in ctx.extra:
            extra["loss_ref"] = round(ctx.extra["loss_ref"], 6)
        return extra

    removal = "exact"

    def remove_concept(self, files: dict[str, dict[str, torch.Tensor]], position: int, manifest: dict) -> dict:
        """Drop the concept's LoRA factors: W = W_init + the other tasks' A B. The later tasks' factors stay as they
        were trained (with the removed one folded in and penalised against); they are not retrained."""
        tasks = lora.tasks_without(files.get(ADAPTER_FILE) or {}, self.adapter.rank, len(manifest["concepts"]), position)
        if not tasks:
            files.pop(ADAPTER_FILE, None)
            return {"adapter_rank": None}
        files[ADAPTER_FILE] = lora.concat_loras(tasks, [1.0] * len(tasks))
        return {"adapter_rank": self.adapter.rank * len(tasks)}
