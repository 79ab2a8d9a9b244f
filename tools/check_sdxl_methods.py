"""Every method of edgecp on an SDXL layout: two concepts each (so the DC phases, the Fisher, DSC's teachers and the
merges run with an earlier concept), the forgetting check on the second, plus the 8-bit and bf16 plans.

The base is the `sdxl-mini` fixture (SDXL's structure, narrow widths): this checks that every code path carries SDXL's
conditioning, not what the methods learn. 001's rank 64 is larger than the mini fixture's attention widths, so
merge-orthogonal runs at rank 4 here.

    python tools/check_sdxl_methods.py --out docs/sdxl/methods-mini.json        # about 6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=None, help="an SDXL diffusers folder (default: a new sdxl-mini fixture)")
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", default="all")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import importlib.util

    from edgecp.api import init_store
    from edgecp.forgetting import CheckConfig
    from edgecp.methods import method_names
    from edgecp.train import add_concept
    from tests.conftest import make_photos

    work = Path(tempfile.mkdtemp(prefix="edgecp-sdxl-methods-"))
    base = args.base
    if base is None:
        spec = importlib.util.spec_from_file_location("make_sd_fixture", ROOT / "tools" / "make_sd_fixture.py")
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
        base = work / "sdxl-mini"
        tool.write_fixture(base, "sdxl-mini", log=lambda *_: None)
    photos = [make_photos(work / "a", seed=1), make_photos(work / "b", seed=2)]
    names = method_names() if args.methods == "all" else args.methods.split(",")
    runs = names + (["lora-sequential:int8", "dsc-ewc-dc:int8", "ewc-dc:bf16"] if args.methods == "all" else [])
    rows, failed = [], 0
    for run in runs:
        method, _, plan = run.partition(":")
        force = {"int8": {"weights": "int8"}, "bf16": {"weights": "bf16", "compute": "bf16"}}.get(plan)
        root = work / run.replace(":", "-")
        t0 = time.perf_counter()
        row = {"method": method, "plan": plan or "planner's", "resolution": args.resolution, "steps": args.steps}
        try:
            adapter = {"rank": 4, "alpha": 4.0} if method == "merge-orthogonal" else None
            init_store(root, str(base), method=method, adapter=adapter,
                       train={"steps": args.steps, "resolution": args.resolution, "grad_accum": 1},
                       prior={"num_images": 1, "steps": 2})
            add_concept(root, "alpha", photos[0], class_word="dog", plan_force=force, check=CheckConfig(images=0))
            m = add_concept(root, "beta", photos[1], class_word="mug", plan_force=force,
                            check=CheckConfig(images=1, steps=2))
            c = m["concepts"][-1]
            row.update(ok=True, seconds=round(time.perf_counter() - t0, 1), phases=sorted(c["seconds_per_iteration"]),
                       check_drift=m["check"]["concepts"][0]["drift"], plan_used=c["memory"]["plan"]["weights"])
        except Exception as e:  # a failure is a row of the report, with its traceback's last line
            failed += 1
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300], where=traceback.format_exc().splitlines()[-3])
        rows.append(row)
        print(f"{run}: {'ok' if row['ok'] else 'FAILED ' + row['error']} ({row.get('seconds', '-')} s)", flush=True)
    report = {"base": str(base), "runs": rows, "failed": failed}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
