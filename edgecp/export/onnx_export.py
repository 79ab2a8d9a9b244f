"""Export a store version to ONNX for one device profile, in the folder layout optimum's ONNX SD pipelines read.

    OUT/text_encoder/model.onnx   input_ids -> last_hidden_state, pooler_output
    OUT/unet/model.onnx           sample, timestep, encoder_hidden_states -> out_sample
    OUT/vae_decoder/model.onnx    latent_sample -> sample
    OUT/vae_encoder/model.onnx    sample -> latent_parameters (profile permitting)
    OUT/tokenizer/ OUT/scheduler/ OUT/model_index.json OUT/edgecp.json

input_ids are int64 and timestep a float scalar, as optimum exports them since late 2024. The adapter is merged into a full-precision copy of the base and the concept tokens are baked into the text
encoder, so the device needs no peft and no torch. Each model is checked against PyTorch on the same inputs
(tensor gate), then one image is drawn through the export and through PyTorch with the same prompt, seed and
steps (image gate: PSNR >= the profile's `min_psnr`); below either the export is refused and nothing is left behind.

Weights: a model whose fp32 weights reach `EXTERNAL_DATA_MIN_BYTES` (1 GiB; protobuf's hard limit is 2 GiB) is
written as `model.onnx` (graph) + one `model.onnx_data` (every tensor of 1 KiB or more, 4 KiB aligned so
onnxruntime can map it), never as the hundreds of loose per-tensor files torch's exporter writes past 2 GiB.
Each model goes through a private scratch folder (export -> optimize/quantize -> one data file) that is deleted
before the next model starts, so no intermediate file reaches the final folder. Memory: PyTorch's side runs in
three stages with one model in memory at a time (`edgecp.export.references`: the text encoder's embeddings, then
the UNet's DDIM loops and its export while the other two wait on disk, then the VAE's decode), each model is dropped
(moved to the meta device) as soon as it is exported, and the models are verified once all are exported, so no
onnxruntime session sits beside torch weights; the data file is written tensor by tensor, and onnxruntime's
optimizer and quantizer run on the graph without its weights (see `_optimize`, `_to_int8`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.export import references
from edgecp.integrity import lock_dir, unlock_dir, write_export_meta
from edgecp.memory import release_memory
from edgecp.model.tokens import bake_tokens
from edgecp.profiles import DeviceProfile, load_profile
from edgecp.store import Store

ExportProgress = Callable[[str, int, int], None]  # (phase, done, total): phase is "<stage> <model>" or "image gate"

EXTERNAL_DATA_MIN_BYTES = 1 << 30  # fp32 weights from which a model gets one model.onnx_data (protobuf: 2 GiB max)
DATA_FILE = "model.onnx_data"      # optimum's and onnxruntime.transformers' name for the one external-data file
_ALIGN = 4096                      # page-aligned tensors: onnxruntime maps them instead of copying
_INLINE_MAX = 1024                 # smaller tensors stay in the graph (onnx's own size_threshold default)
GATE_SEED = 0


class _TextEncoder(torch.nn.Module):
    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        out = self.te(input_ids.long(), return_dict=False)
        return out[0], out[1]


class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters  # (B, 2C, h, w): mean and logvar


EXAMPLE_LATENT_MAX = 8  # example inputs at most 8x8 latents (64 px), batch 1: every batch and spatial axis is dynamic


def _specs(comps) -> dict:
    """Per model: wrapper, example inputs (seeded), input/output names, dynamic axes.

    The example latents are the base's size capped at EXAMPLE_LATENT_MAX, batch 1 (the text encoder's: two
    prompts). The traced graph is the same at any size and batch (they are dynamic axes; the tensor gate then checks
    the export at the gate's size and classifier-free guidance's batch of 2), while the trace's own memory is not:
    SD1.5's UNet exported from 32x32 latents at batch 2 peaked 1.35 GB above its weights, from 8x8 at batch 1
    0.55 GB (16x16: 0.79 GB), measured on this 2-core machine."""
    g = torch.Generator().manual_seed(0)
    lat = min(comps.unet.config.sample_size, EXAMPLE_LATENT_MAX)
    res = lat * comps.vae_scale
    c_in = comps.unet.config.in_channels
    d = comps.text_encoder.config.hidden_size
    ids = comps.tokenizer(["a photo", "a photo of a dog"], padding="max_length",
                          max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
    return {
        "text_encoder": (_TextEncoder(comps.text_encoder), (ids,), ["input_ids"], ["last_hidden_state", "pooler_output"],
                         {"input_ids": {0: "batch_size", 1: "sequence_length"}, "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                          "pooler_output": {0: "batch_size"}}),
        "unet": (_UNet(comps.unet),
                 (torch.randn(1, c_in, lat, lat, generator=g), torch.tensor(981.0),
                  torch.randn(1, comps.tokenizer.model_max_length, d, generator=g)),
                 ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                 {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {},
                  "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                  "out_sample": {0: "batch_size", 2: "height", 3: "width"}}),
        "vae_decoder": (_VaeDecoder(comps.vae), (torch.randn(1, comps.vae.config.latent_channels, lat, lat, generator=g),),
                        ["latent_sample"], ["sample"],
                        {"latent_sample": {0: "batch_size", 2: "height", 3: "width"}, "sample": {0: "batch_size", 2: "height", 3: "width"}}),
        "vae_encoder": (_VaeEncoder(comps.vae), (torch.rand(1, 3, res, res, generator=g) * 2 - 1,), ["sample"],
                        ["latent_parameters"],
                        {"sample": {0: "batch_size", 2: "height", 3: "width"}, "latent_parameters": {0: "batch_size", 2: "height", 3: "width"}}),
    }


def _torch_onnx_export(module, args, path: Path, inputs, outputs, axes, opset: int) -> None:
    # The TorchScript exporter is what optimum uses for these models and is exact and fast here; torch warns that
    # it is deprecated, so fall back to the dynamo exporter where it is gone.
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


def write_one_data_file(src: Path, dst_dir: Path, external: bool, model=None, fp16: frozenset[str] = frozenset()) -> None:
    """`src` (a model.onnx, its weights inline or in any number of external files beside it) -> dst_dir/model.onnx,
    self-contained, or with every tensor >= 1 KiB in one dst_dir/model.onnx_data when `external`.

    Streams tensor by tensor (reads each external tensor from its file, writes it, drops it): onnx's own
    `convert_model_to_external_data` + `save_model` would first load every weight into the proto, a second copy
    of the model in memory. The offsets and locations are set with onnx's `set_external_data`, so any onnx
    reader (onnx.load, onnxruntime, optimum) reads the result.

    `model`: the graph to write in place of src's (its external tensors still read from src's folder), e.g. one
    the optimizer rewrote without loading the weights. `fp16`: names of tensors the fp16 converter retyped to
    float16 while their data was still fp32 in the external file; they are converted here, one at a time, with
    onnxruntime's own value mapping (`float16.convert_np_to_float16`). A tensor whose data is in the proto
    (`raw_data`) is taken from there: the converter already converted it.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, set_external_data, uses_external_data

    model = onnx.load(str(src), load_external_data=False) if model is None else model
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "model.onnx"

    def data_of(t) -> bytes | None:
        if t.HasField("raw_data") and len(t.raw_data):
            return t.raw_data
        if not uses_external_data(t):
            return None
        info = ExternalDataInfo(t)
        with open(src.parent / info.location, "rb") as f:
            f.seek(info.offset or 0)
            raw = f.read(info.length) if info.length else f.read()
        if t.name in fp16:
            from onnxruntime.transformers.float16 import convert_np_to_float16

            raw = convert_np_to_float16(np.frombuffer(raw, dtype=np.float32)).astype(np.float16).tobytes()
        return raw

    def inline(t, raw: bytes) -> None:
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
        t.raw_data = raw

    if not external:
        for t in _all_tensors(model):
            if uses_external_data(t):  # small enough to be one protobuf: every tensor inline
                inline(t, data_of(t))
        onnx.save_model(model, str(dst))
        return
    with open(dst_dir / DATA_FILE, "wb") as data:
        for t in _all_tensors(model):
            raw = data_of(t) if uses_external_data(t) or len(t.raw_data) >= _INLINE_MAX else None
            if raw is None:
                continue
            if len(raw) < _INLINE_MAX:  # a small tensor another writer put outside (a Reshape's shape): inline, as
                inline(t, raw)  # shape inference and onnxruntime's loader read it from the graph
                continue
            offset = data.tell()
            if offset % _ALIGN:
                data.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = data.tell()
            data.write(raw)
            del raw
            del t.external_data[:]
            t.raw_data = b""  # set_external_data insists on the field; the data now lives in the file
            set_external_data(t, DATA_FILE, offset=offset, length=data.tell() - offset)
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(dst))


