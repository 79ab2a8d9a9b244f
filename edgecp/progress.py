"""The one progress-event type: every long job of the library (add-concept and its phases, generation, export,
bench, estimate) reports through a `Progress` callback that receives `ProgressEvent`s, and never prints. The CLI
turns them into progress bars with ETAs; a notebook or service can log them. Torch-free: the device runtime's
sampler reports through it too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    """`step` of `total` done in `phase` (train, fisher, dsc, consolidate, load, priors, encode, commit, sample,
    "<stage> <model>" of an export, "image gate", runs/tasks of a bench, ...); `loss` where a phase has one."""

    phase: str
    step: int
    total: int
    loss: float | None = None


Progress = Callable[[ProgressEvent], None]


def emit(progress: Progress | None, phase: str, step: int, total: int, loss: float | None = None) -> None:
    """Send one event to `progress` (nothing when it is None)."""
    if progress is not None:
        progress(ProgressEvent(phase, step, total, loss))
