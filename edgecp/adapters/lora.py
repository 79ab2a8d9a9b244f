"""LoRA and VeRA on the UNet through peft.

LoRA: `inject_adapter_in_model` keeps the UNet a `UNet2DConditionModel` (diffusers pipelines and gradient
checkpointing work unchanged). VeRA: peft refuses `inject_adapter_in_model` for it (its projections are shared
state on the tuner), so it goes through `get_peft_model`; the layers are still replaced in place, so the UNet
object stays the one pipelines use, and the PeftModel is kept beside it for the state dict.

State dicts use peft's keys without the adapter name (`...attn2.to_k.lora_A.weight`), the keys diffusers'
`load_lora_weights` understands after `convert_state_dict_to_diffusers`.
"""

from __future__ import annotations

import dataclasses

import torch
from peft import (
    LoraConfig,
    VeraConfig,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer, cast_adapter_dtype

from edgecp.config import AdapterConfig
from edgecp.errors import EdgecpError
from edgecp.model.host import to_host
from edgecp.model.quant import fold_into, folded

ADAPTER_NAME = "default"
_PEFT_KEY = "_edgecp_peft_model"  # a plain attribute, not a submodule (the PeftModel contains the UNet)
_VERA_PREFIX = "base_model.model."


def peft_config(cfg: AdapterConfig):
    if cfg.kind == "lora":
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), init_lora_weights=True)
    return VeraConfig(r=cfg.rank, target_modules=list(cfg.targets), save_projection=True, projection_prng_key=0)


def attach(unet, cfg: AdapterConfig, seed: int = 0) -> None:
    """Add a fresh adapter (zero update: LoRA's B = 0, VeRA's lambda_b = 0) to `unet`'s target modules.

    LoRA's A is peft's Kaiming-uniform, or with `cfg.init == "gaussian"` A ~ N(0, I) (paper 001's "standard
    initialization technique (A ~ N(0, I), B = 0)"; peft's own "gaussian" draws N(0, 1/r), so it is drawn here)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.kind == "vera":
            unet.__dict__[_PEFT_KEY] = get_peft_model(unet, peft_config(cfg), adapter_name=ADAPTER_NAME)
        else:
            inject_adapter_in_model(peft_config(cfg), unet, adapter_name=ADAPTER_NAME)
            # peft makes the adapter in its base layer's dtype; a 16-bit frozen target (model/quant.py) must still get
            # fp32 masters, as get_peft_model's autocast_adapter_dtype gives VeRA above
            cast_adapter_dtype(unet, ADAPTER_NAME)
            if cfg.init == "gaussian":
                with torch.no_grad():
                    for name, p in adapter_parameters(unet).items():
                        if ".lora_A." in name:
                            p.normal_(0.0, 1.0)


def has_adapter(unet) -> bool:
    return bool(adapter_parameters(unet))


def adapter_state(unet) -> dict[str, torch.Tensor]:
    """The adapter's tensors by state-dict key, as CPU copies wherever the UNet lives (`model.host.to_host`: the
    rule that lets methods combine them with a version's stored tensors, which are CPU tensors)."""
    pm = unet.__dict__.get(_PEFT_KEY)
    if pm is not None:
        sd = get_peft_model_state_dict(pm, adapter_name=ADAPTER_NAME)
        sd = {k.removeprefix(_VERA_PREFIX): v for k, v in sd.items()}
    else:
        sd = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return to_host(sd)


def load_adapter_state(unet, state: dict[str, torch.Tensor]) -> None:
    pm = unet.__dict__.get(_PEFT_KEY)
    if pm is not None:
        result = set_peft_model_state_dict(pm, {_VERA_PREFIX + k: v for k, v in state.items()}, adapter_name=ADAPTER_NAME)
    else:
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter state has keys the UNet lacks, e.g. {unexpected[0]}")