def _weight_bytes(model, folder: Path) -> int:
    """Bytes of all initializer data of a model loaded with load_external_data=False (inline or external)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    total = 0
    for t in _all_tensors(model):
        if uses_external_data(t):
            info = ExternalDataInfo(t)
            total += info.length if info.length else (folder / info.location).stat().st_size
        else:
            total += len(t.raw_data)
    return total


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)  # initializers and tensor attributes, subgraphs included


MODEL_TYPES = {"unet": "unet", "text_encoder": "clip", "vae_decoder": "vae", "vae_encoder": "vae"}  # optimizer's
# Fusions whose operators (com.microsoft GroupNorm/SkipGroupNorm/NhwcConv/BiasSplitGelu/BiasAdd, MultiHeadAttention
# with packed QKV/KV) only onnxruntime's CUDA provider runs: an export verified on the CPU leaves them out.
GPU_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                    "enable_bias_add", "enable_packed_qkv", "enable_packed_kv")
# Operators the CPU provider has no fp16 kernel for (kept fp32 with casts around them) when the export is verified on
# the CPU; on CUDA nothing is blocked, as onnxruntime's own optimize_pipeline.py does for SD 1.x.
CPU_FP16_BLOCK = ("Resize",)


# What a CPU-verified fp16 export cannot see (issue 22): onnxruntime's CPU provider runs fp16 nodes through fp32
# kernels and drops Cast pairs, so an activation past fp16's range (65504: SDXL's VAE) passes the CPU gates and
# overflows on the GPU. Our choice where no GPU verified the export: the VAE stays fp32 (onnxruntime's own SD script
# keeps SDXL's VAE fp32 by name; measuring every activation of the fp32 graph would mean an output per node of the
# UNet). The UNet and text encoder stay fp16 (SD 1.x/2.x's run in fp16 in onnxruntime's and diffusers' pipelines);
# edgecp.json's `verified_on` says the export was not checked for overflow.
CPU_VERIFIED_VAE = ("no GPU verified this export: the CPU provider computes fp16 nodes in fp32 and cannot see fp16 "
                    "overflow, so the VAE stays fp32")
CPU_ONLY_NOTE = "cpu-only: fp16 overflow not checked"


def cpu_kept_fp32(name: str, gpu: bool) -> bool:
    """Whether model `name` of an fp16 export stays fp32 because no GPU verifies the export (see CPU_VERIFIED_VAE)."""
    return not gpu and name.startswith("vae_")


def verified_on(profile: DeviceProfile, gpu: bool, provider: str | None) -> dict:
    """What the export's gates ran on, for edgecp.json: the provider the image gate's UNet ran on, the GPU's name
    (CUDA device 0, where onnxruntime's sessions run by default) when one verified it, and for fp16 exports whether
    fp16 overflow could be seen (only a GPU computes fp16 nodes in fp16)."""
    device = None
    if gpu:
        try:
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a CPU build of torch beside onnxruntime-gpu: the provider still names the GPU path
            device = None
    out = {"provider": provider or ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider"), "device": device}
    if profile.precision == "fp16":
        out["fp16_overflow"] = f"checked on {device or 'CUDA'}" if gpu else CPU_ONLY_NOTE
    return out


def cuda_usable() -> bool:
    """onnxruntime's CUDA provider is installed and starts here (a GPU, its driver, CUDA and cuDNN)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from edgecp.export.step_graph import STEP_GRAPH

    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(str(STEP_GRAPH), providers=["CUDAExecutionProvider"])
        return "CUDAExecutionProvider" in sess.get_providers()
    except Exception:  # onnxruntime raises its own error types when the provider cannot load
        return False
    finally:
        ort.set_default_logger_severity(2)


def _optimize(src: Path, dst_dir: Path, name: str, external: bool, fp16: bool, gpu: bool) -> dict:
    """One model through onnxruntime.transformers' Stable Diffusion optimizer, the steps of its
    `models/stable_diffusion/optimize_pipeline.py` for one model: the model type's python fusions (UNet: attention
    to MultiHeadAttention, GroupNorm, BiasSplitGelu, ...; CLIP: attention, LayerNorm, QuickGelu; VAE: attention,
    GroupNorm), packed K/V and QKV only in fp16 as there, then fp16 with fp32 inputs and outputs
    (`keep_io_types`). `gpu`: the export is verified on CUDA, so the CUDA-only fusions apply; else they are left
    out (named in the report) and the ops without fp16 CPU kernels stay fp32. Writes dst_dir/model.onnx and
    returns what was fused.

    Memory: the optimizer runs on the graph alone (`_weight_free`); a fusion that reads a weight (packing Q, K
    and V into one matrix) reads that tensor from the file, and the fp16 conversion of the rest happens tensor by
    tensor as the result is written. Loaded whole, the SD1.5 UNet took more than 20 GB here (the optimizer's and
    the converter's shape-inference copies of the proto).
    """
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[name]
    opts = FusionOptions(model_type)
    if model_type == "unet":
        opts.enable_packed_kv = fp16 and opts.enable_packed_kv
        opts.enable_packed_qkv = fp16 and opts.enable_packed_qkv
    skipped = []
    if not gpu:
        for flag in GPU_ONLY_FUSIONS:
            if getattr(opts, flag, False):
                setattr(opts, flag, False)
                skipped.append(flag.removeprefix("enable_"))
    weights = src.parent / "weights"
    with _weight_free(src, weights) as graph, _quiet_logging(), _ort_optimizer_fixes():
        external_fp32 = {t.name for t in _all_tensors(graph)
                         if uses_external_data(t) and t.data_type == onnx.TensorProto.FLOAT}
        m = optimize_model(graph, model_type=model_type, num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=opts, use_gpu=gpu)
        if fp16:
            m.convert_float_to_float16(keep_io_types=True, op_block_list=[] if gpu else list(CPU_FP16_BLOCK))
            _restore_resize_scales(m.model)
        fused = {k: v for k, v in m.get_fused_operator_statistics().items() if v}
    retyped = frozenset(t.name for t in _all_tensors(m.model) if t.name in external_fp32
                        and t.data_type == onnx.TensorProto.FLOAT16 and not len(t.raw_data))
    write_one_data_file(weights / "model.onnx", dst_dir, external, model=m.model, fp16=retyped)
    return {"fused": fused, "fusions_left_out": skipped, "verified_for": "cuda" if gpu else "cpu"}


@contextlib.contextmanager
def _weight_free(src: Path, folder: Path):
    """`src`'s weights streamed into folder's one data file; yields the graph loaded without them, with the working
    directory at `folder`, against which onnx resolves an external tensor's location when a library step reads
    it. onnxruntime's optimizer and quantizer work on a loaded proto and copy it (shape inference, save and
    reload); on the graph alone those copies are small and only the weights a step reads come into memory."""
    import onnx

    write_one_data_file(src, folder, external=True)  # every tensor >= 1 KiB in one file, streamed
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield graph
    finally:
        os.chdir(cwd)


@contextlib.contextmanager
def _patched(owner, attr: str, value):
    """`owner.attr` is `value` inside the block, restored after."""
    old = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, old)


