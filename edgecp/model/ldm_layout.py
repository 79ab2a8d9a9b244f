"""diffusers -> original (LDM) single-file layout, for any UNet/VAE size: what diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` does (a script in diffusers' repository, not in the
package: hence written here), generalised to the tiny base's block counts.

Text encoders: SD 1.x's CLIP under `cond_stage_model.transformer.text_model.*`; SD 2.x's OpenCLIP under
`cond_stage_model.model.*` (q/k/v joined into `in_proj_*`, `resblocks`, `ln_final`, `positional_embedding`), the
layout diffusers' `convert_open_clip_checkpoint` reads. SD 2.x checkpoints carry OpenCLIP's 24 layers; diffusers
(and so edgecp) keeps 23, the penultimate layer's output being what SD 2.x conditions on: the 24th, never used, is
not written (our choice, stated in docs/export).

Used by `edgecp export --format checkpoint` and by the tests, which make small single-file checkpoints offline."""

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
    if unet_cfg.get("addition_embed_type") == "text_time":  # SDXL's pooled-text + time-ids embedding
        m += [("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2.")]
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


def text_encoder_to_ldm(state: dict, openclip: bool, prefix: str | None = None) -> dict:
    """A transformers CLIPTextModel state dict -> the original layout (SD 1.x CLIP, or SD 2.x OpenCLIP). `prefix`:
    where the encoder lives (SDXL: `conditioner.embedders.0.transformer.` for CLIP, `conditioner.embedders.1.model.`
    for OpenCLIP, whose `text_projection` is stored transposed, x @ P, as diffusers' converter reads it)."""
    projection = state.get("text_projection.weight")
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()
             if not k.startswith("text_projection.")}  # transformers 5
    if not openclip:
        p = prefix or "cond_stage_model.transformer."
        return {p + k: v for k, v in state.items() if not k.endswith("position_ids")}
    p, out = prefix or "cond_stage_model.model.", {}
    if projection is not None:
        out[p + "text_projection"] = projection.T.contiguous()
    out[p + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = state["text_model.embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = state["text_model.final_layer_norm.weight"]
    out[p + "ln_final.bias"] = state["text_model.final_layer_norm.bias"]
    n = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers."))
    for i in range(n):
        src, dst = f"text_model.encoder.layers.{i}.", f"{p}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{x}_proj.{kind}"] for x in "qkv"])
            out[dst + f"attn.out_proj.{kind}"] = state[f"{src}self_attn.out_proj.{kind}"]
            out[dst + f"ln_1.{kind}"] = state[f"{src}layer_norm1.{kind}"]
            out[dst + f"ln_2.{kind}"] = state[f"{src}layer_norm2.{kind}"]
            out[dst + f"mlp.c_fc.{kind}"] = state[f"{src}mlp.fc1.{kind}"]
            out[dst + f"mlp.c_proj.{kind}"] = state[f"{src}mlp.fc2.{kind}"]
    return out


def pipeline_to_single_file(folder, out) -> None:
    """A diffusers SD folder -> one .safetensors file in the original layout (UNet, VAE, the text encoder(s))."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    sd = {}
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    sd.update(unet_to_ldm(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")), cfg))
    vcfg = json.loads((folder / "vae" / "config.json").read_text())
    sd.update(vae_to_ldm(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")), vcfg))
    if (folder / "text_encoder_2").is_dir():  # SDXL: both encoders under `conditioner.embedders`
        sd.update(text_encoder_to_ldm(load_file(str(folder / "text_encoder" / "model.safetensors")), openclip=False,
                                      prefix="conditioner.embedders.0.transformer."))
        sd.update(text_encoder_to_ldm(load_file(str(folder / "text_encoder_2" / "model.safetensors")), openclip=True,
                                      prefix="conditioner.embedders.1.model."))
    else:
        sd.update(text_encoder_to_ldm(load_file(str(folder / "text_encoder" / "model.safetensors")),
                                      openclip=cfg["cross_attention_dim"] == 1024))
    save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()}, str(out))
