"""Custom Diffusion (Kumari et al. 2023) as paper 000 compares it: the paper's CD, its sequential variant, CD EWC.

All three train the cross-attention K and V projections (attn2.to_k / to_v, full matrices) and the concept token;
000 App. H: lr 5e-6 for the non-LoRA methods.

- `custom-diffusion` (000's "CD"): "the best performing variant of Kumari et al. that trains separate KV parameters
  per task and then merges them into a single model using a constrained optimization objective". Each task trains
  K/V from the base; then every layer is merged by Kumari et al.'s closed form (consolidation/merge.py) over all
  concepts so far (from the second concept on; the first concept's model is its fine-tuned K/V, as Kumari et al.
  use a single concept's). The version keeps, per concept, only what the merge needs: T_i = (W_i - W0) C_i^T and the
  concept's text features C_i, plus the regulariser covariance R (shared); and the merged change W - W0 as
  base_delta, so inference and export see one model. Regulariser features (Kumari et al.: 1000 LAION captions):
  edgecp uses the 100 diverse prompts of `GENERAL_PROMPTS` and the prior prompt (no captions ship with edgecp).
  Text features of a prompt: the text encoder's output rows from BOS to EOT (the K/V inputs that prompt produces).
- `custom-diffusion-sequential`: K/V trained task after task from the weights the previous task left, no merge.
- `cd-ewc`: the sequential variant + online EWC on K/V ("a sequentially trained variant of CD", 000).
"""

from __future__ import annotations

import torch

from edgecp.consolidation.merge import constrained_merge, merge_targets, regulariser_covariance
from edgecp.errors import EdgecpError
from edgecp.methods.base import Method, TaskContext
from edgecp.methods.ewc import EwcMixin, EwcParams
from edgecp.methods.phases import autocast, concept_texts
from edgecp.personal import (
    DELTA_FILE,
    KV,
    encode_text,
    fold_base_delta,
    join_tasks,
    read_tensors,
    split_tasks,
    to_host,
)
from edgecp.progress import emit

KV_TARGETS = KV
CD_FILE = "cd_merge.safetensors"  # per concept: T_i of every K/V layer and C_i; the regulariser covariance

_SUBJECTS = ["a dog", "a city street", "a bowl of fruit", "a mountain lake", "an old car", "a child", "a forest",
             "a cup of coffee", "a sailing boat", "a bird"]
_SETTINGS = ["at sunset", "in the rain", "in a watercolor painting", "on a white background", "at night",
             "in winter", "seen from above", "in a busy market", "in black and white", "on a sunny beach"]
GENERAL_PROMPTS = [f"{s} {t}" for s in _SUBJECTS for t in _SETTINGS]  # 100 diverse descriptions
# Prompts per text-encoder call for the regulariser (our choice): its 101 prompts in one call held every layer's
# hidden states of both encoders, 2.16 GB above the weights on SDXL's encoders at fp32 compute (measured), which the
# planner counts nowhere (it counts no text-encoder activations); 8 at a time add nothing measurable. A prompt's
# features do not depend on the others in its call (2e-6 apart: the GEMMs' blocking).
REG_CHUNK = 8


def kv_weights(unet, targets: tuple[str, ...] = KV_TARGETS) -> dict[str, torch.nn.Parameter]:
    """module.weight -> Parameter of every cross-attention K/V projection."""
    return {f"{name}.weight": m.weight for name, m in unet.named_modules()
            if any(name.endswith(t) for t in targets) and isinstance(m, torch.nn.Linear)}


def prompt_rows(tokenizer, prompts: list[str]) -> list[int]:
    """How many encoder rows each prompt fills: BOS, its tokens and EOT (the rest is padding)."""
    ids = tokenizer(prompts, truncation=True, max_length=tokenizer.model_max_length).input_ids
    return [len(x) for x in ids]


