"""The GPU check, ready for the first GPU at hand (issue 28): the planner's CUDA predictions against measured
`torch.cuda.max_memory_allocated`, per method and plan, at 512 px on SD1.5 and 1024 px on SDXL, the s/iteration of
the 8-bit plan against the fastest, and whether every plan stayed within its budget.

It is made for a borrowed machine (`device` tool): one command under 10 minutes, no network, a Python with torch,
peft, transformers, onnxruntime and scikit-image but not diffusers, torchao or bitsandbytes. Those come as wheels
unpacked into a folder that travels with the working tree (64 MiB in all, the tree included), which this machine
prepares:

    python tools/device_check.py --prepare .device          # here: downloads diffusers, torchao, bitsandbytes (its
                                                            # CUDA 12.6-13.2 kernels only), importlib_metadata: 29 MiB
    # on the GPU machine (the `device` tool's run, carry [".device"]):
    python tools/device_check.py --wheels .device --out $OUT --budget-seconds 540

    python tools/device_check.py --dry-run --out /tmp/dc      # here, on the CPU: the same flow on the mini fixtures

What runs, in priority order (a row is started only while its expected time fits `--budget-seconds`; rows not
reached are listed as such): the fixtures are built on the machine (`tools/make_sd_fixture.py`, random weights, SDXL
first), then for each family and method a store learns one history concept (8-bit plan, one iteration: EWC DC's
Fisher and DSC then have an earlier concept) and each row learns one more concept on a copy of it, in a fresh
process: a budget (SDXL 8 GB, the issue's target, which the planner predicts 000's methods fit at 1024 px with the
8-bit plan; SD1.5 4 GB: the planner's choice within it), `int8-bnb` (the 8-bit plan through bitsandbytes, pinned,
checkpointing: the backend the planner no longer picks on CUDA, measured against torchao's) or `int8` (the 8-bit
plan, torchao), and `none` (no budget: the fastest plan that fits the card). Each row
records the plan, the predicted and the measured peak per phase (the manifest's `memory`, which on CUDA is
`max_memory_allocated`), s/iteration per phase and whether the measured peak stayed within the budget.
The report is `OUT/device-check.json` and `OUT/device-check.md`, written after every row, so a run stopped by its
limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CARRIED = ["diffusers==0.42.1", "torchao==0.18.0", "bitsandbytes==0.50.2", "importlib_metadata", "zipp"]
BNB_KEEP = ("cuda126", "cuda128", "cuda130", "cuda132")  # torch's CUDA builds; all kernels would not fit in 64 MiB

FAMILIES = {  # family: (fixture preset, resolution), real sizes and their mini stand-ins for --dry-run
    "sdxl": ("sdxl", 1024), "sd15": ("sd15", 512),
}
DRY = {"sdxl": ("sdxl-mini", 64), "sd15": ("sd15-mini", 64)}
# custom-diffusion last: at SDXL's 8 GB its plan keeps the trained K/V in host memory (host_trained), a path no GPU ran
METHODS = ("dsc-ewc-dc", "lora-sequential", "ewc-dc", "custom-diffusion")
ROWS = {"sdxl": ("8GB", "int8-bnb", "none"), "sd15": ("int8", "4GB", "none")}  # in the order they run
FORCE = {"int8": {"weights": "int8", "gradient_checkpointing": True},
         "int8-bnb": {"weights": "int8", "backend": "bitsandbytes", "gradient_checkpointing": True}}


def rows_of(family: str, dry_run: bool) -> tuple[str, ...]:
    """The family's rows; a dry run on the CPU takes torchao's `int8` for `int8-bnb` (bitsandbytes trains on CUDA)."""
    return tuple("int8" if dry_run and r == "int8-bnb" else r for r in ROWS[family])


# -- preparing the carried folder (this machine, with PyPI) ----------------------------------------------------
def prepare(folder: Path) -> None:
    """Download the carried wheels into `folder`, bitsandbytes' repacked with only the kernels of BNB_KEEP. They travel
    zipped (unpacked they would be 95 MiB) and are unpacked on the machine by `unpack`."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.11", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_24_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(folder), *CARRIED], check=True)
    for whl in sorted(folder.glob("bitsandbytes-*.whl")):
        slim = whl.with_suffix(".slim")
        with zipfile.ZipFile(whl) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                name = info.filename
                if name.startswith("bitsandbytes/libbitsandbytes_") and not any(k in name for k in BNB_KEEP):
                    continue  # ROCm, XPU and the CUDA builds torch does not ship for
                dst.writestr(info, src.read(info))
        slim.replace(whl)
    size = sum(f.stat().st_size for f in folder.glob("*.whl"))
    print(f"{folder}: {size / 2**20:.1f} MiB of wheels (carry the folder; add '{folder.name}/' to .git/info/exclude)")