def adapter_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by state-dict key (lora_A/lora_B or vera_lambda_*)."""
    out = {}
    for n, p in unet.named_parameters():
        if f".{ADAPTER_NAME}" in n and ("lora_" in n or "vera_lambda" in n):
            out[n.replace(f".{ADAPTER_NAME}", "")] = p
    return out


def param_names(unet) -> dict[str, str]:
    """state-dict key -> parameter name in `unet.named_parameters()` (for torch.func.functional_call)."""
    return {n.replace(f".{ADAPTER_NAME}", ""): n for n, _ in unet.named_parameters()
            if f".{ADAPTER_NAME}" in n and ("lora_" in n or "vera_lambda" in n)}


def set_trainable(unet, trainable: bool = True) -> None:
    for p in adapter_parameters(unet).values():
        p.requires_grad_(trainable)


def with_rank(cfg: AdapterConfig, rank: int) -> AdapterConfig:
    """The same LoRA at another rank with the same scaling alpha/r (for concatenated task LoRAs)."""
    return dataclasses.replace(cfg, rank=rank, alpha=cfg.alpha * rank / cfg.rank)


# -- LoRA factor algebra (C-LoRA, LoRA merge: the sum of task LoRAs is one LoRA of the summed rank) -----------
def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".lora_A.", 1)[0] for k in state if ".lora_A." in k})


def lora_delta(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """module -> scaling * B @ A, the (out, in) weight update of each adapted layer."""
    return {m: scaling * state[f"{m}.lora_B.weight"].float() @ state[f"{m}.lora_A.weight"].float() for m in lora_modules(state)}


def weight_deltas(deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """module name -> (out, in) delta, as state-dict keys of the weights it changes (module.weight)."""
    return {f"{m}.weight": d for m, d in deltas.items()}


def fold_into_base(unet, deltas: dict[str, torch.Tensor]) -> None:
    """W <- W + delta for each adapted layer (module name -> (out, in)), before any adapter is attached: added in
    fp32 and rounded once to W's dtype; layers the loader folded already (`quant.fold_into`) are skipped."""
    done = folded(unet)
    fold_into(unet, {k: d for k, d in weight_deltas(deltas).items() if k not in done})


def concat_loras(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """One LoRA equal to sum_i w_i B_i A_i: A's stacked (sum r, in), B's side by side (out, sum r) times w_i."""
    out = {}
    for m in lora_modules(states[0]):
        out[f"{m}.lora_A.weight"] = torch.cat([s[f"{m}.lora_A.weight"] for s in states], dim=0).contiguous()
        out[f"{m}.lora_B.weight"] = torch.cat([w * s[f"{m}.lora_B.weight"] for s, w in zip(states, weights)], dim=1).contiguous()
    return out


def split_lora(state: dict[str, torch.Tensor], rank: int, weights: list[float] | None = None) -> list[dict[str, torch.Tensor]]:
    """Inverse of `concat_loras`: per-task LoRAs of `rank` (B blocks divided by their weights)."""
    mods = lora_modules(state)
    if not mods:
        return []
    total = state[f"{mods[0]}.lora_A.weight"].shape[0]
    n = total // rank
    weights = weights or [1.0] * n
    tasks = []
    for i in range(n):
        sl = slice(i * rank, (i + 1) * rank)
        tasks.append({**{f"{m}.lora_A.weight": state[f"{m}.lora_A.weight"][sl].clone() for m in mods},
                      **{f"{m}.lora_B.weight": state[f"{m}.lora_B.weight"][:, sl] / weights[i] for m in mods}})
    return tasks


def tasks_without(state: dict[str, torch.Tensor], rank: int, n_concepts: int, position: int,
                  weights: list[float] | None = None) -> list[dict[str, torch.Tensor]]:
    """The per-task LoRAs of a concatenated adapter (`split_lora`) minus task `position` (remove-concept)."""
    tasks = split_lora(state, rank, weights) if state else []
    if len(tasks) != n_concepts:
        raise EdgecpError(f"the adapter holds {len(tasks)} task LoRAs for {n_concepts} concepts: "
                          "the version is inconsistent; run `edgecp verify`")
    del tasks[position]
    return tasks


def merge(unet) -> torch.nn.Module:
    """Fold the adapter into the base weights and remove it (for export; call on a full-precision copy)."""
    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER_NAME])
    _unwrap(unet)
    unet.__dict__.pop(_PEFT_KEY, None)
    return unet


def _unwrap(model: torch.nn.Module) -> None:
    """Replace every merged peft layer by its base layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
