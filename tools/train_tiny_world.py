#!/usr/bin/env python
"""Pretrain the tiny Stable Diffusion base on the tiny world (edgecp.world.data), reproducibly, on a CPU.

Stages, each with its own wall-clock budget (or a fixed step count):

  a. VAE   - diffusers AutoencoderKL with the config of edgecp/model/tiny.py; L1 + L2 + edge (image gradient)
             reconstruction + a small KL (SD-style), the posterior's log-variance initialised low; then
             scaling_factor = 1 / std of the latents of the UNet's training images.
  b. CLIP  - the evaluation encoder (edgecp.world.evaluator): small CNN image tower + CLIPTextModel text tower
             (the tiny config, the real CLIP tokenizer), InfoNCE with a learnable temperature; captions that
             repeat within a batch count as positives of each other.
  c. text  - the SD text encoder := the evaluator's text tower (frozen from here on).
  d. UNet  - the config of tiny.py, on VAE latents of a fixed set of world images, SD noise schedule
             (DDPMScheduler from tiny.SD_SCHEDULER_CONFIG), epsilon prediction with min-SNR-5 weighting,
             10 % caption dropout to "" (classifier-free guidance), AdamW, EMA of the weights.
  e. write - a diffusers StableDiffusionPipeline folder (DDIM scheduler, no safety checker, safetensors) to
             --out, with evaluator/ inside it, README.md and train_report.json. UNet and VAE weights are
             stored in fp16 (diffusers loads them as fp32 unless told otherwise); the text encoder stays fp32
             (transformers 5 would load fp16 weights as fp16 and mix dtypes in a plain from_pretrained); the
             evaluator refers to text_encoder/model.safetensors (sha256-checked) instead of a second copy.
  f. check - samples.png (fixed captions, DDIM 25 steps, guidance 6) and evaluator scores of generated images
             against one-attribute-changed captions, in train_report.json.

Usage (the full run, about 55 minutes on 2 CPU cores):
    python tools/train_tiny_world.py --seed 0
Smoke test (well under a minute):
    python tools/train_tiny_world.py --smoke --out /tmp/tiny-world-smoke

Budgets are wall-clock: the number of steps depends on the machine (train_report.json records it). Pass
--steps-vae/--steps-clip/--steps-unet (and --threads) to repeat a run step for step; the learning-rate
schedules then follow steps instead of time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: far faster on a shared CPU
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "edgecp" / "model" / "assets" / "tiny-world"
SIZE_LIMIT_MB = 25.0
GUIDANCE = 6.0
SAMPLE_STEPS = 25
ATTRIBUTES = ("colour", "shape", "position", "count", "bg_colour")  # changed one at a time in the evaluation

# offsets of the example index ranges each stage draws from (the world is indexed by (seed, index))
STREAM_VAE, STREAM_CLIP, STREAM_EVAL = 10_000_000, 20_000_000, 90_000_000


# ----------------------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------------------

T_START = time.time()


def log(stage: str, msg: str) -> None:
    el = time.time() - T_START
    print(f"[{int(el // 60):02d}:{int(el % 60):02d}] {stage:<6} {msg}", flush=True)


def fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60:d}:{s % 60:02d}"


class Clock:
    """Progress of one stage: by wall clock (budget seconds) or by a fixed number of steps."""

    def __init__(self, stage: str, seconds: float, steps: int | None, every_s: float = 20.0):
        self.stage, self.seconds, self.steps = stage, float(seconds), steps
        self.t0 = time.time()
        self.step = 0
        self.every_s, self.last_print = every_s, self.t0
        self.losses: list[float] = []
        self.curve: list[tuple[int, float, float]] = []  # (step, seconds, mean loss over the last interval)

    @property
    def elapsed(self) -> float:
        return time.time() - self.t0

    @property
    def progress(self) -> float:
        if self.steps is not None:
            return min(1.0, self.step / max(1, self.steps))
        return min(1.0, self.elapsed / max(1e-9, self.seconds))

    def done(self) -> bool:
        if self.steps is not None:
            return self.step >= self.steps
        return self.elapsed >= self.seconds

    def lr(self, peak: float, warmup: int, floor: float = 0.1) -> float:
        """Linear warm-up over `warmup` steps, then cosine from `peak` to `floor * peak` over the budget."""
        w = min(1.0, (self.step + 1) / max(1, warmup))
        return peak * w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * self.progress)))

    def tick(self, loss: float, extra: str = "") -> None:
        self.step += 1
        self.losses.append(loss)
        now = time.time()
        if now - self.last_print >= self.every_s or self.done():
            recent = self.losses[-max(1, min(len(self.losses), 50)):]
            mean = float(np.mean(recent))
            self.curve.append((self.step, round(self.elapsed, 1), round(mean, 5)))
            sps = self.elapsed / self.step
            left = (self.steps - self.step) * sps if self.steps is not None else self.seconds - self.elapsed
            total = f"/{self.steps}" if self.steps is not None else ""
            log(self.stage, f"step {self.step}{total}  loss {mean:.4f}  {sps:.2f} s/step  "
                            f"{self.progress * 100:5.1f}%  ETA {fmt_s(left)}{('  ' + extra) if extra else ''}")
            self.last_print = now

    def summary(self, batch: int) -> dict:
        el = self.elapsed
        return {
            "seconds": round(el, 1), "steps": self.step, "batch": batch,
            "s_per_step": round(el / max(1, self.step), 3), "samples_per_s": round(self.step * batch / max(el, 1e-9), 1),
            "final_loss": round(float(np.mean(self.losses[-50:])), 5) if self.losses else None,
            "curve": self.curve,
        }


def to_tensor(images: np.ndarray, device):
    import torch

    return torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def tokenize(tokenizer, texts: list[str], padding="max_length") -> np.ndarray:
    return tokenizer(list(texts), padding=padding, truncation=True, max_length=77, return_tensors="np").input_ids.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# a. VAE
# ----------------------------------------------------------------------------------------------------------

def train_vae(vae, args, device) -> dict:
    import torch
    import torch.nn.functional as F

    from edgecp.world.data import make_dataset

    torch.manual_seed(args.seed + 100)
    rng = np.random.default_rng(args.seed + 100)
    # start the posterior narrow (std ~ 0.05, not ~ 1): with SD's tiny KL weight the decoder would otherwise see
    # mostly noise for hundreds of steps while the encoder slowly learns to shrink the log-variance
    with torch.no_grad():
        c = vae.config.latent_channels
        vae.quant_conv.weight[c:] *= 0.1
        vae.quant_conv.bias[c:] = -6.0
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr_vae, betas=(0.9, 0.99), weight_decay=0.0)
    clock = Clock("vae", args.minutes_vae * 60, args.steps_vae)
    next_index = STREAM_VAE
    kl_w, edge_w = 1e-6, 0.5
    while not clock.done():
        full = clock.progress >= args.vae_crop_until
        batch = args.batch_vae_full if full else args.batch_vae_crop
        images, _ = make_dataset(batch, args.seed, start=next_index)
        next_index += batch
        x = to_tensor(images, device)
        if not full:  # random 32x32 crops, one position per batch
            y0, x0 = (int(v) for v in rng.integers(0, 33, 2))
            x = x[:, :, y0:y0 + 32, x0:x0 + 32]
        for g in opt.param_groups:
            g["lr"] = clock.lr(args.lr_vae, warmup=30)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        l2 = F.mse_loss(rec, x)
        edge = ((rec[..., 1:, :] - rec[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])).abs().mean() + \
               ((rec[..., 1:] - rec[..., :-1]) - (x[..., 1:] - x[..., :-1])).abs().mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = l1 + l2 + edge_w * edge + kl_w * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        clock.tick((l1 + l2).item(), extra=("64px" if full else "32px crops") + f"  kl {kl.item():.1f}")
    vae.eval()
    summary = clock.summary(args.batch_vae_full)
    summary["batch_crops"] = args.batch_vae_crop if args.vae_crop_until > 0 else None
    return summary


def vae_eval(vae, args, device) -> dict:
    import torch

    from edgecp.world.data import make_dataset

    images, _ = make_dataset(args.eval_images, args.seed, start=STREAM_EVAL)
    with torch.no_grad():
        x = to_tensor(images, device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).mean(dim=(1, 2, 3)).cpu().numpy()
    return {"psnr_db": round(float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10)))), 2), "n": len(images)}


# ----------------------------------------------------------------------------------------------------------
# b. the evaluator (contrastive)
# ----------------------------------------------------------------------------------------------------------

def hard_negative(rng: np.random.Generator, ex) -> str | None:
    """The caption of a shapes example with one of its words about shape, colour, position or count changed
    (NegCLIP-style: batches of random scenes rarely differ in one attribute only, hard negatives make the
    evaluator look at each). None for photos or when no word can be changed."""
    import re

    from edgecp.world.data import COLOURS, PLURAL, SHAPES

    if ex.scene.kind != "shapes":
        return None
    g = ex.scene.groups[int(rng.integers(len(ex.scene.groups)))]
    cap = ex.caption
    kinds = ["shape", "colour", "position", "count"]
    rng.shuffle(kinds)
    for kind in kinds:
        if kind == "shape":
            word = g.shape if g.count == 1 else PLURAL[g.shape]
            other = str(rng.choice([x for x in SHAPES if x != g.shape]))
            new = other if g.count == 1 else PLURAL[other]
        elif kind == "colour":
            word = g.colour
            new = str(rng.choice([c for c in COLOURS if c not in (g.colour, ex.scene.bg_colour)]))
        elif kind == "position":
            phrases = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
            word = phrases.get(g.position, "in the center" if "in the center" in cap else "in the middle")
            new = str(rng.choice([v for k, v in phrases.items() if k != g.position] +
                                 (["in the center"] if g.position != "center" else [])))
        else:
            word = {2: "two", 3: "three"}.get(g.count)
            if word is None:
                continue
            new = "three" if word == "two" else "two"
        pattern = rf"\b{re.escape(word)}\b"
        if re.search(pattern, cap):
            out = re.sub(pattern, new, cap, count=1)
            return re.sub(r"\ba (?=[aeiou])", "an ", re.sub(r"\ban (?=[^aeiou])", "a ", out))
    return None


def train_clip(ev, tokenizer, args, device) -> dict:
    import torch
    import torch.nn.functional as F

    from edgecp.world.data import make_dataset

    torch.manual_seed(args.seed + 200)
    rng = np.random.default_rng(args.seed + 200)
    model = ev.model.to(device).train()
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or n == "logit_scale" else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr_clip, betas=(0.9, 0.98))
    clock = Clock("clip", args.minutes_clip * 60, args.steps_clip)
    cache: dict[str, np.ndarray] = {}
    next_index = STREAM_CLIP
    B = args.batch_clip
    while not clock.done():
        images, captions, examples = make_dataset(B, args.seed, start=next_index, return_examples=True)
        next_index += B
        negatives = [n for n in (hard_negative(rng, ex) for ex in examples) if n is not None and n not in captions]
        texts = captions + negatives
        new = [c for c in dict.fromkeys(texts) if c not in cache]
        if new:
            cache.update(zip(new, tokenize(tokenizer, new)))
        # causal attention + pooling at the first end-of-text token: padding beyond it changes nothing
        length = max(int(np.argmax(cache[c] == tokenizer.eos_token_id)) + 1 for c in texts)
        ids = np.stack([cache[c][:length] for c in texts])
        for g in opt.param_groups:
            g["lr"] = clock.lr(args.lr_clip, warmup=20)
        img = model.encode_images(to_tensor(images, device))
        txt = model.encode_texts(torch.from_numpy(ids).to(device))
        logits = img @ txt.T * model.logit_scale.exp()  # (B, B + negatives)
        # captions repeated within the batch are positives of each other; hard negatives are never positives
        codes = {c: k for k, c in enumerate(dict.fromkeys(texts))}
        lab = torch.tensor([codes[c] for c in texts], device=device)
        same = (lab[:B, None] == lab[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :B].T, target[:, :B]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
            acc = float(same[torch.arange(B, device=device), logits.argmax(1)].mean())
        clock.tick(loss.item(), extra=f"acc {acc:.2f} (of {len(texts)})  T {1 / model.logit_scale.exp().item():.3f}")
    model.eval().cpu()
    return clock.summary(B)


def eval_scenes(args, n: int):
    """`n` held-out one-group scenes with colour-named backgrounds (their images and Examples)."""
    from edgecp.world.data import make_example

    out, i = [], STREAM_EVAL + 100_000
    while len(out) < n:
        ex = make_example(args.seed, i)
        i += 1
        if ex.scene.kind == "shapes" and len(ex.scene.groups) == 1 and ex.scene.bg_colour is not None:
            out.append(ex)
    return out


def attribute_variants(scene) -> dict[str, list[str]]:
    """For each attribute: [true caption, captions with that attribute changed to every other valid value]."""
    from edgecp.world.data import COLOURS, POSITIONS, SHAPES, canonical_caption

    g = scene.groups[0]
    true = canonical_caption(scene)
    out = {}
    for attr in ATTRIBUTES:
        if attr == "colour":
            alts = [c for c in COLOURS if c not in (g.colour, scene.bg_colour)]
        elif attr == "shape":
            alts = [s for s in SHAPES if s != g.shape]
        elif attr == "position":
            alts = [p for p in POSITIONS if p != g.position]
        elif attr == "count":
            alts = [k for k in (1, 2, 3) if k != g.count and not (k == 3 and g.size == "large")]
        else:  # bg_colour
            alts = [c for c in COLOURS if c not in (g.colour, scene.bg_colour)]
        out[attr] = [true] + [canonical_caption(scene, **{attr: a}) for a in alts]
    return out


def attribute_accuracy(ev, images, scenes) -> dict:
    """Share of images whose true caption beats every one-attribute-changed caption, per attribute."""
    emb = ev.embed_images(images)
    res = {}
    for attr in ATTRIBUTES:
        hits, chance = [], []
        for e, sc in zip(emb, scenes):
            caps = attribute_variants(sc)[attr]
            sims = ev.embed_texts(caps) @ e
            hits.append(float(np.argmax(sims) == 0))
            chance.append(1.0 / len(caps))
        res[attr] = {"accuracy": round(float(np.mean(hits)), 3), "chance": round(float(np.mean(chance)), 3)}
    return res


def retrieval_accuracy(ev, args) -> float:
    """Image -> caption top-1 within held-out batches of 64 (a repeated caption counts as right)."""
    from edgecp.world.data import make_dataset

    images, captions = make_dataset(args.eval_images, args.seed, start=STREAM_EVAL)
    sims = ev.embed_images(images) @ ev.embed_texts(captions).T
    hits = []
    for s in range(0, len(captions), 64):
        block = sims[s:s + 64, s:s + 64]
        caps = captions[s:s + 64]
        hits += [caps[int(np.argmax(row))] == caps[i] for i, row in enumerate(block)]
    return round(float(np.mean(hits)), 3)


# ----------------------------------------------------------------------------------------------------------
# d. UNet
# ----------------------------------------------------------------------------------------------------------

def encode_latents(vae, images: np.ndarray, device, batch: int = 256):
    import torch

    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            post = vae.encode(to_tensor(images[i:i + batch], device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, tokenizer, latents, captions, scaling_factor, args, device) -> dict:
    import torch
    from diffusers import DDPMScheduler

    from edgecp.model.tiny import SD_SCHEDULER_CONFIG

    torch.manual_seed(args.seed + 300)
    rng = np.random.default_rng(args.seed + 300)
    sched = DDPMScheduler.from_config({k: v for k, v in SD_SCHEDULER_CONFIG.items()
                                       if k not in ("set_alpha_to_one",)})
    acp = sched.alphas_cumprod.to(device)
    snr = acp / (1 - acp)
    weight_t = torch.clamp(snr, max=args.min_snr_gamma) / snr  # min-SNR-gamma weights for epsilon prediction

    # frozen text encoder: the hidden states of every caption once (77 tokens, as the pipeline encodes)
    text_encoder.to(device).eval().requires_grad_(False)
    uniq = list(dict.fromkeys(captions))
    index = {c: k for k, c in enumerate(uniq)}
    cap_idx = torch.tensor([index[c] for c in captions])
    states = []
    with torch.no_grad():
        for i in range(0, len(uniq), 256):
            ids = torch.from_numpy(tokenize(tokenizer, uniq[i:i + 256])).to(device)
            states.append(text_encoder(ids).last_hidden_state.half().cpu())
        empty = text_encoder(torch.from_numpy(tokenize(tokenizer, [""])).to(device)).last_hidden_state
    states = torch.cat(states)
    mean, std = latents
    n = len(captions)
    log("unet", f"{n} latents, {len(uniq)} distinct captions; batch {args.batch_unet}")

    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr_unet, betas=(0.9, 0.999), weight_decay=0.01)
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    clock = Clock("unet", args.minutes_unet * 60, args.steps_unet)
    perm, pos = rng.permutation(n), 0
    B = args.batch_unet
    while not clock.done():
        if pos + B > n:
            perm, pos = rng.permutation(n), 0
        idx = torch.from_numpy(perm[pos:pos + B])
        pos += B
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape)).to(device) * scaling_factor
        cond = states[cap_idx[idx]].to(device).float()
        drop = torch.from_numpy(rng.random(B) < args.caption_dropout).to(device)
        cond = torch.where(drop[:, None, None], empty.expand_as(cond), cond)
        noise = torch.randn_like(z0)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), device=device)
        zt = sched.add_noise(z0, noise, t)
        for g in opt.param_groups:
            g["lr"] = clock.lr(args.lr_unet, warmup=50)
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * weight_t[t]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema_max_decay, (1 + clock.step) / (10 + clock.step))
            torch._foreach_mul_(ema, d)
            torch._foreach_add_(ema, [p.detach() for p in params], alpha=1 - d)
        clock.tick(per.mean().item(), extra=f"lr {opt.param_groups[0]['lr']:.1e}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    return clock.summary(B)


# ----------------------------------------------------------------------------------------------------------
# e/f. writing and checking
# ----------------------------------------------------------------------------------------------------------

def write_pipeline(comps: dict, out: Path) -> None:
    import copy

    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from edgecp.model.tiny import SD_SCHEDULER_CONFIG

    unet16 = copy.deepcopy(comps["unet"]).cpu().to(torch.float16)
    vae16 = copy.deepcopy(comps["vae"]).cpu().to(torch.float16)
    pipe = StableDiffusionPipeline(
        vae=vae16, text_encoder=comps["text_encoder"].cpu().to(torch.float32), tokenizer=comps["tokenizer"],
        unet=unet16, scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def load_pipeline(out: Path, device):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   use_safetensors=True).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompts: list[str], seed: int, steps: int, device, batch: int = 32) -> np.ndarray:
    import torch

    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator("cpu").manual_seed(seed + i)
        res = pipe(list(prompts[i:i + batch]), height=64, width=64, num_inference_steps=steps,
                   guidance_scale=GUIDANCE, generator=g, output_type="np")
        out.append((res.images * 255).round().clip(0, 255).astype(np.uint8))
    return np.concatenate(out)


def sample_grid(pipe, captions, per_caption: int, seed: int, steps: int, device, path: Path) -> None:
    from PIL import Image, ImageDraw

    prompts = [c for c in captions for _ in range(per_caption)]
    imgs = generate(pipe, prompts, seed, steps, device)
    cell, text_w, pad = 128, 300, 4
    W = text_w + per_caption * (cell + pad)
    H = len(captions) * (cell + pad)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, cap in enumerate(captions):
        words, lines, line = cap.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > 44:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        for k, ln in enumerate(lines):
            draw.text((6, r * (cell + pad) + 8 + 14 * k), ln, fill=(0, 0, 0))
        for c in range(per_caption):
            im = Image.fromarray(imgs[r * per_caption + c]).resize((cell, cell), Image.Resampling.NEAREST)
            canvas.paste(im, (text_w + c * (cell + pad), r * (cell + pad)))
    canvas.save(path)


def write_readme(out: Path, report: dict) -> None:
    st = report["stages"]
    ev = report.get("eval", {})
    lines = [
        "# tiny-world: the pretrained tiny Stable Diffusion base of edgecp",
        "",
        "Stable Diffusion 1.x architecture at 64x64 px (VAE factor 4, 16x16x4 latents; UNet (32, 64), cross-attention",
        "dim 64; 2-layer CLIP text encoder of width 64 with the real 49,408-token CLIP tokenizer), pretrained from",
        "scratch on the procedural *tiny world* of `edgecp.world.data` (coloured shapes at named positions on named",
        "backgrounds, plus crops of scikit-image's bundled photos except the ones reserved as concepts).",
        "",
        f"Made by `python tools/train_tiny_world.py {report['command_args']}` (seed {report['seed']}) in "
        f"{report['total_minutes']:.1f} min on {report['machine']['threads']} CPU thread(s) "
        f"({report['machine']['processor'] or report['machine']['machine']}).",
        "",
        "| stage | minutes | steps | batch | samples/s | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("vae", "clip", "unet"):
        s = st[k]
        lines.append(f"| {k} | {s['seconds'] / 60:.1f} | {s['steps']} | {s['batch']} | {s['samples_per_s']} | {s['final_loss']} |")
    lines += [
        "",
        f"- VAE: scaling_factor {report['scaling_factor']:.4f}; held-out reconstruction PSNR {report['vae_eval']['psnr_db']} dB.",
        f"- Evaluator (`evaluator/`, load with `edgecp.world.evaluator.load_evaluator`): held-out image->caption top-1 "
        f"in batches of 64: {report['clip_eval']['retrieval_top1']}.",
    ]
    if ev:
        lines.append(f"- Generated images (DDIM {report['sample_steps']} steps, guidance {GUIDANCE:g}) vs. captions with one attribute changed "
                     "(evaluator picks the true caption; real images for reference):")
        lines.append("")
        lines.append("| attribute | generated | real | chance |")
        lines.append("|---|---|---|---|")
        for a in ATTRIBUTES:
            lines.append(f"| {a} | {ev['generated'][a]['accuracy']} | {ev['real'][a]['accuracy']} | {ev['real'][a]['chance']} |")
    lines += [
        "",
        "Storage: UNet and VAE weights in fp16 (diffusers loads them as fp32 by default), text encoder in fp32;",
        "`evaluator/` refers to `text_encoder/model.safetensors` (its text tower, sha256-checked) instead of",
        f"keeping a second copy. Total {report['size_mb']:.1f} MB (limit {SIZE_LIMIT_MB:.0f} MB).",
        "",
        "`samples.png`: one row per caption, several seeds. `train_report.json`: everything above and the loss curves.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None,
                   help=f"output folder (default {DEFAULT_OUT.relative_to(REPO)}; with --smoke a temp folder)")
    p.add_argument("--minutes-vae", type=float, default=10.0)
    p.add_argument("--minutes-clip", type=float, default=5.0)
    p.add_argument("--minutes-unet", type=float, default=35.0)
    p.add_argument("--steps-vae", type=int, default=None, help="fixed steps instead of the time budget")
    p.add_argument("--steps-clip", type=int, default=None)
    p.add_argument("--steps-unet", type=int, default=None)
    p.add_argument("--n-latents", type=int, default=10000, help="world images encoded once for the UNet")
    p.add_argument("--batch-vae-full", type=int, default=16)
    p.add_argument("--batch-vae-crop", type=int, default=64)
    p.add_argument("--vae-crop-until", type=float, default=0.0,
                   help="share of the VAE budget on 32x32 crops (0: whole images; on a CPU they learn more per second)")
    p.add_argument("--batch-clip", type=int, default=256)
    p.add_argument("--batch-unet", type=int, default=64)
    p.add_argument("--lr-vae", type=float, default=3e-3)
    p.add_argument("--lr-clip", type=float, default=2e-3)
    p.add_argument("--lr-unet", type=float, default=1e-3)
    p.add_argument("--min-snr-gamma", type=float, default=5.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema-max-decay", type=float, default=0.999)
    p.add_argument("--eval-images", type=int, default=256, help="held-out images for the VAE/evaluator checks")
    p.add_argument("--eval-generated", type=int, default=48, help="images generated for the attribute check")
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPU cores available)")
    p.add_argument("--smoke", action="store_true", help="tiny budgets and sizes: a test that everything runs")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    if args.smoke:
        args.minutes_vae, args.minutes_clip, args.minutes_unet = 0.03, 0.03, 0.05
        args.n_latents, args.batch_vae_crop, args.batch_vae_full = 96, 16, 8
        args.batch_clip, args.batch_unet = 64, 16
        args.eval_images, args.eval_generated, args.sample_steps = 32, 4, 3
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "tiny-world-smoke" if args.smoke else DEFAULT_OUT
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.threads or cores
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = torch.device(args.device)

    from edgecp.model.base import quiet_loading
    from edgecp.model.tiny import build_tiny_components
    from edgecp.world import data as world
    from edgecp.world.evaluator import build_evaluator, save_evaluator

    # this script owns its process: diffusers' and transformers' notices and progress bars stay off while main runs
    quiet = quiet_loading()  # held in a local: the generator restores the settings once it is closed
    quiet.__enter__()
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()) and not args.force and (not args.smoke or out == DEFAULT_OUT):
        raise SystemExit(f"{out} exists: pass --force to replace it")
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    budget = args.minutes_vae + args.minutes_clip + args.minutes_unet
    log("start", f"seed {args.seed}, {threads} thread(s), device {device}, budgets vae {args.minutes_vae} + clip "
                 f"{args.minutes_clip} + unet {args.minutes_unet} = {budget:.1f} min (+ data, encoding, checks)")
    log("start", f"photo sources: {', '.join(world.photo_sources())}")

    comps = build_tiny_components(args.seed)
    tokenizer = comps["tokenizer"]
    report: dict = {"seed": args.seed, "command_args": " ".join(argv_used), "args": {k: str(v) for k, v in vars(args).items()},
                    "stages": {}, "photo_sources": list(world.photo_sources()), "reserved": sorted(world.RESERVED),
                    "versions": {}, "machine": {"threads": threads, "device": str(device),
                                                "processor": platform.processor(), "machine": platform.machine()}}
    import diffusers
    import transformers

    report["versions"] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                          "transformers": transformers.__version__, "numpy": np.__version__}

    # a. VAE
    vae = comps["vae"].to(device)
    log("vae", f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters")
    report["stages"]["vae"] = train_vae(vae, args, device)
    report["vae_eval"] = vae_eval(vae, args, device)
    log("vae", f"held-out PSNR {report['vae_eval']['psnr_db']} dB")

    # encode the UNet's images now (their latent std sets the scaling factor)
    t0 = time.time()
    images, captions = world.make_dataset(args.n_latents, args.seed, start=0)
    log("data", f"{len(images)} world images in {time.time() - t0:.1f} s; encoding them with the VAE ...")
    t0 = time.time()
    mean, std = encode_latents(vae, images, device)
    del images
    sample = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(args.seed))
    scaling_factor = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    report["stages"]["encode"] = {"seconds": round(time.time() - t0, 1), "images": args.n_latents}
    report["scaling_factor"] = scaling_factor
    log("data", f"encoded in {time.time() - t0:.1f} s; latent std {1 / scaling_factor:.4f} -> scaling_factor {scaling_factor:.4f}")

    # b. evaluator, c. text encoder := its text tower
    ev = build_evaluator(args.seed + 3, tokenizer=tokenizer)
    ev.model.text_model = comps["text_encoder"]
    assert ev.model.text_model.config.hidden_size == ev.config["text_tower"]["config"]["hidden_size"]
    report["stages"]["clip"] = train_clip(ev, tokenizer, args, device)
    report["clip_eval"] = {"retrieval_top1": retrieval_accuracy(ev, args)}
    log("clip", f"held-out image->caption top-1 (batches of 64): {report['clip_eval']['retrieval_top1']}")
    text_encoder = ev.model.text_model  # the same module object as comps["text_encoder"]

    # d. UNet
    unet = comps["unet"]
    log("unet", f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f} M parameters")
    report["stages"]["unet"] = train_unet(unet, text_encoder, tokenizer, (mean, std), captions, scaling_factor, args, device)

    # e. write
    t0 = time.time()
    write_pipeline({"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}, tmp)
    te_file = next((tmp / "text_encoder").glob("*.safetensors"))
    save_evaluator(ev, tmp / "evaluator", text_weights=te_file,
                   training={"seed": args.seed, "clip_steps": report["stages"]["clip"]["steps"]})
    log("write", f"pipeline + evaluator written in {time.time() - t0:.1f} s")

    # f. check: reload from disk, sample, score
    t0 = time.time()
    pipe = load_pipeline(tmp, device)
    sample_grid(pipe, list(world.SAMPLE_CAPTIONS), 4 if not args.smoke else 1, args.seed, args.sample_steps, device,
                tmp / "samples.png")
    log("check", f"samples.png in {time.time() - t0:.1f} s")
    t0 = time.time()
    scenes = eval_scenes(args, args.eval_generated)
    gen = generate(pipe, [world.canonical_caption(e.scene) for e in scenes], args.seed + 1, args.sample_steps, device)
    real = np.stack([e.image for e in scenes])
    report["eval"] = {"n": len(scenes), "generated": attribute_accuracy(ev, gen, [e.scene for e in scenes]),
                      "real": attribute_accuracy(ev, real, [e.scene for e in scenes]),
                      "clip_score_generated": round(float(np.mean(np.sum(
                          ev.embed_images(gen) * ev.embed_texts([world.canonical_caption(e.scene) for e in scenes]), 1))), 4),
                      "clip_score_real": round(float(np.mean(np.sum(
                          ev.embed_images(real) * ev.embed_texts([world.canonical_caption(e.scene) for e in scenes]), 1))), 4)}
    report["stages"]["check"] = {"seconds": round(time.time() - t0, 1)}
    g, r = report["eval"]["generated"], report["eval"]["real"]
    log("check", "attribute accuracy generated/real/chance: " + ", ".join(
        f"{a} {g[a]['accuracy']:.2f}/{r[a]['accuracy']:.2f}/{r[a]['chance']:.2f}" for a in ATTRIBUTES))

    report["sample_steps"], report["guidance"] = args.sample_steps, GUIDANCE
    report["total_minutes"] = round((time.time() - T_START) / 60, 2)
    report["size_mb"] = round(folder_mb(tmp), 2)
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    write_readme(tmp, report)
    report["size_mb"] = round(folder_mb(tmp), 2)
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if report["size_mb"] > SIZE_LIMIT_MB:
        raise SystemExit(f"output is {report['size_mb']:.1f} MB > {SIZE_LIMIT_MB} MB; left in {tmp}")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log("done", f"{out} ({report['size_mb']:.1f} MB) in {report['total_minutes']:.1f} min")
    return report


if __name__ == "__main__":
    main()