def _ort_optimizer_fixes() -> contextlib.ExitStack:
    """Three patches to onnxruntime.transformers' optimizer (1.32 included), undone when the returned stack exits:
    - it reads a UNet attention's head count with `int()` of a (1,) array (`FusionAttentionUnet.get_num_heads`), a
      TypeError since numpy 2.4 that aborts the fusion; the patched reader takes the same value by index;
    - its UNet optimizer draws a tqdm bar on stderr when tqdm is installed; the library never prints (the export
      reports its stages through `progress`), so it is told tqdm is absent;
    - its fp16 converter takes a converted initializer's shape from `numpy_helper.to_array(tensor).shape`, which
      loads an external tensor's data (and misreads it once retyped); the shape is the tensor's `dims`, read so
      here, which keeps the weights on disk while the graph is converted (see `_optimize`).
    Its modules import each other top-level (the package puts its folder on sys.path): the patched names are the
    ones the UNet optimizer uses."""
    import float16  # onnxruntime.transformers' own top-level module names
    import fusion_attention_unet
    import onnx_model_unet
    from onnx import helper

    original = fusion_attention_unet.FusionAttentionUnet.get_num_heads

    def get_num_heads(fusion, reshape_q, is_torch2: bool = False) -> int:
        if is_torch2:
            parent = fusion.model.get_parent(reshape_q, 1)
            if parent is not None and parent.op_type == "Concat" and len(parent.input) == 4:
                value = fusion.model.get_constant_value(parent.input[2])
                if isinstance(value, np.ndarray) and value.size == 1:
                    return max(int(value.reshape(-1)[0]), 0)
            return 0
        return original(fusion, reshape_q, is_torch2)

    is_installed = onnx_model_unet.is_installed
    stack = contextlib.ExitStack()
    stack.enter_context(_patched(fusion_attention_unet.FusionAttentionUnet, "get_num_heads", get_num_heads))
    stack.enter_context(_patched(onnx_model_unet, "is_installed", lambda name: name != "tqdm" and is_installed(name)))
    stack.enter_context(_patched(float16, "make_value_info_from_tensor",
                                 lambda t: helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))))
    return stack


@contextlib.contextmanager
def _quiet_logging():
    """onnxruntime's optimizer and quantizer log on the root logger; the library never prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _shape_inferred(model):
    """onnx shape inference and the quantizer's metadata mark, on a graph whose weights stay external (the tensors'
    dims are in the proto): what onnxruntime's quantizers get from a saved-and-reloaded copy with every weight."""
    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    model = onnx.shape_inference.infer_shapes(model)
    add_infer_metadata(model)
    return model


def _to_int8(src: Path, dst_dir: Path, external: bool) -> dict:
    """onnxruntime's dynamic int8 quantization of MatMul/Gemm weights (`quantize_dynamic`'s steps: shape inference,
    `update_opset_version`, `ONNXQuantizer` in IntegerOps mode with `MatMulConstBOnly`), run on the graph alone.

    `quantize_dynamic` itself loads every weight (`onnx.load` of the shape-inferred copy) and then saves through
    onnx's converter: 11.9 GB peak for the SD1.5 UNet here (3.5x its 3.44 GB). Its steps are called here on the
    weight-free graph (`_weight_free`: the quantizer reads the MatMul weights it quantizes and no other), and the
    result is written by the streaming writer to dst_dir. MatMul/Gemm only: ConvInteger has no kernel on many
    execution providers and was slower than fp32 on onnxruntime's CPU (profiles/edge-int8.toml).
    """
    from onnxruntime.quantization import QuantType, onnx_quantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, update_opset_version

    weights = src.parent / "int8-weights"
    # the quantizer re-infers shapes after turning Gemm into MatMul by saving and reloading a deep copy with every
    # weight; shape inference on the weight-free graph gives it the same value infos
    with (_weight_free(src, weights) as graph, _quiet_logging(),
          _patched(onnx_quantizer, "save_and_reload_model_with_shape_infer", _shape_inferred)):
        quantizer = onnx_quantizer.ONNXQuantizer(
            update_opset_version(_shape_inferred(graph), QuantType.QInt8), False, False, QuantizationMode.IntegerOps, False,
            QuantType.QInt8, QuantType.QUInt8, None, [], [], ["MatMul", "Gemm"], {"MatMulConstBOnly": True})
        quantizer.quantize_model()
    write_one_data_file(weights / "model.onnx", dst_dir, external, model=quantizer.model.model)
    return {"quantization": "dynamic"}


