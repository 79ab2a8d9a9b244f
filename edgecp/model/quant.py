"""The frozen base in the precision a memory plan asks for: fp32, 16-bit, or 8-bit Linear weights.

What changes with a plan (a training- and sampling-time representation only; the store's identity, every merge and
every export keep using the original full-precision weights):
- `fp32`: the weights as stored.
- `bf16` / `fp16`: every UNet and text-encoder weight held in 16 bits, run under autocast (diffusers' LoRA training
  scripts do the same with `--mixed_precision`).
- `int8`: as 16-bit, and every UNet and text-encoder `nn.Linear` swapped for an 8-bit weight-only layer: torchao's
  `Int8WeightOnlyConfig` (the faster CPU backend in docs/memory/README.md; on CUDA the planner's default too, since
  bitsandbytes' `Linear8bitLt`, the other backend, keeps its inputs until backward: planner.py), quantized on the
  host and moved with the model. Those libraries quantize `Linear` only, so convolutions (about half of SD 1.5's
  UNet weights) and norms stay in 16 bits.
- The adapter's target layers (by default cross-attention K/V, 2% of SD 1.5's UNet; 13% of SDXL's) are never
  8-bit: peft wraps a plain `nn.Linear` (`Precision.plain`). They keep full-precision base weights only for the
  methods that train those weights (`Precision.keep`, `Method.keep_full_precision`): Custom Diffusion and CNS, where
  a bf16 weight would round a small update away (8 bits of mantissa). For the other methods a frozen target is read
  only under autocast, which casts an fp32 weight to the 16-bit dtype at every call anyway: it is held in that dtype
  (our choice; it saves 0.68 GB on SDXL, whose K/V read 2048-wide text). A plan with `host_trained` keeps the
  trained ones in host memory instead (`Precision.host`, model/host.HostLinear: fp32 there, a 16-bit copy on the
  device per call).
- Stored changes of base weights (a version's `base_delta`; the LoRAs C-LoRA and MagMax fold in) are folded while
  loading (`fold`): W + delta in fp32, tensor by tensor, then cast once to the plan's dtype. That is the weight
  autocast would compute from an fp32 W + delta at every call, so the methods that fold (C-LoRA, merge-and-reinit,
  MagMax) hold their folded targets in 16 bits too, and no fp32 copy of those layers is ever resident. Norms stay fp32 (tiny, and PyTorch's CPU group norm wants
  fp32 affine parameters beside 16-bit inputs). The VAE of a diffusers folder is held in bf16 in bf16 plans and
  stays fp32 otherwise (SD's VAE overflows in fp16; a single file's VAE stays fp32); plans drop it from memory once
  the latents are cached.

The UNet of a diffusers folder is loaded tensor by tensor into an empty (meta) model and converted as it arrives, in
batches of memory-mapped reads that are unmapped after each batch, so the full fp32 UNet never sits in memory (peak
RSS counts the mapped pages). `from_pretrained` reads the whole fp32 state dict first; this is why we stream by hand.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors import safe_open
from torch import nn
from torchao.quantization import Int8WeightOnlyConfig, quantize_
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from edgecp.errors import EdgecpError
from edgecp.memory import compact_allocator
from edgecp.model.base import (
    Components,
    ddim_scheduler,
    is_sdxl_folder,
    load_components,
    load_error,
    quiet_loading,
    sdxl_components,
)
from edgecp.model.host import host_linear

BACKENDS = ("torchao", "bitsandbytes")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
STREAM_BATCH_BYTES = 64 * 2**20  # mapped bytes read before the mapping is dropped


NORMS = (nn.GroupNorm, nn.LayerNorm)  # held in fp32: tiny, and PyTorch's CPU kernels want fp32 affine parameters


def _keep(name: str, keep: Iterable[str]) -> bool:
    return any(name == k or name.endswith("." + k) for k in keep)


def quantize_linear(layer: nn.Linear, backend: str, device: str | torch.device = "cpu") -> nn.Module:
    """An 8-bit weight-only copy of `layer` (frozen). torchao converts in place; bitsandbytes returns a new module,
    quantized on `device` itself: give the full device (`cuda:1`, not `device.type`), since Int8Params quantize on
    their first move and a bare `cuda` is the current GPU (cuda:0), where CB/SCB were made and stayed (issue 22)."""
    if backend == "torchao":
        quantize_(layer, Int8WeightOnlyConfig())
        layer.requires_grad_(False)
        return layer
    if backend == "bitsandbytes":
        import bitsandbytes as bnb  # lazy: the [cuda] extra, not installed by edgecp[train]

        q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                has_fp16_weights=False, threshold=6.0)
        q.weight = bnb.nn.Int8Params(layer.weight.data.float().cpu(), requires_grad=False, has_fp16_weights=False)
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.data.clone(), requires_grad=False)
        return q.to(torch.device(device))  # Int8Params quantize on their first move to a device (bitsandbytes' way)
    raise EdgecpError(f"8-bit backend '{backend}' is unknown: use one of {', '.join(BACKENDS)}")


def check_backend(backend: str) -> None:
    """A clear error when the 8-bit backend's package cannot be imported: bitsandbytes comes with the [cuda] extra
    only (torchao comes with edgecp[train] and is imported with this module)."""
    module = {"torchao": "torchao", "bitsandbytes": "bitsandbytes"}.get(backend)
    if module is None:
        raise EdgecpError(f"8-bit backend '{backend}' is unknown: use one of {', '.join(BACKENDS)}")
    try:
        __import__(module)
    except Exception as e:
        raise EdgecpError(
            f"the 8-bit backend {backend} cannot be imported ({type(e).__name__}): pip install {module}, "
            "or pass a larger --memory-budget so that a 16-bit plan fits"
        ) from e


@dataclass(frozen=True)
class Precision:
    """How the frozen base is held. `compute` is the dtype of its non-quantized weights and of autocast."""

    weights: str = "fp32"  # fp32 | bf16 | fp16 | int8
    backend: str | None = None  # int8 only: torchao | bitsandbytes
    compute: str = "fp32"  # fp32 | bf16 | fp16
    keep: tuple[str, ...] = ()  # module-name suffixes kept in full precision (targets whose base weights change)
    plain: tuple[str, ...] = ()  # module-name suffixes never 8-bit (the adapter's targets: peft wraps nn.Linear)
    host: tuple[str, ...] = ()  # module-name suffixes whose Linear weights stay in host memory in fp32 (HostLinear)

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "bf16", "fp16", "int8"):
            raise EdgecpError(f"weight precision '{self.weights}' is unknown: use fp32, bf16, fp16 or int8")
        if (self.weights == "int8") != (self.backend is not None):
            raise EdgecpError(f"an 8-bit backend goes with int8 weights only (weights={self.weights}, backend={self.backend})")
        object.__setattr__(self, "keep", tuple(self.keep))
        object.__setattr__(self, "plain", tuple(self.plain))
        object.__setattr__(self, "host", tuple(self.host))

    def quantizes(self, name: str) -> bool:
        """Whether the `nn.Linear` called `name` becomes 8-bit under this precision."""
        return self.weights == "int8" and not _keep(name, self.keep) and not _keep(name, self.plain)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.compute]


def precision_of(plan) -> Precision:
    """How a memory plan (`planner.Plan`: weights, backend, compute) holds the frozen base. Built here, beside the
    dtypes, so that the planner stays pure (no torch)."""
    return Precision(plan.weights, plan.backend, plan.compute)


def autocast_for(plan, device_type: str):
    """Autocast to the plan's 16-bit dtype (a no-op without a plan or for fp32 plans)."""
    if plan is None or plan.compute == "fp32":
        return nullcontext()  # no autocast object at all: any device type, the meta stand-in for CUDA included
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[plan.compute]
    return torch.autocast(device_type, dtype=dtype)


