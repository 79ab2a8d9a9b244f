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

from edgecp.cli.common import (
    BudgetOpt,
    DeviceOpt,
    JsonOpt,
    PlanOpt,
    StoreOpt,
    err,
    out,
    parse_kv,
    progress_bars,
    table,
)
from edgecp.errors import EdgecpError
from edgecp.planner import fmt_bytes, parse_bytes
from edgecp.render import esc


def _train_progress(bar):
    return lambda ev: bar(ev.phase, ev.step, ev.total, ev.loss, metric=ev.metric)


def render_purge(purged: dict | None, console: Console) -> None:
    """What `--purge-source` deleted and did not: never claim a deletion that did not happen."""
    if not purged:
        return
    if purged["deleted"]:
        console.print(f"source files deleted: {esc(', '.join(purged['deleted']))}", highlight=False, soft_wrap=True)
    for k in purged["not_deleted"]:
        console.print(f"[yellow]not deleted:[/] {esc(k['path'])} ({esc(k['reason'])})", highlight=False, soft_wrap=True)


def render_check(m: dict, store: Path) -> None:
    """The forgetting check's result: one line per earlier concept, and one warning line per drifted concept that
    names the rollback."""
    chk = m.get("check")
    if not chk or chk.get("off"):
        return
    if not chk.get("concepts"):
        return
    parts = []
    for r in chk["concepts"]:
        sim = f", evaluator {r['evaluator_similarity']:.3f}" if "evaluator_similarity" in r else ""
        parts.append(f"<{r['name']}> drift {r['drift']:.3f} (DC {r['dc_before']:.2f}->{r['dc_after']:.2f}{sim})")
    out.print(f"forgetting check ({chk['images']} image(s) each, {chk['seconds']:.1f}s; drift = 1 - SSIM against "
              f"{chk['from']}, warns above {chk['threshold']:g}): " + "; ".join(parts),
              markup=False, highlight=False, soft_wrap=True)
    for name in chk["warn"]:
        r = next(r for r in chk["concepts"] if r["name"] == name)
        err.print(f"[yellow]warning:[/] <{esc(name)}> drifted {r['drift']:.3f} (threshold {chk['threshold']:g}) while "
                  f"learning <{esc(m['concepts'][-1]['name'])}>: compare with `edgecp generate \"<{esc(name)}>\" "
                  f"--version {chk['from']} --store {esc(store)}`; undo with `edgecp rollback {chk['from']} --store "
                  f"{esc(store)}`", highlight=False, soft_wrap=True)
    if m.get("contact_sheet"):
        out.print(f"contact sheet: {esc(m['contact_sheet'])}", highlight=False, soft_wrap=True)