STATIC_OPS = ("Conv", "MatMul", "Gemm")  # static QDQ: the convolutions too (most of a UNet's time on a CPU)
# Static int8 is for the UNet, which runs twice per step (guidance); the text encoder and the VAE decoder run once per
# image, where integer kernels save little and the VAE's quantization error lands straight in the pixels: they take
# the dynamic variant (our choice, measured: the tiny base's VAE decoder failed its tensor gate statically, 0.28 > 0.26)
STATIC_MODELS = ("unet",)
BASE_CALIBRATION_PROMPTS = ("a photo of a dog", "a photo of a person", "a landscape painting")  # our choice
CALIBRATION_SEED = 1000  # calibration images use other seeds than the image gate's (GATE_SEED): the gate is unseen


def calibration_prompts(concepts: list[dict]) -> list[str]:
    """Static int8's calibration prompts: three plain ones for the base (a subject, a person, a scene: our choice,
    onnxruntime and the papers name none) and, per concept, its prompt in its
    class (its token through every model) and its class alone (what the base drew before). Text only: the user's
    photos are never read (they are purged once a concept is committed)."""
    prompts = list(BASE_CALIBRATION_PROMPTS)
    for c in concepts:
        prompts.append(gate_prompt([c]))
        if c.get("class_word"):
            prompts.append(f"a photo of a {c['class_word']}")
    return list(dict.fromkeys(prompts))


def _gate_args(calls: list[dict], spec) -> tuple:
    """The tensor gate's inputs of one model: what it was fed at the middle of PyTorch's gate image (a text encoder
    and a VAE are called once, a UNet once per step), as the export's example inputs' dtypes. Inputs from the model's
    own use, not random ones: a statically quantized model is calibrated for the ranges generation produces."""
    _, example, names, _, _ = spec
    call = calls[len(calls) // 2]
    return tuple(torch.from_numpy(np.asarray(call[n])).to(e.dtype).reshape(e.shape if e.dim() == 0 else call[n].shape)
                 for n, e in zip(names, example))


class _Feeds:
    """onnxruntime's CalibrationDataReader over recorded inputs, cast to the graph's input types and ranks (the
    pipeline's 0-d timestep for a (1,) input, or the reverse)."""

    def __init__(self, feeds: list[dict], graph):
        from onnx.helper import tensor_dtype_to_np_dtype

        types = {i.name: (tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type), len(i.type.tensor_type.shape.dim))
                 for i in graph.graph.input}

        def cast(v, dtype, rank):
            a = np.asarray(v, dtype=dtype)
            return a if a.ndim == rank else a.reshape([1] * rank)

        self.it = iter([{k: cast(v, *types[k]) for k, v in f.items() if k in types} for f in feeds])

    def get_next(self) -> dict | None:
        return next(self.it, None)


def _kept_float(model) -> list[str]:
    """Nodes static int8 leaves in float (our choice; onnxruntime quantizes every listed op type by default):
    - MatMuls of two activations (attention's Q K^T and its product with V): nothing to store as int8, and with both
      sides quantized per call SD1.5's UNet was slower (828 against 720 ms per call, 256 px, this CPU) for the same
      image (31.9 against 31.5 dB against fp32 at 25 steps);
    - a model's first and last convolution: the first sees the raw input (latents, noise), the last writes the
      model's output at full range; quantizing the tiny UNet's last one alone moved its output 0.68 (tolerance 0.75)
      against 0.08 with both kept float."""
    consts = {t.name for t in model.graph.initializer}
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and not set(n.input) & consts]
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    return exclude + (convs[:1] + convs[-1:] if len(convs) > 1 else [])


