"""Memory on the device at hand: what it has, what a run peaked at, and the planner's inputs for a store.

The planner itself (edgecp/planner.py) is pure; this module measures and bridges. CPU peaks are the process's
resident set (`ru_maxrss`, and a sampling thread for per-phase peaks); CUDA peaks are
`torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (and `max_memory_reserved` beside them, to check
the planner's fragmentation margin on a GPU).

CUDA (issue 22): native bf16 is compute capability 8.0 and above (`cuda_bf16`); the usable memory of a present GPU
starts from what is free now (`device_info`); out-of-memory errors include cuBLAS/cuDNN allocation failures
(`is_oom`), and `forget_failure` lets the failed run's model, optimizer and activations go before anything else
runs in the process.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import diffusers  # noqa: F401 (the model stack: `runtime_rss` measures the process with it imported)
import peft  # noqa: F401
import torch
import torchao  # noqa: F401
import transformers  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
from transformers import CLIPTextModel  # noqa: F401

from edgecp.errors import EdgecpError
from edgecp.heap import set_mmap_threshold, trim_heap
from edgecp.planner import DeviceInfo, Workload, fmt_bytes, parse_bytes

DEVICE_RE = re.compile(r"cpu|cuda(:[0-9]{1,3})?")
# Planning for a GPU that is not here (`edgecp plan --device cuda --gpu-memory 8GB`): without --gpu-capability we
# assume 7.5 (Turing: fp16, no native bf16). Our choice: fp16 runs on every GPU edgecp plans for, and the 16-bit
# plans of both dtypes predict the same bytes; add-concept on the real GPU plans again from what it reports.
DEFAULT_GPU_CAPABILITY = (7, 5)


def _no_cuda() -> str:
    why = (f"this torch {torch.__version__} is a CPU build" if torch.version.cuda is None
           else "no NVIDIA GPU or driver was found")
    return (f"CUDA is not available here ({why}): use --device cpu, or run on a machine with an NVIDIA GPU "
            "and torch's CUDA build")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`--device`: None (cuda when present, else cpu), cpu, cuda or cuda:N; anything else, a CUDA device this
    machine lacks included, is one line saying what is accepted."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device).strip().lower()
    if not DEVICE_RE.fullmatch(text):
        raise EdgecpError(f"--device '{device}' is not supported: use cpu, cuda or cuda:N (e.g. cuda:0)")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EdgecpError(_no_cuda())
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise EdgecpError(f"--device {text} does not exist: this machine has {n} CUDA device(s), "
                              f"cuda:0 to cuda:{n - 1}")
    return dev


def parse_capability(text: str | float | None) -> tuple[int, int]:
    """'8.6' -> (8, 6), '9' -> (9, 0); None -> DEFAULT_GPU_CAPABILITY. Majors 5 to 15 (CUDA 12 starts at 5.0)."""
    if text is None or text == "":
        return DEFAULT_GPU_CAPABILITY
    m = re.fullmatch(r"\s*([0-9]{1,2})(?:\.([0-9]))?\s*", str(text))
    if not m or not 5 <= int(m.group(1)) <= 15:
        raise EdgecpError(f"--gpu-capability '{text}' is not a CUDA compute capability: write it like 7.5 or 8.6 "
                          "(nvidia-smi --query-gpu=compute_cap --format=csv prints it)")
    return int(m.group(1)), int(m.group(2) or 0)


def given_device_info(memory: str | int, capability: str | float | None = None) -> DeviceInfo:
    """A GPU described by its memory and compute capability, for planning where it is not present: bf16 from
    capability 8.0 (Ampere) on, fp16 below. All of `memory` is the plan's (no other process is assumed); the
    planner's CUDA peaks count the context reserve and the fragmentation margin against it (edgecp/planner.py)."""
    total = parse_bytes(memory, what="GPU memory", flag="--gpu-memory")
    major, minor = parse_capability(capability)
    return DeviceInfo("cuda", int(total), major >= 8,
                      f"a GPU with {fmt_bytes(total)}, compute capability {major}.{minor} (given)", card=int(total))


def cuda_bf16(device: torch.device) -> bool:
    """Native bf16 on a CUDA device: compute capability 8.0 (Ampere) and above.

    Not `torch.cuda.is_bf16_supported()`: its default `including_emulation=True` answers True on 7.x cards (T4,
    V100, RTX 20xx), which emulate bf16 without tensor cores; there the planner must pick fp16 (with loss scaling).
    `device` keeps its index: cuda:1 asks about GPU 1."""
    major, _minor = torch.cuda.get_device_capability(device)
    return major >= 8


def device_info(device: torch.device) -> DeviceInfo:
    """The memory the process may use on `device` and whether it computes bf16 natively.

    A present GPU (`device` with its index, e.g. cuda:1): usable = free now (`torch.cuda.mem_get_info`: other
    processes and this process's context already subtracted) + what this process's allocator holds and can reuse
    (`memory_reserved`). Not the card's total: other programs' memory is not ours to plan with."""
    if device.type == "cuda":
        if not torch.cuda.is_available():  # get_device_properties would raise an AssertionError
            raise EdgecpError(_no_cuda())
        props = torch.cuda.get_device_properties(device)
        free, card = torch.cuda.mem_get_info(device)
        usable = int(free) + int(torch.cuda.memory_reserved(device))
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceInfo("cuda", usable, cuda_bf16(device),
                          f"{props.name} (cuda:{index}), {fmt_bytes(usable)} usable of {fmt_bytes(card)}",
                          card=int(card))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:  # a container's limit, where there is one
        limit = int(Path("/sys/fs/cgroup/memory.max").read_text().strip())
        total = min(total, limit)
    except (OSError, ValueError):
        pass
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return DeviceInfo("cpu", int(total), bf16, "cpu", runtime=runtime_rss())


