"""The CPU-at-the-boundary rule (issue 22): the one way a live tensor reaches the CPU. A leaf module, so that the
adapters, the methods and `personal` all use it without importing one another."""

from __future__ import annotations

import torch


def host(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous copy of `t` in CPU memory (never a view of a live parameter)."""
    return t.detach().to("cpu", copy=True).contiguous()


def to_host(tensors):  # (dict[str, Tensor]) -> dict[str, Tensor], or (Tensor) -> Tensor
    """The CPU-at-the-boundary rule (issue 22): a version's tensors live on the CPU. `read_tensors` gives CPU tensors;
    every live tensor (on the training device, e.g. `cuda:1`) passes through here before it is combined with stored
    ones (`torch.cat`, `+`, `torch.where`) or written, so `files()`, `consolidate()` and `remove_concept()` combine
    CPU tensors only, whatever the device, and the files hold no device. Stored tensors go the other way, with
    `.to(live)`, only where they meet the live model (penalties, teachers, folds). One function, so that tests can
    stand the meta device in for CUDA (tests/test_cuda_paths.py)."""
    if isinstance(tensors, torch.Tensor):
        return host(tensors)
    return {k: host(v) for k, v in tensors.items()}


class _ToDevice(torch.autograd.Function):
    """w (host, fp32) -> a copy on `device` in `dtype`; its gradient comes back through `host` (the one boundary),
    cast to w's dtype: the fp32 gradient that autocast's own cast of an fp32 weight would give."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        ctx.master_dtype = w.dtype
        return w.to(device=device, dtype=dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return host(grad).to(ctx.master_dtype), None, None


class HostLinear(torch.nn.Linear):
    """An `nn.Linear` whose parameters stay in host memory in fp32 whatever the model is moved or cast to: each call
    copies them to the input's device in the dtype the call computes in (autocast's, else the input's), and the
    backward of that copy brings their gradient back to the host in fp32, where the optimizer keeps its state.

    ZeRO-Offload's split (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training"): fp32 master
    weights, gradients and the optimizer on the CPU, the 16-bit forward and backward on the GPU. Used for the base
    weights Custom Diffusion and CNS train (SDXL's cross-attention K/V: 341 M numbers, 5.5 GB with AdamW in fp32) when
    a plan says `host_trained` (planner.py). The arithmetic is autocast's on an fp32 weight: the same 16-bit copy
    multiplies, and the same gradient, cast to fp32, accumulates (tests/test_host_weights.py). Written by hand: no
    library offers one layer's offload (DeepSpeed offloads a whole engine's optimizer; accelerate's cpu_offload
    moves weights of frozen modules only)."""

    def _apply(self, fn, recurse=True):  # Module.to / .cuda / .half of the model: this layer stays where it is
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        autocast = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)  # meta has none
        dtype = torch.get_autocast_dtype(kind) if autocast else x.dtype
        w = _ToDevice.apply(self.weight, x.device, dtype)
        b = None if self.bias is None else _ToDevice.apply(self.bias, x.device, dtype)
        return torch.nn.functional.linear(x, w, b)


def host_linear(layer: torch.nn.Linear) -> HostLinear:
    """`layer` as a HostLinear sharing nothing with it: its parameters copied to host memory in fp32, their
    requires_grad kept."""
    new = HostLinear.__new__(HostLinear)
    torch.nn.Module.__init__(new)
    new.in_features, new.out_features = layer.in_features, layer.out_features
    for name in ("weight", "bias"):
        p = getattr(layer, name)
        new.register_parameter(name, None if p is None else torch.nn.Parameter(
            p.detach().to("cpu", torch.float32, copy=True), requires_grad=p.requires_grad))
    return new
