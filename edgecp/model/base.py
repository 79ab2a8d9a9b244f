"""Resolve and load a base model: the embedded tiny model, a diffusers folder, a single-file checkpoint, a hub id.

A base is identified by the sha256 of its weights; a store records it at init and refuses any other base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers.utils import logging as transformers_logging

from edgecp.errors import EdgecpError
from edgecp.model.sdxl import (
    DualTextEncoder,
    DualTokenizer,
    install_packed_conditioning,
    is_sdxl_config,
    pool_at_end_of_text,
)
from edgecp.model.single_file import config_folder, detect_family, install_token_rows, load_token_rows
from edgecp.model.tiny import ensure_tiny_model
from edgecp.paths import edgecp_home
from edgecp.sampling import ddim_config  # one rule for PyTorch and the runner (re-exported here)
from edgecp.scoped import progress_bars_off, quiet_libraries
from edgecp.store import sha256_file

COMPONENT_DIRS = ("unet", "vae", "text_encoder", "text_encoder_2")  # text_encoder_2: SDXL only


@dataclass(frozen=True)
class BaseSpec:
    """Where a base model comes from. `kind` is tiny | folder | single_file | hub."""

    kind: str
    locator: str  # what the user typed ("tiny", a path, a hub id)
    path: Path | None = None  # the local folder or file, once resolved

    def to_json(self) -> dict:
        return {"kind": self.kind, "locator": self.locator}


def resolve_base(locator: str) -> BaseSpec:
    """Turn what the user typed into a local folder or file, downloading a hub id when online."""
    if locator == "tiny":
        return BaseSpec("tiny", "tiny", ensure_tiny_model())
    p = Path(locator).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").exists() or not (p / "unet").is_dir():
            raise EdgecpError(
                f"base folder '{locator}' is not a diffusers Stable Diffusion folder (no model_index.json / unet/): "
                "pass the folder that StableDiffusionPipeline.save_pretrained wrote, or a .safetensors checkpoint"
            )
        return BaseSpec("folder", str(p.resolve()), p.resolve())
    if p.is_file():
        if p.suffix != ".safetensors":
            raise EdgecpError(
                f"base file '{locator}' is not a .safetensors checkpoint: edgecp never unpickles .ckpt/.bin files; "
                "convert it to safetensors first"
            )
        return BaseSpec("single_file", str(p.resolve()), p.resolve())
    if locator.count("/") == 1 and not locator.startswith((".", "/", "~")):
        return BaseSpec("hub", locator, _download_hub(locator))
    raise EdgecpError(
        f"base '{locator}' is neither 'tiny', an existing folder or .safetensors file, nor a hub id 'owner/name'"
    )


def _download_hub(repo_id: str) -> Path:
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"],
            ignore_patterns=["*.fp16.safetensors", "*non_ema*", "*.ckpt", "*.bin"],
        )
    except Exception as e:  # offline, gated, or unknown repo: all the same to the user
        raise EdgecpError(
            f"could not fetch base '{repo_id}' from the model hub ({type(e).__name__}); "
            "when offline, pass a local diffusers folder or a .safetensors file with --base"
        ) from e
    return Path(folder)


def is_sdxl_folder(path: Path) -> bool:
    """Whether a diffusers folder is an SDXL pipeline, by its UNet's architecture (added text and time conditioning),
    not by the pipeline class its model_index.json names."""
    try:
        return is_sdxl_config(json.loads((path / "unet" / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def weight_files(spec: BaseSpec) -> list[Path]:
    assert spec.path is not None
    if spec.path.is_file():
        return [spec.path]
    files = []
    for comp in COMPONENT_DIRS:
        d = spec.path / comp
        files += sorted(f for f in d.glob("*.safetensors") if f.is_file() and ".fp16." not in f.name)
    if not files:
        raise EdgecpError(
            f"base folder '{spec.path}' has no .safetensors weights under unet/, vae/, text_encoder/: "
            "edgecp loads safetensors only; re-save the pipeline with safe_serialization=True"
        )
    return files


def stored_unet_dtype(spec: BaseSpec) -> str | None:
    """The safetensors dtype ("F32", "F16", "BF16") of the first floating tensor of the base's UNet file, from its
    header alone; None for a single-file base (diffusers converts the whole checkpoint there anyway)."""
    assert spec.path is not None
    if spec.path.is_file():
        return None
    for f in sorted(f for f in (spec.path / "unet").glob("*.safetensors") if ".fp16." not in f.name):
        with safe_open(str(f), framework="numpy") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                dtype = sf.get_slice(key).get_dtype()
                if dtype in ("F32", "F16", "BF16", "F64"):
                    return dtype
    return None


def base_sha256(spec: BaseSpec) -> str:
    """sha256 over the base's weight files (name + bytes), cached by (path, size, mtime) to avoid rehashing GBs."""
    cache_file = edgecp_home() / "hash-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    h = hashlib.sha256()
    dirty = False
    root = spec.path if spec.path.is_dir() else spec.path.parent
    for f in weight_files(spec):
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(f)
            dirty = True
        h.update(str(f.relative_to(root)).encode() + b"\0" + cache[key].encode())
    if dirty:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass  # a cache, not state
    return h.hexdigest()


