"""The planner's predictions per method and budget for a base, as a markdown table (no model is loaded).

What `edgecp plan --store S --device cuda --gpu-memory G --resolution R [--memory-budget B] [--plan weights=int8]`
prints, for every method on one base: a store per method is made under `--work` (empty: the plan of the first
concept, no DSC phase yet, the DC Fisher over c_0 and c_1), then each budget is planned, and the 8-bit plan on its own.

    python tools/make_sd_fixture.py --out /tmp/sdxl --preset sdxl
    python tools/plan_table.py --base /tmp/sdxl --resolution 1024 --gpu-memory 24GB --gpu-capability 8.6 \
        --budgets 8GB,12GB,16GB,24GB --out docs/sdxl/cuda-plans-1024.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--resolution", type=int, required=True)
    ap.add_argument("--gpu-memory", default="24GB")
    ap.add_argument("--gpu-capability", default="8.6")
    ap.add_argument("--budgets", default="8GB,12GB,16GB,24GB")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgecp-plan-table"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from edgecp.api import init_store, plan_store
    from edgecp.errors import EdgecpError
    from edgecp.methods import method_names
    from edgecp.planner import GB

    methods = method_names() if args.methods == "all" else args.methods.split(",")
    budgets = args.budgets.split(",")
    shutil.rmtree(args.work, ignore_errors=True)
    rows, data = [], []
    for method in methods:
        store = args.work / method
        init_store(store, args.base, method=method)
        for budget in [*budgets, "int8"]:
            force = {"weights": "int8"} if budget == "int8" else None
            try:
                plan = plan_store(store, None if budget == "int8" else budget, {"resolution": args.resolution},
                                  n_images=4, force=force, gpu_memory=args.gpu_memory,
                                  gpu_capability=args.gpu_capability)
            except EdgecpError as e:
                rows.append(f"| {method} | {budget} | does not fit: {str(e).split(':')[0][:90]} | | |")
                data.append({"method": method, "budget": budget, "refused": str(e)})
                continue
            phases = plan.predicted
            worst = max(phases, key=phases.get)
            kind = plan.weights + (f"/{plan.backend}" if plan.backend else "")
            desc = (f"{kind}, {plan.compute} autocast, {'ckpt' if plan.gradient_checkpointing else 'no ckpt'}, "
                    f"{plan.micro_batch} x {plan.grad_accum}, DC chunk {plan.dc_chunk}, VAE {plan.vae_dtype}"
                    + (f", trained K/V in host memory ({plan.host_memory / GB:.2f} GB)" if plan.host_trained else ""))
            rows.append(f"| {method} | {budget} | {desc} | {plan.peak / GB:.2f} ({worst}) | "
                        + ", ".join(f"{k} {v / GB:.2f}" for k, v in phases.items()) + " |")
            data.append({"method": method, "budget": budget, "plan": plan.to_json()})
    head = (f"Predicted by the planner for a CUDA GPU of {args.gpu_memory}, compute capability {args.gpu_capability}, "
            f"at {args.resolution} px on `{args.base}` (a prediction: no GPU measured it). GB = 10^9 bytes. "
            "`int8`: the 8-bit plan, no budget.\n\n| method | budget | plan | peak GB (phase) | per phase GB |\n"
            "| --- | --- | --- | --- | --- |\n")
    text = head + "\n".join(rows) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
