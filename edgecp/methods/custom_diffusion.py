"""Custom Diffusion (Kumari et al. 2023) as paper 000 runs it sequentially, and CD EWC.

The cross-attention K and V projections (attn2.to_k / to_v, full matrices) and the concept token are trained,
task after task, from the weights the previous task left. The version stores only those changed tensors
(base_delta: W - W_base). Paper 000 App. H: lr 5e-6 for the non-LoRA methods. CD EWC adds the online EWC
penalty on the K/V weights, Fisher from the denoising loss ("a sequentially trained variant of CD").
"""

from __future__ import annotations

import torch

from edgecp.methods.base import Method, TaskContext
from edgecp.methods.ewc import EwcMixin, EwcParams
from edgecp.personal import DELTA_FILE, fold_base_delta

KV_TARGETS = ("attn2.to_k", "attn2.to_v")


def kv_weights(unet, targets: tuple[str, ...] = KV_TARGETS) -> dict[str, torch.nn.Parameter]:
    """module.weight -> Parameter of every cross-attention K/V projection."""
    return {f"{name}.weight": m.weight for name, m in unet.named_modules()
            if any(name.endswith(t) for t in targets) and isinstance(m, torch.nn.Linear)}


class CustomDiffusion(Method):
    name = "custom-diffusion"
    summary = "train the cross-attention K/V projections + token, sequentially (000's Custom Diffusion baseline)"
    adapter_kind = "none"

    @classmethod
    def train_defaults(cls, tiny: bool) -> dict:
        return {"lr": 1e-4} if tiny else {"lr": 5e-6}

    def prepare(self, ctx: TaskContext) -> None:
        ctx.extra["base_delta"] = fold_base_delta(ctx.comps.unet, ctx.prev_dir)
        params = kv_weights(ctx.comps.unet)
        ctx.extra["start"] = {k: p.detach().clone() for k, p in params.items()}  # W after task n-1
        for p in params.values():
            p.requires_grad_(True)

    def tensors(self, ctx: TaskContext) -> dict[str, torch.nn.Parameter]:
        return kv_weights(ctx.comps.unet)

    def trainable_numbers(self, target_in_out: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        return 0, sum(i * o for i, o in target_in_out)  # the full K/V matrices

    def keep_full_precision(self) -> tuple[str, ...]:
        return KV_TARGETS

    def weight_deltas(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """The cumulative change of every trained tensor since the base: earlier tasks + this one."""
        start, base = ctx.extra["start"], ctx.extra["base_delta"]
        return {k: (base[k].to(p) if k in base else 0) + (p.detach() - start[k]) for k, p in self.tensors(ctx).items()}

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        return {DELTA_FILE: {k: v.cpu() for k, v in self.weight_deltas(ctx).items()}}


class CdEwc(EwcMixin, CustomDiffusion):
    name = "cd-ewc"
    summary = "sequential Custom Diffusion + online EWC on the K/V weights (000's CD EWC baseline)"
    Params = EwcParams

    def anchor(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        return ctx.extra["start"]  # the K/V weights the previous task left

