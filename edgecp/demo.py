"""`edgecp demo`: the whole user path on the embedded tiny model, offline, in a few minutes on a CPU.

What the tiny model can draw (said first by the demo): it was trained from scratch on a synthetic world of 64-px
pictures (coloured shapes with stripes, dots, checks and rings on pale backgrounds, and crops of a few bundled
photos), so it draws flat shapes and colours, not photographs. A concept made of those things is learned visibly;
a photo of a cat is learned as its colours and rough layout only.

The "user's photos": a toy (a yellow star with blue stripes, drawn by the benchmark's procedural source: what the
tiny world can learn), then scikit-image's bundled photos of Chelsea the cat and the coffee cup (what it cannot
draw), each cut into a few views, written to OUT/photos/ as a user would have them. The demo writes:
- OUT/learning.png: per concept, its training views, what the model drew for "a photo of a <class>" before the
  concept, and what it draws for "a photo of <concept>" after (same seeds);
- OUT/samples/: the toy's samples while it learns (`--sample-every`), the iteration in each file name;
- OUT/forgetting-check.png: the forgetting check after the last concept (earlier concepts, before and after).
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
from edgecp.generate import GenerateConfig, generate_from_onnx, generate_from_store, torch_generate
from edgecp.personal import PersonalModel
from edgecp.prompts import expand
from edgecp.store import Store
from edgecp.train import SampleConfig, add_concept

MARKER = ".edgecp-demo"
CONCEPTS = [("toy", None, "toy"), ("cat", "chelsea", "cat"), ("mug", "coffee", "mug")]
PROMPTS = ["a photo of <toy>", "a photo of <cat> cat. Posing with <mug> mug"]
TINY_CAN_DRAW = ("the tiny model was trained on 64-px synthetic pictures (coloured shapes with stripes, dots, checks "
                 "and rings, and crops of a few photos): it learns a concept made of shapes and colours (the toy) "
                 "visibly, and a photo (the cat, the mug) only as its colours and rough layout; a real base "
                 "(SD 1.5) is needed for photographs")
TOY = dict(shape="star", pattern="stripes", colour="yellow", accent="blue", freq=4, angle=20.0)


def write_toy_photos(folder: Path, views: int = 4, seed: int = 0) -> list[Path]:
    """The toy: views of a procedural object (`eval.sequences.ProceduralSource`), as PNGs."""
    from edgecp.eval.sequences import ProceduralSource

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, view in enumerate(ProceduralSource(**TOY).views("train", views, 128, seed)):
        p = folder / f"toy-{i}.png"
        view.save(p)
        paths.append(p)
    return paths


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
    say(TINY_CAN_DRAW)

    timings, rows, checks = {}, [], {}
    gcfg = GenerateConfig(n=4, seed=0, steps=gen_steps)
    for i, (name, image, word) in enumerate(CONCEPTS):
        photos = (write_toy_photos(out / "photos" / name, seed=i) if image is None
                  else write_demo_photos(out / "photos" / name, image, seed=i))
        purge = i == len(CONCEPTS) - 1  # the last one also deletes the user's files after the commit
        views = [Image.open(p).convert("RGB") for p in photos]
        before = _draw(store, None, f"a photo of a {word}", gcfg, bar)
        t = time.perf_counter()
        m = add_concept(store, name, photos, class_word=word, purge_source=purge,
                        overrides={"steps": steps} if steps else None,
                        samples=SampleConfig(50, out / "samples", steps=gen_steps) if i == 0 else None,
                        contact_sheet=out / "forgetting-check.png" if purge else None,
                        progress=lambda ev, n=name: bar(f"learn <{n}>" if ev.phase == "train" else ev.phase,
                                                        ev.step, ev.total, ev.loss, metric=ev.metric))
        timings[name] = round(time.perf_counter() - t, 1)
        after = _draw(store, m["version"], f"a photo of <{name}>", gcfg, bar)
        rows.append((f"<{name}>", views, before, after))
        staged = list((store / "staging").rglob("*")) if (store / "staging").exists() else []
        left = [p for p in photos if p.exists()]
        fx = m["concepts"][-1]["metrics"]
        say(f"learned <{name}> -> {m['version']}; fixed-timestep loss {fx['loss_fixed_before']:.4f} -> "
            f"{fx['loss_fixed_after']:.4f}; staged copies left: {len(staged)}; "
            f"source photos left: {len(left)}/{len(photos)}{' (--purge-source)' if purge else ''}")
        for r in m["check"]["concepts"]:
            warned = (f": past the threshold; `edgecp rollback {m['check']['from']} --store {store}` would undo "
                      f"<{name}>") if r["name"] in m["check"]["warn"] else ""
            say(f"  forgetting check: <{r['name']}> drift {r['drift']:.3f} (1 - SSIM, warns above "
                f"{m['check']['threshold']:g}), DC {r['dc_before']:.2f} -> {r['dc_after']:.2f}{warned}")
        checks[name] = m["check"]
    learning = _learning_sheet(rows, out / "learning.png")
    say(f"what learning did (training views | before | after): {learning}")

    images = out / "images"
    paths = {k: v for k, v in (("learning sheet", learning), ("samples while learning", out / "samples"),
                                ("forgetting check", out / "forgetting-check.png")) if v.exists()}
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
               "learn_seconds": timings, "export_max_abs_diff": worst, "checks": checks,
               "paths": {"store": str(store), "photos": str(out / "photos"), "onnx export": report["out"],
                         **{k: str(v) for k, v in paths.items()}}}
    (out / "demo-report.json").write_text(json.dumps(summary, indent=2))
    summary["paths"]["report"] = str(out / "demo-report.json")
    return summary


def _draw(store: Path, version: str | None, prompt: str, cfg, bar) -> list:
    """Images of `prompt` from a version of the store (None: HEAD), in memory."""
    model = PersonalModel.load(Store.open(store), version)
    return torch_generate(model.comps, expand(prompt, model.concepts), cfg, model.device,
                          lambda ev: bar("draw", ev.step, ev.total))


def _learning_sheet(rows: list, path: Path) -> Path:
    """One PNG: a row per concept, its training views | before | after, 64 px tiles, labelled."""
    from PIL import ImageDraw

    tile, gap, label = 64, 10, 14
    n = max(len(v) + len(b) + len(a) for _, v, b, a in rows)
    sheet = Image.new("RGB", (n * tile + 2 * gap, label + len(rows) * (tile + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (name, views, before, after) in enumerate(rows):
        y = label + j * (tile + label)
        draw.text((2, y - label + 2), f"{name}: training views", fill="black")
        x = 0
        for k, group in enumerate((views, before, after)):
            if k == 1:
                draw.text((x + 2, y - label + 2), "before", fill="black")
            if k == 2:
                draw.text((x + 2, y - label + 2), "after", fill="black")
            for im in group:
                sheet.paste(im.convert("RGB").resize((tile, tile)), (x, y))
                x += tile
            x += gap
    sheet.save(path)
    return path
