"""PyTorch's side of an export, one model in memory at a time.

An export needs, from PyTorch: the image gate's reference image, each model's outputs on the inputs it saw while
drawing that image (the tensor gate), and for static int8 the UNet's inputs while drawing the calibration images.
Drawn with diffusers' whole pipeline, those need the text encoder, the UNet and the VAE resident together. Here the
same pipeline runs in three stages, each needing one model (docs/export/README.md has the measurements):

1. `encode`: the text encoder gives every job's prompt embeddings (diffusers' `encode_prompt`);
2. `denoise`: the UNet runs each job's DDIM loop from those embeddings (the pipeline with `output_type="latent"`);
3. `decode`: the VAE turns the final latents into images (`vae.decode` and the pipeline's own post-processing).

Same modules, same calls, same order as `edgecp.generate.torch_generate`: the images are the ones `edgecp generate`
draws with DDIM (the tests compare them). Between stages the caller drops or parks the models it is done with.
`recording` captures each model's inputs per call (forward pre-hooks; the VAE's `decode` wrapped on the instance).

On SDXL the stages use diffusers' `StableDiffusionXLPipeline` the way `generate` does (`model.base.pipeline_for`):
stage 1 runs both encoders (`encode_prompt`: penultimate hidden states, the second's pooled embedding), stage 2
passes those with the pipeline's own time ids; `recording` keeps each encoder's ids under its own name and the
UNet's `text_embeds` and `time_ids` beside its three inputs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import VaeImageProcessor

from edgecp.model.base import ddim_scheduler
from edgecp.sampling import initial_latents

GUIDANCE = 7.5  # generate's default, as the ONNX runner's: both halves of classifier-free guidance are seen


@dataclass
class Job:
    """One image to draw: its prompt, seed, DDIM steps and side in pixels; what each stage left."""

    prompt: str
    seed: int
    steps: int
    size: int
    feeds: dict[str, list[dict]] = field(default_factory=dict)  # per model, the inputs of each call (export names)
    embeds: tuple | None = None  # (prompt, negative prompt) from the text encoder; SDXL: + (pooled, negative pooled)
    latents: torch.Tensor | None = None                           # the UNet's final latents
    image: np.ndarray | None = None                               # (H, W, 3) uint8, from the VAE
    step_seconds: list[float] = field(default_factory=list)       # wall time of each denoising step (UNet + DDIM)


@contextlib.contextmanager
def recording(comps, feeds: dict[str, list[dict]]):
    """While the block runs, every call's inputs land in feeds[model] under the export's input names
    (text_encoder, unet, vae_decoder; vae_encoder gets the decoded images, clamped to the encoder's range)."""
    hooks = []
    np_ = lambda t: t.detach().float().numpy().copy() if t.is_floating_point() else t.detach().numpy().copy()

    def text(name):
        def hook(_m, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            feeds.setdefault(name, []).append({"input_ids": np_(ids)})
        return hook

    def unet(_m, args, kwargs):
        names = ("sample", "timestep", "encoder_hidden_states")
        vals = {**dict(zip(names, args)), **{k: v for k, v in kwargs.items() if k in names}}
        vals.update(kwargs.get("added_cond_kwargs") or {})  # SDXL: text_embeds, time_ids
        feeds.setdefault("unet", []).append({k: np_(torch.as_tensor(v)) for k, v in vals.items()
                                             if k in names or k in ("text_embeds", "time_ids")})

    decode = comps.vae.decode

    def recording_decode(z, *args, **kwargs):
        out = decode(z, *args, **kwargs)
        feeds.setdefault("vae_decoder", []).append({"latent_sample": np_(z)})
        image = out[0] if isinstance(out, tuple) else out.sample
        feeds.setdefault("vae_encoder", []).append({"sample": np_(image.clamp(-1, 1))})
        return out

    encoders = ({"text_encoder": comps.text_encoder.text_encoder, "text_encoder_2": comps.text_encoder.text_encoder_2}
                if comps.sdxl else {"text_encoder": comps.text_encoder})
    for name, te in encoders.items():
        hooks.append(te.register_forward_pre_hook(text(name), with_kwargs=True))
    hooks.append(comps.unet.register_forward_pre_hook(unet, with_kwargs=True))
    comps.vae.decode = recording_decode
    try:
        yield feeds
    finally:
        for h in hooks:
            h.remove()
        del comps.vae.decode  # the class's method again


def step_timer(seconds: list[float], inner: Callable | None = None) -> Callable:
    """A step callback: appends each step's wall time to `seconds` (since the previous call returned, or since it was
    made), then calls `inner` with the same arguments and returns what it returns. `inner`'s own time (a progress
    bar) is not the step's. The export's PyTorch side and its image gate time their steps alike with it."""
    mark = [time.perf_counter()]

    def on_step(*args):
        seconds.append(time.perf_counter() - mark[0])
        out = inner(*args) if inner is not None else None
        mark[0] = time.perf_counter()
        return out

    return on_step


def _pipeline(comps, text_encoder=None, unet=None):
    """diffusers' pipeline holding only the stage's model: the others may be on the meta device (parked), and the
    pipeline takes its device from the first model it holds."""
    # the config the export's scheduler/ file records and the runner reads (ddim_config): both sides sample alike
    if comps.sdxl:
        from diffusers import StableDiffusionXLPipeline  # as model.base.pipeline_for builds it for `generate`

        te = text_encoder
        pipe = StableDiffusionXLPipeline(
            vae=None, text_encoder=te.text_encoder if te is not None else None,
            text_encoder_2=te.text_encoder_2 if te is not None else None, tokenizer=comps.tokenizer.first,
            tokenizer_2=comps.tokenizer.second, unet=unet, scheduler=ddim_scheduler(comps.scheduler.config),
            force_zeros_for_empty_prompt=True, add_watermarker=False)
        pipe.vae_scale_factor = comps.vae_scale
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=text_encoder, tokenizer=comps.tokenizer, unet=unet,
        scheduler=ddim_scheduler(comps.scheduler.config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.vae_scale_factor = comps.vae_scale  # diffusers assumes 8 without a VAE
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode(comps, jobs: list[Job], negative_prompt: str = "") -> None:
    """Stage 1, the text encoder only: each job's (prompt, negative prompt) embeddings."""
    pipe = _pipeline(comps, text_encoder=comps.text_encoder)
    for job in jobs:
        with recording(comps, job.feeds):
            if comps.sdxl:
                job.embeds = pipe.encode_prompt(job.prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                                do_classifier_free_guidance=True, negative_prompt=negative_prompt)
            else:
                job.embeds = pipe.encode_prompt(job.prompt, torch.device("cpu"), 1, True,
                                                negative_prompt=negative_prompt)


@torch.no_grad()
def denoise(comps, jobs: list[Job], callback: Callable[[Job, int, int], None] | None = None) -> None:
    """Stage 2, the UNet only: each job's DDIM loop from its embeddings and seed's latents, to its final latents,
    and the wall time of each step (``Job.step_seconds``). ``callback(job, step, steps)`` after each step."""
    pipe = _pipeline(comps, unet=comps.unet)
    for job in jobs:
        lat = job.size // comps.vae_scale
        latents = torch.from_numpy(initial_latents(job.seed, 1, comps.unet.config.in_channels, lat, lat))
        def report(_pipe, i, _t, kwargs, _job=job):
            if callback is not None:
                callback(_job, i + 1, _job.steps)
            return kwargs  # diffusers' callback_on_step_end hands the step's tensors back

        on_step = step_timer(job.step_seconds, report)
        pooled = ({"pooled_prompt_embeds": job.embeds[2], "negative_pooled_prompt_embeds": job.embeds[3]}
                  if comps.sdxl else {})
        with recording(comps, job.feeds):
            job.latents = pipe(
                prompt_embeds=job.embeds[0], negative_prompt_embeds=job.embeds[1], **pooled, height=job.size,
                width=job.size,
                num_inference_steps=job.steps, guidance_scale=GUIDANCE,
                latents=latents * pipe.scheduler.init_noise_sigma, output_type="latent", callback_on_step_end=on_step,
            ).images


@torch.no_grad()
def decode(comps, jobs: list[Job]) -> None:
    """Stage 3, the VAE only: each job's image, as the pipeline decodes and post-processes it."""
    processor = VaeImageProcessor(vae_scale_factor=comps.vae_scale)
    for job in jobs:
        with recording(comps, job.feeds):
            image = comps.vae.decode(job.latents / comps.vae.config.scaling_factor, return_dict=False)[0]
        pil = processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])[0]
        job.image = np.asarray(pil.convert("RGB"))
