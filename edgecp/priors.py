"""Prior-class images for prior preservation: generated once by the base model, cached in the store.

They are model outputs, not user data, so they outlive commits. The cache key covers everything that
determines them (base weights, prompt, count, sampler settings, resolution).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from edgecp import seeds
from edgecp.config import PriorConfig
from edgecp.generate import GenerateConfig, torch_generate
from edgecp.store import Store


def prior_key(base_sha: str, cfg: PriorConfig, resolution: int) -> str:
    key = [base_sha, cfg.prompt, cfg.num_images, cfg.steps, cfg.guidance, resolution]
    if cfg.sampler != "base":  # stores made before the sampler setting keep their cache key
        key.append(cfg.sampler)
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def ensure_priors(store: Store, comps, cfg: PriorConfig, resolution: int, device, callback=None, plan=None) -> list[Path]:
    """The cached prior images, generating them with the (clean) base model if missing. Call inside writer().

    Under a memory `plan` the base samples in the plan's precision, `plan.micro_batch` images per call; the cache
    key does not include the precision (the images are a training-time prior either way).
    """
    key = prior_key(store.info["base"]["sha256"], cfg, resolution)
    d = store.prior_dir(key)
    if (d / "done.json").exists():
        return sorted(d.glob("*.png"))
    gcfg = GenerateConfig(n=cfg.num_images, seed=seeds.PRIORS, steps=cfg.steps, guidance=cfg.guidance, size=resolution,
                          sampler=None if cfg.sampler == "base" else cfg.sampler)
    comps.vae.enable_slicing()  # decode one image at a time (same images, a quarter of the decoder's peak)
    images = torch_generate(comps, cfg.prompt, gcfg, device, callback, plan)
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=d.parent))
    try:
        for i, im in enumerate(images):
            im.save(tmp / f"{i:04d}.png")
        (tmp / "done.json").write_text(json.dumps({"prompt": cfg.prompt, "n": cfg.num_images}))
        if d.exists():
            shutil.rmtree(d)
        os.rename(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(d.glob("*.png"))
