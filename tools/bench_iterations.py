#!/usr/bin/env python
"""Seconds per iteration of training and consolidation, with 2, 6 and 50 concepts in the store (issues 3, 10).

Times, in one run and on the same model, the real code paths of edgecp:
  plain     one LoRA training iteration (instance + prior rows, token trained): lora-sequential   train.Trainer.step
  ewc-dc    one EWC DC Fisher iteration, k concepts in ONE batched UNet call          methods.phases.fisher_phase
  dsc       one DSC iteration (2 no-grad teacher calls + 1 student call, 3 concepts)   methods.phases.dsc_phase
  c-lora    one C-LoRA training iteration (plain + Eq. 2 penalty over earlier tasks)  train.Trainer.step
  ewc       one training iteration of dsc-ewc-dc (plain + the online EWC penalty)     train.Trainer.step
  default   what dsc-ewc-dc, the default method, costs per training iteration, its two consolidation phases
            amortised: ewc + 0.2 x (ewc-dc + dsc) (000 App. H.2.1: each phase runs 0.2 x the training iterations)
Previous concepts are synthetic tokens and random earlier-task LoRAs (timing does not depend on their values).

    python tools/bench_iterations.py                      # tiny model, CPU, 2/6/50 concepts
    python tools/bench_iterations.py --concepts 2 6 50 --iters 20 --batch 1 --k 5
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def build_context(n_concepts: int, batch: int, device: torch.device, seed: int = 0):
    """A TaskContext for task n = n_concepts on the tiny base: n-1 frozen synthetic concepts + the new one."""
    from diffusers import DDPMScheduler

    from edgecp.config import AdapterConfig, TrainConfig
    from edgecp.methods.base import LatentSet, TaskContext
    from edgecp.model.base import load_components, resolve_base
    from edgecp.model.tokens import add_concept_token, concept_embedding, token_of, word_embedding

    torch.manual_seed(seed)
    comps = load_components(resolve_base("tiny"))
    for m in (comps.text_encoder, comps.vae, comps.unet):
        m.to(device)
    base = word_embedding(comps.tokenizer, comps.text_encoder, "dog")
    previous = []
    for i in range(n_concepts - 1):
        name = f"c{i:03d}"
        add_concept_token(comps.tokenizer, comps.text_encoder, name, base + 0.01 * torch.randn_like(base), trainable=False)
        previous.append({"name": name, "token": token_of(name), "prompt": f"a photo of a {token_of(name)} dog"})
    add_concept_token(comps.tokenizer, comps.text_encoder, "new", base, trainable=True)
    lat = comps.unet.config.sample_size
    c = comps.unet.config.in_channels

    def latents(n):
        return LatentSet(torch.randn(n, c, lat, lat, device=device), 0.1 * torch.ones(n, c, lat, lat, device=device), 1.0)

    cfg = TrainConfig(steps=1, batch_size=batch, grad_accum=1, seed=seed)
    ctx = TaskContext(
        index=n_concepts, name="new", token="<new>", class_word="dog", prompt="a photo of a <new> dog",
        prior_prompt="a photo", previous=previous, prev_dir=None, train=cfg, comps=comps, device=device,
        noise_scheduler=DDPMScheduler.from_config(comps.scheduler.config),
        token_row=concept_embedding(comps.text_encoder).rows[-1], instance=latents(8), prior=latents(8),
    )
    return ctx, AdapterConfig()


def random_lora(unet, rank: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    from edgecp.adapters import lora

    return {k: scale * torch.randn_like(p) for k, p in lora.adapter_parameters(unet).items()}


def time_train(ctx, method, iters: int, warmup: int) -> float:
    from edgecp.train import Trainer

    trainer = Trainer(ctx, method)
    for _ in range(warmup):
        trainer.step()
    t0 = time.perf_counter()
    for _ in range(iters):
        trainer.step()
    dt = (time.perf_counter() - t0) / iters
    trainer.close()
    return dt


def measure(n: int, iters: int, warmup: int, batch: int, k: int, device, tick) -> dict[str, float]:
    from edgecp.adapters import lora
    from edgecp.consolidation.clora import occupied_norm
    from edgecp.methods.clora import CLora, CLoraParams
    from edgecp.methods.dsc import DscEwcDc, DscEwcDcParams
    from edgecp.methods.lora_sequential import LoraSequential
    from edgecp.methods.phases import dsc_phase, fisher_phase

    out = {}
    ctx, adapter = build_context(n, batch, device)
    lora.attach(ctx.comps.unet, adapter)
    lora.set_trainable(ctx.comps.unet, True)
    out["plain"] = time_train(ctx, LoraSequential(None, adapter), iters, warmup)
    tick()
    if warmup:
        fisher_phase(ctx, lora.adapter_parameters(ctx.comps.unet), warmup, use_dc=True, k=k)
    fisher_phase(ctx, lora.adapter_parameters(ctx.comps.unet), iters, use_dc=True, k=k)
    out["ewc-dc"] = ctx.extra["fisher_seconds_per_iter"]
    tick()
    pool = [random_lora(ctx.comps.unet, adapter.rank) for _ in range(max(n - 1, 1))]
    if warmup:
        dsc_phase(ctx, pool, warmup)
    dsc_phase(ctx, pool, iters)
    out["dsc"] = ctx.extra["dsc_seconds_per_iter"]
    tick()
    # C-LoRA: the earlier tasks' |sum of deltas| per layer, as CLora.prepare computes it once per task
    earlier = lora.concat_loras(pool, [1.0] * len(pool))
    ctx.extra["occupied"] = {m: d.abs().to(device) for m, d in lora.lora_delta(earlier, 1.0).items()}
    ctx.extra["occupied_norm"], ctx.extra["loss_ref"] = occupied_norm(ctx.extra["occupied"]), 0.1  # values: no cost
    out["c-lora"] = time_train(ctx, CLora(CLoraParams(), adapter), iters, warmup)
    tick()
    params = lora.adapter_parameters(ctx.comps.unet)  # the EWC penalty of dsc-ewc-dc: a Fisher and an anchor
    ctx.extra["ewc"] = ({k: torch.rand_like(p) for k, p in params.items()}, {k: p.detach().clone() for k, p in params.items()})
    out["ewc"] = time_train(ctx, DscEwcDc(DscEwcDcParams(), adapter), iters, warmup)
    out["default"] = out["ewc"] + 0.2 * (out["ewc-dc"] + out["dsc"])
    tick()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, nargs="+", default=[2, 6, 50])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    console = Console(width=150)
    results = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                  TimeRemainingColumn(), console=console) as prog:
        task = prog.add_task("timing", total=5 * len(args.concepts))
        for n in args.concepts:
            prog.update(task, description=f"{n} concepts")
            results[n] = measure(n, args.iters, args.warmup, args.batch, args.k, device, lambda: prog.advance(task))
    t = Table(title=f"seconds per iteration, tiny model, {args.device}, batch {args.batch}, k={args.k}, "
                    f"torch threads {torch.get_num_threads()}, mean of {args.iters}")
    t.add_column("concepts")
    timed, ratios = ("plain", "ewc-dc", "dsc", "c-lora", "ewc", "default"), ("ewc-dc", "dsc", "c-lora", "ewc", "default")
    for col in timed:
        t.add_column(f"{col} s")
    for col in ratios:
        t.add_column(f"{col} / plain")
    for n, r in results.items():
        t.add_row(str(n), *(f"{r[c]:.4f}" for c in timed), *(f"{r[c] / r['plain']:.2f}x" for c in ratios))
    console.print(t)


if __name__ == "__main__":
    main()
