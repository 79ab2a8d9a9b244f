#!/usr/bin/env python
"""The desktop tools' files, measured per method (issue 26): `edgecp export --format webui` (LoRA file size, the
chosen ranks, the largest relative weight error of a layer, the gate image through diffusers' loaders against
edgecp's own model, and the same image without the LoRA for scale) and `--format checkpoint` (size, the image of the
checkpoint read back as a base).

    python tools/bench_webui.py --base tiny --out /tmp/bw                       # every method, two concepts each
    python tools/bench_webui.py --base /path/sd15 --methods dsc-ewc-dc,custom-diffusion,vera-ewc-dc \\
        --steps 2 --resolution 128 --out /tmp/bw-sd15 [--store-from /tmp/bu-sd15]

Per method a store on `--base` learns the first `--concepts` photo tasks (`--steps` iterations each), or, with
`--store-from DIR`, a copy of DIR/METHOD/store is used when it exists (e.g. tools/bench_update.py's stores).
Resumable: OUT/bench_webui.json keeps the finished methods. Writes OUT/bench_webui.json and OUT/bench_webui.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--methods", default="", help="comma-separated (default: every method)")
    ap.add_argument("--concepts", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="training iterations per concept")
    ap.add_argument("--resolution", type=int, default=0, help="training resolution (0: the base's)")
    ap.add_argument("--photo-size", type=int, default=64)
    ap.add_argument("--store-from", type=Path, help="reuse DIR/METHOD/store when it exists (copied)")
    ap.add_argument("--checkpoint", default="fp16", help="checkpoint precision, or 'none' to skip it")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from edgecp.api import init_store
    from edgecp.errors import EdgecpError
    from edgecp.eval.sequences import six_tasks
    from edgecp.export.checkpoint import export_checkpoint
    from edgecp.export.webui import export_webui
    from edgecp.methods import method_names
    from edgecp.store import Store
    from edgecp.train import add_concept

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "bench_webui.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": []}
    done = {r["method"] for r in results["rows"]}
    tasks = six_tasks()[: args.concepts]
    for method in [m for m in (args.methods.split(",") if args.methods else method_names()) if m not in done]:
        work = out / method
        store = work / "store"
        src = args.store_from / method / "store" if args.store_from else None
        t0 = time.perf_counter()
        if not store.exists() and src is not None and src.exists():
            shutil.copytree(src, store)
        elif not store.exists():
            train = {"steps": args.steps, **({"resolution": args.resolution} if args.resolution else {})}
            init_store(store, args.base, method=method, train=train, prior={"num_images": 2, "steps": 2})
        for k, task in enumerate(tasks, start=1):
            if len(Store.open(store).manifest()["concepts"]) < k and not (src is not None and src.exists()):
                folder = work / "photos" / task.name / "train"
                if not folder.exists():
                    tasks[k - 1 : k].write(work / "photos", n_train=6, n_target=1, size=args.photo_size)
                add_concept(store, task.name, sorted(folder.iterdir()), class_word=task.class_word)
        trained_s = time.perf_counter() - t0
        row = {"method": method, "concepts": len(Store.open(store).manifest()["concepts"]),
               "train_seconds": round(trained_s, 1)}
        try:
            rep = export_webui(store, work / "webui", overwrite=True)
            lo, check = rep["lora"], rep["image_check"]
            row["webui"] = {"bytes": lo["bytes"], "path": lo["path"], "why": lo["why"], "layers": lo["layers"],
                            "rank_min": lo["rank_min"], "rank_max": lo["rank_max"],
                            "max_relative_error": lo["max_relative_error"], "psnr_db": check["psnr_db"],
                            "without_lora_psnr_db": check.get("without_lora_psnr_db"), "seconds": rep["seconds"]}
        except EdgecpError as e:
            row["webui"] = {"refused": str(e)}
        if args.checkpoint != "none":
            try:
                rep = export_checkpoint(store, work / "checkpoint", overwrite=True, precision=args.checkpoint)
                row["checkpoint"] = {"bytes": rep["checkpoint"]["bytes"], "precision": args.checkpoint,
                                     "psnr_db": rep["image_check"]["psnr_db"], "seconds": rep["seconds"]}
            except EdgecpError as e:
                row["checkpoint"] = {"refused": str(e)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        results_file.write_text(json.dumps(results, indent=1))
        (out / "bench_webui.md").write_text(table(results))
    (out / "bench_webui.md").write_text(table(results))


def table(results: dict) -> str:
    lines = ["| method | concepts | LoRA KB | path | ranks | largest layer error | PSNR dB (file vs edgecp) | "
             "PSNR dB without the LoRA | checkpoint MB | checkpoint PSNR dB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        w, c = r["webui"], r.get("checkpoint", {})
        ck = (f"{c['bytes'] / 1e6:.1f} | {c['psnr_db']}" if "bytes" in c else
              f"refused: {c['refused'][:80]} |" if "refused" in c else " | ")
        if "refused" in w:
            lines.append(f"| {r['method']} | {r['concepts']} | refused: {w['refused'][:120]} | | | | | | {ck} |")
            continue
        ranks = f"{w['rank_min']}" if w["rank_min"] == w["rank_max"] else f"{w['rank_min']}-{w['rank_max']}"
        lines.append(f"| {r['method']} | {r['concepts']} | {w['bytes'] / 1e3:.1f} | {w['path']} | {ranks} | "
                     f"{w['max_relative_error']:.2%} | {w['psnr_db']} | {w['without_lora_psnr_db']} | {ck} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
