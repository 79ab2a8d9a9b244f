"""Single-file checkpoints (the original LDM layout most people download), loaded with no network.

diffusers' `from_single_file` converts the weights but fetches the pipeline's configs and tokenizer from the hub.
edgecp ships the small config files of the Stable Diffusion families it supports (`assets/sd-configs/`) and
builds the CLIP tokenizer from the BPE vocabulary it already carries, so `from_single_file(config=LOCAL)` never
goes online.

The family is read from the checkpoint's header (key names and two tensor shapes; no weights are loaded):
- `sd1`: SD 1.x (CLIP ViT-L/14 text encoder, cross-attention 768), epsilon prediction, 512 px;
- `sd2-v`: SD 2.x (OpenCLIP ViT-H text encoder, cross-attention 1024), v-prediction, 768 px (2.0 / 2.1);
- `sd2-base`: SD 2.x base, epsilon prediction, 512 px;
- `sdxl`: SDXL base 1.0 (CLIP ViT-L and OpenCLIP ViT-bigG under `conditioner.embedders.0/1`), 1024 px, epsilon;
  the SDXL refiner and inpainting UNets are refused;
- `tiny`: the embedded tiny world's architecture (cross-attention 64), e.g. `--base tiny` saved as one file.
Whether an SD 2.x checkpoint predicts v or epsilon is not in its weights. Like diffusers (which defaults to
stable-diffusion-2-1), edgecp assumes v-prediction at 768 px, unless the file name says `base` or `512`
(e.g. `v2-1_512-ema-pruned.safetensors`, `sd2-base.safetensors`): our choice, stated here and in the README. A
checkpoint edgecp exported names its family in its metadata (`edgecp_family`), which wins over the file name.
Inpainting, the SDXL refiner and anything else are refused with the reason, before a store is written.

Concept tokens: a checkpoint that `edgecp export --format checkpoint` wrote carries its concepts' token rows under
`edgecp_token_rows.<token>` (the text encoder's table keeps the base vocabulary's shape, which every desktop tool
needs; those tools ignore keys they do not know). `load_token_rows` reads them back, and the base loader adds the
tokens to the tokenizer and the rows to the table, in the file's order (`edgecp_tokens` in its metadata): a store made
on the checkpoint knows the concepts as words of its base.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from edgecp.errors import EdgecpError
from edgecp.model.tiny import ensure_tiny_model
from edgecp.model.tokenizer import write_clip_tokenizer
from edgecp.paths import edgecp_home

CONFIGS = Path(__file__).parent / "assets" / "sd-configs"
FAMILIES = ("sd1", "sd2-base", "sd2-v", "sdxl", "tiny")

UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"
V2_KEY = "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # (out, 1024) in SD 2.x
V1_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"  # (320, 768) in SD 1.x
XL_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"  # diffusers' xl_base key
XL_REFINER_KEY = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"


TOKEN_ROWS = "edgecp_token_rows."  # key prefix of a concept token's row in a checkpoint edgecp wrote
TOKENS_META = "edgecp_tokens"  # metadata: the JSON list of those tokens in id order
FAMILY_META = "edgecp_family"  # metadata: the family of a checkpoint edgecp wrote (SD 2.x: v or epsilon)


def load_token_rows(path: Path) -> list[tuple[str, torch.Tensor]]:
    """(token, row) in the file's order for a checkpoint `edgecp export --format checkpoint` wrote; [] otherwise.
    The metadata's list and the keys must agree (one line naming the file when they do not)."""
    with safe_open(str(path), framework="pt") as f:
        keys = {k for k in f.keys() if k.startswith(TOKEN_ROWS)}  # noqa: SIM118 (safe_open is not iterable)
        if not keys:
            return []
        try:
            tokens = json.loads((f.metadata() or {}).get(TOKENS_META, "null"))
        except ValueError:
            tokens = None
        if (not isinstance(tokens, list) or not all(isinstance(t, str) and t == t.lower() for t in tokens)
                or sorted(TOKEN_ROWS + t for t in tokens) != sorted(keys)):
            raise EdgecpError(f"base file '{path}' holds concept token rows that its '{TOKENS_META}' metadata does not "
                              "list: the file was edited or damaged; export the checkpoint again")
        return [(t, f.get_tensor(TOKEN_ROWS + t).float()) for t in tokens]


