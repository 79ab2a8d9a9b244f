"""A base's shape for the memory planner, read from safetensors headers and config files (no weights loaded)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from edgecp.model.base import BaseSpec
from edgecp.model.single_file import CONFIGS, XL_KEY
from edgecp.planner import BaseShape, UNetShape

# The SD 1.x UNet layout (diffusers' UNet2DConditionModel defaults), used when a single-file checkpoint has no
# config beside it; the planner only needs the block structure, which SD 1.x and 2.x share.
SD1_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "in_channels": 4, "sample_size": 64,
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
SD_VAE_CHANNELS = (128, 256, 512, 512)
_SINGLE_FILE_PREFIX = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text",
                       "conditioner.embedders.0.": "text", "conditioner.embedders.1.": "text"}


def _header(path: Path) -> dict[str, list[int]]:
    with safe_open(str(path), "pt") as sf:
        return {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}  # noqa: SIM118 (safe_open is no dict)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_target(key: str, targets: tuple[str, ...]) -> bool:
    module = key.rsplit(".", 1)[0]
    return any(module == t or module.endswith("." + t) for t in targets)


def _count(tensors: dict[str, list[int]], targets: tuple[str, ...]) -> dict:
    c = {"conv": 0, "linear": 0, "other": 0, "target": 0, "rows": 0, "largest": 0, "target_io": []}
    for key, shape in tensors.items():
        n = _numel(shape)
        c["largest"] = max(c["largest"], n)
        if _is_target(key, targets):
            c["target"] += n
            if key.endswith("weight") and len(shape) == 2:
                c["target_io"].append((shape[1], shape[0]))
        elif len(shape) == 4:
            c["conv"] += n
        elif len(shape) == 2 and key.endswith("weight"):
            c["linear"] += n
            c["rows"] += shape[0]
        else:
            c["other"] += n
    return c


def _text_linear(tensors: dict[str, list[int]]) -> tuple[int, int]:
    """(weights, output rows) of the text encoders' Linear layers: 2-D weights that are no embedding table (a single
    file's fused `in_proj_weight` becomes q/k/v Linears in diffusers; OpenCLIP's bare `text_projection` matrix and
    `positional_embedding` have no `weight` suffix)."""
    n = rows = 0
    for key, shape in tensors.items():
        if len(shape) == 2 and key.endswith("weight") and "embedding" not in key:
            n += _numel(shape)
            rows += shape[0]
    return n, rows


def base_shape(spec: BaseSpec, targets: tuple[str, ...] = ("attn2.to_k", "attn2.to_v"),
               target_fp32: bool = True) -> BaseShape:
    """Counts by kind of the UNet's weights, text encoder and VAE sizes, the UNet's block structure. `targets`: the
    layers the method adapts; `target_fp32`: whether it keeps their base weights fp32 (Method.keep_full_precision)."""
    assert spec.path is not None
    if spec.path.is_file():
        parts: dict[str, dict[str, list[int]]] = {"unet": {}, "vae": {}, "text": {}}
        header = _header(spec.path)
        for key, shape in header.items():
            for prefix, comp in _SINGLE_FILE_PREFIX.items():
                if key.startswith(prefix):
                    parts[comp][key.removeprefix(prefix)] = shape
                    break
        unet_cfg, vae_channels, single = SD1_UNET, SD_VAE_CHANNELS, True
        if XL_KEY in header:  # SDXL's block structure differs from SD 1.x/2.x: its shipped config
            unet_cfg = json.loads((CONFIGS / "sdxl" / "unet" / "config.json").read_text())
    else:
        def tensors(comp: str) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for f in sorted((spec.path / comp).glob("*.safetensors")):
                if ".fp16." not in f.name:
                    out.update(_header(f))
            return out

        # SDXL's second text encoder counts with the first: both are held, and trained through when the token is
        parts = {"unet": tensors("unet"), "vae": tensors("vae"),
                 "text": {**{f"1.{k}": v for k, v in tensors("text_encoder").items()},
                          **{f"2.{k}": v for k, v in tensors("text_encoder_2").items()}}}
        unet_cfg = json.loads((spec.path / "unet" / "config.json").read_text())
        vae_channels = tuple(json.loads((spec.path / "vae" / "config.json").read_text())["block_out_channels"])
        single = False
    u = _count(parts["unet"], targets)
    text_linear, text_rows = _text_linear(parts["text"])
    return BaseShape(
        unet_conv=u["conv"], unet_linear=u["linear"], unet_other=u["other"], unet_target=u["target"],
        unet_linear_rows=u["rows"], text=sum(_numel(s) for s in parts["text"].values()),
        vae=sum(_numel(s) for s in parts["vae"].values()), vae_channels=vae_channels,
        vae_scale=2 ** (len(vae_channels) - 1), unet=UNetShape.from_config(unet_cfg),
        largest_tensor=max(u["largest"], max((_numel(s) for s in parts["text"].values()), default=0)),
        target_in_out=tuple(u["target_io"]), single_file=single, target_fp32=target_fp32,
        text_linear=text_linear, text_linear_rows=text_rows,
    )
