"""Tracing: each PyTorch model of the pipeline to a raw fp32 ONNX graph with optimum's input and output names.

    text_encoder   input_ids -> last_hidden_state, pooler_output
    unet           sample, timestep, encoder_hidden_states -> out_sample
    vae_decoder    latent_sample -> sample
    vae_encoder    sample -> latent_parameters

SDXL (optimum's `ORTStableDiffusionXLPipeline` layout, as optimum's `CLIPTextOnnxConfig`,
`CLIPTextWithProjectionOnnxConfig` and `UNetOnnxConfig` name them):

    text_encoder     input_ids -> last_hidden_state, pooler_output, hidden_states.0 ... hidden_states.L
    text_encoder_2   input_ids -> text_embeds, last_hidden_state, hidden_states.0 ... hidden_states.L
    unet             sample, timestep, encoder_hidden_states, text_embeds, time_ids -> out_sample

Every hidden state is an output because optimum's reader and diffusers' SDXL pipeline take the penultimate one
(`hidden_states[-2]`); they are activations, so the graph's weights do not grow.

Every batch and spatial axis is dynamic, so the graph traced from small example inputs runs at any size; the
tensor gate then checks it at the gate's size and classifier-free guidance's batch of 2. input_ids are int64 and
the timestep a float scalar, as optimum exports them (the runner reads a 1-D timestep too).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from edgecp import seeds
from edgecp.model.sdxl import pooled_width, time_ids

# Example inputs are at most 8x8 latents (64 px) at batch 1: the graph does not depend on them, the trace's own
# memory does (docs/export/README.md, "Measurements behind the export code").
EXAMPLE_LATENT_MAX = 8


class TextEncoderGraph(torch.nn.Module):
    """The text encoder as optimum exports it: int ids in, (last_hidden_state, pooler_output) out."""

    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        out = self.te(input_ids.long(), return_dict=False)
        return out[0], out[1]


class TextEncoderXLGraph(torch.nn.Module):
    """One SDXL text encoder as optimum exports it: its usual outputs, then every hidden state."""

    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        out = self.te(input_ids.long(), output_hidden_states=True, return_dict=True)
        first = (out.text_embeds, out.last_hidden_state) if hasattr(out, "text_embeds") else (
            out.last_hidden_state, out.pooler_output)
        return (*first, *out.hidden_states)


class UNetGraph(torch.nn.Module):
    """The UNet's noise prediction, as a plain tensor."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetXLGraph(torch.nn.Module):
    """SDXL's UNet with its added conditioning as two inputs (diffusers' `added_cond_kwargs`)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids})[0]


class VaeDecoderGraph(torch.nn.Module):
    """The VAE's decode: scaled latents to an image in [-1, 1]."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderGraph(torch.nn.Module):
    """The VAE's encode: an image to its latent distribution's parameters."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters  # (B, 2C, h, w): mean and logvar


class ModelSpec(NamedTuple):
    """What tracing one model needs: the wrapper, example inputs, input/output names and dynamic axes."""

    module: torch.nn.Module
    example: tuple
    inputs: list[str]
    outputs: list[str]
    axes: dict[str, dict[int, str]]


def _image_axes(*names: str) -> dict[str, dict[int, str]]:
    return {n: {0: "batch_size", 2: "height", 3: "width"} for n in names}


def text_xl_spec(te, tokenizer) -> ModelSpec:
    """One SDXL text encoder's ModelSpec, with optimum's output names (module docstring)."""
    ids = tokenizer(["a photo", "a photo of a dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    text = {0: "batch_size", 1: "sequence_length"}
    first = ["text_embeds", "last_hidden_state"] if hasattr(te, "text_projection") else [
        "last_hidden_state", "pooler_output"]
    hidden = [f"hidden_states.{i}" for i in range(te.config.num_hidden_layers + 1)]
    axes = {"input_ids": dict(text), **{n: dict(text) for n in first + hidden}}
    axes["text_embeds" if "text_embeds" in first else "pooler_output"] = {0: "batch_size"}
    return ModelSpec(TextEncoderXLGraph(te), (ids,), ["input_ids"], first + hidden, axes)


def model_specs(comps) -> dict[str, ModelSpec]:
    """Per model, its ModelSpec. The example latents are the base's size capped at EXAMPLE_LATENT_MAX, batch 1 (the
    text encoder's: two prompts), drawn from a generator seeded with `seeds.TRACE_EXAMPLE`."""
    g = torch.Generator().manual_seed(seeds.TRACE_EXAMPLE)
    lat = min(comps.unet.config.sample_size, EXAMPLE_LATENT_MAX)
    res = lat * comps.vae_scale
    length = comps.tokenizer.model_max_length
    d = comps.unet.config.cross_attention_dim
    text = {0: "batch_size", 1: "sequence_length"}
    if comps.sdxl:
        te, unet = comps.text_encoder, comps.unet
        width = pooled_width(unet.config)
        sample = torch.randn(1, unet.config.in_channels, lat, lat, generator=g)
        xl = {
            "text_encoder": text_xl_spec(te.text_encoder, comps.tokenizer.first),
            "text_encoder_2": text_xl_spec(te.text_encoder_2, comps.tokenizer.second),
            "unet": ModelSpec(UNetXLGraph(unet),
                              (sample, torch.tensor(981.0), torch.randn(1, length, d, generator=g),
                               torch.randn(1, width, generator=g),
                               time_ids(res, res, 1, sample)),
                              ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"],
                              ["out_sample"],
                              {**_image_axes("sample"), "timestep": {}, "encoder_hidden_states": dict(text),
                               "text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"},
                               **_image_axes("out_sample")}),
        }
    else:
        ids = comps.tokenizer(["a photo", "a photo of a dog"], padding="max_length", max_length=length,
                              return_tensors="pt").input_ids
        xl = {}
    return {
        **(xl or {
            "text_encoder": ModelSpec(TextEncoderGraph(comps.text_encoder), (ids,), ["input_ids"],
                                      ["last_hidden_state", "pooler_output"],
                                      {"input_ids": dict(text), "last_hidden_state": dict(text),
                                       "pooler_output": {0: "batch_size"}}),
            "unet": ModelSpec(UNetGraph(comps.unet),
                              (torch.randn(1, comps.unet.config.in_channels, lat, lat, generator=g),
                               torch.tensor(981.0), torch.randn(1, length, d, generator=g)),
                              ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                              {**_image_axes("sample"), "timestep": {}, "encoder_hidden_states": dict(text),
                               **_image_axes("out_sample")}),
        }),
        "vae_decoder": ModelSpec(VaeDecoderGraph(comps.vae),
                                 (torch.randn(1, comps.vae.config.latent_channels, lat, lat, generator=g),),
                                 ["latent_sample"], ["sample"], _image_axes("latent_sample", "sample")),
        "vae_encoder": ModelSpec(VaeEncoderGraph(comps.vae), (torch.rand(1, 3, res, res, generator=g) * 2 - 1,),
                                 ["sample"], ["latent_parameters"], _image_axes("sample", "latent_parameters")),
    }


def torch_onnx_export(spec: ModelSpec, path: Path, opset: int) -> None:
    """`spec`'s module traced to `path`. The TorchScript exporter is what optimum uses for these models and is exact
    and fast here; torch warns that it is deprecated, so this falls back to the dynamo exporter where it is gone."""
    module, args, inputs, outputs, axes = spec
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
        except (TypeError, NotImplementedError, RuntimeError) as e:
            if "dynamo" not in str(e).lower() and "legacy" not in str(e).lower():
                raise
            dyn = {k: {i: torch.export.Dim.AUTO for i in v} for k, v in axes.items() if k in inputs}
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=dyn, opset_version=opset)
