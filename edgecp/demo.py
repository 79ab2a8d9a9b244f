"""`edgecp demo`: the whole user path on the embedded tiny model, offline, in a few minutes on a CPU.

The "user's photos" are scikit-image's bundled photos (Chelsea the cat, the coffee cup, the rocket), each cut into
a few augmented views, written to OUT/photos/ as a user would have them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from edgecp.api import init_store
from edgecp.errors import EdgecpError
from edgecp.generate import GenerateConfig, generate_from_onnx, generate_from_store
from edgecp.train import add_concept

MARKER = ".edgecp-demo"
CONCEPTS = [("cat", "chelsea", "cat"), ("mug", "coffee", "mug"), ("rocket", "rocket", "rocket")]
PROMPTS = ["a photo of <cat>", "a photo of <cat> cat. Posing with <mug> mug"]


def write_demo_photos(folder: Path, image_name: str, views: int = 4, seed: int = 0) -> list[Path]:
    """Random crops (60-100% of the shorter side) and mirror flips of one bundled scikit-image photo, as JPEGs."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(getattr(data, image_name)()).convert("RGB")
    folder.mkdir(parents=True, exist_ok=True)
    w, h = im.size
    paths = []
    for i in range(views):
        side = int(min(w, h) * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        view = im.crop((x, y, x + side, y + side)).resize((128, 128), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        p = folder / f"{image_name}-{i}.jpg"
        view.save(p, quality=92)
        paths.append(p)
    return paths


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise EdgecpError(f"'{out}' exists and was not made by `edgecp demo`: pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by edgecp demo; safe to delete\n")


def run_demo(out: str | Path = "edgecp-demo", steps: int | None = None, gen_steps: int = 20,
             progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the demo into `out` (new, empty, or an earlier demo's folder, which is replaced): a store on the tiny
    base, the three concepts learned one after the other (the last with `purge_source`), images from PyTorch,
    an ONNX export (cpu-fp32) and images from onnxruntime. Writes OUT/demo-report.json and returns that summary."""
    # lazy: the export imports onnxruntime, the [runtime] extra, which edgecp[train] does not install
    from edgecp.export.onnx_export import export_onnx

    say = log or (lambda _m: None)
    bar = progress or (lambda *a, **k: None)
    out = Path(out).resolve()
    t0 = time.perf_counter()
    _prepare_out(out)
    store = out / "store"
    method = init_store(store, "tiny").info["method"]["name"]
    say(f"created store {store} on the embedded tiny model, method {method} (paper 000's, the default)")

    timings = {}
    for i, (name, image, word) in enumerate(CONCEPTS):
        photos = write_demo_photos(out / "photos" / name, image, seed=i)
        purge = i == len(CONCEPTS) - 1  # the last one also deletes the user's files after the commit
        t = time.perf_counter()
        m = add_concept(store, name, photos, class_word=word, purge_source=purge,
                        overrides={"steps": steps} if steps else None,
                        progress=lambda ev, n=name: bar(f"learn <{n}>" if ev.phase == "train" else ev.phase,
                                                        ev.step, ev.total, ev.loss))
        timings[name] = round(time.perf_counter() - t, 1)
        staged = list((store / "staging").rglob("*")) if (store / "staging").exists() else []
        left = [p for p in photos if p.exists()]
        say(f"learned <{name}> -> {m['version']}; staged copies left: {len(staged)}; "
            f"source photos left: {len(left)}/{len(photos)}{' (--purge-source)' if purge else ''}")

    gcfg = GenerateConfig(n=4, seed=0, steps=gen_steps)
    images = out / "images"
    paths = {}
    for j, prompt in enumerate(PROMPTS):
        files = generate_from_store(store, prompt, gcfg, images, callback=lambda ev, j=j: bar(f"torch prompt {j + 1}", ev.step, ev.total))
        paths[f"torch grid {j + 1}"] = files[-1]
        say(f"generated '{prompt}' with PyTorch -> {files[-1]}")

    report = export_onnx(store, "cpu-fp32", out / "onnx-cpu-fp32", progress=lambda ev: bar(ev.phase, ev.step, ev.total))
    worst = max(r["max_abs_diff"] for r in report["models"].values())
    say(f"exported ONNX (cpu-fp32) to {report['out']}; max |onnx - torch| = {worst:.2e}")
    for j, prompt in enumerate(PROMPTS):
        files = generate_from_onnx(report["out"], prompt, gcfg, images, callback=lambda ev, j=j: bar(f"onnx prompt {j + 1}", ev.step, ev.total))
        paths[f"onnx grid {j + 1}"] = files[-1]
        say(f"generated '{prompt}' with onnxruntime -> {files[-1]}")

    summary = {"out": str(out), "store": str(store), "method": method, "seconds": round(time.perf_counter() - t0, 1),
               "learn_seconds": timings, "export_max_abs_diff": worst,
               "paths": {"store": str(store), "photos": str(out / "photos"), "onnx export": report["out"],
                         **{k: str(v) for k, v in paths.items()}}}
    (out / "demo-report.json").write_text(json.dumps(summary, indent=2))
    summary["paths"]["report"] = str(out / "demo-report.json")
    return summary