class CustomDiffusionSequential(Method):
    name = "custom-diffusion-sequential"
    summary = ("keeps training the model's cross-attention key/value weights for every concept: no protection of "
               "earlier concepts, larger files than an adapter")
    paper = "000 CD sequential (Kumari et al. 2023)"
    adapter_kind = "none"
    bench_class_word = True  # 000 evaluates CD with the concept name after the token
    trains_base = True  # trains its K/V base weights

    def prepare(self, ctx: TaskContext) -> None:
        ctx.extra["base_delta"] = fold_base_delta(ctx.comps.unet, ctx.prev_dir)
        self._start_training(ctx)

    def _start_training(self, ctx: TaskContext) -> None:
        params = kv_weights(ctx.comps.unet)
        ctx.extra["start"] = {k: p.detach().clone() for k, p in params.items()}  # W when this task starts
        for p in params.values():
            p.requires_grad_(True)

    def tensors(self, ctx: TaskContext) -> dict[str, torch.nn.Parameter]:
        return kv_weights(ctx.comps.unet)

    def trainable_numbers(self, target_in_out: tuple[tuple[int, int], ...]) -> tuple[int, int]:
        return 0, sum(i * o for i, o in target_in_out)  # the full K/V matrices

    def adapted_layers(self) -> tuple[str, ...]:
        return KV_TARGETS

    def held_bytes(self, n_previous: int) -> float:
        return super().held_bytes(n_previous) + 4.0  # W when the task starts (`start`), fp32

    def weight_deltas(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        """The cumulative change of every trained tensor since the base: earlier tasks + this one."""
        start, base = ctx.extra["start"], ctx.extra["base_delta"]
        return {k: (base[k].to(p) if k in base else 0) + (p.detach() - start[k]) for k, p in self.tensors(ctx).items()}

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        return {DELTA_FILE: to_host(self.weight_deltas(ctx))}


def split_cd_tasks(flat: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor | None]:
    """The merge file (`CD_FILE`) -> (each concept's {T_i per K/V layer, "features": C_i}, in order; the
    regulariser covariance R, None when the file holds none)."""
    tasks, rest = split_tasks(flat)
    return tasks, rest.get("reg_cov")




def merge_all(tasks: list[dict[str, torch.Tensor]], reg_cov: torch.Tensor) -> dict[str, torch.Tensor]:
    """The merged change W - W0 of every K/V layer from each concept's (T_i per layer, C_i)."""
    layers = [k for k in tasks[0] if k != "features"]
    feats = [t["features"] for t in tasks]
    return {k: constrained_merge([t[k] for t in tasks], feats, reg_cov) for k in layers}


class CustomDiffusion(CustomDiffusionSequential):
    name = "custom-diffusion"
    summary = ("trains the cross-attention key/value weights per concept from the base and merges them in one "
               "closed-form step: no extra training, larger files than an adapter")
    paper = "000 CD (Kumari et al. 2023, constrained merge)"
    removal = "exact"  # re-merge without the concept's (T_i, C_i)

    def base_changes(self, prev_dir) -> dict[str, torch.Tensor]:
        """Nothing: each concept's K/V train from the base's W0 (the version's base_delta is the merge, for
        generation and export only). Part 3's loader folded it in, so that concepts 2+ trained from the merged
        model; tests/test_methods_001_003.py checks where each task starts."""
        return {}

    def prepare(self, ctx: TaskContext) -> None:
        ctx.extra["base_delta"] = {}  # K/V trained from W0: earlier concepts live only in the merge file
        tasks, reg_cov = split_cd_tasks(read_tensors(ctx.prev_dir, CD_FILE))
        if ctx.previous and not tasks:  # a store whose concepts the sequential variant learned (before issue 10)
            raise EdgecpError(
                f"this store's {len(ctx.previous)} concept(s) were learned by sequential Custom Diffusion, which is "
                "now called custom-diffusion-sequential, and hold no per-concept merge data: keep adding concepts "
                "to it with an edgecp from before, or start a new store for the paper's CD")
        if reg_cov is None:
            reg_cov = self._regulariser(ctx)
        ctx.extra["cd_tasks"], ctx.extra["reg_cov"] = tasks, reg_cov
        self._start_training(ctx)

    @torch.no_grad()
    def _regulariser(self, ctx: TaskContext) -> torch.Tensor:
        prompts = GENERAL_PROMPTS + [ctx.prior_prompt]
        rows = prompt_rows(ctx.comps.tokenizer, prompts)
        with autocast(ctx):
            emb = torch.cat([to_host(encode_text(ctx.comps, prompts[i:i + REG_CHUNK], ctx.device).float())
                             for i in range(0, len(prompts), REG_CHUNK)])
        return regulariser_covariance(torch.cat([e[:n] for e, n in zip(emb, rows)])).float()

    def consolidate(self, ctx: TaskContext, progress=None) -> None:
        texts = concept_texts(ctx)  # (n+1, T, D), the current concept last (its trained token)
        n = prompt_rows(ctx.comps.tokenizer, [ctx.prompt])[0]
        feats = to_host(texts[-1, :n])
        start = ctx.extra["start"]
        trained = {k: p.detach() - start[k] for k, p in self.tensors(ctx).items()}  # W_i - W0 on the live device
        changes = to_host(trained)  # CPU from here on: the merge file and the merge itself hold no device
        task = {k: merge_targets(d, feats).float() for k, d in changes.items()}
        task["features"] = feats
        ctx.extra["cd_tasks"] = ctx.extra["cd_tasks"] + [task]
        if len(ctx.extra["cd_tasks"]) == 1:  # one concept: its fine-tuned K/V as trained (nothing to merge yet)
            ctx.extra["merged"] = changes
            return
        merged = merge_all(ctx.extra["cd_tasks"], ctx.extra["reg_cov"])
        with torch.no_grad():  # the in-memory model becomes the merged one, as the version will be
            for k, p in self.tensors(ctx).items():
                p.copy_(start[k] + merged[k].to(p))
        ctx.extra["merged"] = merged
        if progress:
            emit(progress, "consolidate", 1, 1)

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        return {DELTA_FILE: ctx.extra["merged"], CD_FILE: join_tasks(ctx.extra["cd_tasks"], reg_cov=ctx.extra["reg_cov"])}

    def remove_concept(self, files: dict[str, dict[str, torch.Tensor]], position: int, manifest: dict) -> dict:
        tasks, reg_cov = split_cd_tasks(files.get(CD_FILE) or {})
        if position < len(tasks):
            del tasks[position]
        if tasks:  # one concept left: its merge with itself (its raw K/V change is not kept), exact otherwise
            files[CD_FILE] = join_tasks(tasks, reg_cov=reg_cov)
            files[DELTA_FILE] = merge_all(tasks, reg_cov)
        else:
            files.pop(CD_FILE, None)
            files.pop(DELTA_FILE, None)
        return {}


class CdEwc(EwcMixin, CustomDiffusionSequential):
    name = "cd-ewc"
    summary = ("custom-diffusion-sequential, held back where earlier concepts need its weights (EWC): an extra pass "
               "of 1/5 of the training steps")
    paper = "000 CD EWC"
    Params = EwcParams

    def anchor(self, ctx: TaskContext) -> dict[str, torch.Tensor]:
        return ctx.extra["start"]  # the K/V weights the previous task left
