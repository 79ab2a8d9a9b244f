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
    "<stage> <model>" of an export, "image gate", runs/tasks of a bench, ...); `loss` where a phase has one, and
    `metric`, what that number is in words ("denoising loss", "DC-EWC loss (Eq. 5)", ...), for a display."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    metric: str | None = None


Progress = Callable[[ProgressEvent], None]


# what each phase's number is, when the emitter does not say (a display prints "<metric> <value>")
METRICS = {
    "train": "denoising loss (one batch)",
    "fisher": "DC-EWC loss (000 Eq. 5: denoising + delta x signed cross-entropies; can be negative)",
    "dsc": "DSC loss (000 Eq. 6: distillation + noise matching)",
}


def emit(progress: Progress | None, phase: str, step: int, total: int, loss: float | None = None,
         metric: str | None = None) -> None:
    """Send one event to `progress` (nothing when it is None); `metric` defaults to METRICS[phase] when a loss is
    given."""
    if progress is not None:
        if loss is not None and metric is None:
            metric = METRICS.get(phase, "loss")
        progress(ProgressEvent(phase, step, total, loss, metric))
