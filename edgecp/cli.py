"""The `edgecp` command: parse -> build config -> call ONE library function -> render.

Errors a user can fix print one line and exit non-zero; EDGECP_DEBUG=1 shows the traceback. `main()` also turns
what the environment does to a command into one line (issue 21): Ctrl-C ("interrupted: ...", exit 130), a
read-only store, a full disk and other OSErrors that name a path. For its own process only, it silences the
notices libraries print on import (kernels' "Skipping publisher trust check" when the Hub is offline, diffusers'
FutureWarnings); the library sets nothing of the kind.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from edgecp.errors import EdgecpError
from edgecp.render import esc

app = typer.Typer(
    name="edgecp", help="Continual personalization of Stable Diffusion: teach concepts one at a time, export to ONNX.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
)
profiles_app = typer.Typer(help="Device profiles for `edgecp export`.", invoke_without_command=True)
app.add_typer(profiles_app, name="profiles")
out = Console()
err = Console(stderr=True)

StoreOpt = Annotated[Path, typer.Option("--store", "-s", help="The store folder (made by `edgecp init`).")]
PlanOpt = Annotated[Optional[list[str]], typer.Option(
    "--plan", help="Pin a plan setting key=value (weights=int8|bf16|fp32, gradient_checkpointing=true, micro_batch=1, "
    "dc_chunk=2); the planner chooses the rest.")]
BudgetOpt = Annotated[Optional[str], typer.Option(
    "--memory-budget", help="Peak memory to stay within, e.g. 6GB (GPU memory on CUDA, resident memory on the CPU).")]


def _parse_kv(items: list[str] | None, flag: str) -> dict:
    """`key=value` pairs; values parsed as JSON when they can be (numbers, booleans, lists)."""
    result = {}
    for item in items or []:
        if "=" not in item:
            raise EdgecpError(f"{flag} '{item}' is not key=value: e.g. {flag} rank=16")
        k, v = item.split("=", 1)
        try:
            result[k.strip()] = json.loads(v)
        except ValueError:
            result[k.strip()] = v
    return result


def _method_params(items: list[str]) -> dict:
    """`METHOD:key=value` pairs -> {method: {key: value}}."""
    out: dict = {}
    for item in items:
        method, sep, kv = item.partition(":")
        if not sep:
            raise EdgecpError(f"--param '{item}' is not METHOD:key=value: e.g. -p ewc-dc:ewc_strength=3")
        out.setdefault(method.strip(), {}).update(_parse_kv([kv], "--param"))
    return out


@contextmanager
def progress_bars():
    """A rich progress display; yields `bar(phase, step, total, loss=None)` that creates a bar per phase."""
    cols = [TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*cols, console=err, transient=False) as prog:
        tasks: dict[str, int] = {}

        def bar(phase: str, step: int, total: int, loss: float | None = None) -> None:
            if phase not in tasks:
                tasks[phase] = prog.add_task(phase, total=total, completed=step, info="")  # a resumed bar: ETA from here
            info = f"loss {loss:.4f}" if loss is not None else ""
            prog.update(tasks[phase], completed=step, total=total, info=info)

        yield bar


def _train_progress(bar):
    return lambda ev: bar(ev.phase, ev.step, ev.total, ev.loss)


@app.command()
def init(
    store: Annotated[Path, typer.Argument(help="A new, empty folder for the store.")],
    base: Annotated[str, typer.Option(help="'tiny' (embedded), a diffusers folder, a .safetensors file, or a hub id.")] = "tiny",
    method: Annotated[Optional[str], typer.Option(
        help="Continual strategy (default dsc-ewc-dc, paper 000's method); see `edgecp methods`.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Method hyperparameter key=value (repeat).")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="lora or vera (default: the method's).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="Adapter rank (default 16).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated UNet module suffixes (default attn2.to_k,attn2.to_v).")] = None,
    train: Annotated[Optional[list[str]], typer.Option("--train", help="Training default key=value (steps, lr, grad_accum, ...).")] = None,
    prior_prompt: Annotated[Optional[str], typer.Option(help="The prior prompt c_0 for prior preservation.")] = None,
    prior_images: Annotated[Optional[int], typer.Option(help="How many prior images the base generates once.")] = None,
    memory_budget: BudgetOpt = None,
) -> None:
    """Create a store: one personal model on one base.

    Examples:
      edgecp init my-model --base tiny
      edgecp init my-model --base ./stable-diffusion-v1-5 --rank 16
    """
    from edgecp.api import init_store
    from edgecp.config import DEFAULT_METHOD

    adapter_d: dict = {"kind": adapter} if adapter else {}
    if rank is not None:
        adapter_d.update(rank=rank, alpha=float(rank))
    if targets:
        adapter_d["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    prior = {k: v for k, v in (("prompt", prior_prompt), ("num_images", prior_images)) if v is not None}
    s = init_store(store, base, method or DEFAULT_METHOD, _parse_kv(param, "--param"), adapter_d,
                   _parse_kv(train, "--train"), prior, memory_budget=memory_budget)
    chosen = s.info["method"]["name"]
    why = " (the default: paper 000's EWC + DSC with DC scores; --method picks another)" if method is None else ""
    out.print(f"created store [bold]{esc(s.root)}[/] on base '{esc(s.info['base']['locator'])}' "
              f"(sha256 {s.info['base']['sha256'][:12]}), method {chosen}{why}")


@app.command("set-method")
def set_method_cmd(
    method: Annotated[str, typer.Argument(help="Continual strategy; see `edgecp methods`.")],
    store: StoreOpt,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p", help="Method hyperparameter key=value (repeat).")] = None,
) -> None:
    """Change the method of a store that holds no concepts yet.

    Examples:
      edgecp set-method dsc-ewc-dc --store my-model -p k=5 -p delta=0.5
    """
    from edgecp.api import set_method

    s = set_method(store, method, _parse_kv(param, "--param"))
    out.print(f"store {esc(s.root)} now uses {s.info['method']['name']} {esc(s.info['method']['params'])}")


@app.command("add-concept")
def add_concept_cmd(
    name: Annotated[str, typer.Argument(help="The concept's name; prompts refer to it as <name>.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    store: StoreOpt,
    class_word: Annotated[Optional[str], typer.Option(help="What the concept is, e.g. dog; starts its token.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training iterations (default: the store's).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adapter learning rate.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Training seed.")] = None,
    purge_source: Annotated[bool, typer.Option("--purge-source/--keep-source", help="Delete the given image files after the commit.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda when present).")] = None,
    memory_budget: BudgetOpt = None,
    plan_pin: PlanOpt = None,
) -> None:
    """Learn a new concept from a few photos and commit it as a new version.

    Examples:
      edgecp add-concept my-dog photos/dog/ --store my-model --class-word dog
      edgecp add-concept my-mug a.jpg b.jpg --store my-model --purge-source --memory-budget 6GB
    """
    from edgecp.train import add_concept

    overrides = {k: v for k, v in (("steps", steps), ("lr", lr), ("seed", seed)) if v is not None}
    with progress_bars() as bar:
        m = add_concept(store, name, images, class_word=class_word, overrides=overrides,
                        purge_source=purge_source, device=device, progress=_train_progress(bar),
                        memory_budget=memory_budget, plan_force=_parse_kv(plan_pin, "--plan") or None,
                        on_plan=lambda p: out.print(p.line(), markup=False, highlight=False, soft_wrap=True))
    c = m["concepts"][-1]
    out.print(f"learned [bold]<{c['name']}>[/] from {len(c['images'])} image(s) in {c['seconds']['total']:.1f}s "
              f"-> version {m['version']}; staged copies purged")
    if purge_source:
        from edgecp.cli_store import render_purge

        render_purge(m.get("purged"), out)


@app.command()
def plan(
    store: StoreOpt,
    memory_budget: BudgetOpt = None,
    device: Annotated[Optional[str], typer.Option(help="cuda or cpu (default: cuda when present).")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training resolution in pixels (default: the store's).")] = None,
    images: Annotated[int, typer.Option(help="How many photos the concept will have.")] = 4,
    plan_pin: PlanOpt = None,
    gpu_memory: Annotated[Optional[str], typer.Option(
        help="Plan for a GPU that need not be here: its memory, e.g. 8GB (implies --device cuda).")] = None,
    gpu_capability: Annotated[Optional[str], typer.Option(
        help="With --gpu-memory: its CUDA compute capability, e.g. 8.6 (8.0+: bf16; below: fp16; default 7.5).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what add-concept will do within a memory budget, and its predicted peak per phase (loads no model).

    Examples:
      edgecp plan --store my-model --memory-budget 6GB
      edgecp plan --store my-model --memory-budget 3GB --resolution 512 --device cuda
      edgecp plan --store my-model --gpu-memory 8GB --gpu-capability 7.5   # a GPU that is not here
    """
    from edgecp.api import plan_store
    from edgecp.planner import fmt_bytes

    p = plan_store(store, memory_budget, {"resolution": resolution}, device, images, _parse_kv(plan_pin, "--plan") or None,
                   gpu_memory=gpu_memory, gpu_capability=gpu_capability)
    if as_json:
        out.print_json(json.dumps(p.to_json()))
        return
    out.print(p.line(), markup=False, highlight=False, soft_wrap=True)
    if p.loss_scaling:
        out.print("fp16 trains with loss scaling (GradScaler; fp16 would flush the small gradients to zero)",
                  markup=False, highlight=False, soft_wrap=True)
    if gpu_memory is not None:
        from edgecp.memory import parse_capability
        from edgecp.planner import parse_bytes

        major, minor = parse_capability(gpu_capability)
        size = fmt_bytes(parse_bytes(gpu_memory, "GPU memory", "--gpu-memory"))
        out.print(f"for a GPU with {size} (given, not this machine's), "
                  f"compute capability {major}.{minor}{'' if gpu_capability else ' (assumed)'}: "
                  f"{'bf16' if major >= 8 else 'fp16 (no native bf16 below 8.0)'}", markup=False, highlight=False,
                  soft_wrap=True)
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