def unpack(folder: Path, site: Path) -> None:
    """The carried wheels into `site`, first on sys.path and on the children's PYTHONPATH (no pip, no network)."""
    site.mkdir(parents=True, exist_ok=True)
    for whl in sorted(folder.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])


# -- one row, in a fresh process ---------------------------------------------------------------------------------
def child(args) -> None:
    """Learn one concept on `args.store` with the row's plan; print the manifest's memory and speed as JSON."""
    from edgecp.forgetting import CheckConfig
    from edgecp.train import add_concept

    force = FORCE.get(args.row)
    budget = None if args.row in (*FORCE, "none") else args.row
    m = add_concept(args.store, args.name, sorted(Path(args.photos).glob("*.png")), class_word="dog",
                    device=args.device, memory_budget=budget, plan_force=force, check=CheckConfig(images=0),
                    overrides={"steps": args.steps, "batch_size": 1, "grad_accum": 1})
    c = m["concepts"][-1]
    print("ROW " + json.dumps({"memory": c["memory"], "seconds_per_iteration": c["seconds_per_iteration"],
                               "seconds": c["seconds"]}))


def _tool(name: str):
    """A sibling script of tools/ as a module (make_sd_fixture's presets, bench_memory's photos)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _spawn(argv: list[str], timeout: float) -> tuple[dict | None, float, str]:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                           env=env, timeout=max(10.0, timeout))
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0, "timed out"
    rows = [line[4:] for line in p.stdout.splitlines() if line.startswith("ROW ")]
    if p.returncode or not rows:
        return None, time.perf_counter() - t0, (p.stdout + p.stderr)[-1500:]
    return json.loads(rows[-1]), time.perf_counter() - t0, ""


def environment(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device, "python": sys.version.split()[0]}
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory=p.total_memory, capability=f"{p.major}.{p.minor}")
    for mod in ("diffusers", "torchao", "bitsandbytes", "peft", "transformers", "onnxruntime"):
        try:
            m = __import__(mod)
            info[mod] = m.__version__
            info[f"{mod}_from"] = str(Path(m.__file__).parent.parent)  # the carried site or the machine's own
        except Exception as e:  # a row that needs it fails with its own line; the report says why here
            info[mod] = f"not importable: {type(e).__name__}: {str(e)[:120]}"
    return info


def run(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from edgecp.api import init_store

    fixture = _tool("make_sd_fixture")
    photos_of = _tool("bench_memory")._photos  # 3 random 320 px photos per seed, as bench_memory learns them
    t_start = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    work = Path(args.work or tempfile.mkdtemp(prefix="edgecp-device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "dry_run": args.dry_run, "rows_per_family": ROWS,
              "budget_seconds": args.budget_seconds, "rows": [], "not_reached": [], "fixtures": {}}
    photos = [photos_of(work / f"photos{i}", 3, i) for i in range(2)]
    sizes = DRY if args.dry_run else FAMILIES
    last_row = 0.0
    for family in args.families.split(","):
        preset, resolution = sizes[family]
        base = work / preset
        if not base.exists():
            t0 = time.perf_counter()
            counts = fixture.write_fixture(base, preset, log=lambda *_: None)
            report["fixtures"][preset] = {"seconds": round(time.perf_counter() - t0, 1), "parameters": counts}
        for method in args.methods.split(","):
            left = args.budget_seconds - (time.perf_counter() - t_start)
            if left < 3 * last_row:
                report["not_reached"] += [f"{family} {method} {row}" for row in rows_of(family, args.dry_run)]
                continue
            hist = work / f"{family}-{method}"
            shutil.rmtree(hist, ignore_errors=True)
            init_store(hist, str(base), method=method, train={"resolution": resolution, "steps": 1},
                       prior={"num_images": 1, "steps": 2})
            res, sec, err = _spawn(["--child", "--store", str(hist), "--name", "c0", "--photos", str(photos[0]),
                                    "--row", "int8", "--steps", "1", "--device", device], left)
            if res is None:
                report["rows"].append({"family": family, "method": method, "row": "history", "error": err})
                _write(report, args.out)
                continue
            for row in rows_of(family, args.dry_run):
                left = args.budget_seconds - (time.perf_counter() - t_start)
                if left < 1.2 * max(last_row, sec):
                    report["not_reached"].append(f"{family} {method} {row}")
                    continue
                store = work / f"{family}-{method}-{row}"
                shutil.rmtree(store, ignore_errors=True)
                shutil.copytree(hist, store)
                res, last_row, err = _spawn(["--child", "--store", str(store), "--name", "new", "--photos",
                                             str(photos[1]), "--row", row, "--steps", str(args.steps), "--device",
                                             device], left)
                entry = {"family": family, "method": method, "row": row, "resolution": resolution,
                         "wall_seconds": round(last_row, 1)}
                if res is None:
                    entry["error"] = err
                else:
                    mem = res["memory"]
                    plan = mem["plan"]
                    entry.update(
                        plan={k: plan.get(k) for k in ("weights", "backend", "compute", "gradient_checkpointing",
                                                       "micro_batch", "dc_chunk", "offload")},
                        budget=plan.get("budget"), predicted_peak=mem["predicted_peak"],
                        measured_peak=mem["measured_peak"], measure=mem.get("measure"),
                        ratio=round(mem["measured_peak"] / mem["predicted_peak"], 3),
                        within_budget=plan.get("budget") is None or mem["measured_peak"] <= plan["budget"],
                        predicted_phases=plan.get("predicted"), measured_phases=mem.get("measured_phases"),
                        cuda_terms=plan.get("cuda_terms"), seconds_per_iteration=res["seconds_per_iteration"])
                report["rows"].append(entry)
                _write(report, args.out)
                print(f"[{time.perf_counter() - t_start:.0f} s] {family} {method} {row}: "
                      + (entry.get("error", "")[-200:] if "error" in entry else
                         f"measured {entry['measured_peak'] / 1e9:.2f} GB, predicted {entry['predicted_peak'] / 1e9:.2f}"
                         f" GB, {entry['seconds_per_iteration']}"), flush=True)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    _write(report, args.out)
    return report


def _write(report: dict, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "device-check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "device-check.md").write_text(table(report) + "\n")


def table(report: dict) -> str:
    env = report["environment"]
    lines = [f"device check on {env.get('gpu', env['device'])} (torch {env['torch']}, CUDA {env.get('cuda')})"
             + (" - DRY RUN on the CPU, mini fixtures: plumbing only" if report["dry_run"] else ""), "",
             "| family | method | row | plan | predicted GB | measured GB | measured/predicted | within budget | "
             "s/it train | s/it fisher | s/it dsc |", "|" + "---|" * 11]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['family']} | {r['method']} | {r['row']} | FAILED: {r['error'][-120:]!r} |")
            continue
        p, s = r["plan"], r["seconds_per_iteration"]
        plan = f"{p['weights']}{'/' + p['backend'] if p['backend'] else ''}, {'ckpt' if p['gradient_checkpointing'] else 'no ckpt'}"
        lines.append(f"| {r['family']} | {r['method']} | {r['row']} | {plan} | {r['predicted_peak'] / 1e9:.2f} | "
                     f"{r['measured_peak'] / 1e9:.2f} | {r['ratio']:.2f} | {'yes' if r['within_budget'] else 'NO'} | "
                     f"{s.get('train', '-')} | {s.get('fisher', '-')} | {s.get('dsc', '-')} |")
    if report["not_reached"]:
        lines += ["", "not reached within the time budget: " + ", ".join(report["not_reached"])]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", type=Path, help="download the carried wheels into this folder, then stop")
    ap.add_argument("--wheels", type=Path, default=None, help="unpack the wheels `--prepare` made, then run")
    ap.add_argument("--dry-run", action="store_true", help="the CPU and the mini fixtures: the flow, not the figures")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="fixtures and stores (default: a new temporary folder)")
    ap.add_argument("--families", default="sdxl,sd15")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=3, help="training iterations of a measured row")
    ap.add_argument("--budget-seconds", type=float, default=540.0, help="start no row that would end past this")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--photos", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
    elif args.child:
        child(args)
    else:
        if args.wheels:
            unpack(args.wheels, Path(tempfile.mkdtemp(prefix="edgecp-site-")))
        report = run(args)
        print(table(report))


if __name__ == "__main__":
    main()
