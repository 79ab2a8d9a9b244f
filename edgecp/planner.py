"""The memory planner: from a base's shape, a method's phases, a resolution, a device and a budget, to a plan.

A pure module: no model is loaded and nothing is measured here (`base_shape` reads only safetensors headers).
`plan_training` and `plan_generation` enumerate the plans in order of expected speed and return the fastest one
whose predicted peak fits the budget; `predict_training` gives the peak of every phase of one plan.

What a plan decides (each knob keeps the mathematics of training unchanged):
- the frozen weights: fp32, 16-bit (bf16 where the device has it, else fp16) or 8-bit Linear weights (torchao; on
  CUDA bitsandbytes when `--plan backend=bitsandbytes` pins it), with autocast to the 16-bit dtype; adapters and
  token rows stay fp32 masters;
- gradient checkpointing;
- the micro-batch: a training iteration of `batch_size` images becomes `batch_size / micro_batch` UNet calls whose
  gradients add up (an exact split of the same per-row loss);
- the DC/DSC chunk: the B*k rows of a Fisher or DSC call are run `dc_chunk` rows at a time (methods/phases.py keeps
  the gradient exact with a two-pass backward);
- for the methods that train base weights (Custom Diffusion, CNS: the cross-attention K/V), where they live
  (`host_trained`, CUDA only): on the GPU, fp32 with their gradients and AdamW's moments beside them, or in host
  memory with all of that (model/host.HostLinear, ZeRO-Offload's split), the GPU seeing a 16-bit copy of one layer
  at a time; the arithmetic is the same (autocast casts the fp32 weight to that copy anyway). What the method holds
  per trained number beside the weight, gradient and moments is counted too (`Workload.held_per_number`: the copy of
  W at the task's start, EWC's anchor and Fisher, CNS's masks);
- the VAE and text encoder leave memory once latents and embeddings are cached (free: add-concept no longer needs
  them), SDPA attention (PyTorch's fused kernel, the diffusers default), VAE slicing for generation.

The peak model (bytes):
    peak(phase) = runtime + resident weights(phase) + trainable state + activations(rows, resolution) + transients
Activations come from the UNet's structure: U = sum over its ResNet and transformer blocks of C_l * h_l^2 (channels
times latent area at that level). Without checkpointing a row keeps `full` * U values for the backward pass; with
checkpointing it keeps `saved` * U plus one block's recomputation, `block` * max_l(C_l h_l^2) (`Activations`). The CPU's
were fitted on measured peaks (tools/bench_memory.py on the SD 1.5-sized fixture; docs/memory/README.md) and are
checked against the tiny base by tests/test_planner.py.

On CUDA (issue 22) the peak is what the process holds on the GPU, not only `torch.cuda.max_memory_allocated`:
    peak(phase) = allocated(phase) + bitsandbytes retained inputs(phase) + fragmentation margin + context reserve
named terms that `Plan.cuda_terms` keeps per phase and `edgecp plan` prints (`cuda_term_names`):
- **context reserve** `CUDA_CONTEXT` = 0.5 GB: the CUDA context with cuBLAS/cuDNN handles and the kernels loaded
  lazily, outside the allocator's counters. Our number, not measured by edgecp on a GPU: 0.3-0.5 GB with
  CUDA's lazy module loading (the default since CUDA 11.7/12), 0.7-0.8 GB without it (PyTorch forum answers,
  "What is the reason for pytorch's GPU memory floor", "High gpu memory overhead"); we take the top of the lazy range.
- **fragmentation margin** `CUDA_FRAGMENTATION` = 10% of the allocator's peak (allocated + retained): what the
  caching allocator reserves beyond what is allocated (memory_reserved - memory_allocated). It rounds large blocks
  up to 2 MiB and serves requests under 10 MiB from 20 MiB segments (c10/cuda/CUDACachingAllocator.cpp:
  kRoundLarge, kLargeBuffer, kMinLargeAlloc), and freed blocks of other sizes cannot always be reused ("When does
  fragmentation occur in the CUDA caching allocator?", PyTorch devlog). 10% is our choice, not measured here;
  `PeakMeter` records max_memory_reserved beside max_memory_allocated so that the first GPU run can check it.
- **bitsandbytes retained inputs** (int8 plans with the bitsandbytes backend): `MatMul8bitLt.forward` keeps
  `ctx.tensors = (CAt, subA, A)` as plain attributes of the autograd context whenever its input needs a gradient
  (bitsandbytes 0.50.2, `bitsandbytes/autograd/_functions.py` lines 186-187, read in `backward` at line 208);
  `ctx.save_for_backward` is not used for them, so gradient checkpointing (whose saved-tensor hooks free and
  recompute what `save_for_backward` saved) cannot free them: every 8-bit Linear whose input needs a gradient keeps
  that input alive until backward. CAt is None for a frozen weight (line 135: only when the weight needs a gradient)
  and subA holds the outlier columns only, so the term is A, the inputs themselves (`_bnb_retained`). Observed on
  the CPU with `MatMul8bitLt` (tests/test_gpu_plumbing.py): its input outlives a checkpointed forward, an
  nn.Linear's does not.
- host-side loading transients (the 64 MB streaming batch, a single file's fp32 pipeline) are in host memory and
  are not counted against the GPU; bitsandbytes quantizes each Linear from an fp16 copy on the GPU (one at a time).
- the device's memory is the card's total for a GPU given by `--gpu-memory`, and what is free now
  (`torch.cuda.mem_get_info`) plus what this process's allocator already holds on a present GPU: other processes
  count. mem_get_info makes this process's context first, so on a present GPU the context reserve is counted twice
  (our choice, on the safe side: lazily loaded kernels grow the context during the run).
The CUDA activation coefficients (`CUDA_ACTIVATIONS`, issue 28) are not the CPU's: those were fitted on the resident
set, which carries glibc's heap and mapped pages, while the allocator counts live tensor bytes. tools/
count_activations.py counts exactly those on the CPU for one step of the same program (bf16 autocast, checkpointing,
SDPA) on three bases (docs/memory/counted-activations.md); the coefficients are that fit rounded up by about 10%. They were not measured on a GPU.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace

from edgecp.errors import EdgecpError

GB = 1e9


@dataclass(frozen=True)
class Activations:
    """The activation model's coefficients for one device kind (module docstring), in values of the compute dtype per
    element of the UNet's structure (C*h^2) of one row, except the VAE's, per pixel-channel of its widest level."""

    full: float  # no checkpointing: values kept per C*h^2 of every block
    saved: float  # checkpointing: block inputs and skips kept per C*h^2
    block: float  # checkpointing: the largest block recomputed with its gradients, per C*h^2 of that level
    infer_u: float  # no grad: values alive per C*h^2 of every block (the skips the up path reads)
    infer: float  # no grad: values per C*h^2 of the largest attention level
    decode: float  # VAE decoder (one image); bytes on the CPU, values of the VAE's dtype on CUDA
    encode: float  # VAE encoder, per image
    vae_in_values: bool  # decode/encode count values of the VAE's dtype (else bytes, whatever the dtype)

    def vae_bytes(self, which: str, vae_dtype: str) -> float:
        per = self.decode if which == "decode" else self.encode
        return per * _bytes(vae_dtype) if self.vae_in_values else per


# The CPU's: fitted on peak RSS (tools/bench_memory.py on the SD 1.5-sized fixture; docs/memory/README.md), so they
# carry glibc's heap and the resident pages with them.
CPU_ACTIVATIONS = Activations(full=28.0, saved=8.0, block=80.0, infer_u=0.0, infer=6.0, decode=24.0, encode=12.0,
                              vae_in_values=False)
# CUDA's: what `torch.cuda.max_memory_allocated` counts is the bytes of live tensors, which
# tools/count_activations.py counts on the CPU (a dispatch mode over one step of the same program: bf16 autocast,
# checkpointing, SDPA) for the tiny base, the sdxl-mini and the SDXL fixtures (docs/memory/counted-activations.md).
# Fitted on those counts, then rounded up by about 10%; not measured on a GPU.
CUDA_ACTIVATIONS = Activations(full=18.0, saved=0.83, block=64.0, infer_u=0.17, infer=26.0, decode=6.6, encode=5.5,
                               vae_in_values=True)
ACTIVATIONS = {"cpu": CPU_ACTIVATIONS, "cuda": CUDA_ACTIVATIONS}
RUNTIME_CPU = 0.50 * GB  # python + torch + diffusers + transformers + peft resident (measured)
RUNTIME_CUDA = 0.0  # torch.cuda.max_memory_allocated excludes the CUDA context: a named term instead
CUDA_CONTEXT = 0.5 * GB  # context reserve (module docstring: our number, not measured here)
CUDA_FRAGMENTATION = 0.10  # fragmentation margin, share of the allocator's peak (module docstring)
CUDA_TERMS = ("context_reserve", "fragmentation_margin", "bitsandbytes_retained_inputs")
CPU_SLACK = 1.0  # allocator fragmentation on glibc: within the fitted coefficients (measured)
STREAM_TRANSIENT = 64 * 2**20  # model/quant.STREAM_BATCH_BYTES

# Relative time of an iteration per weight precision, by device: measured on this project's CPU (AVX512-BF16)
# for large layers (tools/bench_memory.py); CUDA values are the usual tensor-core ratios, not measured here.
SPEED = {
    ("cpu", True): {"fp32": 1.0, "bf16": 0.55, "int8": 0.6},  # CPU with native bf16 (AVX512-BF16 / AMX)
    ("cpu", False): {"fp32": 1.0, "bf16": 2.0, "int8": 2.2},
    ("cuda", True): {"fp32": 1.0, "bf16": 0.45, "fp16": 0.45, "int8": 0.7},
    ("cuda", False): {"fp32": 1.0, "fp16": 0.5, "int8": 0.75},
}
SMALL_UNET = 100e6  # below this many UNet parameters a CPU gains nothing from bf16 (op overhead dominates)
CHECKPOINT_COST = 1.35  # one more forward pass per block
CHUNK_COST = 1.3  # the two-pass chunked DC/DSC backward adds a no-grad forward
# A plan is chosen only if its predicted peak is within this share of the budget: room for the predictions' error
# against measured peaks (docs/memory/README.md; the figures that set it: docs/history/core.md, "planner").
HEADROOM = 0.92


MIN_BUDGET = 64 * 2**20  # 64 MiB = 67,108,864 bytes: below it not even the runtime fits
MAX_BUDGET = 10**15  # 1,000 TB: a larger number is a typo (and "1e400" would overflow)


def parse_bytes(text: str | float | int | None, what: str = "memory budget", flag: str = "--memory-budget") -> int | None:
    """'6GB', '6 GiB', '512MB', '6' (GB) -> bytes; None -> None.

    Decimal units are powers of 1000 (MB = 1e6, GB = 1e9), binary ones (MiB, GiB) of 1024. The minimum is
    MIN_BUDGET, 64 MiB; the message states it in both units (64 MiB = 67.11 MB), so that "65MB", which is below
    it, is not refused as "below 64 MB" (issue 21).
    """
    if text is None or text == "":
        return None
    shown = str(text) if len(str(text)) <= 40 else str(text)[:37] + "..."
    if isinstance(text, bool):
        raise EdgecpError(f"{what} {text!r} is not a size: write it like {flag} 6GB")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value) or value > MAX_BUDGET:
            raise EdgecpError(f"{what} {text!r} is not a size this planner can use: write it like {flag} 6GB")
        n = int(value * GB) if value < 1e6 else int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*", str(text).lower())
        if not m:
            raise EdgecpError(f"{what} '{shown}' is not a size: write it like {flag} 6GB, 6.5GiB or 3000MB")
        value, unit = float(m.group(1)), (m.group(2) or "gb")
        base = 1024 if "i" in unit else 1000
        power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
        if value * base**power > MAX_BUDGET:  # also catches "9999...9TB", which float() makes inf
            raise EdgecpError(f"{what} '{shown}' is above {MAX_BUDGET / 1e12:,.0f} TB: write it like {flag} 6GB")
        n = round(value * base**power)
    if n < MIN_BUDGET:
        raise EdgecpError(f"{what} '{shown}' is {n:,} bytes, below the minimum 64 MiB ({MIN_BUDGET / 1e6:.2f} MB, "
                          f"{MIN_BUDGET:,} bytes): write it like {flag} 6GB")
    return n


def fmt_bytes(n: float) -> str:
    return f"{n / GB:.2f} GB"


def _round_up(n: float) -> str:
    """The next 0.1 GB above n, as a --memory-budget value."""
    return f"{math.ceil(n / GB * 10 + 1e-9) / 10:.1f}GB"


@dataclass(frozen=True)
class UNetShape:
    """What the activation model needs of a UNet2DConditionModel config."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_levels: tuple[bool, ...]  # does level l have transformer blocks
    in_channels: int = 4
    sample_size: int = 64
    linear_projection: bool = False  # Transformer2DModel's proj_in/proj_out are Linear (SD 2.x), not 1x1 convs
    level_layers: tuple[int, ...] = ()  # BasicTransformerBlocks per Transformer2DModel at each level (SDXL: 1, 2, 10;
    #                                     empty: 1 everywhere, as SD 1.x/2.x)

    @classmethod
    def from_config(cls, cfg: dict) -> UNetShape:
        lpb = cfg.get("layers_per_block", 2)
        n_levels = len(cfg["block_out_channels"])
        tl = cfg.get("transformer_layers_per_block", 1) or 1
        per_level = [tl] * n_levels if isinstance(tl, int) else list(tl)
        per_level = tuple(int(x if isinstance(x, int) else max(x)) for x in per_level)
        return cls(
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=lpb if isinstance(lpb, int) else max(lpb),
            attention_levels=tuple("CrossAttn" in t for t in cfg["down_block_types"]),
            in_channels=cfg.get("in_channels", 4),
            sample_size=cfg.get("sample_size") or 64,
            linear_projection=bool(cfg.get("use_linear_projection", False)),
            level_layers=per_level,
        )

    def layers_at(self, level: int) -> int:
        """Transformer depth at `level` (the mid block takes the last level's, as diffusers builds it)."""
        return self.level_layers[level] if self.level_layers else 1

    def units(self, latent: int) -> tuple[float, float, float]:
        """(U_resnet, U_attention, largest attention level's C*h^2) in elements for a latent side `latent`. U_attention
        counts each Transformer2DModel once per BasicTransformerBlock it holds (SDXL's 10-deep lowest level: 10x);
        SD 1.x/2.x have one everywhere."""
        u_res = u_attn = biggest = 0.0
        last = len(self.block_out_channels) - 1
        for level, c in enumerate(self.block_out_channels):
            h = max(1, latent // 2**level)
            area = c * h * h
            n_down, n_up = self.layers_per_block, self.layers_per_block + 1
            u_res += (n_down + n_up) * area
            if self.attention_levels[level]:
                u_attn += (n_down + n_up) * area * self.layers_at(level)
                biggest = max(biggest, area)
            if level == last:  # mid block: two ResNets and one transformer
                u_res += 2 * area
                u_attn += area * self.layers_at(level)
                biggest = max(biggest, area)
        return u_res, u_attn, biggest or max(c * max(1, latent // 2**i) ** 2 for i, c in enumerate(self.block_out_channels))

    def transformer_blocks(self, latent: int) -> list[tuple[int, int, int, int]]:
        """(channels C, tokens h^2, BasicTransformerBlocks, Transformer2DModels) per UNet level with attention, as
        `units` counts them: layers_per_block down and layers_per_block + 1 up per attention level, the mid block at
        the last level."""
        out = []
        last = len(self.block_out_channels) - 1
        for level, c in enumerate(self.block_out_channels):
            h = max(1, latent // 2**level)
            n = (2 * self.layers_per_block + 1) if self.attention_levels[level] else 0
            n += 1 if level == last else 0
            if n:
                out.append((c, h * h, n * self.layers_at(level), n))
        return out


@dataclass(frozen=True)
class BaseShape:
    """Parameter counts by kind (from safetensors headers) and the structure the activation model needs."""

    unet_conv: int
    unet_linear: int  # nn.Linear weights (8-bit in an int8 plan), adapter targets excluded
    unet_other: int  # norms, biases, embeddings
    unet_target: int  # base weights of the adapter's target layers (never 8-bit; fp32 when `target_fp32`)
    unet_linear_rows: int  # output rows of the quantizable Linears (one fp32 scale each when 8-bit)
    text: int
    vae: int
    vae_channels: tuple[int, ...]
    vae_scale: int
    unet: UNetShape
    largest_tensor: int = 0  # elements
    target_in_out: tuple[tuple[int, int], ...] = ()  # (in, out) of each adapted layer
    single_file: bool = False
    target_fp32: bool = True  # the method changes the targets' base weights: they stay fp32 (model/quant.py)
    text_linear: int = 0  # text encoders' nn.Linear weights (8-bit in an int8 plan)
    text_linear_rows: int = 0

    @property
    def unet_params(self) -> int:
        return self.unet_conv + self.unet_linear + self.unet_other + self.unet_target


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # cpu | cuda
    total: int  # bytes the process may use (CPU: physical RAM; CUDA: the card)
    bf16: bool  # native bf16 (CPU: AVX512-BF16/AMX; CUDA: compute capability >= 8, not emulated)
    name: str = ""
    runtime: int = 0  # CPU: resident bytes of the process with its libraries imported (0: RUNTIME_CPU)
    card: int = 0  # CUDA: the card's total memory (`total` is what is usable: free + held, or the given size)


@dataclass(frozen=True)
class Workload:
    """What add-concept will run, in UNet rows per image and parameters trained."""

    resolution: int
    batch_size: int  # images per UNet call in training, before any micro-batch split
    grad_accum: int
    phase_rows: dict = field(default_factory=lambda: {"train": 2})  # rows per image, per phase
    adapter_params: int = 0  # trainable adapter numbers
    base_params_trained: int = 0  # base weights trained directly (Custom Diffusion, CNS)
    trains_token: bool = True
    n_images: int = 4
    priors_to_generate: int = 0  # prior images not cached yet
    prior_steps: int = 25
    held_per_number: float = 0.0  # bytes per trained number held beside it, its gradient and AdamW's moments
    #                               (Method.held_bytes: CD/CNS's start copy, EWC's anchor and Fisher, CNS's masks)


@dataclass(frozen=True)
class Plan:
    device: str
    weights: str  # fp32 | bf16 | fp16 | int8
    backend: str | None  # torchao | bitsandbytes (int8 only)
    compute: str  # fp32 | bf16 | fp16: autocast dtype and the dtype of the non-8-bit frozen weights
    gradient_checkpointing: bool
    micro_batch: int
    grad_accum: int
    dc_chunk: int  # rows per UNet call in the Fisher / DSC phases
    offload: bool = True  # VAE and text encoder leave memory once cached
    attention: str = "sdpa"
    vae_slicing: bool = True
    budget: int | None = None
    predicted: dict = field(default_factory=dict)  # phase -> bytes
    purpose: str = "train"  # train | generate (micro_batch is then the images per UNet call)
    cuda_terms: dict = field(default_factory=dict)  # CUDA: phase -> {term: bytes} within `predicted` (CUDA_TERMS)
    target_dtype: str = "fp32"  # the adapted layers' base weights (BaseShape.target_fp32, else `compute`)
    host_trained: bool = False  # the trained base weights, their gradients and AdamW state in host memory
    host_memory: int = 0  # CUDA with host_trained: the bytes they take in host memory (`host_bytes`)

    @property
    def peak(self) -> int:
        return max(self.predicted.values()) if self.predicted else 0

    @property
    def loss_scaling(self) -> bool:
        """fp16 compute trains with loss scaling (edgecp/scaling.py); bf16 and fp32 need none."""
        return self.compute == "fp16"

    @property
    def vae_dtype(self) -> str:
        """The VAE's precision under this plan: bf16 in bf16 plans, else fp32, never fp16 (SD's and SDXL's VAEs
        overflow there: activations past 65504; diffusers' SDXL VAE config says `force_upcast`)."""
        return "bf16" if self.compute == "bf16" else "fp32"

    def line(self) -> str:
        w = {"fp32": "fp32 base", "bf16": "bf16 base", "fp16": "fp16 base"}.get(self.weights)
        w = w or f"8-bit base ({self.backend}; convs/norms {self.compute}, adapted layers {self.target_dtype})"
        parts = [w, f"{self.compute} autocast" if self.compute != "fp32" else "no autocast"]
        if self.compute != "fp32":  # model/quant.py and generate.decode_latents hold and run the VAE so
            parts.append(f"VAE {self.vae_dtype}" + (" (SD/SDXL VAEs overflow in fp16)" if self.compute == "fp16" else ""))
        if self.loss_scaling and self.purpose != "generate":
            parts.append("loss scaling")
        if self.host_trained:
            parts.append("trained base weights and AdamW state in host memory"
                         + (f" ({fmt_bytes(self.host_memory)})" if self.host_memory else ""))
        if self.purpose == "generate":
            parts += [f"{self.micro_batch} image(s) per call", "VAE slicing" if self.vae_slicing else "", "SDPA"]
        else:
            parts += ["checkpointing" if self.gradient_checkpointing else "no checkpointing",
                      f"micro-batch {self.micro_batch} x {self.grad_accum}", f"DC chunk {self.dc_chunk} rows",
                      "encoders offloaded" if self.offload else "encoders resident", self.attention.upper()]
        parts = [p for p in parts if p]
        budget = f" of {fmt_bytes(self.budget)} budget" if self.budget else ""
        return f"plan on {self.device}: " + ", ".join(parts) + f"; predicted peak {fmt_bytes(self.peak)}{budget}"

    def to_json(self) -> dict:
        d = asdict(self)
        d["peak"] = self.peak
        d["loss_scaling"] = self.loss_scaling
        return d



# -- the peak model ---------------------------------------------------------------------------------------------
def _bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def unet_weight_bytes(shape: BaseShape, weights: str, compute: str, host_targets: bool = False) -> float:
    """The UNet's weights on the planned device; `host_targets`: the target layers' are in host memory instead."""
    if weights == "fp32":
        return 4.0 * (shape.unet_params - (shape.unet_target if host_targets else 0))
    lin = shape.unet_linear + 4 * shape.unet_linear_rows if weights == "int8" else _bytes(compute) * shape.unet_linear
    target = 0 if host_targets else (4 if shape.target_fp32 else _bytes(compute)) * shape.unet_target
    return lin + _bytes(compute) * (shape.unet_conv + shape.unet_other) + target


def text_weight_bytes(shape: BaseShape, weights: str, compute: str) -> float:
    """The text encoders as model/quant.load_planned holds them: fp32, 16-bit, or 8-bit Linear layers with one fp32
    scale per output row and the rest (token embeddings, norms) in 16 bits."""
    if weights == "fp32":
        return 4.0 * shape.text
    if weights == "int8":
        return shape.text_linear + 4.0 * shape.text_linear_rows + _bytes(compute) * (shape.text - shape.text_linear)
    return _bytes(compute) * shape.text


def _activation_bytes(shape: BaseShape, latent: int, rows: int, ckpt: bool, compute: str, grad: bool = True,
                      kind: str = "cpu") -> float:
    a = ACTIVATIONS[kind]
    u_res, u_attn, biggest = shape.unet.units(latent)
    b = _bytes(compute)
    if not grad:
        return rows * (a.infer_u * (u_res + u_attn) + a.infer * biggest) * b
    if ckpt:
        return rows * (a.saved * (u_res + u_attn) * b + a.block * biggest * b)
    return rows * a.full * (u_res + u_attn) * b


def _runtime(device: DeviceInfo) -> float:
    if device.kind == "cpu":
        return device.runtime or RUNTIME_CPU
    return RUNTIME_CUDA


def _bnb_retained(shape: BaseShape, latent: int, rows: int, compute: str, ckpt: bool) -> float:
    """Bytes of the inputs that bitsandbytes' `MatMul8bitLt` keeps until backward (module docstring): the inputs of
    the 8-bit Linears of every BasicTransformerBlock, per token of a row, in the dtype they arrive in under CUDA
    autocast:
    - attn1.to_q/k/v (one tensor, the three share it), attn2.to_q and ff.net.0.proj take LayerNorm outputs: fp32
      (layer_norm is on autocast's fp32 list), 3 x 4 C bytes;
    - attn1.to_out and attn2.to_out take the attention outputs, in the compute dtype (scaled_dot_product_attention
      is on autocast's 16-bit list), 2 x 2 C bytes. Without checkpointing SDPA saves its output for its own
      backward anyway, so they are counted with checkpointing only;
    - ff.net.2 takes GEGLU's output, 4 C values in fp32 (bitsandbytes returns its input's dtype, here fp32), 16 C;
    - with linear projections (SD 2.x) proj_in and proj_out take fp32 inputs (GroupNorm's output, the residual
      sum): 2 x 4 C bytes per Transformer2DModel.
    Our choice: every block counts, the first one's attn1/attn2.to_q inputs included although they need no gradient
    with the default targets (cross-attention K/V): an upper bound by at most 3 x 4 C bytes per token of one block.
    attn2.to_k/to_v are adapter targets and stay full precision (no 8-bit layer)."""
    b = _bytes(compute)
    total = 0.0
    for c, tokens, blocks, models in shape.unet.transformer_blocks(latent):
        per_token = 3 * 4 * c + (2 * b * c if ckpt else 0) + 4 * 4 * c
        total += blocks * tokens * per_token
        if shape.unet.linear_projection:
            total += models * tokens * 2 * 4 * c
    return rows * total


def _with_cuda_terms(device: DeviceInfo, allocated: dict[str, float], retained: dict[str, float]):
    """(predicted, cuda_terms): on CUDA each phase's allocator bytes plus the named terms (module docstring)."""
    if device.kind != "cuda":
        return {k: int(v * CPU_SLACK) for k, v in allocated.items()}, {}
    predicted, terms = {}, {}
    for phase, alloc in allocated.items():
        kept = retained.get(phase, 0.0)
        t = {"context_reserve": int(CUDA_CONTEXT), "fragmentation_margin": int(CUDA_FRAGMENTATION * (alloc + kept)),
             "bitsandbytes_retained_inputs": int(kept)}
        terms[phase] = t
        predicted[phase] = int(alloc) + sum(t.values())
    return predicted, terms


def host_bytes(work: Workload, plan: Plan) -> int:
    """Host memory a CUDA plan with `host_trained` takes for the trained base weights: each fp32 number, its gradient
    and AdamW's two moments, and what the method holds beside them (`held_per_number`); not part of `predicted`,
    which is the GPU's."""
    if not (plan.host_trained and plan.device == "cuda"):
        return 0
    return int((16.0 + work.held_per_number) * work.base_params_trained)


def predict_training(shape: BaseShape, work: Workload, device: DeviceInfo, plan: Plan) -> dict[str, int]:
    """Predicted peak bytes of each add-concept phase under `plan` (CPU: resident set; CUDA: the process's GPU
    memory, the named terms of `predict_training_terms` included)."""
    return predict_training_terms(shape, work, device, plan)[0]


def _load_transient(shape: BaseShape, device: DeviceInfo, plan: Plan) -> float:
    """Bytes in flight while the base loads, counted on the device whose memory is planned."""
    if device.kind == "cuda":  # the streaming batch and a single file's fp32 pipeline stay in host memory
        # bitsandbytes' fp16 copy of one layer (it quantizes on the GPU); torchao quantizes on the host
        return 2.0 * shape.largest_tensor if plan.weights == "int8" and plan.backend == "bitsandbytes" else 0.0
    transient = STREAM_TRANSIENT + 4.0 * shape.largest_tensor
    if shape.single_file:  # from_single_file materialises the fp32 pipeline before it is converted
        transient += 4.0 * (shape.unet_params + shape.text + shape.vae)
    return transient


def text_off_device(plan: Plan) -> bool:
    """Whether `plan` moves the text encoders to host memory while the VAE encodes the photos (`memory.on_host`): a
    CUDA plan that offloads, unless its 8-bit layers are bitsandbytes' (which quantizes as it moves to the GPU)."""
    return plan.device == "cuda" and plan.offload and plan.backend != "bitsandbytes"


def predict_training_terms(shape: BaseShape, work: Workload, device: DeviceInfo,
                           plan: Plan) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(predicted peak per phase, CUDA terms per phase ({} on the CPU)) of add-concept under `plan`."""
    latent = work.resolution // shape.vae_scale
    # `host_trained` on CUDA: the trained base weights, their gradients, AdamW's moments and what the method holds
    # beside them are in host memory; the device sees a 16-bit copy of one layer at a time (all of them without
    # checkpointing, which keeps each for its backward). On the CPU host memory is the planned memory: all count.
    off = plan.host_trained and device.kind == "cuda"
    unet = unet_weight_bytes(shape, plan.weights, plan.compute, host_targets=off)
    text = text_weight_bytes(shape, plan.weights, plan.compute)
    vae = _bytes(plan.vae_dtype) * shape.vae
    act = ACTIVATIONS[device.kind]
    runtime = _runtime(device)
    # trainable state: an adapter's fp32 master + grad + two AdamW moments; a trained base weight is counted with the
    # UNet's weights, so grad + moments; and what the method holds per trained number (`held_per_number`)
    held = work.held_per_number
    state = (16.0 + held) * work.adapter_params + (0.0 if off else (12.0 + held) * work.base_params_trained)
    largest_target = max((i * o for i, o in shape.target_in_out), default=0)
    copies = 0.0  # the 16-bit copies of host weights on the device
    if plan.host_trained:
        copies = _bytes(plan.compute) * (2 * largest_target if plan.gradient_checkpointing else shape.unet_target)
    out: dict[str, float] = {}
    retained: dict[str, float] = {}
    bnb = device.kind == "cuda" and plan.weights == "int8" and plan.backend == "bitsandbytes"
    out["load"] = runtime + unet + text + vae + _load_transient(shape, device, plan)
    vae_px = shape.vae_channels[0] * work.resolution**2
    if work.priors_to_generate:
        sample_rows = 2 * min(plan.micro_batch, work.priors_to_generate)  # guidance doubles the rows
        out["priors"] = runtime + unet + text + vae + max(
            _activation_bytes(shape, latent, sample_rows, False, plan.compute, grad=False, kind=device.kind),
            act.vae_bytes("decode", plan.vae_dtype) * vae_px)  # VAE slicing: one image at a time
        out["priors"] += _bytes(plan.compute) * largest_target if plan.host_trained else 0.0  # one layer's copy
    out["encode"] = (runtime + unet + (0 if text_off_device(plan) else text) + vae
                     + act.vae_bytes("encode", plan.vae_dtype) * vae_px)  # one row a call
    resident = unet + (text if work.trains_token or not plan.offload else 0) + (0 if plan.offload else vae)
    train_rows = work.phase_rows.get("train", 2) * plan.micro_batch
    out["train"] = runtime + resident + state + copies + _activation_bytes(
        shape, latent, train_rows, plan.gradient_checkpointing, plan.compute, kind=device.kind)
    if bnb:
        retained["train"] = _bnb_retained(shape, latent, train_rows, plan.compute, plan.gradient_checkpointing)
    consolidate_resident = unet + (0 if plan.offload else text + vae)
    for phase in ("fisher", "dsc"):
        per_image = work.phase_rows.get(phase)
        if not per_image:
            continue
        rows = min(plan.dc_chunk, per_image * work.batch_size)
        if phase == "fisher":  # accumulator + grads, and what the method holds (start copy, anchor, Fisher)
            extra = (8.0 + held) * work.adapter_params + (0.0 if off else (8.0 + held) * work.base_params_trained)
        else:
            extra = state
        out[phase] = runtime + consolidate_resident + extra + copies + _activation_bytes(
            shape, latent, rows, plan.gradient_checkpointing, plan.compute, kind=device.kind)
        if bnb:
            retained[phase] = _bnb_retained(shape, latent, rows, plan.compute, plan.gradient_checkpointing)
    return _with_cuda_terms(device, out, retained)


def predict_generation(shape: BaseShape, resolution: int, batch: int, device: DeviceInfo, plan: Plan) -> dict[str, int]:
    return predict_generation_terms(shape, resolution, batch, device, plan)[0]


def predict_generation_terms(shape: BaseShape, resolution: int, batch: int, device: DeviceInfo, plan: Plan):
    """(predicted peak per phase, CUDA terms per phase) of generation under `plan` (no gradient: nothing retained)."""
    latent = resolution // shape.vae_scale
    unet = unet_weight_bytes(shape, plan.weights, plan.compute)
    text = text_weight_bytes(shape, plan.weights, plan.compute)
    vae = _bytes(plan.vae_dtype) * shape.vae
    runtime = _runtime(device)
    vae_px = shape.vae_channels[0] * resolution**2
    decode = ACTIVATIONS[device.kind].vae_bytes("decode", plan.vae_dtype) * vae_px
    out = {
        "load": runtime + unet + text + vae + _load_transient(shape, device, plan),
        "sample": runtime + unet + text + vae + _activation_bytes(shape, latent, 2 * batch, False, plan.compute,
                                                                  grad=False, kind=device.kind),
        "decode": runtime + unet + text + vae + decode * (1 if plan.vae_slicing else batch),
    }
    return _with_cuda_terms(device, out, {})


# -- enumeration ---------------------------------------------------------------------------------------------------
def _precisions(shape: BaseShape, device: DeviceInfo) -> list[tuple[str, str | None, str]]:
    """The precisions to try, fastest backend first for equal weights. 8-bit: torchao on both devices (on CUDA its
    weight-only int8 runs a 16-bit GEMM on a dequantized copy of each weight, freed with its block under
    checkpointing); bitsandbytes only when `--plan backend=bitsandbytes` pins it on CUDA, since its retained inputs
    (module docstring) make it the larger plan at every size. Which is faster on a GPU was not measured here."""
    half = "bf16" if device.bf16 or device.kind == "cpu" else "fp16"
    return [("fp32", None, "fp32"), (half, None, half), ("int8", "torchao", half)]


def _target_dtype(shape: BaseShape, compute: str) -> str:
    return "fp32" if shape.target_fp32 else compute


def _speed(device: DeviceInfo, shape: BaseShape, weights: str) -> float:
    """Relative iteration time of a precision (lower is faster)."""
    if device.kind == "cpu" and shape.unet_params < SMALL_UNET:
        return {"fp32": 1.0, "bf16": 1.1, "fp16": 1.1, "int8": 1.2}[weights]
    table = SPEED[(device.kind, device.bf16)]
    return table.get(weights, 1.0)


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _candidates(shape: BaseShape, work: Workload, device: DeviceInfo, force: dict):
    consolidation_rows = max([work.phase_rows.get(p, 0) * work.batch_size for p in ("fisher", "dsc")] + [1])
    chunks = sorted({consolidation_rows, *[c for c in (8, 4, 2, 1) if c < consolidation_rows]}, reverse=True)
    if "dc_chunk" in force:  # a pinned chunk larger than the rows simply runs them in one call
        chunks = [int(force["dc_chunk"])]
    # host memory for trained base weights: on CUDA, for the methods that train them (on the CPU it saves nothing
    # and runs only when pinned: --plan host_trained=true)
    hosts = [False]
    if work.base_params_trained and (device.kind == "cuda" or force.get("host_trained")):
        hosts.append(True)
    precisions = _precisions(shape, device)
    if force.get("compute") == "fp32" and force.get("weights") == "int8":  # pinned only (not measured at scale):
        precisions.append(("int8", "torchao", "fp32"))  # 8-bit Linears, fp32 everything else, no autocast
    for weights, backend, compute in precisions:
        if weights == "int8" and "backend" in force:
            backend = force["backend"]
        for host, ckpt in ((h, c) for h in hosts for c in (False, True)):
            for micro in _divisors(work.batch_size):
                for chunk in chunks:
                    speed = _speed(device, shape, weights) * (CHECKPOINT_COST if ckpt else 1.0)
                    speed *= 1.0 + 0.08 * (work.batch_size // micro - 1)
                    speed *= 1.0 if chunk >= consolidation_rows else CHUNK_COST + 0.02 * (consolidation_rows // chunk)
                    yield speed, Plan(device.kind, weights, backend, compute, ckpt, micro,
                                      work.grad_accum * (work.batch_size // micro), chunk,
                                      target_dtype=_target_dtype(shape, compute), host_trained=host)


def plan_training(shape: BaseShape, work: Workload, device: DeviceInfo, budget: int | None = None,
                  force: dict | None = None) -> Plan:
    """The fastest plan whose predicted peak fits `budget` (default: the device's memory).

    `force` pins plan fields (e.g. {"weights": "int8"}) for measurements. Raises EdgecpError naming the smallest
    budget that would work when none fits.
    """
    limit = HEADROOM * _capacity(device, budget)
    valid = {f for f in Plan.__dataclass_fields__}
    for key in force or {}:
        if key not in valid:
            raise EdgecpError(f"--plan {key}=... is not a plan setting: use one of weights, gradient_checkpointing, "
                              "micro_batch, dc_chunk, compute, backend, host_trained")
    best, smallest = None, None
    for speed, plan in _candidates(shape, work, device, force or {}):
        if force and any(getattr(plan, k) != v for k, v in force.items()):
            continue
        predicted, terms = predict_training_terms(shape, work, device, plan)
        plan = replace(plan, budget=budget, predicted=predicted, cuda_terms=terms, host_memory=host_bytes(work, plan))
        if smallest is None or plan.peak < smallest.peak:
            smallest = plan
        # trained weights in host memory only when no plan that keeps them on the GPU fits: per UNet call their
        # 16-bit copy crosses to the GPU (twice with checkpointing) and their gradient back, and AdamW steps on the
        # CPU, a cost no GPU has measured here
        key = (plan.host_trained, speed)
        if plan.peak <= limit and (best is None or key < best[0]):
            best = (key, plan)
    if best is None:
        if smallest is None:
            raise EdgecpError(f"no plan matches --plan {force}: micro_batch must divide the batch size "
                              f"{work.batch_size}, backend needs weights=int8, host_trained a method that trains "
                              "base weights (custom-diffusion, cns); drop or change the setting")
        what = _limit_name(device, budget)
        raise EdgecpError(
            f"{what} is below the smallest plan for {work.resolution} px ({fmt_bytes(smallest.peak)} with "
            f"{smallest.weights} weights, micro-batch {smallest.micro_batch}, DC chunk {smallest.dc_chunk}): "
            f"pass --memory-budget {_round_up(smallest.peak / HEADROOM)} or more"
            + (", or pin fewer --plan settings" if force else "")
            + f", or train at a lower resolution: `edgecp plan --resolution {max(32, work.resolution // 16 * 8)}` shows "
            "what fits, and a store's resolution is set when it is made (`edgecp init DIR --train resolution=N`)"
        )
    return best[1]


def _capacity(device: DeviceInfo, budget: int | None) -> float:
    """The bytes a plan may use: the budget, else the device's memory; on CUDA never more than the GPU has
    (usable: free + held on a present GPU, the given size otherwise), whatever the budget says."""
    if budget is None:
        return device.total
    return min(budget, device.total) if device.kind == "cuda" else budget


def _limit_name(device: DeviceInfo, budget: int | None) -> str:
    if budget and (device.kind != "cuda" or budget <= device.total):
        return f"--memory-budget {fmt_bytes(budget)}"
    usable = " usable" if device.kind == "cuda" else ""
    return f"this {device.kind}'s {fmt_bytes(device.total)}{usable}"


def plan_generation(shape: BaseShape, resolution: int, n: int, device: DeviceInfo, budget: int | None = None) -> Plan:
    """The sampling plan: the fastest precision and the largest images-per-call (`micro_batch`) that fit."""
    limit = HEADROOM * _capacity(device, budget)
    best, smallest = None, None
    for weights, backend, compute in _precisions(shape, device):
        for batch in sorted({min(n, 4), *[b for b in (2, 1) if b < min(n, 4)]}, reverse=True):
            plan = Plan(device.kind, weights, backend, compute, False, batch, 1, 1, budget=budget, purpose="generate",
                        target_dtype=_target_dtype(shape, compute))
            predicted, terms = predict_generation_terms(shape, resolution, batch, device, plan)
            plan = replace(plan, predicted=predicted, cuda_terms=terms)
            speed = _speed(device, shape, weights) * (1 + 0.05 * (4 // batch))
            if smallest is None or plan.peak < smallest[1].peak:
                smallest = (batch, plan)
            if plan.peak <= limit and (best is None or speed < best[0]):
                best = (speed, plan, batch)
    if best is None:
        raise EdgecpError(
            f"{_limit_name(device, budget)} is below the smallest generation plan for {resolution} px "
            f"({fmt_bytes(smallest[1].peak)}): pass --memory-budget {_round_up(smallest[1].peak / HEADROOM)} or more, "
            "or a smaller --size"
        )
    return best[1]