def convert_(model: nn.Module, precision: Precision, device: str | torch.device = "cpu") -> nn.Module:
    """In place: hold `model` in `precision`, except the modules it keeps in full precision."""
    if precision.weights == "fp32":
        return model
    for name, module in list(model.named_modules()):
        if (name and _keep(name, precision.keep)) or isinstance(module, NORMS):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != precision.dtype:
                setattr(module, pname, nn.Parameter(p.data.to(precision.dtype), requires_grad=False))
    if precision.weights == "int8":
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and precision.quantizes(name):
                _set_submodule(model, name, quantize_linear(module, precision.backend, device))
        _own_memory_(model)
    return model


def _own_memory_(model: nn.Module) -> None:
    """In place: each plain tensor the model keeps (what was not made 8-bit) gets memory of its own. transformers
    loads a safetensors file at its own dtype as views of the file's memory map; quantizing reads every page of it,
    and the few tensors kept as they were (token embeddings, norms, biases) then hold the whole mapping, resident:
    SDXL's second text encoder stayed at 3.68 GB of RSS in an int8 plan with fp32 compute, 1.41 GB with its own
    memory (in bf16 plans the cast already copies). tests/test_memory_plans.py checks that no kept tensor lies in
    the file's mapping."""
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for t in table.values():
                if t is not None and type(t.data) is torch.Tensor and t.device.type == "cpu":
                    t.data = t.data.clone()