def _to_int8_static(src: Path, dst_dir: Path, external: bool, feeds: list[dict]) -> dict:
    """onnxruntime's static int8 quantization in QDQ format (`quantize_static`'s steps): MinMax ranges of every
    Conv/MatMul/Gemm input and output from `feeds`, per-channel symmetric int8 weights, asymmetric uint8
    activations, int32 biases. onnxruntime fuses each DequantizeLinear -> op -> QuantizeLinear into its integer
    kernel (QLinearConv, QLinearMatMul) when the session is optimized.

    `quantize_static` loads every weight twice over (shape-inferred copy, calibration model saved with its weights):
    here its steps run on the weight-free graph (`_weight_free`). The calibration graph (the same graph plus
    ReduceMin/ReduceMax outputs) is saved beside the one data file and references it, so onnxruntime's session is
    the only copy of the fp32 weights; the quantizer then reads each weight it quantizes, one at a time.
    Choices where onnxruntime leaves it to the caller: MinMax ranges (its default; no histogram of every
    activation, which would not fit SD-scale memory); uint8 activations with int8 weights (U8S8, its recommended
    CPU format); per-channel weights (as its CNN examples)."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, calibrate
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import update_opset_version

    from edgecp.export.ort_runner import session_options

    weights = src.parent / "int8-weights"
    with _weight_free(src, weights) as graph, _quiet_logging():
        model = update_opset_version(_shape_inferred(graph), QuantType.QInt8, QuantType.QUInt8)
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # the calibrator adds its ReduceMin/Max nodes to the graph it is given
        with _patched(calibrate, "load_model_with_shape_infer", lambda _path, graph=copy: graph):
            calibrator = calibrate.MinMaxCalibrater(weights / "model.onnx", list(STATIC_OPS),
                                                    augmented_model_path=str(weights / "calibration.onnx"))
        calibrator.augment_graph()
        # the calibrator's own session (unoptimized, as here) runs in onnxruntime's default node order, where the
        # added ReduceMin/Max nodes run late and keep activations alive: 7.6 GB for SD1.5's UNet against 3.6 GB
        # for the plain graph; in priority order each runs beside its producer and the peak is the plain graph's
        options = session_options("disabled")
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        calibrator.infer_session = ort.InferenceSession(str(weights / "calibration.onnx"), sess_options=options,
                                                        providers=["CPUExecutionProvider"])
        calibrator.collect_data(_Feeds(feeds, model))
        ranges = calibrator.compute_data()
        del calibrator, copy  # the session with the fp32 weights goes before the quantizer reads any
        for i, node in enumerate(model.graph.node):  # the quantizer excludes nodes by name
            node.name = node.name or f"{node.op_type}_{i}"
        exclude = _kept_float(model)
        quantizer = QDQQuantizer(model, True, False, QuantType.QInt8, QuantType.QUInt8, ranges, [], exclude,
                                 list(STATIC_OPS), {"ActivationSymmetric": False, "WeightSymmetric": True})
        quantizer.quantize_model()
    write_one_data_file(weights / "model.onnx", dst_dir, external, model=quantizer.model.model)
    return {"quantization": "static", "calibration_samples": len(feeds)}


def _restore_resize_scales(model) -> None:
    """Resize's `scales` input must be float32 (ONNX type constraint) but the fp16 converter also converts the
    Constant nodes that feed it; turn those back into float32 (a fix the converter lacks)."""
    import onnx
    from onnx import numpy_helper

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


def _verify_optimization(profile: DeviceProfile, gpu: bool) -> str:
    """onnxruntime's optimization level of the gates' sessions: "basic" for an fp16 export verified on the CPU,
    whose provider has no fp16 kernels for most ops and keeps fp32 copies of the weights (one fewer at "basic":
    SD1.5's UNet 4.7 GB instead of 6.0); the outputs are the same computation."""
    return "basic" if profile.precision == "fp16" and not gpu else "all"


def _session(path: Path, profile: DeviceProfile, optimization: str = "all"):
    import onnxruntime as ort

    from edgecp.export.ort_runner import available_providers, session_options

    return ort.InferenceSession(str(path), sess_options=session_options(optimization),
                                providers=available_providers(profile.providers))


def _parity(path: Path, args, ref: tuple, inputs, profile: DeviceProfile, optimization: str = "all"
            ) -> tuple[float, float]:
    """(max |onnx - torch| over all outputs, tolerance) on `args` (what the model saw while PyTorch drew the gate
    image); `ref` is PyTorch's output."""
    sess = _session(path, profile, optimization)
    feeds = {}
    for spec, name, a in zip(sess.get_inputs(), inputs, args):
        arr = a.numpy()
        feeds[name] = arr.astype(np.int32 if spec.type == "tensor(int32)" else arr.dtype)
    got = sess.run(None, feeds)
    del sess
    diff = max(float(np.abs(g.astype(np.float32) - r.float().numpy()).max()) for g, r in zip(got, ref))
    tol = profile.tolerance(max(float(r.abs().max()) for r in ref))
    return diff, tol


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); identical images give 100.0 (a finite, JSON-safe stand-in)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * float(np.log10(255.0**2 / mse)))


def gate_prompt(concepts: list[dict]) -> str:
    """The image gate's prompt: the first concept in its class (its token through every model), else a plain one."""
    if concepts:
        c = concepts[0]
        return " ".join(w for w in ("a photo of", c["token"], c.get("class_word")) if w)
    return "a photo of a dog"


def step_ms(seconds: list[float]) -> float | None:
    """A denoising step's time in ms from each step's wall time: the median of all but the first (which carries
    a session's or a module's first run); None under two steps."""
    return round(float(np.median(seconds[1:])) * 1e3, 1) if len(seconds) > 1 else None


def _image_gate(folder: Path, profile: DeviceProfile, prompt: str, steps: int, ref: np.ndarray, is_tiny: bool,
                progress: ExportProgress | None, optimization: str = "all", ref_step_seconds: list[float] = ()) -> dict:
    """The same prompt, seed and steps through the export (edgecp's onnxruntime runner) as `ref` (PyTorch).

    Speed beside it: the median step (UNet call with both halves of guidance, and the DDIM update) of this image
    against PyTorch's steps drawing `ref` (``ref_step_seconds``; PyTorch's side always runs fp32 on the CPU), on
    this machine, in this process, one after the other. A rough figure from few steps: ``tools/bench_export.py``
    times whole images."""
    from edgecp.export.ort_runner import OnnxStableDiffusion, available_providers

    try:
        # one session at a time: the export's peak stays one model's; the CPU memory arena kept but for fp16, whose
        # casts grow it (SD1.5's fp16 UNet: +1.4 GB), since without it fp32 runs ~15% slower and the speed is reported
        pipe = OnnxStableDiffusion(folder, providers=available_providers(profile.providers), optimization=optimization,
                                   reduce_memory=True, arena=profile.precision != "fp16")
    except ValueError as e:  # e.g. a CUDA provider onnxruntime lists but cannot start: the runner names the fix
        raise EdgecpError(f"image gate of profile '{profile.name}': {str(e).splitlines()[0]}") from None
    h, w = ref.shape[:2]
    seconds: list[float] = []
    cb = references.step_timer(seconds, (lambda i, n: progress("image gate", i, n)) if progress else None)
    img = np.asarray(pipe([prompt], steps=steps, seed=GATE_SEED, height=h, width=w, callback=cb)[0].convert("RGB"))
    provider = pipe.unet.providers[0]
    del pipe
    gate = {"prompt": prompt, "seed": GATE_SEED, "steps": steps, "size": [h, w], "psnr_db": round(psnr(img, ref), 2),
            "min_psnr_db": profile.min_psnr, "provider": provider}
    onnx_ms, torch_ms = step_ms(seconds), step_ms(ref_step_seconds)
    if onnx_ms is not None and torch_ms is not None:
        gate["unet_step_ms"] = {"onnx": onnx_ms, "pytorch": torch_ms, "ratio": round(onnx_ms / torch_ms, 3),
                                "provider": provider, "steps_timed": steps - 1}
    if is_tiny:  # the tiny world's evaluator: does the export's image still read as the same picture?
        from edgecp.eval.features import EvaluatorFeatures, tiny_evaluator_path

        e = EvaluatorFeatures(tiny_evaluator_path()).embed_images([img, ref])
        gate["evaluator_similarity"] = round(float(e[0] @ e[1]), 4)
    return gate


