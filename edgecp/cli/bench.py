"""The method and benchmark commands of `edgecp`: methods (the continual strategies), bench (compare them over a
concept sequence), demo (the whole path on the embedded tiny model).

Registered on the main app by `register(app)`; each parses, calls ONE library function and renders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from edgecp.cli.common import err, out, parse_kv, progress_bars
from edgecp.errors import EdgecpError
from edgecp.render import esc


def _method_params(items: list[str]) -> dict:
    """`METHOD:key=value` pairs -> {method: {key: value}}."""
    out: dict = {}
    for item in items:
        method, sep, kv = item.partition(":")
        if not sep:
            raise EdgecpError(f"--param '{item}' is not METHOD:key=value: e.g. -p ewc-dc:ewc_strength=3")
        out.setdefault(method.strip(), {}).update(parse_kv([kv], "--param"))
    return out


methods_app = typer.Typer(help="The continual strategies a store can use.", invoke_without_command=True)


@methods_app.callback()
def methods(ctx: typer.Context) -> None:
    """List the continual strategies a store can use: what each does and costs, how `remove-concept` works with
    it, which to pick when unsure."""
    if ctx.invoked_subcommand:
        return
    # lazy: edgecp.methods loads torch, which `edgecp --help` must not load
    from edgecp.config import DEFAULT_METHOD
    from edgecp.methods import method_class, method_names

    t = Table()
    t.add_column("method", no_wrap=True)
    t.add_column("what it does, what it costs (the paper's name)", overflow="fold")
    t.add_column("remove-concept", max_width=14 if out.is_terminal else None)  # the description gets the room
    for name in method_names():
        cls = method_class(name)
        t.add_row(f"{name} (default)" if name == DEFAULT_METHOD else name,
                  f"{esc(cls.summary)}\n[dim]({esc(cls.paper)})[/]",
                  "exact" if cls.removal == "exact" else "token-only or rollback")
    out.print(t)
    exact = [n for n in method_names() if method_class(n).removal == "exact"]
    out.print(f"Unsure? Keep the default, {DEFAULT_METHOD}. To take a concept out exactly later, choose "
              f"{', '.join(exact[:-1])} or {exact[-1]} (the others remove its word, or roll back). "
              "The method is fixed once the store holds a concept; `edgecp methods show NAME` gives its settings.",
              highlight=False, soft_wrap=True)


@methods_app.command("show")
def methods_show(
    name: Annotated[str, typer.Argument(help="A method, e.g. dsc-ewc-dc.")],
    base: Annotated[Optional[str], typer.Option(help="Show the set this base gets (tiny, a folder or a .safetensors "
                                                     "file); default: all three sets.")] = None,
) -> None:
    """Every hyperparameter of a method with its default and its source, per defaults set: paper (SD 1.x/2.x: the
    papers' numbers), tiny (the embedded base: calibrated on the validation sequence), scale-free (other bases).

    Examples:
      edgecp methods show dsc-ewc-dc
      edgecp methods show merge-reinit --base ./sd-v1-5
    """
    # lazy: edgecp.methods and edgecp.api load torch, which `edgecp --help` must not load
    from edgecp.methods import defaults

    sets = defaults.SETS
    if base is not None:
        from edgecp.api import resolved_defaults

        sets = (resolved_defaults(base, name)[0],)
    rows = defaults.table(name)
    for dset in sets:
        t = Table(title=f"{name}: the {dset} set ({defaults.WHY[dset]})", title_justify="left")
        for col in ("setting", "value", "source"):
            t.add_column(col, overflow="fold")
        for sec, key, by_set in rows:
            st = by_set[dset]
            if st is not None:
                t.add_row(f"{sec}.{key}", esc(defaults.shown(st.value)), esc(st.source))
        out.print(t)


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
        help="Class word in the prompts: paper (000: CD and TI; 003: CNS), always or never.")] = None,
    sampler: Annotated[Optional[str], typer.Option(help="The evaluation's sampler: base (the base's own), ddim or "
                                                        "ddpm (000; the paper preset's).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch threads of every run (part of the config: every "
                                                        "executor computes the same numbers; default 2).")] = None,
    train: Annotated[Optional[list[str]], typer.Option("--train", help="A training setting of every run's store, "
                                                                      "key=value (e.g. lr=3e-4).")] = None,
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
    # lazy: edgecp.eval.bench and edgecp.eval.executor load torch, which `edgecp --help` must not load
    from edgecp.eval.bench import parse_methods, table_markdown
    from edgecp.eval.executor import make_executor

    overrides = {
        "methods": parse_methods(methods) if methods else None,
        "seeds": tuple(int(s) for s in seeds.split(",")) if seeds else None,
        "sequence": sequence, "tasks": tasks, "steps": steps, "n_gen": n_gen, "gen_steps": gen_steps,
        "base": base, "features": features, "class_word": class_word, "sampler": sampler, "threads": threads,
        "method_params": _method_params(param) if param else None,
        "train": parse_kv(train, "--train") if train else None,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    if resume is not None and (given or out_dir is not None or preset != "quick" or estimate):
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in given) or ("--out" if out_dir else "--preset/--estimate")
        raise EdgecpError(f"--resume {resume} reads the config saved in that folder: leave out {flags}")
    opts = {"address": address, "num_gpus": gpus_per_run, "num_cpus": cpus_per_run, "max_retries": retries}
    ex = make_executor(executor, **opts) if executor == "ray" else make_executor(executor)
    if estimate:
        _print_estimate(_config(preset, given))
        return
    out_dir, result = _run_bench(preset, given, out_dir, resume, ex)
    typer.echo(table_markdown(result))  # plain: a markdown table must not be wrapped at the terminal width
    out.print(f"{result['seconds']:.0f}s; results, CSV, curves, heatmaps and samples in [bold]{esc(out_dir)}[/]")


def _config(preset: str, given: dict):
    """The preset's BenchConfig with the options given on the command line."""
    # lazy: edgecp.eval.bench loads torch, which `edgecp --help` must not load
    from edgecp.eval.bench import preset as get_preset

    return dataclasses.replace(get_preset(preset), **given)


def _print_estimate(cfg) -> None:
    """`bench --estimate`: runs, device-hours and disk, from a short calibration on this device."""
    # lazy: the estimate calibrates on the model stack (torch), which `edgecp --help` must not load
    from edgecp.eval.estimate import estimate as estimate_bench
    from edgecp.eval.estimate import estimate_lines

    with progress_bars() as bar:
        e = estimate_bench(cfg, progress=lambda ev: bar(ev.phase, ev.step, ev.total))
    for line in estimate_lines(e):
        out.print(esc(line), highlight=False)


def _run_bench(preset: str, given: dict, out_dir: Path | None, resume: Path | None, ex) -> tuple[Path, dict]:
    """Run the bench (or finish the one in `resume`) with progress bars; (its folder, its result)."""
    # lazy: edgecp.eval.executor loads torch, which `edgecp --help` must not load
    from edgecp.eval.executor import resume_bench, run_bench

    with progress_bars() as bar:
        progress = lambda ev: bar("bench (runs)" if ev.phase == "runs" else "bench (tasks)", ev.step, ev.total)
        log = lambda msg: err.print(f"[dim]bench:[/] {esc(msg)}")
        if resume is not None:
            return resume, resume_bench(resume, progress=progress, log=log, executor=ex)
        cfg = _config(preset, given)
        out_dir = out_dir or Path("edgecp-bench")
        return out_dir, run_bench(cfg, out_dir, progress=progress, log=log, executor=ex)


def demo(out_dir: Annotated[Path, typer.Option("--out", help="Where the demo writes its store and images.")] = Path("edgecp-demo")) -> None:
    """The whole path on the embedded tiny model, offline: init, three concepts, generate, export, ONNX."""
    # lazy: the demo runs the model stack (torch), which `edgecp --help` must not load
    from edgecp.demo import run_demo

    with progress_bars() as bar:
        report = run_demo(out_dir, progress=bar, log=lambda msg: err.print(f"[dim]demo:[/] {esc(msg)}"))
    out.print("\n[bold]edgecp demo done[/] - everything is under " + esc(report["out"]))
    for k, v in report["paths"].items():
        out.print(f"  {k:<22} {esc(v)}")


def register(app: typer.Typer) -> None:
    app.add_typer(methods_app, name="methods")
    app.command("bench")(bench)
    app.command("demo")(demo)
