"""The concept commands of `edgecp`: add-concept (learn one), plan (what add-concept will do within a memory budget),
concepts (what the store's current version has learned).

Registered on the main app by `register(app)`; each parses, calls ONE library function and renders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgecp.cli.common import BudgetOpt, DeviceOpt, JsonOpt, PlanOpt, StoreOpt, out, parse_kv, progress_bars
from edgecp.planner import fmt_bytes, parse_bytes
from edgecp.render import esc


def _train_progress(bar):
    return lambda ev: bar(ev.phase, ev.step, ev.total, ev.loss)


def render_purge(purged: dict | None, console: Console) -> None:
    """What `--purge-source` deleted and did not: never claim a deletion that did not happen."""
    if not purged:
        return
    if purged["deleted"]:
        console.print(f"source files deleted: {esc(', '.join(purged['deleted']))}", highlight=False, soft_wrap=True)
    for k in purged["not_deleted"]:
        console.print(f"[yellow]not deleted:[/] {esc(k['path'])} ({esc(k['reason'])})", highlight=False, soft_wrap=True)


def add_concept_cmd(
    name: Annotated[str, typer.Argument(help="The concept's name; prompts refer to it as <name>.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    store: StoreOpt,
    class_word: Annotated[Optional[str], typer.Option(help="What the concept is, e.g. dog; starts its token.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training iterations (default: the store's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adapter learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.")] = None,
    purge_source: Annotated[bool, typer.Option("--purge-source/--keep-source", help="Delete the given image files after the commit.")] = False,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    plan_pin: PlanOpt = None,
) -> None:
    """Learn a new concept from a few photos and commit it as a new version.

    Examples:
      edgecp add-concept my-dog photos/dog/ --store my-model --class-word dog
      edgecp add-concept my-mug a.jpg b.jpg --store my-model --purge-source --memory-budget 6GB
    """
    # lazy: edgecp.train loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.train import add_concept

    overrides = {k: v for k, v in (("steps", steps), ("lr", lr), ("seed", seed)) if v is not None}
    with progress_bars() as bar:
        m = add_concept(store, name, images, class_word=class_word, overrides=overrides,
                        purge_source=purge_source, device=device, progress=_train_progress(bar),
                        memory_budget=memory_budget, plan_force=parse_kv(plan_pin, "--plan") or None,
                        on_plan=lambda p: out.print(p.line(), markup=False, highlight=False, soft_wrap=True))
    c = m["concepts"][-1]
    out.print(f"learned [bold]<{c['name']}>[/] from {len(c['images'])} image(s) in {c['seconds']['total']:.1f}s "
              f"-> version {m['version']}; staged copies purged")
    if purge_source:
        render_purge(m.get("purged"), out)


def plan(
    store: StoreOpt,
    memory_budget: BudgetOpt = None,
    device: DeviceOpt = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training resolution in pixels (default: the store's).")] = None,
    images: Annotated[int, typer.Option(help="How many photos the concept will have.")] = 4,
    plan_pin: PlanOpt = None,
    gpu_memory: Annotated[Optional[str], typer.Option(
        help="Plan for a GPU that need not be here: its memory, e.g. 8GB (implies --device cuda).")] = None,
    gpu_capability: Annotated[Optional[str], typer.Option(
        help="With --gpu-memory: its CUDA compute capability, e.g. 8.6 (8.0+: bf16; below: fp16; default 7.5).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show what add-concept will do within a memory budget, and its predicted peak per phase (loads no model).

    Examples:
      edgecp plan --store my-model --memory-budget 6GB
      edgecp plan --store my-model --memory-budget 3GB --resolution 512 --device cuda
      edgecp plan --store my-model --gpu-memory 8GB --gpu-capability 7.5   # a GPU that is not here
    """
    # lazy: edgecp.api loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.api import plan_store

    p = plan_store(store, memory_budget, {"resolution": resolution}, device, images, parse_kv(plan_pin, "--plan") or None,
                   gpu_memory=gpu_memory, gpu_capability=gpu_capability)
    if as_json:
        out.print_json(json.dumps(p.to_json()))
        return
    out.print(p.line(), markup=False, highlight=False, soft_wrap=True)
    if p.loss_scaling:
        out.print("fp16 trains with loss scaling (GradScaler; fp16 would flush the small gradients to zero)",
                  markup=False, highlight=False, soft_wrap=True)
    if gpu_memory is not None:
        _print_given_gpu(gpu_memory, gpu_capability)
    _print_peaks(p)


