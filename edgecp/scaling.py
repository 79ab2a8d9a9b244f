"""Loss scaling for fp16 plans (issue 22): gradients that fp16 would flush to zero, kept.

Why: at 512 px a training latent has 4 x 64 x 64 = 16,384 elements; the per-element-mean MSE divided by a
gradient accumulation of 8 gives d loss / d prediction of about 2 |eps - eps_hat| / (16,384 x 8), ~1e-5 and below,
under fp16's smallest normal number (6.1e-5). Autocast runs the backward of the UNet in fp16, so those gradients
lose their precision as subnormals and, a few layers down, become exactly zero: the adapter then learns nothing,
silently. bf16 has fp32's exponent range and fp32 needs nothing, so only fp16 plans scale (`needs_scaling`).

Two tools, one rule (PyTorch's `GradScaler`): multiply the loss by a scale S (a power of two, so that scaling and
unscaling are exact), back-propagate, divide the gradients by S in fp32, and when any gradient is inf or NaN the
scale was too large: halve it and do not use those gradients; after `GROWTH_INTERVAL` good steps, double it.
- training (`train.Trainer`): `grad_scaler(plan)` is `torch.amp.GradScaler(device_type)`, used as its documentation
  says (scale the loss, `step`, `update`; a step whose gradients are not finite is skipped by `GradScaler.step`).
  GradScaler works on the CPU too (torch >= 2.3: `torch.amp.GradScaler("cpu")`), which is how the tests prove it.
- `torch.autograd.grad` calls (the Fisher and DSC phases, `dc_scores.dc_grad`, CNS's importance), where there is
  no optimizer to skip: `LossScale.grad` / `scaled_grad` retry the same backward with half the scale until the
  gradients are finite, so the caller always gets finite, unscaled fp32 gradients (or, below `MIN_SCALE`, the
  non-finite ones: the forward itself overflowed, and `train.check_finite` refuses to commit them).

Our choices: the initial scale is GradScaler's default 2^16 (65,536), the growth interval its 2,000 calls, the
backoff its 0.5; a disabled scale (bf16, fp32, no plan) is a plain `torch.autograd.grad`, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

INIT_SCALE = 2.0**16  # torch.amp.GradScaler's default init_scale
GROWTH_INTERVAL = 2000  # GradScaler's default growth_interval
BACKOFF = 0.5  # GradScaler's default backoff_factor
GROWTH = 2.0  # GradScaler's default growth_factor
MIN_SCALE = 2.0**-24  # below this even fp16's smallest subnormal times the scale is 0: give up retrying


def needs_scaling(plan) -> bool:
    """Loss scaling is for fp16 compute only (bf16 has fp32's exponent range; fp32 needs none)."""
    return plan is not None and getattr(plan, "compute", "fp32") == "fp16"


def grad_scaler(plan, device: torch.device | str) -> torch.amp.GradScaler | None:
    """The training loop's GradScaler for an fp16 plan on `device` (its type: GradScaler keeps its scale on the
    device of the first loss it scales, so `cuda:1` works), else None."""
    if not needs_scaling(plan):
        return None
    return torch.amp.GradScaler(torch.device(device).type, init_scale=INIT_SCALE, growth_interval=GROWTH_INTERVAL)


class LossScale:
    """A dynamic loss scale for `torch.autograd.grad` (GradScaler's rule, without an optimizer to skip)."""

    def __init__(self, enabled: bool, init: float = INIT_SCALE, growth_interval: int = GROWTH_INTERVAL):
        self.enabled = bool(enabled)
        self.value = float(init) if enabled else 1.0
        self.growth_interval = growth_interval
        self.good = 0  # finite calls since the last change
        self.retries = 0  # backward passes redone with a smaller scale (for the manifest and tests)

    def grad(self, outputs: torch.Tensor, inputs: Sequence[torch.Tensor], grad_outputs: torch.Tensor | None = None,
             allow_unused: bool = False) -> tuple[torch.Tensor | None, ...]:
        """d outputs / d inputs (with `grad_outputs` as torch.autograd.grad takes it), unscaled, in fp32 (float64
        stays float64).

        Enabled: the backward runs on outputs x S (or grad_outputs x S); the graph is kept until the gradients are
        known to be finite (`retain_graph=True`: the caller's graph lives until it drops `outputs`, as it would
        anyway), and a non-finite result is redone at S/2. Disabled: exactly `torch.autograd.grad`.
        """
        inputs = list(inputs)
        if not self.enabled:
            return torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs, allow_unused=allow_unused)
        while True:
            s = self.value
            if grad_outputs is None:
                raw = torch.autograd.grad(outputs * s, inputs, retain_graph=True, allow_unused=allow_unused)
            else:
                raw = torch.autograd.grad(outputs, inputs, grad_outputs=grad_outputs * s, retain_graph=True,
                                          allow_unused=allow_unused)
            # unscaled in fp32 (float64 stays float64): a 16-bit gradient divided by S could underflow again
            grads = tuple(None if g is None else (g if g.dtype == torch.float64 else g.float()) / s for g in raw)
            finite = all(g is None or bool(torch.isfinite(g).all()) for g in grads)
            if finite:
                self.good += 1
                if self.good >= self.growth_interval:
                    self.value *= GROWTH
                    self.good = 0
                return grads
            self.good = 0
            if s * BACKOFF < MIN_SCALE:
                return grads  # the forward overflowed: no scale helps; check_finite refuses to commit
            self.value = s * BACKOFF
            self.retries += 1


def loss_scale(plan) -> LossScale:
    """A LossScale for one phase of `plan`: enabled for fp16 compute only."""
    return LossScale(needs_scaling(plan))


def scaled_grad(outputs: torch.Tensor, inputs: Sequence[torch.Tensor], scale: LossScale | None,
                grad_outputs: torch.Tensor | None = None, allow_unused: bool = False) -> tuple[torch.Tensor | None, ...]:
    """`torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused)` under `scale` (None: unscaled)."""
    if scale is None:
        return torch.autograd.grad(outputs, list(inputs), grad_outputs=grad_outputs, allow_unused=allow_unused)
    return scale.grad(outputs, inputs, grad_outputs, allow_unused)
