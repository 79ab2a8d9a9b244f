"""diffusers -> original (LDM) single-file layout, for any UNet/VAE size: what diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` does for SD 1.x, generalised to the tiny base's
block counts so a small single-file checkpoint can be made offline for the tests."""

from __future__ import annotations

import torch

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _map_prefixes(unet_cfg: dict) -> list[tuple[str, str]]:
    n, L = len(unet_cfg["block_out_channels"]), unet_cfg["layers_per_block"]
    m = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
         ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
         ("mid_block.attentions.0.", "middle_block.1.")]
    m += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(n):
        down_attn = unet_cfg["down_block_types"][i].startswith("CrossAttn")
        up_attn = unet_cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(L):
            m.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."))
            if down_attn:
                m.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1."))
        for j in range(L + 1):
            m.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."))
            if up_attn:
                m.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1."))
        if i < n - 1:
            m.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
            m.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{2 if up_attn else 1}."))
    return m


def unet_to_ldm(state: dict, cfg: dict) -> dict:
    prefixes = sorted(_map_prefixes(cfg), key=lambda p: -len(p[0]))
    out = {}
    for k, v in state.items():
        new = k
        for hf, sd in prefixes:
            if k.startswith(hf):
                new = sd + k[len(hf):]
                if ".resnets." in hf:
                    for a, b in RESNET:
                        new = new.replace(f".{a}.", f".{b}.")
                break
        out["model.diffusion_model." + new] = v
    return out


def vae_to_ldm(state: dict, cfg: dict) -> dict:
    n = len(cfg["block_out_channels"])
    out = {}
    for k, v in state.items():
        new = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.")
        for i in range(2):
            new = new.replace(f"mid_block.resnets.{i}.", f"mid.block_{i + 1}.")
        if "mid_block.attentions.0." in new:
            new = new.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in VAE_ATTN:
                new = new.replace(f".{a}.", f".{b}.")
            if v.ndim == 2:
                v = v[:, :, None, None]  # linear -> 1x1 conv, as the original VAE stores attention
        out["first_stage_model." + new] = v
    return out


def pipeline_to_single_file(folder, out) -> None:
    """A diffusers SD folder -> one .safetensors file in the original layout (UNet, VAE, CLIP text encoder)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    sd = {}
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    sd.update(unet_to_ldm(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")), cfg))
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    sd.update(vae_to_ldm(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")), vcfg))
    for k, v in load_file(str(folder / "text_encoder" / "model.safetensors")).items():
        k = k if k.startswith("text_model.") else "text_model." + k  # transformers 5 saves without the prefix
        sd["cond_stage_model.transformer." + k] = v
    save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()}, str(out))
