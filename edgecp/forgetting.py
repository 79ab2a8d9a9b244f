"""The forgetting check after every concept: did learning concept n change what the model draws for the earlier ones?

The photos of the earlier concepts are gone (purged by design), so the check compares the model with itself: for
every earlier concept i it draws `images` images of i's own prompt from version n-1 and from version n, with the
same seeds (the same initial latents, `edgecp.sampling.initial_latents`), and measures three things:

- **drift** (the warning's measure): 1 - SSIM between the two versions' image of each seed, averaged over the seeds.
  SSIM (Wang et al. 2004, scikit-image's `structural_similarity` on RGB, its 7x7 window, data range 255) compares
  local luminance, contrast and structure, and needs no downloaded weights (LPIPS, DreamSim and CLIP all do, and a
  person's machine may have none of them); it is 0 for the same image and grows as the structure changes, which is
  what forgetting does to a concept's images. A pixel distance (PSNR) would rate a small shift of the whole image
  as large as a lost object, SSIM less so. Same seed, same sampler, same steps: drift 0 means version n draws i as
  n-1 did.
- **dc_before / dc_after** (the papers' own instrument): the diffusion classifier (Li et al. 2023; 000's DC scores)
  on version n-1's images of concept i, under version n-1 and under version n: each image is VAE-encoded, noised at
  `trials` (t, noise) pairs (the same pairs for every candidate and both versions), and each candidate prompt's
  denoising error is averaged over the trials; the image is recognised as the candidate with the lowest error.
  Candidates: the prior prompt c_0 ("a photo") and every earlier concept's prompt, the same set for both versions
  (the DC score's S of 000 Eq. 5 without c_n, which version n-1 cannot read). dc_* is the share of the images
  recognised as i: "does the new model still recognise them as concept i?"; a drop from dc_before to dc_after
  is forgetting in the paper's terms. With `images` = 2 it moves in steps of 0.5: a coarse second opinion.
- **evaluator_similarity** (the tiny base only): the cosine similarity of the tiny world's evaluator embeddings
  (the bench's CLIP stand-in) of the two versions' images, averaged over seeds.

A concept warns when its drift exceeds `threshold` (DRIFT_THRESHOLD unless set): calibrated on the tiny world's
six photo tasks (docs/guide/forgetting.md; `tools/bench_forgetting_check.py`). On SD bases the same number is a
stated default, not a calibration: tune it with `--check-threshold`.

Cost: per earlier concept, 2 x `images` images of `steps` sampling steps, plus 2 x `images` x `trials` x
(concepts + 1) UNet calls for the DC; two model loads. The result goes in the version's manifest (`check`), so
the check runs before the version is sealed: on its files in the version's temporary folder (`Store.commit`'s
`before_seal`), with the training model already released.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecp.errors import EdgecpError
from edgecp.progress import Progress, emit

DRIFT_THRESHOLD = 0.45  # 1 - SSIM; see the module docstring and docs/guide/forgetting.md for the calibration
MAX_CHECK_IMAGES = 64


@dataclass(frozen=True)
class CheckConfig:
    """`images` per earlier concept (0: no check), `steps` of the base's sampler, classifier-free `guidance`, `size`
    (None: the base's), DC `trials` per image, `threshold` on drift, `seed` of the first image."""

    images: int = 2
    steps: int = 20
    guidance: float = 7.5
    size: int | None = None
    trials: int = 8
    threshold: float = DRIFT_THRESHOLD
    seed: int = 0

    def __post_init__(self) -> None:
        for flag, value, low, high in (("--check-images", self.images, 0, MAX_CHECK_IMAGES),
                                       ("--check-steps", self.steps, 1, 1000),
                                       ("--check-trials", self.trials, 1, 1000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise EdgecpError(f"{flag} {value!r} is out of range: a whole number from {low} to {high}")
        if not isinstance(self.threshold, (int, float)) or not 0 < float(self.threshold) <= 2:
            raise EdgecpError(f"--check-threshold {self.threshold!r} is out of range: 1 - SSIM lies in [0, 2]; "
                              f"pass a number in (0, 2], e.g. {DRIFT_THRESHOLD}")


def ssim_drift(a, b) -> float:
    """1 - SSIM of two PIL images of the same size (RGB, data range 255, scikit-image's defaults)."""
    from skimage.metrics import structural_similarity  # lazy: scikit-image loads slowly

    x, y = np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB"))
    return float(1.0 - structural_similarity(x, y, channel_axis=2, data_range=255))


def run_check(store, parent: str, new_dir: Path, new_manifest: dict, cfg: CheckConfig, device,
              memory_budget=None, progress: Progress | None = None) -> tuple[dict, dict]:
    """The check of the version in `new_dir` (manifest `new_manifest`, parent `parent`): (result for the
    manifest, images {name: (before list, after list)} for a contact sheet)."""
    t0 = time.perf_counter()
    earlier = store.manifest(parent)["concepts"]
    base = {"images": cfg.images, "steps": cfg.steps, "guidance": cfg.guidance, "trials": cfg.trials,
            "threshold": cfg.threshold, "measure": "drift = 1 - SSIM (same seeds, version n-1 vs n)",
            "from": parent}
    if cfg.images == 0:
        return {**base, "off": True, "concepts": [], "warn": []}, {}
    if not earlier:
        return {**base, "concepts": [], "warn": [], "seconds": 0.0}, {}
    # lazy: the model stack
    from edgecp.config import stored_prior
    from edgecp.generate import GenerateConfig, plan_generate, torch_generate
    from edgecp.memory import release_memory
    from edgecp.personal import PersonalModel

    gcfg = GenerateConfig(n=cfg.images, seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance, size=cfg.size)
    plan = plan_generate(store, gcfg, device, memory_budget)
    prompts = [c["prompt"] for c in earlier]
    candidates = [stored_prior(store.info["prior"]).prompt] + prompts
    total = 2 * len(earlier) * (cfg.steps + 1)
    done = [0]

    def tick(_ev=None):
        done[0] += 1
        emit(progress, "check", min(done[0], total), total)

    images: dict[str, tuple[list, list]] = {}
    model = PersonalModel.load(store, parent, device=device, plan=plan)
    before = [torch_generate(model.comps, p, gcfg, model.device, tick, plan) for p in prompts]
    for _ in prompts:
        tick()
    latents = [_encode(model, ims) for ims in before]
    dc_before = _dc(model, latents, candidates, cfg, plan)
    del model
    release_memory(device)
    model = PersonalModel.from_folder(store, new_dir, new_manifest, device=device, plan=plan)
    after = [torch_generate(model.comps, p, gcfg, model.device, tick, plan) for p in prompts]
    for _ in prompts:
        tick()
    dc_after = _dc(model, latents, candidates, cfg, plan)
    del model
    release_memory(device)
    sims = _evaluator_similarity(store, before, after)
    rows, warn = [], []
    for i, c in enumerate(earlier):
        drifts = [ssim_drift(a, b) for a, b in zip(before[i], after[i])]
        row = {"name": c["name"], "drift": round(float(np.mean(drifts)), 4), "drift_max": round(max(drifts), 4),
               "dc_before": dc_before[i], "dc_after": dc_after[i]}
        if sims is not None:
            row["evaluator_similarity"] = round(sims[i], 4)
        rows.append(row)
        if row["drift"] > cfg.threshold:
            warn.append(c["name"])
        images[c["name"]] = (before[i], after[i])
    return {**base, "concepts": rows, "warn": warn, "seconds": round(time.perf_counter() - t0, 2)}, images


def _encode(model, ims: list):
    """VAE posterior means (scaled) of PIL images, as the training caches its photos (`diffusion.encode_images`)."""
    import torch

    from edgecp.images import fit_square

    vae = model.comps.vae
    size = ims[0].size[0]
    px = torch.stack([torch.from_numpy(np.asarray(fit_square(im, size), dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                      for im in ims])
    with torch.no_grad():
        mean = vae.encode(px.to(model.device, vae.dtype)).latent_dist.mean.float()
    return mean * float(vae.config.scaling_factor)


def _dc(model, latents: list, candidates: list[str], cfg: CheckConfig, plan) -> list[float]:
    """Per concept i: the share of its images whose lowest mean denoising error (over `trials` shared (t, noise)
    pairs) is under candidate i + 1 (candidate 0 is the prior prompt)."""
    import contextlib

    import torch

    from edgecp import seeds
    from edgecp.consolidation.dc_scores import dc_forward_chunked, trial
    from edgecp.model.quant import autocast_for
    from edgecp.personal import encode_text
    from edgecp.seeds import stream_seed

    comps, dev = model.comps, model.device
    sched = _train_scheduler(comps)
    ctx = autocast_for(plan, dev.type) if plan is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        text = encode_text(comps, candidates, dev)
    chunk = plan.micro_batch * 2 if plan is not None else None
    out = []
    for i, x0 in enumerate(latents):
        gen = torch.Generator().manual_seed(stream_seed(cfg.seed, seeds.CHECK, i))
        err = torch.zeros(x0.shape[0], len(candidates))
        for _ in range(cfg.trials):
            t, noise = trial(x0.cpu(), sched.config.num_train_timesteps, gen)
            with torch.no_grad(), ctx:
                e, _eps = dc_forward_chunked(lambda x, tt, c: comps.unet(x, tt, c).sample, sched, x0,
                                             text.to(x0.dtype), t.to(dev), noise.to(dev), chunk)
            err += e.float().cpu()
        out.append(round(float((err.argmin(dim=1) == i + 1).float().mean()), 4))
    return out


def _train_scheduler(comps):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(comps.scheduler.config)


def _evaluator_similarity(store, before: list, after: list) -> list[float] | None:
    """On the tiny base: mean cosine of the evaluator's embeddings of each seed's two images; None elsewhere."""
    if store.info["base"].get("kind") != "tiny":
        return None
    from edgecp.eval.features import load_features

    try:
        feats = load_features("tiny")
    except EdgecpError:
        return None
    sims = []
    for b, a in zip(before, after):
        fb, fa = feats.embed_images(b), feats.embed_images(a)
        sims.append(float(np.mean(np.sum(fb * fa, axis=1))))
    return sims


def contact_sheet(images: dict[str, tuple[list, list]], result: dict, path: str | Path) -> Path:
    """One PNG: a row per earlier concept, version n-1's images then version n's, with the concept's name and drift
    above its row. Written where the user asks (`--contact-sheet`), by the CLI after the commit."""
    from PIL import Image, ImageDraw

    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise EdgecpError(f"--contact-sheet '{path}' must end in .png")
    rows = [(r, images[r["name"]]) for r in result.get("concepts", []) if r["name"] in images]
    if not rows:
        raise EdgecpError("no contact sheet: there is no earlier concept to compare (the first concept, or the check "
                          "is off)")
    w, h = rows[0][1][0][0].size
    n = len(rows[0][1][0])
    label, gap = 14, 8
    sheet = Image.new("RGB", (2 * n * w + gap, label + len(rows) * (h + label)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), f"before ({result.get('from')})", fill="black")
    draw.text((n * w + gap + 2, 1), "after", fill="black")
    for j, (r, (bef, aft)) in enumerate(rows):
        y = label + j * (h + label)
        flag = "  DRIFTED" if r["name"] in result.get("warn", []) else ""
        draw.text((2, y + 1), f"<{r['name']}>  drift {r['drift']:.3f}  DC {r['dc_before']:.2f}->{r['dc_after']:.2f}{flag}",
                  fill="red" if flag else "black")
        for k, im in enumerate(bef):
            sheet.paste(im.convert("RGB"), (k * w, y + label))
        for k, im in enumerate(aft):
            sheet.paste(im.convert("RGB"), (n * w + gap + k * w, y + label))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
