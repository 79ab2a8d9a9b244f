"""The consolidation phases of paper 000, shared by the methods that use them.

- `fisher_phase`: Algo 2 (EWC, optionally with DC scores, Eq. 5): mean squared gradient over iterations.
- `dsc_phase`: Algo 3 (diffusion scores consolidation, Eq. 6): the student (the adapter just trained) distils
  from a frozen copy of itself and a randomly drawn earlier-task adapter.

Every UNet call evaluates a whole concept subset: B images x k concepts as B*k rows, one (t, eps) per image.
Text embeddings of the (frozen) concept tokens are computed once per task (`concept_texts`). When the memory plan
(ctx.plan) caps the rows per call, the rows run in chunks with the exact two-pass gradient of `dc_scores.dc_grad`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch

from edgecp import seeds
from edgecp.adapters import lora
from edgecp.consolidation.dc_scores import (
    dc_forward_chunked,
    dc_grad,
    dc_log_scores,
    dc_scores,
    entropy,
    sample_subset,
    trial,
)
from edgecp.consolidation.distill import dsc_loss
from edgecp.consolidation.ewc import FisherAccumulator, dc_ewc_loss
from edgecp.diffusion import denoise_loss
from edgecp.methods.base import TaskContext
from edgecp.model.quant import autocast_for
from edgecp.personal import encode_text
from edgecp.progress import emit
from edgecp.scaling import loss_scale
from edgecp.seeds import stream_seed


def phase_iterations(ctx: TaskContext, ratio: float) -> int:
    """Consolidation iterations: `ratio` x training iterations (paper: 0.2 x), at least 1."""
    return max(1, round(ratio * ctx.train.steps))


def checkpointing(ctx: TaskContext) -> bool:
    return ctx.plan.gradient_checkpointing if ctx.plan is not None else ctx.train.gradient_checkpointing


def autocast(ctx: TaskContext):
    return autocast_for(ctx.plan, ctx.device.type)


def dc_chunk(ctx: TaskContext) -> int | None:
    return ctx.plan.dc_chunk if ctx.plan is not None else None


@contextmanager
def grad_mode(ctx: TaskContext):
    """UNet in training mode with gradient checkpointing (as during training) for the duration of a phase."""
    unet = ctx.comps.unet
    if checkpointing(ctx):
        unet.enable_gradient_checkpointing()
    unet.train()
    try:
        with autocast(ctx):
            yield
    finally:
        unet.eval()
        if checkpointing(ctx):
            unet.disable_gradient_checkpointing()


@torch.no_grad()
def concept_texts(ctx: TaskContext) -> torch.Tensor:
    """(n+1, T, D): c_0 (prior), c_1 .. c_{n-1} (previous), c_n (current), computed once per task (after training,
    so c_n uses the trained token) and cached, so that the text encoder can leave memory."""
    if "concept_texts" not in ctx.extra:
        prompts = [ctx.prior_prompt] + [c["prompt"] for c in ctx.previous] + [ctx.prompt]
        with autocast(ctx):
            ctx.extra["concept_texts"] = encode_text(ctx.comps, prompts, ctx.device).detach().float()
    return ctx.extra["concept_texts"]


def predictor(unet, override: dict[str, torch.Tensor] | None = None):
    """eps_hat(x, t, c) of the UNet, or of the UNet with some adapter tensors swapped in (a frozen teacher)."""
    if override is None:
        return lambda x, t, c: unet(x, t, c).sample
    return lambda x, t, c: torch.func.functional_call(unet, override, (x, t, c)).sample


def _report(progress, phase: str, i: int, n: int, loss: float | None, metric: str | None = None) -> None:
    emit(progress, phase, i, n, loss, metric)


def effective_batch(ctx: TaskContext) -> int:
    """Images per optimizer step in training (batch x accumulation): the consolidation phases use the same."""
    return ctx.train.batch_size * ctx.train.grad_accum


def latent_elements(ctx: TaskContext) -> int:
    """D = C*H*W of one training latent (the factor between the 'mean' and 'sum' DC reductions)."""
    return int(ctx.instance.mean[0].numel())


@torch.no_grad()
def reference_loss(ctx: TaskContext, timesteps: int = 8, images: int = 4, text: torch.Tensor | None = None) -> float:
    """The task's denoising loss (per-element mean) at its start: the first `images` training latents (posterior
    means) under c_n, at `timesteps` evenly spaced t (stratified, so one number with little Monte-Carlo noise),
    noise from a fixed generator. The loss scale of the scale-free penalties (C-LoRA, CNS), and add-concept's
    fixed-timestep loss before and after training (`text`: c_n encoded earlier, when the text encoder has left)."""

    sched = ctx.noise_scheduler
    x0 = ctx.instance.mean[:images] * ctx.instance.scale
    n_t = sched.config.num_train_timesteps
    ts = torch.tensor([int((i + 0.5) * n_t / timesteps) for i in range(timesteps)])
    gen = torch.Generator().manual_seed(stream_seed(ctx.train.seed, seeds.REFERENCE_LOSS, ctx.index))
    rows = x0.repeat(timesteps, 1, 1, 1)
    t = ts.repeat_interleave(x0.shape[0]).to(rows.device)
    noise = torch.randn(rows.shape, generator=gen).to(rows)
    if text is None:
        with autocast(ctx):
            text = encode_text(ctx.comps, [ctx.prompt], ctx.device).float()
    step = ctx.plan.micro_batch if ctx.plan is not None else ctx.train.batch_size
    losses = []
    for i in range(0, rows.shape[0], step):
        with autocast(ctx):
            losses.append(denoise_loss(ctx.comps.unet, sched, rows[i:i + step], text.expand(len(rows[i:i + step]), -1, -1),
                                       gen, (noise[i:i + step], t[i:i + step])).float())
    return float(torch.cat(losses).mean())


def fisher_phase(ctx: TaskContext, params: dict[str, torch.nn.Parameter], iterations: int, use_dc: bool, k: int = 5,
                 delta: float = 0.5, tau: float = 1.0, progress=None, reduction: str = "mean") -> dict[str, torch.Tensor]:
    """F_n over `params`: mean over iterations of (grad L_ewc)^2 on D_n. With DC: Eq. 5 over S = {c_0, c_n} + k-2.

    One iteration sees the training's effective batch: `grad_accum` batches of `batch_size` images, their gradients
    averaged (as the optimizer step of training would see them), then squared. Also leaves in ctx.extra["fisher_loss"]
    the mean per-element denoising loss of c_n over the phase (the loss scale of the scale-free EWC weight).
    """
    unet, sched = ctx.comps.unet, ctx.noise_scheduler
    texts = concept_texts(ctx)  # (n+1, T, D)
    n_prev = len(ctx.previous)
    gen = torch.Generator().manual_seed(stream_seed(ctx.train.seed, seeds.FISHER, ctx.index))
    acc = FisherAccumulator(params)
    scale = loss_scale(ctx.plan)  # fp16 plans: gradients scaled, unscaled in fp32 (scaling.scaled_grad)
    accum, d = ctx.train.grad_accum, latent_elements(ctx)
    per_element = 1.0 / d if reduction == "sum" else 1.0
    denoise: list[float] = []
    t0 = time.perf_counter()
    with grad_mode(ctx):
        for it in range(iterations):
            summed: list[torch.Tensor | None] = [None] * len(params)
            total = 0.0
            for _ in range(accum):
                x0 = ctx.instance.draw(torch.randint(len(ctx.instance), (ctx.train.batch_size,), generator=gen), gen)
                t, noise = trial(x0, sched.config.num_train_timesteps, gen)
                if use_dc:
                    subset = [0, n_prev + 1] + [1 + j for j in sample_subset(n_prev, k, gen)]  # c_0, c_n, previous

                    def loss_fn(err, _eps):
                        denoise.append(err[:, 1].mean().item() * per_element)
                        return dc_ewc_loss(err, dc_log_scores(err, tau), current=1, delta=delta)
                else:
                    subset = [n_prev + 1]  # plain denoising loss on c_n

                    def loss_fn(err, _eps):
                        denoise.append(err[:, 0].mean().item() * per_element)
                        return err[:, 0].mean()
                loss, grads = dc_grad(predictor(unet), sched, x0, texts[subset], t, noise, loss_fn,
                                      list(params.values()), chunk=dc_chunk(ctx), reduction=reduction, scale=scale)
                summed = [g if a is None else (a if g is None else a + g) for a, g in zip(summed, grads)]
                total += loss.item() / accum
            acc.add_grads([None if g is None else g / accum for g in summed])
            _report(progress, "fisher", it + 1, iterations, total,
                    None if use_dc else "denoising loss (EWC's Fisher phase, no DC)")
    ctx.extra["fisher_seconds_per_iter"] = (time.perf_counter() - t0) / iterations
    ctx.extra["fisher_loss"] = sum(denoise) / max(len(denoise), 1)
    return acc.mean()


def dsc_phase(ctx: TaskContext, pool: list[dict[str, torch.Tensor]], iterations: int, gamma: float = 0.1,
              lam: float = 1.5, tau_teacher: float = 0.05, tau_student: float = 1.0, progress=None,
              reduction: str = "mean", teacher_reduction: str | None = None, mse_reduction: str = "mean") -> None:
    """Algo 3: distil the adapter in place (student initialised from theta_n) from theta_n and theta_j ~ pool.

    One iteration = one optimizer step over the training's effective batch (`grad_accum` batches of `batch_size`
    images, gradients averaged); theta_j is drawn anew for every batch (000 draws it per iteration, with batch 1).
    The teachers' DC scores over S = {c_0, c_n, c_j} are logged in ctx.extra["dsc_teacher_entropy"] (mean, nats).
    `teacher_reduction` (default: `reduction`) reduces the teachers' errors, `reduction` the student's,
    `mse_reduction` the noise-matching terms (Eq. 6's squared norm: "sum")."""
    teacher_reduction = teacher_reduction or reduction
    unet, sched = ctx.comps.unet, ctx.noise_scheduler
    names = lora.param_names(unet)
    student = lora.adapter_parameters(unet)
    teacher_n = {names[k]: p.detach().clone() for k, p in student.items()}
    teachers = [{names[k]: v.to(ctx.device) for k, v in theta.items() if k in names} for theta in pool]
    texts = concept_texts(ctx)
    n_prev = len(ctx.previous)
    opt = torch.optim.AdamW(list(student.values()), lr=ctx.train.lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(stream_seed(ctx.train.seed, seeds.DSC, ctx.index))
    accum = ctx.train.grad_accum
    scale = loss_scale(ctx.plan)  # fp16 plans: gradients scaled, unscaled in fp32 (scaling.scaled_grad)
    params = list(student.values())
    entropies: list[float] = []
    t0 = time.perf_counter()
    with grad_mode(ctx):
        for it in range(iterations):
            total = 0.0
            for _ in range(accum):
                j = int(torch.randint(len(teachers), (1,), generator=gen))  # theta_j, j ~ U{1..n-1}, drawn anew
                x0 = ctx.instance.draw(torch.randint(len(ctx.instance), (ctx.train.batch_size,), generator=gen), gen)
                t, noise = trial(x0, sched.config.num_train_timesteps, gen)
                s = texts[[0, n_prev + 1, 1 + j]]  # S = {c_0, c_n, c_j}
                with torch.no_grad():
                    err_n, eps_n = dc_forward_chunked(predictor(unet, teacher_n), sched, x0, s, t, noise,
                                                      dc_chunk(ctx), teacher_reduction)
                    err_j, eps_j = dc_forward_chunked(predictor(unet, teachers[j]), sched, x0, s, t, noise,
                                                      dc_chunk(ctx), teacher_reduction)
                p_n, p_j = dc_scores(err_n, tau_teacher), dc_scores(err_j, tau_teacher)
                entropies.append(0.5 * float(entropy(p_n).mean() + entropy(p_j).mean()))

                def student_loss(err_s, eps_s, p_n=p_n, p_j=p_j, eps_n=eps_n, eps_j=eps_j):
                    return dsc_loss(p_n, p_j, dc_log_scores(err_s, tau_student), eps_n[:, 1], eps_j[:, 2],
                                    eps_s[:, 1], eps_s[:, 2], gamma, lam, mse_reduction)

                loss, grads = dc_grad(predictor(unet), sched, x0, s, t, noise, student_loss, params,
                                      chunk=dc_chunk(ctx), reduction=reduction, scale=scale)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g / accum if p.grad is None else p.grad + g / accum
                total += loss.item() / accum
            opt.step()
            opt.zero_grad(set_to_none=True)
            _report(progress, "dsc", it + 1, iterations, total)
    ctx.extra["dsc_seconds_per_iter"] = (time.perf_counter() - t0) / iterations
    ctx.extra["dsc_teacher_entropy"] = sum(entropies) / max(len(entropies), 1)