def refusal_advice(profile: DeviceProfile, model: str | None = None) -> str:
    """What to do after a gate refused an export of `profile` (the tensor gate's `model`, else the image gate).
    Below fp32 a higher precision helps. fp32 is the top: when the profile asks no more than the shipped cpu-fp32
    (an fp32 export matches PyTorch to rounding: 80-100 dB, tensors within 1e-4 on edgecp's test bases) the
    disagreement is an edgecp bug, and the advice says to report it with what it needs; a user profile stricter than
    cpu-fp32 is told which setting to loosen."""
    if profile.precision != "fp32":
        return "try a higher-precision profile such as cpu-fp32"
    ref = load_profile("cpu-fp32")
    if model is None and profile.min_psnr > ref.min_psnr:
        return (f"fp32 is the highest precision: lower the profile's min_psnr (the shipped cpu-fp32 asks "
                f"{ref.min_psnr:g} dB)")
    if model is not None and (profile.atol < ref.atol or profile.rtol < ref.rtol):
        return (f"fp32 is the highest precision: loosen the profile's atol/rtol (the shipped cpu-fp32 allows atol "
                f"{ref.atol:g}, rtol {ref.rtol:g})")
    what = f"the {model} graph" if model else "the export's image"
    return (f"fp32 is the highest precision and should match PyTorch to rounding, so {what} disagreeing is an edgecp "
            "bug for this base: please report it with this line and the base's scheduler/scheduler_config.json and "
            "unet/config.json (EDGECP_DEBUG=1 adds the traceback)")


class _Refused(EdgecpError):
    """A gate refused the export: the profile's next variant may pass (int8 static -> dynamic)."""


def _finish_models(tmp: Path, names: list[str], profile: DeviceProfile, variant: str | None, external: dict,
                   seconds: dict, feeds: dict, gate_args: dict, refs: dict, specs: dict, gpu: bool, level: str,
                   progress: ExportProgress | None, keep_raw: bool) -> dict:
    """Each raw fp32 graph (tmp/.scratch-NAME/raw) through the profile's onnxruntime stages (optimize, quantize as
    `variant`) into tmp/NAME, then the tensor gate on each. Returns the report's models; raises _Refused below the
    gate. The raw graph is removed once its model passes unless `keep_raw` (a later variant may start from it)."""
    models, optimizing, int8 = {}, profile.optimize or profile.precision == "fp16", profile.precision == "int8"
    for name in names:
        scratch, t0 = tmp / f".scratch-{name}", time.perf_counter()
        model_src, info = scratch / "raw" / "model.onnx", {}
        if optimizing:
            _stage(progress, "optimize", name, 0)
            into = scratch / "optimized" if int8 else tmp / name
            fp16 = profile.precision == "fp16" and not cpu_kept_fp32(name, gpu)
            info = _optimize(model_src, into, name, external[name], fp16, gpu)
            if profile.precision == "fp16" and not fp16:
                info["kept_fp32"] = CPU_VERIFIED_VAE
            model_src = into / "model.onnx"
            _stage(progress, "optimize", name, 1)
        if int8:
            _stage(progress, "quantize", name, 0)
            info.update(_to_int8_static(model_src, tmp / name, external[name], feeds[name])
                        if variant == "static" and name in STATIC_MODELS else _to_int8(model_src, tmp / name, external[name]))
            _stage(progress, "quantize", name, 1)
        elif not optimizing:
            write_one_data_file(model_src, tmp / name, external[name])
        models[name] = {"external_data": external[name],
                        "seconds": round(seconds[name] + time.perf_counter() - t0, 2), **info}
        for sub in scratch.iterdir():  # intermediates go now; the raw graph when no later step may need it
            if sub.name != "raw" or not (keep_raw or profile.precision == "fp16" and name.startswith("vae_")):
                shutil.rmtree(sub)
    # verified once every torch model is gone: an onnxruntime session never sits beside torch weights
    for name in names:
        args, inputs = gate_args[name], specs[name][2]
        entry, raw, t0 = models[name], tmp / f".scratch-{name}" / "raw", time.perf_counter()
        _stage(progress, "verify", name, 0)
        diff, tol = _parity(tmp / name / "model.onnx", args, refs[name], inputs, profile, level)
        release_memory(torch.device("cpu"))  # the session's memory back to the OS before the next one
        if profile.precision == "fp16" and name.startswith("vae_") and not diff <= tol:
            # fp16 overflows in some VAEs (SDXL's; activations past 65504): this model stays fp32
            entry["kept_fp32"] = f"fp16 differed from PyTorch by {diff:.3g} > {tol:.3g}"
            shutil.rmtree(tmp / name)
            write_one_data_file(raw / "model.onnx", tmp / name, entry["external_data"])
            diff, tol = _parity(tmp / name / "model.onnx", args, refs[name], inputs, profile, level)
        if not keep_raw:
            shutil.rmtree(raw.parent, ignore_errors=True)
        _stage(progress, "verify", name, 1)
        entry.update({"max_abs_diff": diff, "tolerance": tol, "bytes": dir_bytes(tmp / name),
                      "verify_seconds": round(time.perf_counter() - t0, 2)})
        if not diff <= tol:
            raise _Refused(
                f"export refused: {name} differs from PyTorch by {diff:.3g} > {tol:.3g} allowed by profile "
                f"'{profile.name}' ({profile.precision}{f' {variant}' if variant else ''}); "
                + refusal_advice(profile, model=name))
    return models


