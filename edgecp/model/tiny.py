"""The embedded tiny model: the Stable Diffusion architecture at a size a CPU trains in seconds.

Same classes as SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIPTextModel with the real
49,408-token CLIP BPE tokenizer, the SD noise schedule). ``build_tiny_components`` makes the architecture from a
seed (random weights); ``tools/train_tiny_world.py`` pretrains it on the procedural tiny world and writes the
diffusers folder that ships in the package (``edgecp/model/assets/tiny-world``), which is ``--base tiny``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from edgecp.errors import EdgecpError
from edgecp.model.tokenizer import write_clip_tokenizer

TINY_NAME = "tiny-world"
TINY_SEED = 0
TINY_RESOLUTION = 64  # pixels; the VAE downsamples by 4, the UNet sees 16x16x4 latents

# The SD 1.x noise schedule (scaled_linear 0.00085 -> 0.012 over 1000 steps), as a DDIM config.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def tiny_path() -> Path:
    """The shipped, pretrained tiny base (a diffusers folder with the tiny-world evaluator beside it)."""
    return Path(__file__).resolve().parent / "assets" / TINY_NAME


def build_tiny_components(seed: int = TINY_SEED) -> dict:
    """Make the tiny model's components from `seed` (random weights, the SD architecture)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=64,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )
    tmp = Path(tempfile.mkdtemp(prefix="edgecp-tok-"))
    try:
        tokenizer = write_clip_tokenizer(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def ensure_tiny_model() -> Path:
    """Return the shipped tiny base's diffusers folder; a clear error if the package was installed without it."""
    path = tiny_path()
    if not (path / "model_index.json").exists() or not (path / "unet" / "diffusion_pytorch_model.safetensors").exists():
        raise EdgecpError(
            f"the embedded tiny base is missing at {path}; reinstall edgecp with its package data "
            "or rebuild it with `python tools/train_tiny_world.py --seed 0`"
        )
    return path