@app.command()
def concepts(store: StoreOpt, as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the concepts of the store's current version."""
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


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text prompt; <name> stands for a learned concept.")],
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="The store folder.")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise.")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps (DDIM).")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    size: Annotated[Optional[int], typer.Option(help="Image side in pixels (default: the model's).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("edgecp-out"),
    backend: Annotated[str, typer.Option(help="torch or onnx.")] = "torch",
    onnx_dir: Annotated[Optional[Path], typer.Option(help="An ONNX export folder (default: the store's newest export).")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch backend: cuda or cpu.")] = None,
    memory_budget: BudgetOpt = None,
    reduce_memory: Annotated[bool, typer.Option("--reduce-memory", help="onnx backend: hold one model at a time "
                                                "(peak: the UNet, not all three; seconds of loading per image).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="write into an existing non-empty --out folder")] = False,
) -> None:
    """Generate images, with PyTorch or with onnxruntime on an export.

    Examples:
      edgecp generate "a photo of <my-dog> on a beach" --store my-model -n 4
      edgecp generate "a photo of <my-dog> dog. Posing with <my-mug> mug" --store my-model --backend onnx
    """
    from edgecp.generate import GenerateConfig

    cfg = GenerateConfig(n=n, seed=seed, steps=steps, guidance=guidance, size=size, reduce_memory=reduce_memory)
    if backend not in ("torch", "onnx"):
        raise EdgecpError(f"--backend '{backend}' is unknown: use torch or onnx")
    if reduce_memory and backend != "onnx":
        raise EdgecpError("--reduce-memory is for --backend onnx; the torch backend's memory is --memory-budget")
    if store is None and not (backend == "onnx" and onnx_dir):
        raise EdgecpError("no model given: pass --store STORE (or --backend onnx --onnx-dir DIR)")
    if backend == "torch" and device is not None:
        from edgecp.memory import resolve_device

        resolve_device(device)  # tpu, or cuda on a machine without it: one line before anything loads
    with progress_bars() as bar:
        cb = lambda ev: bar(f"sample ({backend})", ev.step, ev.total)  # noqa: E731
        if backend == "torch":
            from edgecp.generate import generate_from_store

            paths = generate_from_store(store, prompt, cfg, out_dir, device=device, callback=cb,
                                        memory_budget=memory_budget, overwrite=overwrite,
                                        on_plan=lambda p: out.print(p.line(), markup=False, highlight=False, soft_wrap=True))
        else:
            from edgecp.generate import find_export, generate_from_onnx

            paths = generate_from_onnx(onnx_dir or find_export(store), prompt, cfg, out_dir, callback=cb,
                                       overwrite=overwrite,
                                       on_note=lambda m: err.print(f"[yellow]note:[/] {esc(m)}", highlight=False,
                                                                   soft_wrap=True))
    out.print(f"wrote {len(paths) - 1} image(s) and a grid: [bold]{esc(paths[-1])}[/]")


@app.command()
def export(
    store: StoreOpt,
    profile: Annotated[str, typer.Option(help="Device profile name or .toml path; see `edgecp profiles`.")] = "cpu-fp32",
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: STORE/exports/PROFILE-VERSION).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx or diffusers.")] = "onnx",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="write into an existing non-empty --out folder")] = False,
) -> None:
    """Export the current version: ONNX per device profile, or LoRA + embeddings for diffusers.

    Examples:
      edgecp export --store my-model --profile cpu-fp32
      edgecp export --store my-model --format diffusers --out my-lora/
    """
    if fmt == "diffusers":
        from edgecp.export.diffusers_format import export_diffusers

        if out_dir is None:
            raise EdgecpError("--format diffusers needs --out DIR")
        files = export_diffusers(store, out_dir, overwrite=overwrite)
        out.print(f"wrote {len(files)} file(s) to [bold]{esc(out_dir)}[/] (load with load_lora_weights / load_textual_inversion)")
        return
    if fmt != "onnx":
        raise EdgecpError(f"--format '{fmt}' is unknown: use onnx or diffusers")
    from edgecp.export.onnx_export import export_onnx

    with progress_bars() as bar:
        report = export_onnx(store, profile, out_dir, progress=lambda ev: bar(ev.phase, ev.step, ev.total), overwrite=overwrite)
    t = Table(title=f"parity vs PyTorch ({report['profile']})")
    int8 = "quantization" in report
    for col in ("model", "max abs diff", "tolerance", "MB", "x fp32") + (("int8",) if int8 else ()):
        t.add_column(col)
    for name, r in report["models"].items():
        t.add_row(name, f"{r['max_abs_diff']:.2e}", f"{r['tolerance']:.1e}", f"{r['bytes'] / 1e6:.1f}",
                  f"{r['bytes'] / r['fp32_weight_bytes']:.2f}", *((r.get("quantization", ""),) if int8 else ()))
    out.print(t)
    for refused in report.get("refused_variants", []):
        out.print(f"{refused['quantization']} int8 refused ({esc(refused['refused'].split(';')[0])}): "
                  f"shipped {report['quantization']}", highlight=False)
    gate = report["image_gate"]
    sim = f", evaluator similarity {gate['evaluator_similarity']:.4f}" if "evaluator_similarity" in gate else ""
    out.print(f"image gate: {gate['psnr_db']:.2f} dB PSNR vs PyTorch (profile needs {gate['min_psnr_db']:g}){sim}")
    speed = gate.get("unet_step_ms")
    if speed:
        gpu_on_cpu = speed["provider"] == "CPUExecutionProvider" and "CUDAExecutionProvider" in report["providers"]
        out.print(f"speed: a step {speed['onnx']:g} ms ({speed['provider'].removesuffix('ExecutionProvider')}) vs "
                  f"{speed['pytorch']:g} ms PyTorch fp32: {speed['ratio']:.2f}x (median of {speed['steps_timed']} "
                  "gate steps)" + (", a CUDA profile timed on the CPU" if gpu_on_cpu else "")
                  + ("; PyTorch's references run on the CPU" if speed["provider"] != "CPUExecutionProvider" else ""),
                  highlight=False)
    out.print(f"exported to [bold]{esc(report['out'])}[/]")


@app.command()
def methods() -> None:
    """List the continual strategies a store can use, and how `remove-concept` works with each."""
    from edgecp.methods import method_class, method_names

    t = Table()
    t.add_column("method")
    t.add_column("what it does")
    t.add_column("remove-concept")
    for name in method_names():
        cls = method_class(name)
        t.add_row(name, cls.summary, "exact" if cls.removal == "exact" else "token-only or rollback")
    out.print(t)


@profiles_app.callback()
def profiles_list(ctx: typer.Context) -> None:
    """List the shipped device profiles."""
    if ctx.invoked_subcommand:
        return
    from edgecp.profiles import load_profile, profile_files

    t = Table()
    for col in ("profile", "precision", "providers", "description"):
        t.add_column(col)
    for name in profile_files():
        p = load_profile(name)
        t.add_row(p.name, p.precision, ", ".join(p.providers), p.description)
    out.print(t)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Profile name or .toml path.")]) -> None:
    """Show one profile's settings."""
    import dataclasses

    from edgecp.profiles import load_profile

    out.print_json(json.dumps(dataclasses.asdict(load_profile(name))))


@app.command()
def bench(
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="A new folder for the results (default edgecp-bench).")] = None,
    preset: Annotated[str, typer.Option(help="quick (3 methods, 6 tasks, CPU), full (every method, GPU) or paper "
                                             "(000's App. H: needs --sequence DIR and --features DIR).")] = "quick",
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated methods, or all (default: the preset's).")] = None,
    sequence: Annotated[Optional[str], typer.Option(help="six, procedural, or a folder of task folders.")] = None,
    tasks: Annotated[Optional[int], typer.Option(help="Only the first N tasks.")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma-separated seeds, e.g. 0,1,2.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training iterations per task.")] = None,
    n_gen: Annotated[Optional[int], typer.Option(help="Images generated per concept per evaluation.")] = None,
    gen_steps: Annotated[Optional[int], typer.Option(help="Sampling steps of those images.")] = None,
    base: Annotated[Optional[str], typer.Option(help="Base model (default tiny).")] = None,
    features: Annotated[Optional[str], typer.Option(help="tiny (the tiny world's encoder) or a CLIP folder / hub id.")] = None,
    class_word: Annotated[Optional[str], typer.Option(
        help="Class word in the prompts: paper (000: CD and TI only), always or never.")] = None,
    param: Annotated[Optional[list[str]], typer.Option("--param", "-p",
                                                       help="A method's hyperparameter, METHOD:key=value.")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Finish the bench in this folder with the config it was "
                                                         "started with; finished tasks are not recomputed.")] = None,
    executor: Annotated[str, typer.Option(help="serial (in this process) or ray (one Ray task per method x seed; "
                                               "needs edgecp's distributed extra).")] = "serial",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster to join: auto, or ray://HOST:PORT (default: a "
                                                        "local cluster).")] = None,
    gpus_per_run: Annotated[Optional[float], typer.Option(help="GPUs per run with --executor ray; a fraction shares "
                                                               "a GPU (default: 1 when the cluster has GPUs, else 0).")] = None,
    cpus_per_run: Annotated[float, typer.Option(help="CPUs per run with --executor ray.")] = 1,
    retries: Annotated[int, typer.Option(help="Ray retries of a run whose worker died (it resumes).")] = 3,
    estimate: Annotated[bool, typer.Option("--estimate", help="Print runs, device-hours (from a short calibration "
                                                              "on this device) and disk, then exit.")] = False,
) -> None:
    """Benchmark methods over a concept sequence: paper 000's table, 001's average score and forgetting,
    curves, heatmaps, sample grids, JSON and CSV.

    Examples:
      edgecp bench --preset quick --out bench-quick
      edgecp bench --methods all --out bench-all
      edgecp bench --methods lora-sequential,ewc-dc --sequence procedural --tasks 10 --seeds 0,1,2
      edgecp bench --methods ewc-dc -p ewc-dc:ewc_strength=3 --sequence procedural --tasks 6
      edgecp bench --preset paper --base ./sd-v1-4 --sequence ./tasks --features ./clip-vit-l14 --estimate
      edgecp bench --preset paper --base ./sd-v1-4 --sequence ./tasks --features ./clip-vit-l14 --executor ray --address auto --out b
      edgecp bench --resume b
    """
    import dataclasses

    from edgecp.eval.bench import parse_methods, table_markdown
    from edgecp.eval.bench import preset as get_preset
    from edgecp.eval.executor import make_executor, resume_bench, run_bench

    overrides = {
        "methods": parse_methods(methods) if methods else None,
        "seeds": tuple(int(s) for s in seeds.split(",")) if seeds else None,
        "sequence": sequence, "tasks": tasks, "steps": steps, "n_gen": n_gen, "gen_steps": gen_steps,
        "base": base, "features": features, "class_word": class_word,
        "method_params": _method_params(param) if param else None,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if resume is not None and (given or out_dir is not None or preset != "quick" or estimate):
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given) or ("--out" if out_dir else "--preset/--estimate")
        raise EdgecpError(f"--resume {resume} reads the config saved in that folder: leave out {flags}")
    opts = {"address": address, "num_gpus": gpus_per_run, "num_cpus": cpus_per_run, "max_retries": retries}
    ex = make_executor(executor, **opts) if executor == "ray" else make_executor(executor)
    if estimate:
        from edgecp.eval.estimate import estimate as estimate_bench
        from edgecp.eval.estimate import estimate_lines

        cfg = dataclasses.replace(get_preset(preset), **given)
        with progress_bars() as bar:
            e = estimate_bench(cfg, progress=lambda ev: bar(ev.phase, ev.step, ev.total))
        for line in estimate_lines(e):
            out.print(esc(line), highlight=False)
        return
    with progress_bars() as bar:
        progress = lambda ev: bar("bench (runs)" if ev.phase == "runs" else "bench (tasks)", ev.step, ev.total)
        log = lambda msg: err.print(f"[dim]bench:[/] {esc(msg)}")
        if resume is not None:
            result = resume_bench(resume, progress=progress, log=log, executor=ex)
            out_dir = resume
        else:
            cfg = dataclasses.replace(get_preset(preset), **given)
            out_dir = out_dir or Path("edgecp-bench")
            result = run_bench(cfg, out_dir, progress=progress, log=log, executor=ex)
    typer.echo(table_markdown(result))  # plain: a markdown table must not be wrapped at the terminal width
    out.print(f"{result['seconds']:.0f}s; results, CSV, curves, heatmaps and samples in [bold]{esc(out_dir)}[/]")


