"""The commands that use a store's model: generate (PyTorch or onnxruntime), export (ONNX per device profile,
diffusers, the desktop tools' files, a single-file checkpoint), profiles (the device profiles export reads).

Registered on the main app by `register(app)`; each parses, calls ONE library function and renders.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from edgecp import profiles
from edgecp.cli.common import BudgetOpt, StoreOpt, err, out, progress_bars, resolve_store
from edgecp.errors import EdgecpError
from edgecp.render import esc

profiles_app = typer.Typer(help="Device profiles for `edgecp export`.", invoke_without_command=True)


def generate(
    prompt: Annotated[str, typer.Argument(help="Text prompt; <name> stands for a learned concept.")],
    store: Annotated[Optional[Path], typer.Option("--store", "-s", help="The store folder (default: $EDGECP_STORE, else "
                                                  "the current folder if it is a store; not needed with --onnx-dir).")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the starting noise.")] = 0,
    steps: Annotated[int, typer.Option(help="Sampling steps (DDIM).")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    size: Annotated[Optional[int], typer.Option(help="Image side in pixels (default: the model's).")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("edgecp-out"),
    backend: Annotated[str, typer.Option(help="torch or onnx.")] = "torch",
    onnx_dir: Annotated[Optional[Path], typer.Option(help="An ONNX export folder (default: the store's newest export).")] = None,
    update: Annotated[Optional[Path], typer.Option("--update", help="onnx backend: a concept update of the export in "
                                                   "--onnx-dir (`edgecp export --update-for`).")] = None,
    device: Annotated[Optional[str], typer.Option(help="torch backend: cuda or cpu.")] = None,
    memory_budget: BudgetOpt = None,
    reduce_memory: Annotated[bool, typer.Option("--reduce-memory", help="onnx backend: hold one model at a time "
                                                "(peak: the UNet, not all three; seconds of loading per image).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="write into an existing non-empty --out folder")] = False,
    version: Annotated[Optional[str], typer.Option("--version", help="torch backend: draw from this version, e.g. "
                                                   "v0002 (default: HEAD); see `edgecp history`.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="torch backend: also print the memory plan (printed "
                                          "anyway when a memory budget is set, here or at init).")] = False,
) -> None:
    """Generate images, with PyTorch or with onnxruntime on an export.

    Examples:
      edgecp generate "a photo of <my-dog> on a beach" --store my-model -n 4
      edgecp generate "a photo of <my-dog> on a beach" --store my-model -n 4 --version v0001
      edgecp generate "a photo of <my-dog> dog. Posing with <my-mug> mug" --store my-model --backend onnx
      edgecp generate "a photo of <my-dog> dog" --backend onnx --onnx-dir base-export/ --update v0005-update/
    """
    # lazy: edgecp.generate loads the model stack (torch, onnxruntime), which `edgecp --help` must not load
    from edgecp.generate import GenerateConfig, find_export, generate_from_onnx, generate_from_store

    cfg = GenerateConfig(n=n, seed=seed, steps=steps, guidance=guidance, size=size, reduce_memory=reduce_memory)
    if backend not in ("torch", "onnx"):
        raise EdgecpError(f"--backend '{backend}' is unknown: use torch or onnx")
    if reduce_memory and backend != "onnx":
        raise EdgecpError("--reduce-memory is for --backend onnx; the torch backend's memory is --memory-budget")
    if update is not None and not (backend == "onnx" and onnx_dir):
        raise EdgecpError("--update needs --backend onnx --onnx-dir BASE (the export the update was made for)")
    if version is not None and backend != "torch":
        raise EdgecpError("--version is for --backend torch: an export holds the version it was made from (its "
                          "edgecp.json says which)")
    if not (backend == "onnx" and onnx_dir):
        store = resolve_store(store, " (or --backend onnx --onnx-dir DIR)")
    if backend == "torch" and device is not None:
        # lazy: edgecp.memory loads torch, which `edgecp --help` must not load
        from edgecp.memory import resolve_device

        resolve_device(device)  # tpu, or cuda on a machine without it: one line before anything loads
    with progress_bars() as bar:
        cb = lambda ev: bar(f"sample ({backend})", ev.step, ev.total)  # noqa: E731
        if backend == "torch":
            paths = generate_from_store(store, prompt, cfg, out_dir, device=device, callback=cb,
                                        memory_budget=memory_budget, overwrite=overwrite, version=version,
                                        on_plan=lambda p: _print_plan(p, verbose))
        else:
            paths = generate_from_onnx(onnx_dir or find_export(store), prompt, cfg, out_dir, callback=cb,
                                       overwrite=overwrite, update=update,
                                       on_note=lambda m: err.print(f"[yellow]note:[/] {esc(m)}", highlight=False,
                                                                   soft_wrap=True))
    out.print(f"wrote {len(paths) - 1} image(s) and a grid: [bold]{esc(paths[-1])}[/]", soft_wrap=True)


def _print_plan(plan, verbose: bool) -> None:
    """generate's memory plan: with --verbose, or when a budget is set (--memory-budget, or the store's from init)."""
    if verbose or plan.budget:
        out.print(plan.line(), markup=False, highlight=False, soft_wrap=True)


def export(
    store: StoreOpt,
    profile: Annotated[Optional[str], typer.Option(help="Device profile name or .toml path; see `edgecp profiles` "
                                                   "(default cpu-fp32).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: STORE/exports/PROFILE-VERSION).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx, diffusers, webui (kohya LoRA + embeddings for "
                                     "AUTOMATIC1111 / ComfyUI / InvokeAI) or checkpoint (one single-file model).")] = "onnx",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="write into an existing non-empty --out folder")] = False,
    update_for: Annotated[Optional[Path], typer.Option("--update-for", help="write only an update of this base export "
                                                       "(an earlier version's, same profile) that the device holds.")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="webui: every layer's LoRA rank (default: each layer's "
                                                "from --max-error).")] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="webui: largest relative Frobenius error "
                                                       "of a layer's factored change (default 0.01).")] = None,
    precision: Annotated[Optional[str], typer.Option("--precision", help="webui / checkpoint: fp16 (default) or "
                                                     "fp32 tensors.")] = None,
) -> None:
    """Export the current version: ONNX per device profile, LoRA + embeddings for diffusers or for the desktop
    tools, or one single-file checkpoint.

    Examples:
      edgecp export --store my-model --profile cpu-fp32
      edgecp export --store my-model --profile cpu-fp32 --update-for my-model/exports/cpu-fp32-v0001
      edgecp export --store my-model --format diffusers --out my-lora/
      edgecp export --store my-model --format webui --out my-webui/
      edgecp export --store my-model --format checkpoint --out my-checkpoint/
    """
    if fmt in ("webui", "checkpoint", "diffusers") and profile is not None:
        raise EdgecpError(f"--profile is for --format onnx: pass --format {fmt} without it")
    if fmt in ("webui", "checkpoint"):
        return _export_tools(store, fmt, out_dir, overwrite, update_for, rank, max_error, precision)
    for flag, value in (("--rank", rank), ("--max-error", max_error), ("--precision", precision)):
        if value is not None:
            raise EdgecpError(f"{flag} is for --format webui or checkpoint, not --format {fmt}: leave it out")
    profile = profile or "cpu-fp32"
    if fmt == "diffusers":
        # lazy: the diffusers exporter loads torch and diffusers, which `edgecp --help` must not load
        from edgecp.export.diffusers_format import export_diffusers, how_to_load

        if out_dir is None:
            raise EdgecpError("--format diffusers needs --out DIR")
        if update_for is not None:
            raise EdgecpError("--update-for is for --format onnx: a diffusers LoRA is already one concept's size")
        files = export_diffusers(store, out_dir, overwrite=overwrite)
        _print_diffusers(len(files), out_dir, how_to_load(store, files))
        return
    if fmt != "onnx":
        raise EdgecpError(f"--format '{fmt}' is unknown: use onnx, diffusers, webui or checkpoint")
    # lazy: the ONNX exporter loads torch and onnx, which `edgecp --help` must not load
    from edgecp.export.onnx_export import export_onnx

    with progress_bars() as bar:
        report = export_onnx(store, profile, out_dir, progress=lambda ev: bar(ev.phase, ev.step, ev.total),
                             overwrite=overwrite, update_for=update_for)
    _print_export(report)


def _print_diffusers(n_files: int, out_dir: Path, usage: dict) -> None:
    """A diffusers export: where, the words of each concept for a prompt, and Python that loads it (plain text, so
    that it can be copied: no markup, no wrapping)."""
    out.print(f"wrote {n_files} file(s) to [bold]{esc(out_dir)}[/]", soft_wrap=True)
    if usage["tokens"]:
        words = "; ".join(f"{t['words']} for {t['name']}" for t in usage["tokens"])
        out.print(f"in a prompt, write: {words} (e.g. \"{usage['tokens'][0]['prompt']}\")", markup=False,
                  highlight=False, soft_wrap=True)
    out.print("load it with diffusers (Python):", markup=False, highlight=False)
    out.print(usage["code"], markup=False, highlight=False, soft_wrap=True)


def _export_tools(store, fmt: str, out_dir, overwrite: bool, update_for, rank, max_error: float, precision: str):
    if out_dir is None:
        raise EdgecpError(f"--format {fmt} needs --out DIR")
    if update_for is not None:
        raise EdgecpError(f"--update-for is for --format onnx: pass --format {fmt} without it")
    if fmt == "checkpoint" and (rank is not None or max_error is not None):
        flag = "--rank" if rank is not None else "--max-error"
        raise EdgecpError(f"{flag} is for --format webui: a checkpoint holds the merged weights, whole")
    precision = precision or "fp16"
    with progress_bars() as bar:
        progress = lambda ev: bar(ev.phase, ev.step, ev.total)  # noqa: E731
        if fmt == "webui":
            # lazy: these exporters load torch and diffusers, which `edgecp --help` must not load
            from edgecp.export.webui import DEFAULT_MAX_ERROR, export_webui

            report = export_webui(store, out_dir, overwrite=overwrite, rank=rank,
                                  max_error=DEFAULT_MAX_ERROR if max_error is None else max_error,
                                  precision=precision, progress=progress)
        else:
            from edgecp.export.checkpoint import export_checkpoint

            report = export_checkpoint(store, out_dir, overwrite=overwrite, precision=precision, progress=progress)
    check = report["image_check"]
    if fmt == "webui":
        lo = report["lora"]
        ranks = f"rank {lo['rank_min']}" if lo["rank_min"] == lo["rank_max"] else f"ranks {lo['rank_min']}-{lo['rank_max']}"
        out.print(f"wrote [bold]{esc(report['out'])}[/]: {esc(lo['file'])} ({lo['bytes'] / 1e6:.2f} MB, {lo['layers']} "
                  f"layers, {ranks}, largest layer error {lo['max_relative_error']:.2%}; {esc(lo['why'])}) and "
                  f"{len(report['embeddings'])} embedding(s)")
    else:
        ck = report["checkpoint"]
        out.print(f"wrote [bold]{esc(report['out'])}[/]: {esc(ck['file'])} ({ck['bytes'] / 1e6:.1f} MB, "
                  f"{ck['precision']}, {ck['sd_version']}) and {len(report['embeddings'])} embedding(s)")
    out.print(f"read back by {esc(check['reader'])}: gate image {check['psnr_db']} dB against edgecp's own model; "
              f"trigger words and prompts in {esc(report['out'])}/HOW-TO-USE.txt")


def materialize(
    base: Annotated[Path, typer.Argument(help="The base export the update was made for.")],
    update: Annotated[Path, typer.Argument(help="The update folder (`edgecp export --update-for`).")],
    out_dir: Annotated[Path, typer.Option("--out", help="The complete export folder to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an earlier export in --out")] = False,
) -> None:
    """Write base + update as one complete export folder, for readers that know nothing of updates (optimum).

    Example:
      edgecp materialize base-export/ v0005-update/ --out v0005-full/
    """
    # lazy: onnx, which `edgecp --help` must not load
    from edgecp.export.update import materialize as write_folder

    meta = write_folder(base, update, out_dir, overwrite=overwrite)
    out.print(f"wrote version {esc(meta.get('version'))} ({len(meta['files'])} files, byte for byte its full export) "
              f"to [bold]{esc(out_dir)}[/]")


def _print_export(report: dict) -> None:
    """An ONNX export's report: each model's parity with PyTorch and size, the image gate, the step time."""
    t = Table(title=f"parity vs PyTorch ({report['profile']})")
    int8 = "quantization" in report
    for col in ("model", "max abs diff", "tolerance", "MB", "x fp32") + (("int8",) if int8 else ()):
        t.add_column(col)
    for name, r in report["models"].items():
        t.add_row(name, f"{r['max_abs_diff']:.2e}", f"{r['tolerance']:.1e}", f"{r['bytes'] / 1e6:.1f}",
                  f"{r['bytes'] / r['fp32_weight_bytes']:.2f}", *((r.get("quantization", ""),) if int8 else ()))
    out.print(t)
    if report.get("update_refused"):
        err.print(f"[yellow]note:[/] {esc(report['update_refused'])}", highlight=False, soft_wrap=True)
    upd = report.get("update")
    if upd:
        out.print(f"update from {upd['from_version']}: {upd['bytes'] / 1e6:.2f} MB, {100 * upd['fraction']:.2f}% of the "
                  f"full export's {upd['full_export_bytes'] / 1e6:.1f} MB; {esc(upd['why'])}", highlight=False,
                  soft_wrap=True)
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


@profiles_app.callback()
def profiles_list(ctx: typer.Context) -> None:
    """List the shipped device profiles."""
    if ctx.invoked_subcommand:
        return
    t = Table()
    for col in ("profile", "precision", "providers", "description"):
        t.add_column(col)
    for name in profiles.profile_files():
        p = profiles.load_profile(name)
        t.add_row(p.name, p.precision, ", ".join(p.providers), p.description)
    out.print(t)


@profiles_app.command("show")
def profiles_show(name: Annotated[str, typer.Argument(help="Profile name or .toml path.")]) -> None:
    """Show one profile's settings."""
    out.print_json(json.dumps(dataclasses.asdict(profiles.load_profile(name))))


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("export")(export)
    app.command("materialize")(materialize)
    app.add_typer(profiles_app, name="profiles")
