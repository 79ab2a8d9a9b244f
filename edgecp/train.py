"""The one training loop: `add_concept(store, name, images, ...)` learns a concept and commits a version."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from edgecp.config import (
    AdapterConfig,
    PriorConfig,
    TrainConfig,
    check_concept_name,
    from_dict,
    replace,
    to_dict,
)
from edgecp.errors import EdgecpError
from edgecp.images import load_square, purge_sources, validate_images
from edgecp.methods import build_method
from edgecp.methods.base import LatentSet, TaskContext
from edgecp.model.base import load_components
from edgecp.model.tokens import (
    add_concept_token,
    concept_embedding,
    load_concept_tokens,
    token_of,
    word_embedding,
)
from edgecp.personal import TOKENS_FILE, default_device, encode_text, open_base, read_tensors
from edgecp.priors import ensure_priors
from edgecp.prompts import concept_prompt
from edgecp.store import Store, sha256_file


@dataclass(frozen=True)
class ProgressEvent:
    phase: str  # priors | encode | train | consolidate | commit
    step: int
    total: int
    loss: float | None = None


Progress = Callable[[ProgressEvent], None]


def _emit(progress: Progress | None, phase: str, step: int, total: int, loss: float | None = None) -> None:
    if progress:
        progress(ProgressEvent(phase, step, total, loss))


@torch.no_grad()
def encode_images(comps, paths: list[Path], size: int, device, flip: bool) -> LatentSet:
    """VAE posterior (mean, std) of each image (and of its mirror image when `flip`)."""
    px = torch.stack([load_square(p, size) for p in paths])
    if flip:
        px = torch.cat([px, px.flip(-1)])
    dist = comps.vae.encode(px.to(device, comps.vae.dtype)).latent_dist
    return LatentSet(dist.mean.float(), dist.std.float(), float(comps.vae.config.scaling_factor))


def denoise_loss(unet, scheduler, latents, text, generator) -> torch.Tensor:
    """Per-row epsilon-prediction MSE (B,) at a random timestep per row (the standard LDM objective)."""
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    pred = unet(noisy, t, text).sample
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


def add_concept(
    store_root: str | Path,
    name: str,
    images: list[str | Path],
    *,
    class_word: str | None = None,
    overrides: dict | None = None,
    purge_source: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
) -> dict:
    """Learn concept `name` from `images`, commit it as a new version, purge the staged copies. Returns the manifest.

    Every input is validated before anything is written; on any failure the store is exactly as before.
    """
    name = check_concept_name(name)
    store = Store.open(store_root)
    paths = validate_images(images)
    if class_word is not None and not class_word.strip():
        raise EdgecpError("--class-word is empty: pass a word such as 'dog', or leave it out")
    train_cfg = replace(from_dict(TrainConfig, store.info["train"], "train"), **(overrides or {}))
    with store.writer():
        if store.concept(name):
            raise EdgecpError(
                f"concept '{name}' already exists in '{store.root}': choose another name (see `edgecp concepts`)"
            )
        spec = open_base(store)
        staged = store.stage(paths)
        try:
            manifest = _learn(store, spec, name, sorted(staged.iterdir()), paths, class_word, train_cfg,
                              torch.device(device) if device else default_device(), progress)
        finally:
            store.purge_staging(staged)
    if purge_source:
        manifest["purged"] = purge_sources(paths)  # what was and was not deleted (links, hard links), for the CLI
    return manifest


def _learn(store, spec, name, staged, sources, class_word, cfg: TrainConfig, device, progress) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    comps = load_components(spec)
    for m in (comps.text_encoder, comps.vae, comps.unet):
        m.to(device)
    size = cfg.resolution or comps.resolution
    prior_cfg = from_dict(PriorConfig, store.info["prior"], "prior")
    prior_paths = ensure_priors(store, comps, prior_cfg, size, device,
                                lambda i, n: _emit(progress, "priors", i, n))

    head = store.manifest()
    previous = head["concepts"]
    load_concept_tokens(comps.tokenizer, comps.text_encoder, previous, read_tensors(store.version_dir(), TOKENS_FILE))
    token = token_of(name)
    init = word_embedding(comps.tokenizer, comps.text_encoder, class_word or "object")
    add_concept_token(comps.tokenizer, comps.text_encoder, name, init, trainable=cfg.token_lr > 0)
    token_row = concept_embedding(comps.text_encoder).rows[-1]

    method_info = store.info["method"]
    method = build_method(method_info["name"], method_info["params"], from_dict(AdapterConfig, store.info["adapter"], "adapter"))
    from diffusers import DDPMScheduler

    ctx = TaskContext(
        index=len(previous) + 1, name=name, token=token, class_word=class_word,
        prompt=concept_prompt(store.info["prompt_template"], token, class_word), prior_prompt=prior_cfg.prompt,
        previous=previous, prev_dir=store.version_dir(), train=cfg, comps=comps, device=device,
        noise_scheduler=DDPMScheduler.from_config(comps.scheduler.config),
        token_row=token_row if cfg.token_lr > 0 else None,
    )
    _emit(progress, "encode", 0, 1)
    ctx.instance = encode_images(comps, staged, size, device, flip=True)
    ctx.prior = encode_images(comps, prior_paths, size, device, flip=False)
    _emit(progress, "encode", 1, 1)

    method.prepare(ctx)
    n_train = method.n_trainable(ctx)
    losses = _train_loop(ctx, method, progress)
    t_train = time.perf_counter() - t_start
    method.consolidate(ctx, lambda phase, i, n, loss=None: _emit(progress, phase, i, n, loss))

    _emit(progress, "commit", 0, 1)
    tensors = method.files(ctx)
    n_store = sum(t.numel() for f in tensors.values() for t in f.values())
    files = {fname: _safetensors_bytes(t) for fname, t in tensors.items()}
    tokens = read_tensors(store.version_dir(), TOKENS_FILE)
    tokens[token] = token_row.detach().float().cpu().clone()
    files[TOKENS_FILE] = _safetensors_bytes(tokens)
    entry = {
        "name": name, "token": token, "class_word": class_word, "prompt": ctx.prompt, "task": ctx.index,
        "images": [{"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sources],
        "steps": cfg.steps, "train": to_dict(cfg),
        "seconds": {"train": round(t_train, 2), "total": round(time.perf_counter() - t_start, 2)},
        "metrics": {"loss_first": losses[0], "loss_last": losses[-1]},
        "seconds_per_iteration": {
            k: round(v, 4) for k, v in (("train", ctx.extra["train_seconds"] / cfg.steps),
                                        ("fisher", ctx.extra.get("fisher_seconds_per_iter")),
                                        ("dsc", ctx.extra.get("dsc_seconds_per_iter"))) if v is not None},
    }
    unet_params = sum(p.numel() for n, p in comps.unet.named_parameters() if "lora_" not in n and "vera_" not in n)
    manifest = {
        "concepts": previous + [entry], "method": method_info,
        # the paper's N_param Train / Store: % of the UNet's parameters trained per task / stored (base = 100)
        "n_param": {"unet": unet_params, "train": n_train, "store": n_store,
                    "train_pct": round(100 * n_train / unet_params, 4),
                    "store_pct": round(100 + 100 * n_store / unet_params, 4)},
        **method.manifest_extra(ctx),
    }
    version = store.commit(files, manifest)
    _emit(progress, "commit", 1, 1)
    return store.manifest(version)


class Trainer:
    """One training iteration = grad_accum micro-batches of (instance + prior) rows in one UNet call, then a step."""

    def __init__(self, ctx: TaskContext, method):
        comps, cfg = ctx.comps, ctx.train
        self.ctx, self.method = ctx, method
        if cfg.gradient_checkpointing:
            comps.unet.enable_gradient_checkpointing()
            if ctx.token_row is not None:
                te = comps.text_encoder
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        comps.unet.train()
        comps.text_encoder.train(ctx.token_row is not None)
        self.opt = torch.optim.AdamW(method.param_groups(ctx), weight_decay=1e-2)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + ctx.index)
        with torch.no_grad():
            self.prior_text = encode_text(comps, [ctx.prior_prompt], ctx.device)

    def step(self) -> float:
        ctx, cfg, gen = self.ctx, self.ctx.train, self.gen
        total = 0.0
        for _ in range(cfg.grad_accum):
            b = cfg.batch_size
            inst = ctx.instance.draw(torch.randint(len(ctx.instance), (b,), generator=gen), gen)
            prior = ctx.prior.draw(torch.randint(len(ctx.prior), (b,), generator=gen), gen)
            text_n = encode_text(ctx.comps, [ctx.prompt], ctx.device)
            if ctx.token_row is None:
                text_n = text_n.detach()
            text = torch.cat([text_n.expand(b, -1, -1), self.prior_text.expand(b, -1, -1)])
            per_row = denoise_loss(ctx.comps.unet, ctx.noise_scheduler, torch.cat([inst, prior]), text, gen)
            loss = per_row[:b].mean() + cfg.prior_weight * per_row[b:].mean()
            pen = self.method.penalty(ctx)
            if pen is not None:
                loss = loss + pen
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total

    def close(self) -> None:
        comps = self.ctx.comps
        comps.unet.eval()
        comps.text_encoder.eval()
        comps.unet.disable_gradient_checkpointing()


def _train_loop(ctx: TaskContext, method, progress) -> list[float]:
    trainer = Trainer(ctx, method)
    losses = []
    t0 = time.perf_counter()
    for step in range(ctx.train.steps):
        loss = trainer.step()
        losses.append(round(loss, 6))
        _emit(progress, "train", step + 1, ctx.train.steps, loss)
    ctx.extra["train_seconds"] = time.perf_counter() - t0
    trainer.close()
    return losses


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