def host_linears_(model: nn.Module, suffixes: Iterable[str]) -> nn.Module:
    """In place: every `nn.Linear` whose name ends with one of `suffixes` becomes a `HostLinear` (fp32, in host
    memory, copied to the device at each call: model/host.py)."""
    suffixes = tuple(suffixes)
    if suffixes:
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and _keep(name, suffixes):
                _set_submodule(model, name, host_linear(module))
    return model


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def stream_unet(folder: Path, precision: Precision, device: str | torch.device = "cpu",
                fold: Mapping[str, torch.Tensor] | None = None):
    """UNet2DConditionModel of a diffusers folder, converted tensor by tensor (see the module docstring); each tensor
    named in `fold` gets its delta added in fp32 before the conversion.

    Returns None when the folder's keys do not match the model exactly (an old layout diffusers renames on load):
    the caller then loads it the usual way and converts in place.
    """
    keep = precision.keep
    files = sorted(f for f in (folder / "unet").glob("*.safetensors") if ".fp16." not in f.name)
    if not files:
        return None
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    expected = dict(unet.state_dict())
    index: list[tuple[Path, str, int]] = []
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is no dict)
                shape = sf.get_slice(k).get_shape()
                index.append((f, k, 4 * int(torch.tensor(shape).prod()) if shape else 4))
    if {k for _, k, _ in index} != set(expected):
        return None
    check_fold(fold or {}, expected)
    float_dtype = precision.dtype if precision.weights != "fp32" else torch.float32
    pending: dict[str, set[str]] = {}
    for name, module in unet.named_modules():
        names = {n for n, _ in module.named_parameters(recurse=False)}
        if names:
            pending[name] = names

    def batches():
        batch, size = [], 0
        for item in index:
            if batch and (item[0] != batch[0][0] or size + item[2] > STREAM_BATCH_BYTES):
                yield batch
                batch, size = [], 0
            batch.append(item)
            size += item[2]
        if batch:
            yield batch

    for batch in batches():
        _load_batch(unet, batch, keep, float_dtype, pending, precision, device, fold or {})
        gc.collect()  # drops the batch's memory mapping (and the pages it counted in RSS)
    unet.requires_grad_(False)
    return unet.eval()


def _load_batch(unet, batch, keep, float_dtype, pending, precision, device, fold) -> None:
    with safe_open(str(batch[0][0]), "pt") as sf:
        for _, key, _ in batch:
            mod_name, _, pname = key.rpartition(".")
            t = sf.get_tensor(key)
            if key in fold:
                t = t.float() + fold[key].to(torch.float32)
            owner = unet.get_submodule(mod_name)
            full = _keep(mod_name, keep) or isinstance(owner, NORMS) or not t.is_floating_point()
            dtype = torch.float32 if full else float_dtype
            if pname in owner._parameters:
                owner._parameters[pname] = nn.Parameter(t.to(dtype, copy=True), requires_grad=False)  # copy: never keep the mapping alive
            else:
                owner._buffers[pname] = t.to(dtype, copy=True)
            del t
            left = pending.get(mod_name)
            if left is not None:
                left.discard(pname)
                if not left:
                    del pending[mod_name]
                    module = unet.get_submodule(mod_name)
                    if isinstance(module, nn.Linear) and precision.quantizes(mod_name):
                        _set_submodule(unet, mod_name, quantize_linear(module, precision.backend, device))


