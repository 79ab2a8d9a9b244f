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