def install_token_rows(tokenizer, text_encoder, rows: list[tuple[str, torch.Tensor]], where: str) -> None:
    """Add each token to the tokenizer and its row to the end of the text encoder's table (ids must agree)."""
    if not rows:
        return
    start = len(tokenizer)
    width = text_encoder.get_input_embeddings().weight.shape[1]
    if any(r.shape != (width,) for _, r in rows) or start != text_encoder.get_input_embeddings().weight.shape[0]:
        raise EdgecpError(f"{where}: its concept token rows do not fit its text encoder (width {width}): the file was "
                          "edited or damaged; export the checkpoint again")
    if tokenizer.add_tokens([t for t, _ in rows]) != len(rows):
        raise EdgecpError(f"{where}: a concept token it carries is already a word of its tokenizer: the file was "
                          "edited or damaged; export the checkpoint again")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[start:] = torch.stack([r for _, r in rows]).to(table)
    assert [tokenizer.convert_tokens_to_ids(t) for t, _ in rows] == list(range(start, len(tokenizer)))


def _written_family(path: Path) -> str | None:
    """The family a checkpoint edgecp exported names in its metadata (None for any other file)."""
    with safe_open(str(path), framework="numpy") as f:
        family = (f.metadata() or {}).get(FAMILY_META)
    return family if family in FAMILIES else None


def _header(path: Path) -> dict[str, list[int]]:
    """key -> shape, from the safetensors header only."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise EdgecpError(f"base file '{path}' is not a readable .safetensors file ({type(e).__name__}): "
                          "check the download") from None


def detect_family(path: Path) -> str:
    """sd1 | sd2-base | sd2-v | sdxl | tiny for a single-file checkpoint; refuses what edgecp cannot load, naming why."""
    keys = _header(path)
    what = f"base file '{path}'"
    if XL_REFINER_KEY in keys:
        raise EdgecpError(f"{what} is the SDXL refiner (one OpenCLIP encoder, no CLIP ViT-L), which refines another "
                          "model's latents: pass the SDXL base checkpoint")
    if XL_KEY in keys and UNET_KEY in keys:
        if keys[UNET_KEY][1] != 4:
            raise EdgecpError(f"{what} is an SDXL UNet with {keys[UNET_KEY][1]} input channels (inpainting): edgecp "
                              "supports text-to-image SDXL (4 channels)")
        return "sdxl"
    if XL_KEY in keys:
        raise EdgecpError(f"{what} is an SDXL checkpoint without a UNet in the original layout: pass the whole "
                          "single-file checkpoint or a diffusers folder")
    if UNET_KEY not in keys:
        raise EdgecpError(f"{what} is not a Stable Diffusion checkpoint in the original single-file layout (no "
                          f"{UNET_KEY}): pass an SD 1.x/2.x .safetensors checkpoint or a diffusers folder")
    family = _written_family(path)
    if family is not None and keys[UNET_KEY][1] == 4:
        return family
    if keys[UNET_KEY][1] != 4:
        raise EdgecpError(f"{what} has a UNet with {keys[UNET_KEY][1]} input channels (an inpainting or "
                          "depth model): edgecp supports text-to-image SD 1.x/2.x checkpoints (4 channels)")
    if V2_KEY in keys and keys[V2_KEY][-1] == 1024:
        name = path.name.lower()
        return "sd2-base" if ("base" in name or "512" in name) else "sd2-v"
    if V1_KEY in keys and keys[V1_KEY][-1] == 768:
        return "sd1"
    if V1_KEY in keys and keys[V1_KEY][-1] == 64 and keys[UNET_KEY][0] == 32:
        return "tiny"
    raise EdgecpError(f"{what} is a Stable Diffusion UNet of an unknown size (cross-attention is neither 768 "
                      "nor 1024): edgecp supports SD 1.x/2.x checkpoints; convert others to a diffusers folder")


def config_folder(family: str) -> Path:
    """A local diffusers config folder for `family` (shipped configs + the CLIP tokenizer), made once under
    EDGECP_HOME: what `from_single_file(config=...)` reads instead of the hub."""
    if family not in FAMILIES:
        raise EdgecpError(f"unknown Stable Diffusion family '{family}': one of {', '.join(FAMILIES)}")
    if family == "tiny":
        return ensure_tiny_model()
    d = edgecp_home() / "single-file-configs" / family
    if (d / "tokenizer" / "vocab.json").is_file():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=d.parent)) / "configs"
    shutil.copytree(CONFIGS / family, tmp)
    # SD 2.x's OpenCLIP tokenizer pads with "!" (id 0); SD 1.x pads with <|endoftext|>
    write_clip_tokenizer(tmp / "tokenizer", pad_token="!" if family.startswith("sd2") else "<|endoftext|>")
    if family == "sdxl":  # SDXL's second tokenizer is OpenCLIP's, padding with "!"
        write_clip_tokenizer(tmp / "tokenizer_2", pad_token="!")
    try:
        tmp.rename(d)
    except OSError:  # another process made it first
        pass
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return d
