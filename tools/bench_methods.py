#!/usr/bin/env python
"""For every method: seconds per training iteration on the tiny model and the bytes a store holds after three
concepts (issue 4). Each method learns the demo's three photos (cat, coffee cup, rocket) in a fresh store.

    python tools/bench_methods.py                 # all methods, 30 iterations per concept
    python tools/bench_methods.py --steps 50 --methods lora-sequential ewc-dc cns

Columns: train s/it (mean over the 3 tasks, optimizer step included), the consolidation phases' s/it where the
method has them, the version's bytes (what the method keeps: adapter, tokens, Fisher, teachers, weight changes)
and the whole store folder's bytes (plus the cached prior images).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def folder_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def run_method(method: str, steps: int, work: Path, tick) -> dict:
    from edgecp.api import init_store
    from edgecp.demo import CONCEPTS, write_demo_photos, write_toy_photos
    from edgecp.store import Store
    from edgecp.train import add_concept

    root = work / method
    init_store(root, "tiny", method=method, train={"steps": steps})
    per_task = []
    for i, (name, image, word) in enumerate(CONCEPTS):
        photos = (write_toy_photos(work / "photos" / name, seed=i) if image is None
                  else write_demo_photos(work / "photos" / name, image, seed=i))
        m = add_concept(root, name, photos, class_word=word)
        per_task.append(m["concepts"][-1]["seconds_per_iteration"])
        tick()
    store = Store.open(root)
    mean = {k: sum(t.get(k, 0.0) for t in per_task) / len(per_task) for k in ("train", "fisher", "dsc")}
    return {**mean, "version_bytes": store.disk_bytes(), "store_bytes": folder_bytes(root) - folder_bytes(root / "priors"),
            "n_param": store.manifest()["n_param"]}


def main() -> None:
    from edgecp.methods import method_names

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=method_names())
    ap.add_argument("--steps", type=int, default=30, help="training iterations per concept")
    args = ap.parse_args()
    console = Console(width=160)
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgecp-bench-") as tmp, Progress(
        TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
        TimeRemainingColumn(), console=console,
    ) as prog:
        task = prog.add_task("", total=3 * len(args.methods))
        for m in args.methods:
            prog.update(task, description=m)
            results[m] = run_method(m, args.steps, Path(tmp), lambda: prog.advance(task))
    t = Table(title=f"tiny model, CPU, {args.steps} iterations per concept, 3 concepts")
    for col in ("method", "train s/it", "fisher s/it", "dsc s/it", "N_param Train %", "N_param Store %",
                "version bytes", "store bytes (w/o priors)"):
        t.add_column(col, justify="right")
    for m, r in results.items():
        n = r["n_param"]
        t.add_row(m, f"{r['train']:.4f}", f"{r['fisher']:.4f}" if r["fisher"] else "-", f"{r['dsc']:.4f}" if r["dsc"] else "-",
                  f"{n['train_pct']:.3f}", f"{n['store_pct']:.3f}", f"{r['version_bytes']:,}", f"{r['store_bytes']:,}")
    console.print(t)


if __name__ == "__main__":
    main()