def add_concept_cmd(
    store: StoreOpt,
    name: Annotated[Optional[str], typer.Argument(help="The concept's name; prompts refer to it as <name>.")] = None,
    images: Annotated[Optional[list[Path]], typer.Argument(
        help="Image files or folders of images; a NAME.txt beside an image is its caption (\\[name] = the concept).")] = None,
    class_word: Annotated[Optional[str], typer.Option(help="What the concept is, e.g. dog; starts its token.")] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Training iterations (default: the store's train.steps: 1000 on SD 1.x/2.x with the papers' methods, "
             "150 on the tiny base; `edgecp concepts --json` shows each concept's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adapter learning rate (default: the store's).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed (default: the store's).")] = None,
    purge_source: Annotated[bool, typer.Option("--purge-source/--keep-source", help="Delete the given image files (and their captions) after the commit.")] = False,
    device: DeviceOpt = None,
    memory_budget: BudgetOpt = None,
    plan_pin: PlanOpt = None,
    resumable: Annotated[bool, typer.Option("--resumable", help="Survive a crash, kill or out-of-memory error: the photos stay staged in the store with checkpoints until the concept commits or --abandon.")] = False,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="With --resumable: iterations between checkpoints (default 50).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the store's pending resumable concept from its last checkpoint.")] = False,
    abandon: Annotated[bool, typer.Option("--abandon", help="Drop the store's pending resumable concept and delete its staged photos.")] = False,
    sample_every: Annotated[Optional[int], typer.Option(help="Draw samples every N iterations (and at 0 and the end).")] = None,
    sample_dir: Annotated[Optional[Path], typer.Option(help="Where samples go (outside the store); needed with --sample-every.")] = None,
    sample_prompt: Annotated[Optional[list[str]], typer.Option(help="A sample prompt, <name> expanded; repeatable (default: the concept's own prompt).")] = None,
    sample_steps: Annotated[int, typer.Option(help="Sampling steps of each sample.")] = 20,
    check_images: Annotated[Optional[int], typer.Option(help="Forgetting check: images per earlier concept from the previous and the new version (default 2; 0: no check).")] = None,
    check_steps: Annotated[Optional[int], typer.Option(help="Forgetting check: sampling steps (default 20).")] = None,
    check_threshold: Annotated[Optional[float], typer.Option(help="Forgetting check: warn when an earlier concept's drift (1 - SSIM) exceeds this (default 0.45, calibrated on the tiny world).")] = None,
    contact_sheet: Annotated[Optional[Path], typer.Option(help="Forgetting check: write its images (earlier concepts, before and after) to this .png.")] = None,
) -> None:
    """Learn a new concept from a few photos and commit it as a new version.

    After the commit's files are written, a forgetting check draws each earlier concept from the previous and the
    new version (same seeds) and says how far each drifted; a drift past the threshold warns and names the rollback.

    Examples:
      edgecp add-concept my-dog photos/dog/ --store my-model --class-word dog
      edgecp add-concept my-mug a.jpg b.jpg --store my-model --purge-source --memory-budget 6GB
      edgecp add-concept my-cat photos/cat/ --resumable --sample-every 100 --sample-dir samples/ --contact-sheet check.png
      edgecp add-concept --resume --store my-model     # after a crash, a kill or an out-of-memory error
    """
    # lazy: edgecp.train loads the model stack (torch), which `edgecp --help` must not load
    from edgecp.forgetting import CheckConfig
    from edgecp.train import SampleConfig, abandon_concept, add_concept, resume_concept

    if abandon:
        if resume or name or images:
            raise EdgecpError("--abandon takes no concept name, images or --resume: `edgecp add-concept --abandon --store S`")
        r = abandon_concept(store)
        out.print(f"abandoned '{esc(r['name'])}': its {r['photos']} staged photo(s) and checkpoint deleted",
                  highlight=False, soft_wrap=True)
        return
    if resume and (name or images):
        raise EdgecpError("--resume continues the pending concept with its staged photos: drop the name and images")
    if not resume and (not name or not images):
        raise EdgecpError("add-concept needs a NAME and images (or --resume / --abandon): e.g. `edgecp add-concept "
                          "my-dog photos/dog/ --store my-model`")
    if (sample_every is None) != (sample_dir is None):
        raise EdgecpError("--sample-every and --sample-dir go together: e.g. --sample-every 100 --sample-dir samples/")
    samples = SampleConfig(sample_every, sample_dir, tuple(sample_prompt or ()), steps=sample_steps) \
        if sample_every is not None else None
    given = {k: v for k, v in (("images", check_images), ("steps", check_steps), ("threshold", check_threshold))
             if v is not None}
    check = CheckConfig(**given) if given else None
    planned = lambda p: out.print(p.line(), markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    if samples is not None:
        err.print(f"samples go to {esc(samples.out_dir)} (every {samples.every} iterations)", highlight=False,
                  soft_wrap=True)
    with progress_bars() as bar:
        if resume:
            m = resume_concept(store, device=device, progress=_train_progress(bar), memory_budget=memory_budget,
                               plan_force=parse_kv(plan_pin, "--plan") or None, on_plan=planned, samples=samples,
                               check=check, contact_sheet=contact_sheet)
        else:
            overrides = {k: v for k, v in (("steps", steps), ("lr", lr), ("seed", seed)) if v is not None}
            m = add_concept(store, name, images, class_word=class_word, overrides=overrides,
                            purge_source=purge_source, device=device, progress=_train_progress(bar),
                            memory_budget=memory_budget, plan_force=parse_kv(plan_pin, "--plan") or None,
                            on_plan=planned, resumable_=resumable, checkpoint_every=checkpoint_every,
                            samples=samples, check=check, contact_sheet=contact_sheet,
                            on_notice=lambda line: err.print(f"[yellow]note:[/] {esc(line)}", highlight=False,
                                                             soft_wrap=True))
    c = m["concepts"][-1]
    fx = c["metrics"]
    out.print(f"learned [bold]<{esc(c['name'])}>[/] from {len(c['images'])} image(s) in {c['seconds']['total']:.1f}s "
              f"-> version {m['version']}; staged copies purged; fixed-timestep loss {fx['loss_fixed_before']:.4f} -> "
              f"{fx['loss_fixed_after']:.4f}", highlight=False, soft_wrap=True)
    render_check(m, store)
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
    t = table(f"{esc(s['store'])} @ {s['version']} - method {s['method']['name']} - {s['bytes'] / 1e6:.2f} MB", on=out)
    chk = s.get("check") or {}
    drift = {r["name"]: r for r in chk.get("concepts", [])}
    for col in ("task", "name", "prompt token", "class word", "images", "steps", "seconds", "fixed loss",
                f"drift at {s['version']}"):
        t.add_column(col)
    for c in s["concepts"]:
        fx = c.get("metrics") or {}
        loss = f"{fx['loss_fixed_before']:.4f} -> {fx['loss_fixed_after']:.4f}" if "loss_fixed_before" in fx else "-"
        d = drift.get(c["name"])
        cell = "-" if d is None else f"{d['drift']:.3f}" + (" [yellow](warned)[/]" if c["name"] in chk.get("warn", []) else "")
        t.add_row(str(c["task"]), c["name"], esc(c["token"]), esc(c["class_word"] or "-"), str(c["images"]), str(c["steps"]),
                  f"{c['seconds']['total']:.1f}", loss, cell)
    out.print(t)
    if drift:
        out.print(f"drift: 1 - SSIM of each earlier concept's images from {chk['from']} and {s['version']} (same seeds; "
                  f"warns above {chk['threshold']:g}); `edgecp history` has every version's", markup=False,
                  highlight=False, soft_wrap=True)
    if s["n_param"]:
        n = s["n_param"]
        out.print(f"N_param Train {n['train_pct']:.4f}%  N_param Store {n['store_pct']:.4f}%  "
                  f"(of the UNet's {n['unet']:,} parameters; Store counts the base as 100%)")


def register(app: typer.Typer) -> None:
    app.command("add-concept")(add_concept_cmd)
    app.command("plan")(plan)
    app.command("concepts")(concepts)
