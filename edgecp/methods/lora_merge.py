"""LoRA merge (paper 000's baseline; task arithmetic, Ilharco et al. 2023): one LoRA per task, each trained from
the base, the model is base + sum_i w_i Delta_i with equal weights.

"Equal weights" is w_i = 1/n by default (the mean of the task vectors); a number gives the task-arithmetic
scaling lambda for every task instead. The merged model is stored as one LoRA of rank n*r (A's stacked, B's scaled
by w_i side by side), so inference and export need nothing special.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.methods.base import Method, TaskContext
from edgecp.methods.clora import previous_manifest
from edgecp.personal import ADAPTER_FILE, read_tensors


@dataclass(frozen=True)
class LoraMergeParams:
    weights: str | float = "mean"  # "mean": w_i = 1/n; a number: w_i = lambda for every task

    def __post_init__(self) -> None:
        if self.weights != "mean" and not isinstance(self.weights, (int, float)):
            raise EdgecpError(f"lora-merge weights '{self.weights}' must be 'mean' or a number such as 1.0")


class LoraMerge(Method):
    name = "lora-merge"
    summary = ("trains a separate adapter per concept from the base and averages them: no extra training, but the "
               "store grows with each concept and concepts can blur into each other")
    paper = "000 LoRA merge (task arithmetic)"
    Params = LoraMergeParams

    def _weights(self, n: int) -> list[float]:
        return [1.0 / n] * n if self.params.weights == "mean" else [float(self.params.weights)] * n

    def prepare(self, ctx: TaskContext) -> None:
        prev = read_tensors(ctx.prev_dir, ADAPTER_FILE)
        ctx.extra["tasks"] = (lora.split_lora(prev, self.adapter.rank, previous_manifest(ctx).get("merge_weights"))
                              if prev else [])
        lora.attach(ctx.comps.unet, self.adapter, seed=ctx.train.seed + ctx.index)  # trained from the base
        lora.set_trainable(ctx.comps.unet, True)

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        tasks = ctx.extra["tasks"] + [lora.adapter_state(ctx.comps.unet)]
        return {ADAPTER_FILE: lora.concat_loras(tasks, self._weights(len(tasks)))}

    def manifest_extra(self, ctx: TaskContext) -> dict:
        n = len(ctx.extra["tasks"]) + 1
        return {"adapter_rank": self.adapter.rank * n, "merge_weights": self._weights(n)}

    removal = "exact"

    def remove_concept(self, files: dict[str, dict[str, torch.Tensor]], position: int, manifest: dict) -> dict:
        """Drop the concept's task LoRA and re-weight the rest as a store that learned only them would (1/(n-1))."""
        tasks = lora.tasks_without(files.get(ADAPTER_FILE) or {}, self.adapter.rank, len(manifest["concepts"]), position,
                                   manifest.get("merge_weights"))
        if not tasks:
            files.pop(ADAPTER_FILE, None)
            return {"adapter_rank": None, "merge_weights": []}
        files[ADAPTER_FILE] = lora.concat_loras(tasks, self._weights(len(tasks)))
        return {"adapter_rank": self.adapter.rank * len(tasks), "merge_weights": self._weights(len(tasks))}