def export_onnx(store_root: str | Path, profile_name: str = "cpu-fp32", out: str | Path | None = None,
                progress: ExportProgress | None = None, external_data_min_bytes: int | None = None,
                overwrite: bool = False) -> dict:
    """Export the store's current version for `profile_name`; returns the report (per model: parity, bytes,
    seconds, external data; the image gate). Refuses below the profile's tensor or image gate, leaving nothing.

    `out` (default STORE/exports/PROFILE-VERSION): made absolute first (the optimizer and quantizer run with the
    working directory changed); outside the store or directly under STORE/exports/, not a file, empty unless
    `overwrite`, which replaces an earlier ONNX export there once the new one has passed its gates
    (`edgecp.outputs.check_output_dir`). HEAD is read once: that version is loaded and recorded.
    `external_data_min_bytes` (default EXTERNAL_DATA_MIN_BYTES): fp32 weight bytes from which a model is written
    with one model.onnx_data; 0 writes every model that way.
    """
    import onnx

    from edgecp.model.base import stored_unet_dtype
    from edgecp.outputs import absolute, check_output_dir, put_in_place
    from edgecp.personal import PersonalModel, open_base

    profile = load_profile(profile_name)
    threshold = EXTERNAL_DATA_MIN_BYTES if external_data_min_bytes is None else external_data_min_bytes
    store = Store.open(absolute(store_root))
    version = store.head
    if out is None:
        name = f"{profile.name}-{version}"
        if not name.isprintable() or "/" in name or "\\" in name or name.startswith("."):
            raise EdgecpError(f"profile name '{profile.name}' cannot name a folder: give the profile a plain name "
                              "(letters, digits, '-'), or pass --out")
        out = store.root / "exports" / name
    out = check_output_dir(out, store.root, overwrite=overwrite, allow_exports_subdir=True, kind="onnx")
    # full precision, CPU (merge never touches int8). An fp32 file stays mapped and is read as each stage runs; a
    # 16-bit one is converted on load, the UNet tensor by tensor (diffusers would hold the file beside all of it)
    stream = stored_unet_dtype(open_base(store)) not in (None, "F32")
    model = PersonalModel.load(store, version, device=torch.device("cpu"), stream=stream)
    comps = model.comps
    concepts = [{k: c[k] for k in ("name", "token", "class_word")} for c in model.concepts]
    names = ["unet", "text_encoder", "vae_decoder"] + (["vae_encoder"] if profile.vae_encoder else [])
    optimizing = profile.optimize or profile.precision == "fp16"
    static = profile.precision == "int8" and "static" in profile.quantization
    stages = (["reference"] + ["calibrate"] * static + ["export"]
              + ["optimize"] * optimizing + ["quantize"] * (profile.precision == "int8") + ["verify"])
    gpu = optimizing and "CUDAExecutionProvider" in profile.providers and cuda_usable()
    level = _verify_optimization(profile, gpu)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    lock = lock_dir(tmp)  # recovery and gc leave a temporary export alone while its writer lives
    report = {"profile": profile.name, "precision": profile.precision, "providers": list(profile.providers),
              "version": version, "models": {}}
    try:
        specs = _specs(comps)
        prompt = gate_prompt(concepts)
        size = min(comps.resolution, profile.gate_size) // comps.vae_scale * comps.vae_scale
        gate = references.Job(prompt, GATE_SEED, profile.gate_steps, size)
        # static int8's calibration images: text only (the purged photos are never read), seeds the gate never uses
        calibration = [references.Job(p, CALIBRATION_SEED + i, profile.calibration_steps, size)
                       for i, p in enumerate(calibration_prompts(concepts))] if static else []
        gate_args, refs, seconds, external, fp32_bytes = {}, {}, {}, {}, {}

        def reference(name: str) -> None:  # the tensor gate's inputs and PyTorch's outputs on them
            gate_args[name] = _gate_args(gate.feeds[name], specs[name])
            with torch.no_grad():
                r = specs[name][0](*gate_args[name])
            refs[name] = r if isinstance(r, tuple) else (r,)

        def export(name: str, drop: bool) -> None:  # the raw fp32 graph, then (drop) the torch weights go
            module, args, inputs, outputs, axes = specs[name]
            raw = tmp / f".scratch-{name}" / "raw"
            raw.mkdir(parents=True)
            t0 = time.perf_counter()
            _stage(progress, "export", name, 0)
            _torch_onnx_export(module, args, raw / "model.onnx", inputs, outputs, axes, profile.opset)
            if drop:
                module.to("meta")  # its references are computed, its graph is written
            _stage(progress, "export", name, 1)
            graph = onnx.load(str(raw / "model.onnx"), load_external_data=False)  # the graph only, no weights
            fp32_bytes[name] = _weight_bytes(graph, raw)
            external[name] = fp32_bytes[name] >= threshold
            seconds[name] = time.perf_counter() - t0

        # PyTorch's side in three stages, one model in memory at a time (edgecp.export.references).
        # 1: the text encoder, its concept tokens baked: every prompt's
        # embeddings. Its export waits until the UNet is gone: torch's exporter holds a model under 2 GiB whole in
        # memory, serialized, ~3x its size (SD1.5's text encoder: +1.4 GB), and streams only larger ones to disk.
        _stage(progress, "reference", "text_encoder", 0)
        bake_tokens(comps.text_encoder)
        comps.text_encoder.eval().float()
        references.encode(comps, [gate, *calibration])
        reference("text_encoder")
        _stage(progress, "reference", "text_encoder", 1)
        # 2: the UNet, the adapter merged into its full-precision weights, while the text encoder and the VAE wait
        # on disk: the gate image's and the calibration images' DDIM loops, then its export; then it is dropped
        with _parked([comps.text_encoder, comps.vae], tmp / ".parked"):
            _stage(progress, "reference", "unet", 0)
            comps.unet.eval().float()
            if lora.has_adapter(comps.unet):
                lora.merge(comps.unet)
            total = len(calibration) * profile.calibration_steps
            done = {id(j): k * profile.calibration_steps for k, j in enumerate(calibration)}
            step = (lambda job, i, n: progress("calibrate", done[id(job)] + i, total) if job is not gate
                    else progress("reference image", i, n)) if progress else None
            references.denoise(comps, [gate, *calibration], step)
            reference("unet")
            _stage(progress, "reference", "unet", 1)
            release_memory(torch.device("cpu"))  # the loops' activations back to the OS before the trace's
            export("unet", drop=True)
            release_memory(torch.device("cpu"))
        # 3: the VAE: the gate image, then every small model's export
        vae_names = [n for n in names if n.startswith("vae_")]
        for name in vae_names:
            _stage(progress, "reference", name, 0)
        comps.vae.eval().float()
        references.decode(comps, [gate])
        for name in vae_names:
            reference(name)
            _stage(progress, "reference", name, 1)
        # static int8's calibration inputs (STATIC_MODELS: the UNet; a static VAE would need the calibration
        # images decoded too)
        feeds = {n: [f for job in calibration for f in job.feeds.get(n, [])] for n in ("text_encoder", "unet")}
        export("text_encoder", drop=True)
        for name in vae_names:
            export(name, drop=name == vae_names[-1])
        release_memory(torch.device("cpu"))  # torch's freed blocks back to the OS before onnxruntime's sessions
        # then onnxruntime's stages, per variant in the profile's order until one passes both gates (int8: static,
        # else dynamic; any other profile: one); the raw fp32 graphs stay on disk while a later variant may need them
        variants = list(profile.quantization) if profile.precision == "int8" else [None]
        attempts = []
        for k, variant in enumerate(variants):
            try:
                report["models"] = _finish_models(tmp, names, profile, variant, external, seconds, feeds, gate_args,
                                                  refs, specs, gpu, level, progress, keep_raw=k + 1 < len(variants))
                for name in names:  # size against the fp32 reference: its weights as torch's exporter wrote them
                    report["models"][name]["fp32_weight_bytes"] = fp32_bytes[name]
                _write_configs(tmp, comps, names)
                t0 = time.perf_counter()
                image_gate = _image_gate(tmp, profile, prompt, profile.gate_steps, gate.image,
                                         store.info["base"].get("kind") == "tiny", progress, level, gate.step_seconds)
                image_gate["seconds"] = round(time.perf_counter() - t0, 2)
                report["image_gate"] = image_gate
                if not image_gate["psnr_db"] >= profile.min_psnr:
                    raise _Refused(
                        f"export refused: its image is {image_gate['psnr_db']:.2f} dB PSNR from PyTorch's, "
                        f"{profile.min_psnr - image_gate['psnr_db']:.2f} dB below the {profile.min_psnr:g} dB profile "
                        f"'{profile.name}' requires; " + refusal_advice(profile))
            except _Refused as e:
                attempts.append({"quantization": variant, "refused": str(e).removeprefix("export refused: ")})
                if k + 1 == len(variants):
                    tried = "; ".join(f"{a['quantization']}: {a['refused'].split(';')[0]}" for a in attempts[:-1])
                    raise EdgecpError(str(e) + (f" (also refused: {tried})" if tried else "")) from None
                for name in names:
                    shutil.rmtree(tmp / name, ignore_errors=True)
                continue
            break
        for scratch in tmp.glob(".scratch-*"):  # raw graphs kept for a variant that was not needed
            shutil.rmtree(scratch)
        if variant is not None:
            report["quantization"] = variant
            report["refused_variants"] = attempts
        report["stages"] = stages
        report["verified_on"] = verified_on(profile, gpu, report["image_gate"].get("provider"))
        meta = {**report, "concepts": concepts, "base": store.info["base"], "store": str(store.root),
                "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_export_meta(tmp, meta)  # edgecp.json with every file's sha256, last: only a complete export has it
        put_in_place(tmp, out)  # an earlier export there (overwrite) is replaced only now, after both gates
    finally:
        unlock_dir(lock)
        shutil.rmtree(tmp, ignore_errors=True)
    report["out"] = str(out)
    return report


@contextlib.contextmanager
def _parked(modules: list[torch.nn.Module], folder: Path):
    """Inside the block the modules hold no memory: every parameter and buffer (non-persistent ones too, which a
    state dict leaves out) is written to one safetensors file per module and the module moved to the meta device;
    after it, the same module objects get their tensors back from those files, which are deleted, and parameters
    shared inside a module are shared again. (Weights shared between two of the modules would not be: no text
    encoder and VAE share any.)"""
    from safetensors.torch import load_file

    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{i}.safetensors" for i in range(len(modules))]
    # in a function of its own: a loop variable left here would keep a weight alive through the block, and with it
    # the whole safetensors file that diffusers mapped it from (one tensor holds the mapping)
    ties = [_park(m, f) for m, f in zip(modules, files)]
    release_memory(torch.device("cpu"))  # the writer's copies back to the OS: the block's peak is its own
    try:
        yield
    finally:
        with torch.no_grad():
            for m, f, tied in zip(modules, files, ties):
                saved = load_file(str(f))
                m.to_empty(device="cpu")
                for n, first in tied.items():
                    path, _, attr = n.rpartition(".")
                    setattr(m.get_submodule(path), attr, m.get_parameter(first))
                for n, p in m.named_parameters():
                    p.copy_(saved.pop(f"p.{n}"))
                for n, b in m.named_buffers():
                    b.copy_(saved.pop(f"b.{n}"))
                del saved
        shutil.rmtree(folder)


def _park(m: torch.nn.Module, file: Path) -> dict[str, str]:
    """m's parameters and buffers to `file`, m to the meta device; returns {tied parameter: the name owning it}."""
    from safetensors.torch import save_file

    owner: dict[int, str] = {}  # moving to meta unties shared parameters: remember which name owns each
    ties = {}
    for n, p in m.named_parameters(remove_duplicate=False):
        if owner.setdefault(id(p), n) != n:
            ties[n] = owner[id(p)]
    tensors = {f"p.{n}": p for n, p in m.named_parameters()} | {f"b.{n}": b for n, b in m.named_buffers()}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file))
    m.to("meta")
    return ties


