#!/usr/bin/env python
"""Concept updates of an export, measured (issue 25): bytes per concept against the full export, session opening,
generation time, peak RSS on the device side, the image gate, and the update path's image against the full export's.

    python tools/bench_update.py --base tiny --out /tmp/bu
    python tools/bench_update.py --base /path/sd15 --methods lora-sequential --profiles cpu-fp32 --steps 2 \\
        --resolution 128 --device-at 6 --out /tmp/bu-sd15

Per method: a store on `--base` learns the six photo tasks one by one (`--steps` iterations each: the bytes of an
update depend on which tensors a method changes, not on how long it trained; say so when quoting). Per profile: the
base export is made of v0000 (the empty store, what a device holds first); after each concept, `edgecp export
--update-for BASE` writes that version's update, relative to the base, never chained. At the concepts in
`--device-at`, the full export of the version is made too, and a fresh process per side opens it (plain full
export, and base + update) and draws one image (`--size`, `--gen-steps`), measuring the seconds to open the
sessions, the seconds per image and the peak RSS (`resource.getrusage`); the two images are compared pixel by
pixel. Writes OUT/bench_update.json and OUT/bench_update.md. What else ran on the machine is not measured: run it
alone for timings, or re-run only the device side alone afterwards:

    python tools/bench_update.py --methods lora-sequential --reprobe cpu-fp32=6 --repeats 2 --size 256 \
        --gen-steps 5 --out /tmp/bu-sd15
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
PROMPT = "a photo of <{}> {}"


def probe(args) -> None:
    """The device side in this (fresh) process: open the sessions, draw one image; JSON on stdout."""
    from edgecp.export.ort_runner import OnnxStableDiffusion
    from edgecp.export.update_format import open_update
    from edgecp.integrity import read_export_meta

    t0 = time.perf_counter()  # what `edgecp generate --backend onnx` checks first: every file's sha256
    meta, problems = read_export_meta(args.onnx_dir)
    assert not problems, problems
    update = open_update(args.onnx_dir, args.update, base_meta=meta) if args.update else None
    verified = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipe = OnnxStableDiffusion(args.onnx_dir, providers=["CPUExecutionProvider"], update=update)
    opened = time.perf_counter() - t0
    t1 = time.perf_counter()
    img = pipe([args.prompt], steps=args.gen_steps, seed=0, height=args.size, width=args.size)[0]
    image_s = time.perf_counter() - t1
    img.save(args.png)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"verify_s": round(verified, 3), "open_s": round(opened, 3), "image_s": round(image_s, 3),
                      "peak_rss": peak}))


def run_probe(onnx_dir: Path, update: Path | None, prompt: str, size: int, gen_steps: int, png: Path) -> dict:
    cmd = [sys.executable, __file__, "--probe", "--onnx-dir", str(onnx_dir), "--prompt", prompt, "--size", str(size),
           "--gen-steps", str(gen_steps), "--png", str(png)] + (["--update", str(update)] if update else [])
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--onnx-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--update", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--prompt", default="a photo", help=argparse.SUPPRESS)
    ap.add_argument("--png", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--methods", default="dsc-ewc-dc,lora-sequential,custom-diffusion")
    ap.add_argument("--profiles", default="cpu-fp32,cuda-fp16,edge-int8")
    ap.add_argument("--concepts", type=int, default=6)
    ap.add_argument("--limit", default="", help="PROFILE=N,...: updates of that profile for concepts 1..N only")
    ap.add_argument("--steps", type=int, default=20, help="training iterations per concept")
    ap.add_argument("--resolution", type=int, default=0, help="training resolution (0: the base's)")
    ap.add_argument("--grad-accum", type=int, default=0, help="gradient accumulation (0: the store's default)")
    ap.add_argument("--device-at", default="1,6", help="concepts after which the device side is measured")
    ap.add_argument("--size", type=int, default=0, help="image side for the device measurement (0: the base's)")
    ap.add_argument("--gen-steps", type=int, default=10)
    ap.add_argument("--photo-size", type=int, default=64, help="side of the task photos written for training")
    ap.add_argument("--reprobe", default="", help="PROFILE=K: only the device side again, for concept K's full "
                    "export and update already in OUT (run it alone), `--repeats` times per side")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.probe:
        return probe(args)
    if args.out is None:
        ap.error("--out is required")
    if args.reprobe:
        return reprobe(args)

    from edgecp.api import init_store
    from edgecp.errors import EdgecpError
    from edgecp.eval.sequences import six_tasks
    from edgecp.export.onnx_export import export_onnx
    from edgecp.store import Store
    from edgecp.train import add_concept

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "bench_update.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"rows": [], "device": []}
    done = {(r["method"], r["profile"], r["concept"]) for r in results["rows"]}
    profiles = args.profiles.split(",")
    device_at = {int(k) for k in args.device_at.split(",") if k}
    limit = {p: int(n) for p, n in (x.split("=") for x in args.limit.split(",") if x)}
    tasks = six_tasks()[: args.concepts]

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=1))
        (out / "bench_update.md").write_text(table(results))

    for method in args.methods.split(","):
        work = out / method
        store = work / "store"
        train = {"steps": args.steps, **({"resolution": args.resolution} if args.resolution else {}),
                 **({"grad_accum": args.grad_accum} if args.grad_accum else {})}
        if not store.exists():
            init_store(store, args.base, method=method, train=train, prior={"num_images": 2, "steps": 2})
        base = {}
        for profile in profiles:
            base[profile] = work / f"base-{profile}"
            if not base[profile].exists():
                if Store.open(store).manifest()["concepts"]:  # the base export is v0000's, the empty store's
                    raise SystemExit(f"{method}: no base export for {profile} and the store already has concepts: "
                                     "a new profile needs a new --out (the base is made of the empty store)")
                t0 = time.perf_counter()
                export_onnx(store, profile, base[profile])
                print(f"{method} {profile}: base export {time.perf_counter() - t0:.0f} s", flush=True)
        for k, task in enumerate(tasks, start=1):
            if len(Store.open(store).manifest()["concepts"]) < k:
                folder = work / "photos" / task.name / "train"
                if not folder.exists():
                    tasks[k - 1 : k].write(work / "photos", n_train=6, n_target=1, size=args.photo_size)
                t0 = time.perf_counter()
                add_concept(store, task.name, sorted(folder.iterdir()), class_word=task.class_word)
                print(f"{method}: concept {k} ({task.name}) {time.perf_counter() - t0:.0f} s", flush=True)
            for profile in profiles:
                if (method, profile, k) in done or k > limit.get(profile, k):
                    continue
                upd = work / f"{profile}-v{k:04d}-update"
                t0 = time.perf_counter()
                try:
                    report = export_onnx(store, profile, upd, update_for=base[profile], overwrite=True)
                except EdgecpError as e:  # the gate refused the base's variant for this version: recorded, not fatal
                    results["rows"].append({"method": method, "profile": profile, "concept": k, "refused": str(e),
                                            "seconds": round(time.perf_counter() - t0, 1)})
                    done.add((method, profile, k))
                    print(f"{method} {profile} concept {k}: refused: {e}", flush=True)
                    save()
                    continue
                u = report["update"]
                row = {"method": method, "profile": profile, "concept": k, "update_bytes": u["bytes"],
                       "full_export_bytes": u["full_export_bytes"], "fraction": u["fraction"],
                       "models": u["models"], "carried_files": u["carried_files"], "why": u["why"],
                       "gate_psnr_db": report["image_gate"]["psnr_db"], "quantization": report.get("quantization"),
                       "seconds": round(time.perf_counter() - t0, 1)}
                if k in device_at or k == limit.get(profile):
                    full = work / f"full-{profile}-v{k:04d}"
                    export_onnx(store, profile, full, overwrite=True)
                    size = args.size or 0
                    meta = json.loads((full / "edgecp.json").read_text())
                    size = size or meta["image_gate"]["size"][0]
                    prompt = PROMPT.format(task.name, task.class_word)
                    sides = {}
                    for side, folder, update in (("full", full, None), ("base+update", base[profile], upd)):
                        sides[side] = run_probe(folder, update, prompt, size, args.gen_steps,
                                                work / f"{profile}-v{k:04d}-{side}.png")
                    from PIL import Image

                    a = np.asarray(Image.open(work / f"{profile}-v{k:04d}-full.png"), dtype=np.int16)
                    b = np.asarray(Image.open(work / f"{profile}-v{k:04d}-base+update.png"), dtype=np.int16)
                    row["device"] = {**sides, "size": size, "gen_steps": args.gen_steps,
                                     "max_pixel_diff": int(np.abs(a - b).max()),
                                     "full_folder_bytes": dir_bytes(full)}
                results["rows"].append(row)
                done.add((method, profile, k))
                print(f"{method} {profile} concept {k}: update {u['bytes'] / 1e6:.2f} MB = "
                      f"{100 * u['fraction']:.2f}% of {u['full_export_bytes'] / 1e6:.1f} MB, gate "
                      f"{row['gate_psnr_db']} dB" + (f", device {row['device']}" if "device" in row else ""),
                      flush=True)
                save()
    save()


def reprobe(args) -> None:
    """The device side of concept K again (alone, `--repeats` per side), into OUT/bench_update.json's "reprobes"."""
    from PIL import Image

    from edgecp.eval.sequences import six_tasks

    profile, k = args.reprobe.split("=")
    k = int(k)
    out = args.out.resolve()
    results_file = out / "bench_update.json"
    results = json.loads(results_file.read_text())
    task = six_tasks()[k - 1]
    prompt = PROMPT.format(task.name, task.class_word)
    for method in args.methods.split(","):
        work = out / method
        sides: dict = {}
        for _ in range(args.repeats):
            for side, folder, update in (("full", work / f"full-{profile}-v{k:04d}", None),
                                         ("base+update", work / f"base-{profile}", work / f"{profile}-v{k:04d}-update")):
                png = work / f"reprobe-{profile}-v{k:04d}-{side}.png"
                sides.setdefault(side, []).append(run_probe(folder, update, prompt, args.size or 256, args.gen_steps, png))
        a, b = (np.asarray(Image.open(work / f"reprobe-{profile}-v{k:04d}-{s}.png"), dtype=np.int16)
                for s in ("full", "base+update"))
        row = {"method": method, "profile": profile, "concept": k, "size": args.size or 256,
               "gen_steps": args.gen_steps, **sides, "max_pixel_diff": int(np.abs(a - b).max())}
        results.setdefault("reprobes", []).append(row)
        print(json.dumps(row), flush=True)
        results_file.write_text(json.dumps(results, indent=1))