def check_fold(fold: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Every delta names a UNet tensor of its shape: one line otherwise (the store's base has changed)."""
    for key, d in fold.items():
        if key not in expected or tuple(expected[key].shape) != tuple(d.shape):
            raise EdgecpError(f"stored weight change '{key}' matches no UNet tensor of shape {tuple(d.shape)}: the "
                              "store's base has changed")


def fold_into(unet: nn.Module, fold: Mapping[str, torch.Tensor]) -> None:
    """W <- W + delta for each tensor named in `fold` (state-dict keys), added in fp32 and rounded once to W's dtype;
    the keys are recorded on the UNet (`folded`), so the methods' own fold skips what the loader folded."""
    if not fold:
        return
    params = dict(unet.named_parameters())
    check_fold(fold, params)
    with torch.no_grad():
        for key, d in fold.items():
            p = params[key]
            p.copy_((p.float() + d.to(p.device, torch.float32)).to(p.dtype))
    unet._edgecp_folded = folded(unet) | frozenset(fold)


def folded(unet: nn.Module) -> frozenset[str]:
    """The state-dict keys whose stored deltas are already in the UNet's weights."""
    return getattr(unet, "_edgecp_folded", frozenset())


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy (8-bit layers counted with their scales)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if hasattr(t, "__tensor_flatten__"):  # torchao's quantized weight: int8 data + scales
            names, _ = t.__tensor_flatten__()
            total += sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)
        else:
            total += t.numel() * t.element_size()
    for m in model.modules():  # bitsandbytes keeps the row scales beside the int8 weight
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total


def load_planned(spec, precision: Precision, device: str | torch.device = "cpu",
                 fold: Mapping[str, torch.Tensor] | None = None):
    """The base's Components held in `precision` (see the module docstring), with `fold` (state-dict key -> delta, on
    the host) added to the UNet's weights in fp32 before they are converted. The VAE of a diffusers folder is fp32,
    or bf16 in bf16 plans (never fp16: SD's VAE overflows in it); a single file's pipeline comes from
    `load_components` in fp32 and only its UNet and text encoders are converted, so its VAE stays fp32. The text
    encoders follow the plan's weights, 8-bit Linear layers included (their token embeddings, which hold the concept
    rows, stay 16-bit). `device`: where the model will run, with its index (`cuda:1`): 8-bit layers are made there
    (`quantize_linear`)."""
    if precision.weights == "int8":
        check_backend(precision.backend)
    text_precision = Precision(precision.weights, precision.backend, precision.compute)
    with compact_allocator():
        if spec.path is None or spec.path.is_file():  # single file: diffusers builds the fp32 pipeline first
            comps = load_components(spec)
            fold_into(comps.unet, fold or {})
            convert_(comps.unet, precision, device)
            host_linears_(comps.unet, precision.host)
            convert_(comps.text_encoder, text_precision, device)
            return comps
        text_dtype = torch.float32 if precision.weights == "fp32" else precision.dtype
        try:
            with quiet_loading():
                tokenizer = CLIPTokenizer.from_pretrained(spec.path / "tokenizer")
                text_encoder = CLIPTextModel.from_pretrained(spec.path / "text_encoder", dtype=text_dtype,
                                                             use_safetensors=True)
                convert_(text_encoder, text_precision, device)
                sdxl = is_sdxl_folder(spec.path)
                if sdxl:  # the second encoder, with its pooled projection (model/sdxl.py)
                    tokenizer_2 = CLIPTokenizer.from_pretrained(spec.path / "tokenizer_2")
                    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                        spec.path / "text_encoder_2", dtype=text_dtype, use_safetensors=True)
                    convert_(text_encoder_2, text_precision, device)
                # fp16 overflows in SD's VAE, and in SDXL's (activations past 65504; diffusers upcasts it for the
                # same reason, `force_upcast`): fp32, or bf16 (fp32's range) in bf16 plans
                vae_dtype = torch.bfloat16 if precision.compute == "bf16" else torch.float32
                vae = AutoencoderKL.from_pretrained(spec.path / "vae", use_safetensors=True, dtype=vae_dtype)
                scheduler = ddim_scheduler(DDIMScheduler.load_config(spec.path / "scheduler"))  # as load_components
                unet = stream_unet(spec.path, precision, device, fold)
                if unet is None:  # an older key layout: let diffusers rename, then convert
                    unet = UNet2DConditionModel.from_pretrained(spec.path / "unet", use_safetensors=True)
                    fold_into(unet, fold or {})
                    unet = convert_(unet, precision, device)
                unet._edgecp_folded = frozenset(fold or ())
                host_linears_(unet, precision.host)
        except EdgecpError:
            raise
        except Exception as e:
            raise load_error(spec, e) from e
    for m in (text_encoder, vae, unet, *([text_encoder_2] if sdxl else [])):
        m.requires_grad_(False)
        m.eval()
    if sdxl:
        return sdxl_components(tokenizer, tokenizer_2, text_encoder, text_encoder_2, vae, unet, scheduler)
    return Components(tokenizer, text_encoder, vae, unet, scheduler)
