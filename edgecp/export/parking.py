"""PyTorch modules parked on disk while another stage of the export runs, so one model is in memory at a time.

The UNet's stage (its DDIM loops and its export) runs while the text encoder and the VAE wait here: every parameter
and buffer in one safetensors file per module, the modules on the meta device; after the block the same module
objects get their tensors back.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from edgecp.memory import release_memory


@contextlib.contextmanager
def parked(modules: list[torch.nn.Module], folder: Path):
    """Inside the block the modules hold no memory: every parameter and buffer (non-persistent ones too, which a
    state dict leaves out) is written to one safetensors file per module and the module moved to the meta device;
    after it, the same module objects get their tensors back from those files, which are deleted, and parameters
    shared inside a module are shared again. (Weights shared between two of the modules would not be: no text
    encoder and VAE share any.)"""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"{i}.safetensors" for i in range(len(modules))]
    # `park` is a function of its own: a loop variable left here would keep a weight alive through the block, and
    # with it the whole safetensors file that diffusers mapped it from (one tensor holds the mapping)
    ties = [park(m, f) for m, f in zip(modules, files)]
    release_memory(torch.device("cpu"))  # the writer's copies back to the OS: the block's peak is its own
    try:
        yield
    finally:
        for m, f, tied in zip(modules, files, ties):
            unpark(m, f, tied)
        shutil.rmtree(folder)


def park(m: torch.nn.Module, file: Path) -> dict[str, str]:
    """m's parameters and buffers to `file`, m to the meta device; returns {tied parameter: the name owning it}."""
    owner: dict[int, str] = {}  # moving to meta unties shared parameters: remember which name owns each
    ties = {}
    for n, p in m.named_parameters(remove_duplicate=False):
        if owner.setdefault(id(p), n) != n:
            ties[n] = owner[id(p)]
    tensors = {f"p.{n}": p for n, p in m.named_parameters()} | {f"b.{n}": b for n, b in m.named_buffers()}
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(file))
    m.to("meta")
    return ties


@torch.no_grad()
def unpark(m: torch.nn.Module, file: Path, ties: dict[str, str]) -> None:
    """m's tensors back from `file` (written by `park`), its tied parameters one tensor again."""
    saved = load_file(str(file))
    m.to_empty(device="cpu")
    for n, first in ties.items():
        path, _, attr = n.rpartition(".")
        setattr(m.get_submodule(path), attr, m.get_parameter(first))
    for n, p in m.named_parameters():
        p.copy_(saved.pop(f"p.{n}"))
    for n, b in m.named_buffers():
        b.copy_(saved.pop(f"b.{n}"))
    del saved