def _stage(progress: ExportProgress | None, stage: str, name: str, done: int) -> None:
    if progress:
        progress(f"{stage} {name}", done, 1)


def _write_configs(folder: Path, comps, names: list[str]) -> None:
    """tokenizer/, scheduler/, per-model config.json and model_index.json as optimum's ORT SD pipeline reads them."""
    comps.tokenizer.save_pretrained(folder / "tokenizer")
    write_clip_vocab_files(folder / "tokenizer")
    comps.scheduler.save_pretrained(folder / "scheduler")
    comps.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    comps.unet.save_config(folder / "unet")
    for name in names:
        if name.startswith("vae_"):
            comps.vae.save_config(folder / name)
    # what optimum's exporter writes (the diffusers pipeline's config); its ORT loader adds the vae_* parts itself
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "requires_safety_checker": False,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(comps.scheduler).__name__],
        "text_encoder": ["transformers", type(comps.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def write_clip_vocab_files(folder: Path) -> None:
    """Beside tokenizer.json (what transformers 5 writes), the files transformers 4's slow `CLIPTokenizer` reads,
    as diffusers' SD folders ship them: vocab.json, merges.txt, special_tokens_map.json, added_tokens.json and a
    tokenizer_config.json with `added_tokens_decoder`. optimum's ORT pipelines (transformers < 4.58) load the
    tokenizer from these; the concept tokens become added tokens with the ids of tokenizer.json, so every reader
    gives a concept prompt the same ids. Derived from tokenizer.json (the single source), not re-tokenized."""
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    bpe = tj["model"]
    if bpe.get("type") != "BPE":
        raise EdgecpError(f"tokenizer in '{folder}' is {bpe.get('type')}, not CLIP's BPE: export needs a CLIP tokenizer")
    vocab = bpe["vocab"]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder, added = {}, {}
    for t in tj["added_tokens"]:
        decoder[str(t["id"])] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        if t["content"] not in vocab:
            added[t["content"]] = t["id"]
    (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, ensure_ascii=False), encoding="utf-8")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(cfg.get(k), str)}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    v4 = {"add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True, "errors": "replace",
          "model_max_length": cfg.get("model_max_length", 77), "tokenizer_class": "CLIPTokenizer",
          **special, "added_tokens_decoder": decoder}
    # transformers 5's own keys stay (it reads them back); the v4 keys are what a v4 reader needs
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, **v4}, indent=2, ensure_ascii=False),
                                                  encoding="utf-8")


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
