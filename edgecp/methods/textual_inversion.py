"""Textual Inversion (Gal et al. 2023): only the concept's token embedding is trained; the UNet is untouched, so
earlier concepts cannot be forgotten (their tokens are frozen) but a token alone captures less detail."""

from __future__ import annotations

import torch

from edgecp.errors import EdgecpError
from edgecp.methods.base import Method, TaskContext


class TextualInversion(Method):
    name = "textual-inversion"
    summary = ("learns only a new word per concept and never changes the image model: nothing earlier is forgotten, "
               "but it captures the least detail; a few KB per concept")
    paper = "000 TI (Gal et al. 2023)"
    adapter_kind = "none"
    removal = "exact"  # the concept is its token; dropping the token leaves what never learned it
    bench_class_word = True  # 000 evaluates TI with the concept name after the token

    def prepare(self, ctx: TaskContext) -> None:
        if ctx.token_row is None:
            raise EdgecpError("textual-inversion trains only the token: set token_lr > 0 (--train token_lr=5e-4)")

    def tensors(self, ctx: TaskContext) -> dict[str, torch.nn.Parameter]:
        return {}

    def files(self, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
        return {}