def runtime_rss() -> int:
    """Resident bytes of this process with the model stack imported (the planner's runtime term on the CPU): this
    module imports diffusers, transformers, peft and torchao (with their model classes), so the number includes
    them. Measured rather than assumed, since it differs between environments."""
    return current_rss()


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss() -> int:
    """The process's peak resident set: VmHWM of its own address space. (`ru_maxrss` is not used: after a fork and
    exec it starts from the parent's peak, so a child of a large process reports the parent's size.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PeakMeter:
    """Peak memory per phase: CUDA allocator peaks, or the CPU resident set sampled every few milliseconds."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.cuda = device.type == "cuda"
        self.device = device
        self.interval = interval
        self.phases: dict[str, int] = {}
        self.reserved: dict[str, int] = {}  # CUDA: max_memory_reserved per phase (allocated + the cache's slack)
        self.phase = "start"
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> PeakMeter:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss()
            if rss > self.phases.get(self.phase, 0):
                self.phases[self.phase] = rss
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        """Start attributing peaks to `phase`."""
        if phase == self.phase:
            return
        if self.cuda:
            self.phases[self.phase] = max(self.phases.get(self.phase, 0), torch.cuda.max_memory_allocated(self.device))
            self.reserved[self.phase] = max(self.reserved.get(self.phase, 0),
                                            torch.cuda.max_memory_reserved(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        self.phase = phase

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.enter("end")
        else:
            self._stop.set()
            self._thread.join()
            self.phases[self.phase] = max(self.phases.get(self.phase, 0), current_rss())

    @property
    def peak(self) -> int:
        measured = max(self.phases.values(), default=0)
        return measured if self.cuda else max(measured, max_rss())


@contextmanager
def compact_allocator():
    """Large frees go back to the OS at once while the base is being converted (glibc only; else a no-op).

    glibc raises its mmap threshold after a large free, so the 16-bit copies freed as layers are quantized stay in
    the heap and count in the peak (docs/history/core.md has the figures). We set the threshold to 1 MiB for the
    load, then to glibc's own ceiling (32 MiB) so that training allocations stay fast.
    """
    set_mmap_threshold(1 << 20)
    try:
        yield
    finally:
        set_mmap_threshold(32 << 20)
        trim_heap()


def release_memory(device: torch.device) -> None:
    """Give freed memory back (after the VAE or text encoder is dropped, after a failed run)."""
    gc.collect()
    if device.type == "cuda" or torch.cuda.is_initialized():  # CUDA in use in this process
        torch.cuda.empty_cache()
    else:
        trim_heap()


# cuBLAS and cuDNN report a failed allocation of their own workspace or handle as a RuntimeError naming their status
# ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", cuDNN 8's CUDNN_STATUS_ALLOC_FAILED,
# cuDNN 9's CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED / ..._DEVICE_ALLOCATION_FAILED); not a
# torch.OutOfMemoryError, yet the same cause and the same remedy.
LIBRARY_OOM = re.compile(r"(CUBLAS|CUDNN)_STATUS_\w*(ALLOC_FAILED|ALLOCATION_FAILED|NOT_ALLOCATED)")


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error from CUDA (the caching allocator, cuBLAS, cuDNN) or from the CPU allocator."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                             or "DefaultCPUAllocator" in text or LIBRARY_OOM.search(text) is not None)


def forget_failure(e: BaseException) -> None:
    """Let go of everything a failed run still holds through its exception: the locals of every frame of its
    traceback (the model, the optimizer, the activations of the step that failed), also those of the exceptions it
    was raised from or during. Call it inside the `except` block, then raise the user's error after the block
    (an error raised inside it would keep `e` as its __context__) and call `release_memory`."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
        e = e.__cause__ or e.__context__


@contextmanager
def on_host(module, device, active: bool = True):
    """Inside the block `module` is in host memory and its device memory freed; after it, back on `device`. For a
    phase that does not use the module (the text encoders while the VAE encodes). Nothing moves on the CPU."""
    dev = torch.device(device)
    if not active or module is None or dev.type == "cpu":
        yield
        return
    module.to("cpu")
    release_memory(dev)
    try:
        yield
    finally:
        module.to(dev)


def uses_priors(method, cfg) -> bool:
    """Whether a task draws prior images: for the prior loss (prior_weight > 0; 001 trains without it), or because
    the method reads them (CNS's general importance). Training then has a prior row beside each instance row."""
    return cfg.prior_weight > 0 or method.needs_prior_images


def training_workload(method, shape, train_cfg, resolution: int, n_previous: int, n_images: int,
                      priors_to_generate: int, prior_steps: int) -> Workload:
    """The planner's view of one add-concept run. Without prior images a training call has the instance rows only
    (`edgecp.train`: no prior rows when the task trains without the prior loss)."""
    adapter_numbers, base_numbers = method.trainable_numbers(shape.target_in_out)
    rows = dict(method.phase_rows(n_previous))
    if not uses_priors(method, train_cfg):
        rows["train"] = 1
    return Workload(
        resolution=resolution, batch_size=train_cfg.batch_size, grad_accum=train_cfg.grad_accum,
        phase_rows=rows, adapter_params=adapter_numbers, base_params_trained=base_numbers,
        trains_token=train_cfg.token_lr > 0, n_images=n_images, priors_to_generate=priors_to_generate,
        prior_steps=prior_steps, held_per_number=method.held_bytes(n_previous),
    )
