"""Text-to-image with a personal model: PyTorch (diffusers) or ONNX (onnxruntime, no torch imported).

Both backends start from the same numpy-drawn latents for a seed, so their images are comparable.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgecp.errors import EdgecpError
from edgecp.prompts import expand

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerateConfig:
    n: int = 4
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    size: int | None = None  # None: the model's native resolution
    negative_prompt: str = ""
    batch_size: int = 4
    sampler: str | None = None  # None: the base's scheduler; "ddpm" or "ddim": that scheduler from its config
    reduce_memory: bool = False  # onnx backend: one model's session at a time (OnnxStableDiffusion(reduce_memory=))

    def __post_init__(self) -> None:
        if self.n < 1:
            raise EdgecpError(f"-n {self.n} must be >= 1")
        if self.steps < 1:
            raise EdgecpError(f"--steps {self.steps} must be >= 1")
        if self.size is not None and (self.size < 8 or self.size % 8):
            raise EdgecpError(f"--size {self.size} must be a positive multiple of 8 (e.g. 512)")


def torch_generate(comps, prompt: str, cfg: GenerateConfig, device, callback: StepCallback | None = None,
                   plan=None) -> list:
    """`cfg.n` images of one (already expanded) prompt with diffusers' StableDiffusionPipeline.

    Under a memory `plan` (see edgecp/planner.py): its autocast, `plan.micro_batch` images per call, VAE slicing.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from edgecp.export.ort_runner import initial_latents
    from edgecp.methods.phases import autocast_for

    size = cfg.size or comps.resolution
    if size % comps.vae_scale:
        raise EdgecpError(f"--size {size} must be divisible by the VAE factor {comps.vae_scale}")
    scheduler = comps.scheduler
    if cfg.sampler is not None:
        from diffusers import DDIMScheduler, DDPMScheduler

        scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[cfg.sampler].from_config(comps.scheduler.config)
    pipe = StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    lat = size // comps.vae_scale
    latents = torch.from_numpy(
        initial_latents(cfg.seed, cfg.n, comps.unet.config.in_channels, lat, lat)
    ) * scheduler.init_noise_sigma
    per_call = plan.micro_batch if plan is not None else cfg.batch_size
    if plan is not None and plan.vae_slicing:
        comps.vae.enable_slicing()
    total = cfg.steps * math.ceil(cfg.n / per_call)
    images, done = [], 0
    for start in range(0, cfg.n, per_call):
        chunk = latents[start : start + per_call]

        def on_step(_pipe, i, _t, kwargs, _base=done):
            if callback:
                callback(_base + i + 1, total)
            return kwargs

        with torch.no_grad(), autocast_for(plan, torch.device(device).type) if plan else contextlib.nullcontext():
            out = pipe(
                [prompt] * len(chunk), negative_prompt=[cfg.negative_prompt] * len(chunk), height=size, width=size,
                num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                latents=chunk.to(device, comps.unet.dtype if plan is None else torch.float32),
                callback_on_step_end=on_step,
            )
        images += out.images
        done += cfg.steps
    return images


