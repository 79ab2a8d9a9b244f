"""onnxruntime.transformers' Stable Diffusion optimizer, one model at a time, on the graph without its weights.

The steps of onnxruntime's `models/stable_diffusion/optimize_pipeline.py` for one model: the model type's python
fusions (UNet: attention to MultiHeadAttention, GroupNorm, BiasSplitGelu, ...; CLIP: attention, LayerNorm,
QuickGelu; VAE: attention, GroupNorm), packed K/V and QKV only in fp16 as there, then fp16 with fp32 inputs and
outputs (`keep_io_types`). Loaded whole, a model needs several copies of its weights in these steps (the
optimizer's and the converter's shape-inference copies of the proto; docs/export/README.md has the SD1.5 figure);
here they run on the graph alone (`weight_free`), a fusion
that reads a weight (packing Q, K and V into one matrix) reads that tensor from the file, and the fp16 conversion
of the other weights happens tensor by tensor as the result is written.

An export is verified on the machine that makes it. Where CUDA cannot start there, the fusions whose operators only
the CUDA provider runs are left out and the ops without an fp16 CPU kernel stay fp32; the report names both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

from edgecp.export.external_data import all_tensors, weight_free, write_one_data_file
from edgecp.export.ort_patches import OPTIMIZER_PATCHES, applied, quiet_logging

MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "text_encoder_2": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}  # optimizer's
# Fusions whose operators (com.microsoft GroupNorm/SkipGroupNorm/NhwcConv/BiasSplitGelu/BiasAdd, MultiHeadAttention
# with packed QKV/KV) only onnxruntime's CUDA provider runs: an export verified on the CPU leaves them out.
GPU_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
# Operators the CPU provider has no fp16 kernel for (kept fp32 with casts around them) when the export is verified on
# the CPU; on CUDA nothing is blocked, as onnxruntime's own optimize_pipeline.py does for SD 1.x.
CPU_FP16_BLOCK = ("Resize",)

# What a CPU-verified fp16 export cannot see: onnxruntime's CPU provider runs fp16 nodes through fp32
# kernels and drops Cast pairs, so an activation past fp16's range (65504: SDXL's VAE) passes the CPU gates and
# overflows on the GPU. Our choice where no GPU verified the export: the VAE stays fp32 (onnxruntime's own SD script
# keeps SDXL's VAE fp32 by name; measuring every activation of the fp32 graph would mean an output per node of the
# UNet). The UNet and text encoder stay fp16 (SD 1.x/2.x's run in fp16 in onnxruntime's and diffusers' pipelines);
# edgecp.json's `verified_on` says the export was not checked for overflow.
CPU_VERIFIED_VAE = ("no GPU verified this export: the CPU provider computes fp16 nodes in fp32 and cannot see fp16 "
                    "overflow, so the VAE stays fp32")


def cpu_kept_fp32(name: str, gpu: bool) -> bool:
    """Whether model `name` of an fp16 export stays fp32 because no GPU verifies the export (see CPU_VERIFIED_VAE)."""
    return not gpu and name.startswith("vae_")


def fusion_options(name: str, fp16: bool, gpu: bool):
    """(onnxruntime's FusionOptions for model `name`, the fusions left out because no GPU verifies the export)."""
    # lazy: onnxruntime.transformers puts its folder on sys.path (see edgecp.export.ort_patches)
    from onnxruntime.transformers.fusion_options import FusionOptions

    opts = FusionOptions(MODEL_TYPES[name])
    if MODEL_TYPES[name] == "unet":
        opts.enable_packed_kv = fp16 and opts.enable_packed_kv
        opts.enable_packed_qkv = fp16 and opts.enable_packed_qkv
    skipped = []
    if not gpu:
        for flag in GPU_ONLY_FUSIONS:
            if getattr(opts, flag, False):
                setattr(opts, flag, False)
                skipped.append(flag.removeprefix("enable_"))
    return opts, skipped


def optimize(src: Path, dst_dir: Path, name: str, external: bool, fp16: bool, gpu: bool,
             notes: list[str] | None = None) -> dict:
    """Model `name` (src, a raw fp32 graph) through the optimizer into dst_dir/model.onnx; returns what was fused,
    the fusions left out and what it was verified for. `fp16`: converted to float16 with fp32 inputs and outputs.
    `gpu`: the export is verified on CUDA, so the CUDA-only fusions apply. `notes` gets a line per onnxruntime
    patch skipped or applied on a release it was not written for (see edgecp.export.ort_patches)."""
    from onnxruntime.transformers.optimizer import optimize_model  # lazy: see fusion_options

    opts, skipped = fusion_options(name, fp16, gpu)
    weights = src.parent / "weights"
    with weight_free(src, weights) as graph, quiet_logging(), applied(OPTIMIZER_PATCHES, [] if notes is None else notes):
        external_fp32 = {t.name for t in all_tensors(graph)
                         if uses_external_data(t) and t.data_type == onnx.TensorProto.FLOAT}
        m = optimize_model(graph, model_type=MODEL_TYPES[name], num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=opts, use_gpu=gpu)
        if fp16:
            m.convert_float_to_float16(keep_io_types=True, op_block_list=[] if gpu else list(CPU_FP16_BLOCK))
            restore_resize_scales(m.model)
        fused = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    retyped = frozenset(t.name for t in all_tensors(m.model) if t.name in external_fp32
                        and t.data_type == onnx.TensorProto.FLOAT16 and not len(t.raw_data))
    write_one_data_file(weights / "model.onnx", dst_dir, external, model=m.model, fp16=retyped)
    return {"fused": fused, "fusions_left_out": skipped, "verified_for": "cuda" if gpu else "cpu"}


def restore_resize_scales(model) -> None:
    """Resize's `scales` input must be float32 (ONNX type constraint) but the fp16 converter also converts the
    Constant nodes that feed it; turn those back into float32 (a fix the converter lacks)."""
    scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize" and len(n.input) > 2 and n.input[2]}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in scales:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT16:
                    arr = numpy_helper.to_array(attr.t).astype(np.float32)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
    for init in model.graph.initializer:
        if init.name in scales and init.data_type == onnx.TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