def table(results: dict) -> str:
    lines = ["| method | profile | concept | update MB | full export MB | % of full | UNet tensors | gate dB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if "refused" in r:
            lines.append(f"| {r['method']} | {r['profile']} | {r['concept']} | refused: {r['refused'][:150]} | | | | |")
            continue
        unet = r["models"].get("unet", {})
        lines.append(f"| {r['method']} | {r['profile']} | {r['concept']} | {r['update_bytes'] / 1e6:.2f} | "
                     f"{r['full_export_bytes'] / 1e6:.1f} | {100 * r['fraction']:.2f} | "
                     f"{unet.get('tensors', 0)} of {unet.get('of', 0)} | {r['gate_psnr_db']} |")
    dev = [r for r in results["rows"] if "device" in r]
    if dev:
        lines += ["", "| method | profile | concept | side | verify s | open s | s / image | peak RSS MB | max pixel diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in dev:
            for side in ("full", "base+update"):
                d = r["device"][side]
                lines.append(f"| {r['method']} | {r['profile']} | {r['concept']} | {side} | {d['verify_s']:.2f} | "
                             f"{d['open_s']:.2f} | "
                             f"{d['image_s']:.2f} | {d['peak_rss'] / 1e6:.0f} | {r['device']['max_pixel_diff']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
