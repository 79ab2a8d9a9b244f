"""Peak memory and s/iteration of `edgecp add-concept` per method and plan, predicted vs measured.

Every measured row is a fresh `edgecp add-concept` process (the CLI, as a user runs it), so its peak is that
process's own: `ru_maxrss` of the child on the CPU, `torch.cuda.max_memory_allocated` (recorded in the manifest) on
CUDA. The store first learns `--history` concepts (so that EWC DC's Fisher call holds its full k = 5 concepts and
DSC has teachers); each measured row then learns one more concept on a copy of that store. The forgetting check is
off (`--check-images 0`): it runs after training, loads two more models, and is not what the plan budgets.

    python tools/make_sd_fixture.py --out /tmp/sd15
    python tools/bench_memory.py --base /tmp/sd15 --resolution 256 --rows none,int8 --out docs/memory/cpu-256.json
    python tools/bench_memory.py --base /tmp/sd15 --resolution 512 --device cuda --rows none,3GB,4GB,6GB,8GB,int8

A row is `none` (no budget: the fastest plan that fits the device), a budget such as `3GB`, `fp32` (full-precision
weights, the planner's fastest such plan), `int8` (the 8-bit plan: weights pinned to int8 with gradient checkpointing; the planner sizes the rest) or `int8-host` (the 8-bit plan with the trained base weights in host memory:
Custom Diffusion and CNS). s/iteration is one batch-1, accumulation-1 training step
(the peak does not depend on the accumulation), and one Fisher / DSC iteration.

`--compute fp32` pins fp32 compute in every row and in the history (`--plan compute=fp32`: the 8-bit rows then run
8-bit Linears without autocast, a plan the planner predicts but does not offer). For CPUs without native bf16, where
bf16 autocast is emulated: Custom Diffusion's first concept on the SDXL fixture at 256 px had not finished after 38
minutes in bf16 on an AVX2 machine.

    python tools/bench_memory.py --base /tmp/sdxl --methods custom-diffusion --rows int8,int8-host --history 0 \
        --compute fp32 --prior-steps 2 --out docs/sdxl/host-trained-cpu-256.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EDGECP = [sys.executable, "-c", "from edgecp.cli import main; main()"]


def _photos(folder: Path, n: int, seed: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _run(args: list[str], env: dict) -> tuple[int, float, str]:
    """(peak RSS bytes of the child, wall seconds, output); raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(EDGECP + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"edgecp {' '.join(args)} failed ({proc.returncode}):\n{out[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, out


def _row_flags(row: str) -> list[str]:
    if row == "none":
        return []
    if row == "int8":  # the 8-bit plan family at its smallest: checkpointing on, the planner sizes the rest
        return ["--plan", "weights=int8", "--plan", "gradient_checkpointing=true"]
    if row == "int8-host":  # the same, the trained base weights in host memory (Custom Diffusion, CNS)
        return ["--plan", "weights=int8", "--plan", "gradient_checkpointing=true", "--plan", "host_trained=true"]
    if row == "fp32":  # the full-precision plan (what edgecp did before it had a planner), fastest settings
        return ["--plan", "weights=fp32"]
    return ["--memory-budget", row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a diffusers folder (tools/make_sd_fixture.py writes one)")
    ap.add_argument("--methods", default="lora-sequential,ewc-dc,dsc-ewc-dc")
    ap.add_argument("--rows", default="none,int8", help="comma-separated: none, int8, or budgets like 3GB")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--history", type=int, default=3, help="concepts learned before the measured one")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgecp-bench-memory"))
    ap.add_argument("--out", type=Path, default=None, help="JSON results")
    ap.add_argument("--prior-steps", type=int, default=None,
                    help="sampling steps of the one prior image (default: the defaults set's, 50 on SD bases)")
    ap.add_argument("--compute", choices=["fp32", "bf16", "fp16"], default=None,
                    help="pin the compute precision in every row and the history (default: the planner's)")
    args = ap.parse_args()
    pin = ["--plan", f"compute={args.compute}"] if args.compute else []

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    photos = [_photos(args.work / f"photos{i}", 3, i) for i in range(args.history + 1)]
    train = [f"resolution={args.resolution}", f"steps={args.steps}", "batch_size=1", "grad_accum=1"]
    results = []
    methods = args.methods.split(",")
    rows = args.rows.split(",")
    total = len(methods) * (len(rows) + args.history)
    done, t_all = 0, time.perf_counter()
    for method in methods:
        base_store = args.work / f"{method}-history"
        if args.prior_steps is None:
            init = ["init", str(base_store), "--base", args.base, "--method", method, "--prior-images", "1"]
            for t in train:
                init += ["--train", t]
            _run(init, env)
        else:  # the CLI has no flag for the prior's sampling steps: the library's init, in a child as well
            code = ("import json, sys; from edgecp.api import init_store; init_store(sys.argv[1], sys.argv[2], "
                    "method=sys.argv[3], train={k: json.loads(v) for k, v in (kv.split('=') for kv in sys.argv[5:])}, "
                    "prior={'num_images': 1, 'steps': int(sys.argv[4])})")
            subprocess.run([sys.executable, "-c", code, str(base_store), args.base, method, str(args.prior_steps),
                            *train], env=env, check=True, capture_output=True)
        for i in range(args.history):  # build the history with the smallest plan, quickly
            _run(["add-concept", f"c{i}", str(photos[i]), "--store", str(base_store), "--class-word", "dog",
                  "--steps", "1", "--device", args.device, "--plan", "weights=int8", "--check-images", "0", *pin], env)
            done += 1
            _progress(done, total, t_all, f"{method}: history {i + 1}/{args.history}")
        for row in rows:
            store = args.work / f"{method}-{row}"
            shutil.rmtree(store, ignore_errors=True)
            shutil.copytree(base_store, store)
            rss, wall, out = _run(["add-concept", "new", str(photos[-1]), "--store", str(store), "--class-word", "dog",
                                   "--device", args.device, "--check-images", "0", *_row_flags(row), *pin], env)
            head = (store / "HEAD").read_text().strip()
            manifest = json.loads((store / "versions" / head / "manifest.json").read_text())
            c = manifest["concepts"][-1]
            mem = c["memory"]
            measured = mem["measured_peak"] if args.device == "cuda" else rss
            plan = mem["plan"]
            result = {
                "method": method, "row": row, "device": args.device, "resolution": args.resolution,
                "plan": {k: plan.get(k) for k in ("weights", "backend", "compute", "gradient_checkpointing", "micro_batch",
                                                  "grad_accum", "dc_chunk", "host_trained", "host_memory")},
                "predicted_peak": mem["predicted_peak"], "measured_peak": measured,
                "ratio": round(measured / mem["predicted_peak"], 3), "predicted_phases": plan["predicted"],
                "measured_phases": mem["measured_phases"], "budget": plan["budget"],
                "within_budget": plan["budget"] is None or measured <= plan["budget"],
                "seconds_per_iteration": c["seconds_per_iteration"], "wall_seconds": round(wall, 1),
            }
            results.append(result)
            done += 1
            _progress(done, total, t_all, f"{method} {row}: measured {measured / 1e9:.2f} GB, predicted "
                      f"{mem['predicted_peak'] / 1e9:.2f} GB, {c['seconds_per_iteration']}")
    print(table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


def _progress(done: int, total: int, t0: float, what: str) -> None:
    elapsed = time.perf_counter() - t0
    eta = elapsed / done * (total - done)
    print(f"[{done}/{total} {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min] {what}", flush=True)


def table(results: list[dict]) -> str:
    lines = ["| method | row | plan | predicted GB | measured GB | measured/predicted | within budget | "
             "s/it train | s/it fisher | s/it dsc |", "|" + "---|" * 10]
    for r in results:
        p = r["plan"]
        plan = (f"{p['weights']}{'/' + p['backend'] if p['backend'] else ''}, "
                f"{'ckpt' if p['gradient_checkpointing'] else 'no ckpt'}, mb {p['micro_batch']}, chunk {p['dc_chunk']}")
        s = r["seconds_per_iteration"]
        lines.append(f"| {r['method']} | {r['row']} | {plan} | {r['predicted_peak'] / 1e9:.2f} | "
                     f"{r['measured_peak'] / 1e9:.2f} | {r['ratio']:.2f} | {'yes' if r['within_budget'] else 'NO'} | "
                     f"{s.get('train', '-')} | {s.get('fisher', '-')} | {s.get('dsc', '-')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
