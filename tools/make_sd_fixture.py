"""Write a Stable Diffusion 1.5-sized base with random weights, for memory, speed and export checks.

Nothing is downloaded: the components are built from the SD 1.5 configurations (diffusers' UNet2DConditionModel
and AutoencoderKL, transformers' CLIPTextModel at CLIP ViT-L/14's text tower size) and the CLIP BPE tokenizer that
ships with edgecp, then saved as a diffusers folder with safetensors weights. Parameter counts match the real
model (UNet 859.5 M, text encoder 123.1 M, VAE 83.7 M); the images it makes are noise.

    python tools/make_sd_fixture.py --out /tmp/sd15            # about 1 minute, 4.3 GB (fp32, like the hub folder)
    edgecp init /tmp/s --base /tmp/sd15 --train resolution=256

`--preset sdxl` writes SDXL base 1.0's architecture (two text encoders, 2.6 B-parameter UNet; about 1 minute,
13.9 GB fp32), `sdxl-mini` the same layout narrowed for the tests (a few MB).
`--preset sd15-mini` writes the same architecture family at a fraction of the width, for quicker smoke tests.
`--preset sd2-v` / `sd2-v-mini` write SD 2.x 768-v's layout (linear projections, per-block heads, OpenCLIP-H's
text tower, the hub's Euler v-prediction scheduler file without `clip_sample`), full size or at a fifth of the width.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# diffusers' own defaults are the SD 1.x UNet except for the cross-attention width (768 = CLIP ViT-L/14).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# SD 2.x 768-v (edgecp/model/assets/sd-configs/sd2-v): linear projections, per-block head counts, OpenCLIP ViT-H's
# text tower, and the hub's scheduler file: an EulerDiscreteScheduler config with v-prediction and no `clip_sample`
# key (issue 21's refused export)
SD2V_UNET = {**SD15_UNET, "attention_head_dim": (5, 10, 20, 20), "cross_attention_dim": 1024,
             "use_linear_projection": True, "upcast_attention": True, "sample_size": 96}
SD2V_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, projection_dim=512, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SD2V_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None, "use_karras_sigmas": False,
}
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's config files): three levels, 1/2/10 transformer layers,
# linear projections, cross-attention over both encoders' hidden states (768 + 1280), added text + time conditioning
# (pooled 1280 + 6 time ids x 256 Fourier features = 2816), the VAE's 0.13025 scaling, and CLIP ViT-bigG's text tower
# with its projection as the second encoder. Parameter counts: UNet 2,567.5 M, text encoders 123.1 M + 694.7 M.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SDXL_TEXT = {**SD15_TEXT, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1}  # as the hub's config says
SDXL_TEXT_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
# SDXL's layout narrowed for the tests: the same three levels, the 1/2/2 transformer depths standing in for 1/2/10,
# two encoders of different widths (64 and 96, projection 96; the second 10 layers deep), pooled + 6 x 16 time features
SDXL_MINI = (
    {**SDXL_UNET, "block_out_channels": (32, 64, 128), "attention_head_dim": (1, 2, 4),
     "transformer_layers_per_block": (1, 2, 2), "cross_attention_dim": 160, "addition_time_embed_dim": 16,
     "projection_class_embeddings_input_dim": 96 + 6 * 16, "sample_size": 32},
    {**SDXL_VAE, "block_out_channels": (32, 64, 128, 128), "sample_size": 256},
    {**SDXL_TEXT, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
     "projection_dim": 64},
    # 10 layers: diffusers recognises an SDXL single file by its second encoder's 10th block
    {**SDXL_TEXT_2, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 10, "num_attention_heads": 2,
     "projection_dim": 96},
)
PRESETS = {
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT),
    "sdxl": (SDXL_UNET, SDXL_VAE, SDXL_TEXT, SDXL_TEXT_2),
    "sdxl-mini": SDXL_MINI,
    "sd2-v": (SD2V_UNET, SD15_VAE, SD2V_TEXT),
    # SD 2.x's layout at a fifth of the width: per-block head counts kept distinct (2, 4, 8, 8 heads of 32)
    "sd2-v-mini": (
        {**SD2V_UNET, "block_out_channels": (64, 128, 256, 256), "attention_head_dim": (2, 4, 8, 8),
         "cross_attention_dim": 256, "sample_size": 32},
        {**SD15_VAE, "block_out_channels": (32, 64, 128, 128), "sample_size": 256},
        {**SD2V_TEXT, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
         "projection_dim": 256},
    ),
    # a quarter of the width, same block structure: for smoke tests of the tools themselves
    "sd15-mini": (
        {**SD15_UNET, "block_out_channels": (32, 64, 128, 128), "cross_attention_dim": 192, "sample_size": 32},
        {**SD15_VAE, "block_out_channels": (32, 64, 128, 128), "sample_size": 256},
        {**SD15_TEXT, "hidden_size": 192, "intermediate_size": 768, "num_hidden_layers": 3, "num_attention_heads": 3,
         "projection_dim": 192},
    ),
}


def write_fixture(out: Path, preset: str = "sd15", seed: int = 0, log=print) -> dict:
    """Build each component from its config (random weights from `seed`), save it, free it. Returns counts."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from edgecp.model.tiny import SD_SCHEDULER_CONFIG
    from edgecp.model.tokenizer import write_clip_tokenizer

    unet_cfg, vae_cfg, text_cfg, *second = PRESETS[preset]
    xl = bool(second)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    counts = {}
    builders = (
        ("unet", lambda: UNet2DConditionModel(**unet_cfg)),
        ("vae", lambda: AutoencoderKL(**vae_cfg)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))),
    ) + ((("text_encoder_2", lambda: CLIPTextModelWithProjection(CLIPTextConfig(**second[0]))),) if xl else ())
    for i, (name, build) in enumerate(builders):
        t0 = time.perf_counter()
        torch.manual_seed(seed + i)
        model = build().eval()
        counts[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(partial / name, safe_serialization=True)
        del model
        log(f"{name}: {counts[name] / 1e6:.1f} M parameters, {time.perf_counter() - t0:.1f} s")
    write_clip_tokenizer(partial / "tokenizer")
    if xl:  # SDXL's second tokenizer is OpenCLIP's: the same vocabulary, padded with "!"
        write_clip_tokenizer(partial / "tokenizer_2", pad_token="!")
    sd2 = preset.startswith("sd2")
    if xl:
        (partial / "scheduler").mkdir()
        (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=2))
    elif sd2:
        (partial / "scheduler").mkdir()
        (partial / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD2V_SCHEDULER, indent=2))
    else:
        DDIMScheduler(**SD_SCHEDULER_CONFIG).save_pretrained(partial / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
        "requires_safety_checker": False, "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    if sd2:
        index["scheduler"] = ["diffusers", "EulerDiscreteScheduler"]
    if xl:
        index = {
            "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1", "force_zeros_for_empty_prompt": True,
            "feature_extractor": [None, None], "image_encoder": [None, None],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        }
    (partial / "model_index.json").write_text(json.dumps(index, indent=2))
    (partial / "fixture.json").write_text(json.dumps({"preset": preset, "seed": seed, "parameters": counts}, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="the diffusers folder to write")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.perf_counter()
    counts = write_fixture(args.out, args.preset, args.seed)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({args.preset}, seed {args.seed}): {sum(counts.values()) / 1e6:.1f} M parameters, "
          f"{size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