@contextlib.contextmanager
def quiet_loading():
    """diffusers' and transformers' notices below ERROR and their progress bars off for the block (a base loading:
    "Loading pipeline components...", the safety-checker notice of `from_single_file`); on exit each library gets
    back the level and the progress-bar setting it had. Nothing is changed for the rest of the process."""
    with quiet_libraries(("diffusers", "transformers")), progress_bars_off(diffusers_logging, transformers_logging):
        yield


@contextlib.contextmanager
def scheduler_notices_silenced():
    """diffusers' FutureWarnings about a scheduler config's `clip_sample` / `steps_offset` (raised where a pipeline is
    built around a scheduler, and where `from_pretrained` builds the base's own) are not shown: edgecp builds every
    sampling scheduler through `ddim_config`, which sets both as the pipeline would. Local to the block; nothing
    else is filtered and no global filter is installed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The configuration file of this scheduler", category=FutureWarning)
        yield


def ddim_scheduler(config, cls=None):
    """The diffusers scheduler `cls` (default DDIMScheduler; DDPMScheduler for training and `--sampler ddpm`) built
    from a base's scheduler config through `ddim_config`, without diffusers' notices about that config."""
    cls = cls or DDIMScheduler
    with scheduler_notices_silenced():
        return cls.from_config(ddim_config(config))


@dataclass
class Components:
    """The pieces of a Stable Diffusion pipeline that edgecp trains and exports. On SDXL `tokenizer` is a
    `DualTokenizer` and `text_encoder` a `DualTextEncoder` (both encoders; `model/sdxl.py`), and the UNet takes the
    packed conditioning they make."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler: object  # the inference scheduler; training builds a DDPMScheduler from its config

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale

    @property
    def sdxl(self) -> bool:
        return is_sdxl_config(self.unet.config)


def sdxl_components(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, scheduler) -> Components:
    """An SDXL pipeline's pieces as edgecp's Components: the two encoders joined, the UNet taking packed conditioning."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    install_packed_conditioning(unet, vae_scale)
    pool_at_end_of_text(text_encoder, tokenizer)
    pool_at_end_of_text(text_encoder_2, tokenizer_2)
    return Components(DualTokenizer(tokenizer, tokenizer_2), DualTextEncoder(text_encoder, text_encoder_2), vae, unet,
                      scheduler)


def pipeline_for(comps: Components, scheduler):
    """diffusers' text-to-image pipeline around `comps` (no safety checker): StableDiffusionPipeline, or
    StableDiffusionXLPipeline on SDXL, where the pipeline encodes prompts with both encoders itself (their token
    tables carry the concept rows) and passes its own time ids."""
    if comps.sdxl:
        from diffusers import StableDiffusionXLPipeline

        te = comps.text_encoder
        return StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=te.text_encoder, text_encoder_2=te.text_encoder_2,
            tokenizer=comps.tokenizer.first, tokenizer_2=comps.tokenizer.second, unet=comps.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_error(spec: BaseSpec, e: Exception) -> EdgecpError:
    """The one-line error for a base that diffusers or transformers could not load."""
    return EdgecpError(
        f"could not load base '{spec.locator}' as a Stable Diffusion 1.x/2.x/XL pipeline: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}"
    )


def load_components(spec: BaseSpec, dtype=None) -> Components:
    """Load tokenizer, text encoder, VAE, UNet and scheduler from a resolved base (weights via safetensors only).
    The scheduler is a DDIMScheduler from the base's config through `ddim_config`, whatever class the base names."""
    dtype = dtype or torch.float32
    try:
        # the base's own scheduler (replaced below) may say clip_sample true or steps_offset 0: diffusers' notice
        # about it is not the user's business
        with scheduler_notices_silenced(), quiet_loading():
            family = detect_family(spec.path) if spec.kind == "single_file" else None
            if family == "sdxl":
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_single_file(
                    str(spec.path), config=str(config_folder("sdxl")), local_files_only=True, torch_dtype=dtype,
                    use_safetensors=True,
                )
            elif spec.kind == "single_file":  # configs and tokenizer from edgecp's own files: no network
                pipe = StableDiffusionPipeline.from_single_file(
                    str(spec.path), config=str(config_folder(family)), local_files_only=True,
                    torch_dtype=dtype, safety_checker=None, use_safetensors=True,
                )
            elif is_sdxl_folder(spec.path):
                from diffusers import StableDiffusionXLPipeline

                pipe = StableDiffusionXLPipeline.from_pretrained(str(spec.path), dtype=dtype, use_safetensors=True)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(
                    str(spec.path), dtype=dtype, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False, use_safetensors=True,
                )
    except EdgecpError:
        raise
    except Exception as e:
        raise load_error(spec, e) from e
    # a checkpoint edgecp exported: its concepts' tokens become base words (SD 1.x/2.x: edgecp writes no SDXL file yet)
    if spec.kind == "single_file" and getattr(pipe, "text_encoder_2", None) is None:
        install_token_rows(pipe.tokenizer, pipe.text_encoder, load_token_rows(spec.path), f"base file '{spec.path}'")
    scheduler = ddim_scheduler(pipe.scheduler.config)
    encoders = (pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
    for m in (*encoders, pipe.vae, pipe.unet):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    if encoders[1] is not None:
        return sdxl_components(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2, pipe.vae,
                               pipe.unet, scheduler)
    return Components(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler)
