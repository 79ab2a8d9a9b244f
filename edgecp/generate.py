"""Text-to-image with a personal model: PyTorch (diffusers) or ONNX (onnxruntime, no torch imported).

Both backends start from the same numpy-drawn latents for a seed, so their images are comparable. The device
runtime (`edgecp generate --backend onnx`, `pip install 'edgecp[runtime]'`) imports this module: its top-level
imports are torch-free, and the PyTorch backend imports torch and diffusers inside its functions. onnxruntime is
imported only by the ONNX functions, since `edgecp[train]` does not install it.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from edgecp.errors import EdgecpError
from edgecp.integrity import read_export_meta
from edgecp.outputs import absolute, check_output_dir
from edgecp.planner import parse_bytes, plan_generation
from edgecp.profiles import load_profile
from edgecp.progress import Progress, emit
from edgecp.prompts import expand
from edgecp.sampling import initial_latents
from edgecp.scoped import quiet_libraries
from edgecp.store import Store, check_version_name

StepCallback = Progress  # ProgressEvent("sample", step, total) after each denoising step
MAX_IMAGES = 10_000  # images per call, as config.MAX_PRIOR_IMAGES (priors are drawn through GenerateConfig)
MAX_STEPS = 1000
MAX_SIZE = 4096
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1


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
        """Bounds (our choice, generous for real use): n and batch_size <= MAX_IMAGES (priors, up to
        config.MAX_PRIOR_IMAGES, are drawn through this config); steps <= MAX_STEPS (DDIM over SD's 1000 training
        timesteps has at most 1000 steps); size a multiple of 8 up to MAX_SIZE (5x SD 2.x's 768); guidance finite
        within +-MAX_GUIDANCE (7.5 is usual); seed 0 to 2^63 - 1 (numpy draws the latents from it; the bench's
        seeds reach seed * 1000 + concept)."""
        for name, flag, value, low, high in (("n", "-n", self.n, 1, MAX_IMAGES),
                                             ("steps", "--steps", self.steps, 1, MAX_STEPS),
                                             ("batch_size", "batch_size", self.batch_size, 1, MAX_IMAGES),
                                             ("seed", "--seed", self.seed, 0, MAX_SEED)):
            if not _is_int(value) or not low <= value <= high:
                raise EdgecpError(f"{flag} {value!r} is out of range: {name} must be a whole number from {low} to {high}")
        if self.size is not None and (not _is_int(self.size) or not 8 <= self.size <= MAX_SIZE or self.size % 8):
            raise EdgecpError(f"--size {self.size!r} is out of range: use a multiple of 8 from 8 to {MAX_SIZE} "
                              "(e.g. 512), or leave it out for the model's own size")
        if (isinstance(self.guidance, bool) or not isinstance(self.guidance, numbers.Real)
                or not math.isfinite(self.guidance) or abs(self.guidance) > MAX_GUIDANCE):
            raise EdgecpError(f"--guidance {self.guidance!r} is out of range: use a finite number from "
                              f"-{MAX_GUIDANCE:g} to {MAX_GUIDANCE:g} (7.5 is usual; 1 turns guidance off)")


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)  # numpy integers too


def torch_generate(comps, prompt: str, cfg: GenerateConfig, device, callback: StepCallback | None = None,
                   plan=None) -> list:
    """`cfg.n` images of one (already expanded) prompt with diffusers' StableDiffusionPipeline (on SDXL its
    StableDiffusionXLPipeline, which encodes with both encoders and passes its own time ids).

    Under a memory `plan` (see edgecp/planner.py): its autocast, `plan.micro_batch` images per call, VAE slicing.
    The plan's autocast covers the text encoder and the UNet only: the pipeline returns latents and the VAE decodes
    them outside autocast, in its own dtype (`decode_latents`), fp32, or bf16 in bf16 plans as `model/quant.py`
    loads it: SD's VAE overflows in fp16, and an fp16 autocast would run its convolutions in fp16 whatever its
    weights are (issue 22).
    """
    # lazy: torch and diffusers stay off the device runtime (module docstring)
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler

    from edgecp.model.base import ddim_scheduler, pipeline_for
    from edgecp.model.quant import autocast_for

    size = cfg.size or comps.resolution
    if size % comps.vae_scale:
        raise EdgecpError(f"--size {size} must be divisible by the VAE factor {comps.vae_scale}")
    scheduler = comps.scheduler
    if cfg.sampler is not None:
        scheduler = ddim_scheduler(comps.scheduler.config, {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[cfg.sampler])
    pipe = pipeline_for(comps, scheduler)  # StableDiffusionPipeline, or StableDiffusionXLPipeline on SDXL
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
            emit(callback, "sample", _base + i + 1, total)
            return kwargs

        with torch.no_grad(), autocast_for(plan, torch.device(device).type) if plan else contextlib.nullcontext():
            out = pipe(
                [prompt] * len(chunk), negative_prompt=[cfg.negative_prompt] * len(chunk), height=size, width=size,
                num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                latents=chunk.to(device, comps.unet.dtype if plan is None else torch.float32),
                callback_on_step_end=on_step, output_type="latent",
            )
        images += decode_latents(pipe, out.images)
        done += cfg.steps
    return images


def decode_latents(pipe, latents) -> list:
    """PIL images of the pipeline's final latents, decoded as StableDiffusionPipeline decodes them (the same
    operations: scale, `vae.decode`, `image_processor.postprocess`, so an fp32 plan gives the same images as the
    pipeline's own decode) but with autocast off, whatever the caller has on, and the latents in the VAE's dtype."""
    import torch  # lazy: off the device runtime (module docstring)

    vae = pipe.vae
    device_type = latents.device.type if latents.device.type in ("cpu", "cuda") else "cpu"
    with torch.no_grad(), torch.autocast(device_type, enabled=False):
        image = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])


def slug(prompt: str, limit: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return s[:limit].rstrip("-") or "image"


def grid(images: list, cols: int | None = None):
    """The images in one picture, `cols` per row (default: a square grid), on white."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    g = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        g.paste(im, ((i % cols) * w, (i // cols) * h))
    return g