@app.command()
def demo(out_dir: Annotated[Path, typer.Option("--out", help="Where the demo writes its store and images.")] = Path("edgecp-demo")) -> None:
    """The whole path on the embedded tiny model, offline: init, three concepts, generate, export, ONNX."""
    from edgecp.demo import run_demo

    with progress_bars() as bar:
        report = run_demo(out_dir, progress=bar, log=lambda msg: err.print(f"[dim]demo:[/] {esc(msg)}"))
    out.print("\n[bold]edgecp demo done[/] - everything is under " + esc(report["out"]))
    for k, v in report["paths"].items():
        out.print(f"  {k:<22} {esc(v)}")


from edgecp.cli_store import register as _register_store_commands  # noqa: E402

_register_store_commands(app)


class Interrupted(BaseException):
    """Ctrl-C, raised by `main()`'s SIGINT handler instead of KeyboardInterrupt: click turns a KeyboardInterrupt
    into "Aborted!" and exit 1 before main() can see it. A BaseException, so that no `except Exception` in a library
    swallows it; `finally` blocks (the staging purge, the lock) run as for KeyboardInterrupt."""


def _on_sigint(signum, frame) -> None:
    raise Interrupted()


@contextmanager
def _cli_process():
    """What the CLI sets for its own process, undone when main() returns (tests call main() in-process):
    - SIGINT raises `Interrupted` (main thread only; elsewhere Python's default stays);
    - the `kernels` package's logger (imported by bitsandbytes) at ERROR: with HF_HUB_OFFLINE=1 it warns
      "Skipping publisher trust check ..." on stderr at every import of bitsandbytes; and the loggers of
      `edgecp.scoped.QUIET_LOGGERS` (torchao's and bitsandbytes' import notices), which the library quiets only
      while it trains, generates or plans;
    - FutureWarnings ignored: diffusers' deprecation notices concern its API, not the user's command.
    """
    import warnings

    from edgecp.scoped import quiet_libraries  # QUIET_LOGGERS includes `kernels`

    try:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    except ValueError:  # not the main thread
        previous = None
    try:
        with warnings.catch_warnings(), quiet_libraries():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _store_of(path: Path) -> Path | None:
    """The store folder holding `path` (the nearest parent with store.json), if any."""
    for p in [path, *path.parents][:8]:
        if (p / "store.json").is_file():
            return p
    return None


