"""The embedded tiny model: the Stable Diffusion architecture at a size a CPU trains in seconds.

Same classes as SD 1.x (UNet2DConditionModel with cross-attention, AutoencoderKL, CLIPTextModel with the real
49,408-token CLIP BPE tokenizer, the SD noise schedule), built from a seed without any network and written once
to ``$EDGECP_HOME/models/tiny-v1`` as a diffusers folder, so that it loads like any real base.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edgecp.paths import edgecp_home

TINY_NAME = "tiny-v1"
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
    return edgecp_home() / "models" / TINY_NAME


def build_tiny_components(seed: int = TINY_SEED) -> dict:
    """Make the tiny model's components from `seed` (random weights, the SD architecture)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from edgecp.model.tokenizer import write_clip_tokenizer

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
    """Return the tiny model's diffusers folder, writing it first if it does not exist (atomic rename)."""
    path = tiny_path()
    if (path / "model_index.json").exists():
        return path
    from diffusers import StableDiffusionPipeline

    from edgecp.model.base import quiet_hf

    quiet_hf()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=path.parent))
    try:
        pipe = StableDiffusionPipeline(
            **build_tiny_components(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process won the race: theirs is identical
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