def save_images(images: list, out_dir: Path, stem: str) -> list[Path]:
    """`stem-0.png ...` plus `stem-grid.png` (the grid last in the returned list); `edgecp.outputs.IMAGE_NAME_RE`
    recognises these names when a later run writes into the same folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = out_dir / f"{stem}-{i}.png"
        im.save(p)
        paths.append(p)
    g = out_dir / f"{stem}-grid.png"
    grid(images).save(g)
    return paths + [g]


@quiet_libraries()  # the model stack's import notices (torchao, bitsandbytes), on a first import here
def plan_generate(store, cfg: GenerateConfig, device, memory_budget=None):
    """The memory plan of `generate` on this store (no model loaded)."""
    # lazy: these import torch and diffusers, kept off the device runtime (module docstring)
    from edgecp.memory import device_info
    from edgecp.model.shape import base_shape
    from edgecp.personal import generation_targets, open_base

    # as PersonalModel.load holds it: the adapter's targets and K/V never 8-bit, in the plan's dtype (stored base
    # changes are folded in fp32 while loading, model/quant.py)
    shape = base_shape(open_base(store), generation_targets(store), False)
    size = cfg.size or shape.unet.sample_size * shape.vae_scale
    budget = parse_bytes(memory_budget if memory_budget is not None else store.info.get("memory_budget"))
    return plan_generation(shape, size, cfg.n, device_info(device), budget)


@quiet_libraries()
def generate_from_store(
    store_root: str | Path, prompt: str, cfg: GenerateConfig, out_dir: str | Path,
    device: str | None = None, callback: StepCallback | None = None, memory_budget=None, on_plan=None,
    overwrite: bool = False, version: str | None = None,
) -> list[Path]:
    """PyTorch backend: the store's current version, or `version` (any complete one: comparing versions needs no
    rollback); files are named after prompt, version and seed.

    HEAD is read once, first: the version it names is the one loaded and the one in the file names, even if a
    `rollback` moves HEAD while the model loads. `out_dir` may not be inside the store, and a non-empty folder that
    generate did not make needs `overwrite` (`edgecp.outputs.check_output_dir`). The memory planner picks the
    precision and images per call within `memory_budget` (default: the store's, else the device's memory);
    `on_plan` receives the plan. bitsandbytes' and torchao's notices are quiet for the duration of the call
    (`edgecp.scoped.quiet_libraries`, levels restored after).
    """
    import torch  # lazy: off the device runtime (module docstring)

    from edgecp.personal import PersonalModel, default_device

    store_root = absolute(store_root)
    out_dir = check_output_dir(out_dir, store_root, overwrite=overwrite, kind="images")
    store = Store.open(store_root)
    if version is None:
        version = store.head  # read once: loaded, and named in the files, whatever HEAD says later
    else:
        check_version_name(version)
        versions = store.versions()
        if version not in versions:
            span = f"{versions[0]} .. {versions[-1]}" if versions else "no complete version"
            raise EdgecpError(f"--version {version} does not exist in store '{store.root}': it has {span} (see "
                              f"`edgecp history --store {store.root}`)")
    expanded = expand(prompt, store.manifest(version)["concepts"])
    dev = torch.device(device) if device else default_device()
    plan = plan_generate(store, cfg, dev, memory_budget)
    if on_plan:
        on_plan(plan)
    model = PersonalModel.load(store, version, device=dev, plan=plan)
    images = torch_generate(model.comps, expanded, cfg, model.device, callback, plan)
    return save_images(images, out_dir, f"{slug(prompt)}-{version}-s{cfg.seed}")


def find_export(store_root: str | Path) -> Path:
    """The newest complete, intact ONNX export of the store's current version (under STORE/exports).

    An export counts only when its edgecp.json (written last) is present and every file matches the sha256 it
    records: a folder left by a killed export, or one whose files changed, is never picked up."""
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
    # lazy: onnxruntime is the [runtime] extra, not installed by edgecp[train] (module docstring)
    import onnxruntime as ort

    from edgecp.export.ort_runner import GPU_PROVIDERS, available_providers

    listed = meta.get("providers")
    if not listed:  # exports before the report recorded them: the shipped profile of that name
        try:
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
    on_note: Callable[[str], None] | None = None, overwrite: bool = False, update: str | Path | None = None,
) -> list[Path]:
    """ONNX backend: onnxruntime on an exported folder; imports no torch. `on_note(line)` hears why a listed GPU
    provider was not used (the runner then runs on the CPU). The images are labelled with the version the export
    holds (its edgecp.json). `out_dir` follows generate_from_store's rules, kept out of the store the export came
    from (the store its edgecp.json names, and the one whose exports/ folder holds it).
    `update`: a concept update of that export (`edgecp export --update-for`): checked against it before anything runs
    (`export.update_format.open_update`), its version, concepts and tensors used; the export folder is only read."""
    from edgecp.export.ort_runner import OnnxStableDiffusion  # lazy: onnxruntime (module docstring)

    onnx_dir = absolute(onnx_dir)  # a link is still refused as one below
    meta_file = onnx_dir / "edgecp.json"
    if not meta_file.is_file():
        raise EdgecpError(f"'{onnx_dir}' is not an edgecp ONNX export (no edgecp.json): run `edgecp export` first")
    meta, problems = read_export_meta(onnx_dir)
    if problems:
        raise EdgecpError(f"export '{onnx_dir}' is not intact: {problems[0]}; export again with `edgecp export`")
    upd = None
    if update is not None:
        from edgecp.export.update_format import (  # lazy: numpy only, but with the runner's
            UpdateError,
            open_update,
        )

        try:  # the base was hashed just above
            upd = open_update(onnx_dir, absolute(update), base_meta=meta)
        except UpdateError as e:
            raise EdgecpError(str(e)) from None
        meta = {**meta, "version": upd.version, "concepts": upd.concepts, "store": upd.manifest.get("store")}
    version = meta.get("version")
    if not isinstance(version, str) or not re.fullmatch(r"v[0-9]{4,}", version):
        raise EdgecpError(f"export '{onnx_dir}' records version {version!r}, not a version name such as v0003 (its "
                          "edgecp.json was edited): export again with `edgecp export`")
    stores = [onnx_dir.parent.parent] if (onnx_dir.parent.parent / "store.json").is_file() else []
    if isinstance(meta.get("store"), str) and (Path(meta["store"]) / "store.json").is_file():
        stores.append(Path(meta["store"]))
    out_dir = [check_output_dir(out_dir, s, overwrite=overwrite, kind="images") for s in stores or [None]][0]
    expanded = expand(prompt, meta["concepts"])
    providers, note = onnx_providers(meta)
    if note and on_note:
        on_note(note)
    try:
        runner = OnnxStableDiffusion(onnx_dir, providers=providers, reduce_memory=cfg.reduce_memory, update=upd)
        if runner.provider_note and on_note:
            on_note(runner.provider_note)
        images = runner([expanded] * cfg.n, steps=cfg.steps, guidance=cfg.guidance, seed=cfg.seed, height=cfg.size,
                        width=cfg.size, negative_prompt=cfg.negative_prompt, callback=callback)
    except (ValueError, FileNotFoundError) as e:  # the runner's own errors already name the value and the fix
        raise EdgecpError(str(e).splitlines()[0]) from e
    return save_images(images, out_dir, f"{slug(prompt)}-{version}-s{cfg.seed}-onnx")