def _print_given_gpu(gpu_memory: str, gpu_capability: str | None) -> None:
    """The GPU `plan --gpu-memory` planned for: its memory, its capability and the dtype that follows."""
    # lazy: edgecp.memory loads torch, which `edgecp --help` must not load
    from edgecp.memory import parse_capability

    major, minor = parse_capability(gpu_capability)
    size = fmt_bytes(parse_bytes(gpu_memory, "GPU memory", "--gpu-memory"))
    out.print(f"for a GPU with {size} (given, not this machine's), "
              f"compute capability {major}.{minor}{'' if gpu_capability else ' (assumed)'}: "
              f"{'bf16' if major >= 8 else 'fp16 (no native bf16 below 8.0)'}", markup=False, highlight=False,
              soft_wrap=True)


def _print_peaks(p) -> None:
    """The plan's predicted peak per phase (on CUDA with its terms) as a table, then what the terms are."""
    t = Table(title="predicted peak per phase")
    t.add_column("phase")
    t.add_column("peak", justify="right")
    terms = p.cuda_terms  # CUDA: what the peak adds to the allocator's bytes, each term on its own
    if terms:
        for name in ("weights + activations", "context reserve", "fragmentation margin",
                     "bitsandbytes retained inputs"):
            t.add_column(name, justify="right")
    for phase, peak in p.predicted.items():
        row = [phase, fmt_bytes(peak)]
        if terms:
            tp = terms[phase]
            row += [fmt_bytes(peak - sum(tp.values())), fmt_bytes(tp["context_reserve"]),
                    fmt_bytes(tp["fragmentation_margin"]), fmt_bytes(tp["bitsandbytes_retained_inputs"])]
        t.add_row(*row)
    out.print(t)
    if terms:
        out.print("CUDA terms (not measured here; edgecp/planner.py says where the numbers come from), added to "
                  "the weights, trainable state and activations: context "
                  "reserve for the CUDA context outside the allocator, fragmentation margin for what the caching "
                  "allocator reserves beyond what it allocates, bitsandbytes retained inputs for the 8-bit layers' "
                  "inputs that checkpointing cannot free", markup=False, highlight=False, soft_wrap=True)


def concepts(store: StoreOpt, as_json: JsonOpt = False) -> None:
    """List the concepts of the store's current version."""
    # lazy: edgecp.api loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.api import concepts_summary

    s = concepts_summary(store)
    if as_json:
        out.print_json(json.dumps(s))
        return
    t = Table(title=f"{esc(s['store'])} @ {s['version']} - method {s['method']['name']} - {s['bytes'] / 1e6:.2f} MB")
    for col in ("task", "name", "prompt token", "class word", "images", "steps", "seconds"):
        t.add_column(col)
    for c in s["concepts"]:
        t.add_row(str(c["task"]), c["name"], esc(c["token"]), esc(c["class_word"] or "-"), str(c["images"]), str(c["steps"]),
                  f"{c['seconds']['total']:.1f}")
    out.print(t)
    if s["n_param"]:
        n = s["n_param"]
        out.print(f"N_param Train {n['train_pct']:.4f}%  N_param Store {n['store_pct']:.4f}%  "
                  f"(of the UNet's {n['unet']:,} parameters; Store counts the base as 100%)")


def register(app: typer.Typer) -> None:
    app.command("add-concept")(add_concept_cmd)
    app.command("plan")(plan)
    app.command("concepts")(concepts)