def _free(path: Path) -> str:
    import shutil

    for p in [path, *path.parents]:
        try:
            return f"{shutil.disk_usage(p).free / 1e6:,.0f} MB free there now"
        except OSError:
            continue
    return "free space unknown"


def os_error_line(e: OSError) -> str | None:
    """One line for an OSError that names a path, or a full disk (None: leave the traceback). Generic, and honest about what is
    known: the path from e.filename, the store that holds it, the free space left; a write is atomic in edgecp
    (a version is renamed into place, an export too), so a failed command leaves the store at its last commit."""
    name = e.filename if e.filename is not None else e.filename2
    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a write() that fails names no file: the line still holds
        what = "over its disk quota" if e.errno == errno.EDQUOT else "full"
        where = f"'{Path(os.fsdecode(name))}'; {_free(Path(os.fsdecode(name)))}" if name is not None else \
            "while writing"
        return (f"the disk is {what} ({why}: {where}): nothing was committed and the store is at "
                "its last committed version; free some space (a concept needs a few MB in the store, an export "
                "about the size of the base) and retry")
    if name is None:
        return None
    path = Path(os.fsdecode(name))
    store = _store_of(path)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        if store is not None:
            who = "" if e.errno == errno.EROFS else " for this user"
            return (f"store '{store}' is read-only{who} ({why}: '{path}'): commands that change it (add-concept, "
                    "export, rollback, gc, ...) need write access; make it writable, or copy it to a writable disk")
        return f"'{path}' cannot be accessed ({why}): fix its permissions or choose another path"
    return f"{why} (errno {e.errno}): '{path}'; run with EDGECP_DEBUG=1 for the traceback"


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    debug = os.environ.get("EDGECP_DEBUG") == "1"
    try:
        with _cli_process():
            app()
    except EdgecpError as e:
        if debug:
            raise
        err.print(f"[red]error:[/] {esc(e)}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except ModuleNotFoundError as e:  # the lean install (edgecp[runtime]) has no torch stack: say which install
        if e.name is None or e.name.split(".")[0] not in FULL_ONLY or debug:
            raise
        err.print(f"[red]error:[/] this command needs {e.name.split('.')[0]}, which the lean install lacks: "
                  "pip install 'edgecp[full]' (or 'edgecp[train,cuda]' on a CUDA machine)", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted):
        err.print("interrupted: the store is at its last committed version", highlight=False, soft_wrap=True)
        sys.exit(130)
    except OSError as e:
        line = None if debug else os_error_line(e)
        if line is None:
            raise
        err.print(f"[red]error:[/] {esc(line)}", highlight=False, soft_wrap=True)
        sys.exit(2)


FULL_ONLY = {"torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "onnx", "onnxscript",
             "torchao", "skimage", "matplotlib"}


if __name__ == "__main__":
    main()
