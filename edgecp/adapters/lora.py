"""LoRA (and, from the same calls, VeRA) on the UNet through peft.

`inject_adapter_in_model` keeps the UNet a `UNet2DConditionModel` (so diffusers pipelines and gradient
checkpointing work unchanged) and supports every peft tuner, VeRA included (diffusers' `add_adapter` does
not attach VeRA).
"""

from __future__ import annotations

import torch

from edgecp.config import AdapterConfig

ADAPTER_NAME = "default"


def peft_config(cfg: AdapterConfig):
    if cfg.kind == "lora":
        from peft import LoraConfig

        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), init_lora_weights=True)
    from peft import VeraConfig

    return VeraConfig(r=cfg.rank, target_modules=list(cfg.targets), save_projection=True, projection_prng_key=0)


def attach(unet, cfg: AdapterConfig, seed: int = 0) -> None:
    """Add a fresh adapter (B = 0, so the UNet's output is unchanged) to `unet`'s target modules."""
    from peft import inject_adapter_in_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(peft_config(cfg), unet, adapter_name=ADAPTER_NAME)


def adapter_state(unet) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()}


def load_adapter_state(unet, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"adapter state has keys the UNet lacks, e.g. {unexpected[0]}")


def adapter_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by name (lora_A/lora_B or vera_lambda_*)."""
    return {n: p for n, p in unet.named_parameters() if f".{ADAPTER_NAME}" in n and ("lora_" in n or "vera_lambda" in n)}


def set_trainable(unet, trainable: bool = True) -> None:
    for p in adapter_parameters(unet).values():
        p.requires_grad_(trainable)


def merge(unet) -> torch.nn.Module:
    """Fold the adapter into the base weights and remove it (for export; call on a full-precision copy)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER_NAME])
    _unwrap(unet)
    return unet


def _unwrap(model: torch.nn.Module) -> None:
    """Replace every merged peft layer by its base layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
