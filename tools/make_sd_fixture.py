"""Write a Stable Diffusion 1.5-sized base with random weights, for memory, speed and export checks.

Nothing is downloaded: the components are built from the SD 1.5 configurations (diffusers' UNet2DConditionModel
and AutoencoderKL, transformers' CLIPTextModel at CLIP ViT-L/14's text tower size) and the CLIP BPE tokenizer that
ships with edgecp, then saved as a diffusers folder with safetensors weights. Parameter counts match the real
model (UNet 859.5 M, text encoder 123.1 M, VAE 83.7 M); the images it makes are noise.

    python tools/make_sd_fixture.py --out /tmp/sd15            # about 1 minute, 4.3 GB (fp32, like the hub folder)
    edgecp init /tmp/s --base /tmp/sd15 --train resolution=256

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
PRESETS = {
    "sd15": (SD15_UNET, SD15_VAE, SD15_TEXT),
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
    from transformers import CLIPTextConfig, CLIPTextModel

    from edgecp.model.tiny import SD_SCHEDULER_CONFIG
    from edgecp.model.tokenizer import write_clip_tokenizer

    unet_cfg, vae_cfg, text_cfg = PRESETS[preset]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    counts = {}
    builders = (
        ("unet", lambda: UNet2DConditionModel(**unet_cfg)),
        ("vae", lambda: AutoencoderKL(**vae_cfg)),
        ("text_encoder", lambda: CLIPTextModel(CLIPTextConfig(**text_cfg))),
    )
    for i, (name, build) in enumerate(builders):
        t0 = time.perf_counter()
        torch.manual_seed(seed + i)
        model = build().eval()
        counts[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(partial / name, safe_serialization=True)
        del model
        log(f"{name}: {counts[name] / 1e6:.1f} M parameters, {time.perf_counter() - t0:.1f} s")
    write_clip_tokenizer(partial / "tokenizer")
    sd2 = preset.startswith("sd2")
    if sd2:
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