def slug(prompt: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def grid(images: list, cols: int | None = None):
    from PIL import Image

    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    g = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g


def save_images(images: list, out_dir: Path, stem: str) -> list[Path]:
    """`stem-0.png ...` plus `stem-grid.png` (the grid last in the returned list)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = out_dir / f"{stem}-{i}.png"
        im.save(p)
        paths.append(p)
    g = out_dir / f"{stem}-grid.png"
    grid(images).save(g)
    return paths + [g]


def plan_generate(store, cfg: GenerateConfig, device, memory_budget=None):
    """The memory plan of `generate` on this store (no model loaded)."""
    from edgecp.memory import device_info
    from edgecp.model.shape import base_shape
    from edgecp.personal import open_base
    from edgecp.planner import parse_bytes, plan_generation

    shape = base_shape(open_base(store))
    size = cfg.size or shape.unet.sample_size * shape.vae_scale
    budget = parse_bytes(memory_budget if memory_budget is not None else store.info.get("memory_budget"))
    return plan_generation(shape, size, cfg.n, device_info(device), budget)


def generate_from_store(
    store_root: str | Path, prompt: str, cfg: GenerateConfig, out_dir: str | Path,
    device: str | None = None, callback: StepCallback | None = None, memory_budget=None, on_plan=None,
) -> list[Path]:
    """PyTorch backend: the store's current version; files are named after prompt, version and seed.

    The memory planner picks the precision and images per call within `memory_budget` (default: the store's, else
    the device's memory); `on_plan` receives the plan.
    """
    import torch

    from edgecp.personal import PersonalModel, default_device
    from edgecp.store import Store

    store = Store.open(store_root)
    expanded = expand(prompt, store.concepts())
    dev = torch.device(device) if device else default_device()
    plan = plan_generate(store, cfg, dev, memory_budget)
    if on_plan:
        on_plan(plan)
    model = PersonalModel.load(store, device=dev, plan=plan)
    images = torch_generate(model.comps, expanded, cfg, model.device, callback, plan)
    return save_images(images, Path(out_dir), f"{slug(prompt)}-{store.head}-s{cfg.seed}")


def find_export(store_root: str | Path) -> Path:
    """The newest complete, intact ONNX export of the store's current version (under STORE/exports).

    An export counts only when its edgecp.json (written last) is present and every file matches the sha256 it
    records: a folder left by a killed export, or one whose files changed, is never picked up."""
    from edgecp.integrity import read_export_meta
    from edgecp.store import Store

    store = Store.open(store_root)
    head = store.head
    candidates, damaged = [], []
    for d in (store.root / "exports").glob("*"):
        meta = d / "edgecp.json"
        if d.is_dir() and not d.name.startswith(".") and meta.is_file():
            try:
                version = json.loads(meta.read_text()).get("version")
            except (OSError, ValueError, AttributeError):
                version = None
            if version == head or version is None:
                candidates.append((meta.stat().st_mtime, d))
    for _, d in sorted(candidates, reverse=True):
        meta, problems = read_export_meta(d)
        if not problems and meta.get("version") == head:
            return d
        damaged.append(f"{d.name} ({problems[0] if problems else 'another version'})")
    hint = f" ({'; '.join(damaged)}: delete it or run `edgecp gc --store {store_root}`)" if damaged else ""
    raise EdgecpError(
        f"no ONNX export of version {head} in '{store.root}' is complete and intact{hint}: run `edgecp export --store {store_root} "
        "--profile cpu-fp32` first, or pass --onnx-dir"
    )


def onnx_providers(meta: dict) -> tuple[list[str] | None, str | None]:
    """The execution providers of an export's profile that this onnxruntime has, and a note when the profile's GPU
    provider is missing (a CPU build of onnxruntime). None: the profile lists a GPU provider that is present; the
    runner then tries it and falls back to the CPU with its own note when it cannot start (no GPU, CUDA, cuDNN)."""
    import onnxruntime as ort

    from edgecp.export.ort_runner import GPU_PROVIDERS, available_providers

    listed = meta.get("providers")
    if not listed:  # exports before the report recorded them: the shipped profile of that name
        try:
            from edgecp.profiles import load_profile

            listed = list(load_profile(meta.get("profile", "cpu-fp32")).providers)
        except EdgecpError:
            listed = ["CPUExecutionProvider"]
    missing = [p for p in listed if p in GPU_PROVIDERS and p not in ort.get_available_providers()]
    note = None
    if missing:
        note = (f"profile '{meta.get('profile')}' runs on {missing[0]}, which this onnxruntime {ort.__version__} "
                f"does not have (a CPU build): pip uninstall onnxruntime && pip install 'edgecp[cuda]' "
                "(onnxruntime-gpu); running on the CPU")
    usable = available_providers(listed)
    if any(p in GPU_PROVIDERS for p in usable):
        return None, note
    return usable, note


def generate_from_onnx(
    onnx_dir: str | Path, prompt: str, cfg: GenerateConfig, out_dir: str | Path, callback: StepCallback | None = None,
    on_note: Callable[[str], None] | None = None,
) -> list[Path]:
    """ONNX backend: onnxruntime on an exported folder; imports no torch. `on_note(line)` hears why a listed GPU
    provider was not used (the runner then runs on the CPU)."""
    from edgecp.export.ort_runner import OnnxStableDiffusion

    onnx_dir = Path(onnx_dir)
    meta_file = onnx_dir / "edgecp.json"
    if not meta_file.is_file():
        raise EdgecpError(f"'{onnx_dir}' is not an edgecp ONNX export (no edgecp.json): run `edgecp export` first")
    from edgecp.integrity import read_export_meta

    meta, problems = read_export_meta(onnx_dir)
    if problems:
        raise EdgecpError(f"export '{onnx_dir}' is not intact: {problems[0]}; export again with `edgecp export`")
    expanded = expand(prompt, meta["concepts"])
    providers, note = onnx_providers(meta)
    if note and on_note:
        on_note(note)
    try:
        runner = OnnxStableDiffusion(onnx_dir, providers=providers, reduce_memory=cfg.reduce_memory)
        if runner.provider_note and on_note:
            on_note(runner.provider_note)
        images = runner([expanded] * cfg.n, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed, height=cfg.size,
                        width=cfg.size, negative_prompt=cfg.negative_prompt, callback=callback)
    except (ValueError, FileNotFoundError) as e:  # the runner's own errors already name the value and the fix
        raise EdgecpError(str(e).splitlines()[0]) from e
    return save_images(images, Path(out_dir), f"{slug(prompt)}-{meta['version']}-s{cfg.seed}-onnx")
