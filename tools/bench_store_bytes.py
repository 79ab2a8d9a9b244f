"""Store bytes per concept after N concepts, for every method, before and after `gc --keep 1`.

    OMP_NUM_THREADS=1 python tools/bench_store_bytes.py --concepts 6 --steps 2 --out bytes.json

Bytes do not depend on the number of training steps, so `--steps 2` measures the same sizes as a full run. The
prior images (model outputs cached in priors/, not per concept) are reported apart. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def photos(folder: Path, n: int, seed: int, size: int = 72) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(n):
        img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
        cx, cy = rng.integers(20, size - 20, 2).tolist()
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < int(rng.integers(8, 16)) ** 2] = rng.integers(120, 255, 3)
        p = folder / f"p{i}.png"
        Image.fromarray(img).save(p)
        out.append(p)
    return out


def tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def measure(method: str, concepts: int, steps: int, work: Path) -> dict:
    from edgecp.api import init_store
    from edgecp.lifecycle import gc
    from edgecp.train import add_concept

    root = work / method / "store"
    init_store(root, "tiny", method=method, train={"steps": steps}, prior={"num_images": 2, "steps": 2})
    t0 = time.perf_counter()
    for i in range(concepts):
        add_concept(root, f"c{i}", photos(work / method / f"p{i}", 2, seed=i + 1), class_word="object")
    seconds = time.perf_counter() - t0
    before = tree_bytes(root / "versions")
    head = tree_bytes(root / "versions" / (root / "HEAD").read_text().strip())
    g = gc(root, keep=1)
    after = tree_bytes(root / "versions")
    return {"method": method, "concepts": concepts, "versions_bytes_before_gc": before, "versions_bytes_after_gc": after,
            "head_bytes": head, "per_concept_before": before / concepts, "per_concept_after": after / concepts,
            "priors_bytes": tree_bytes(root / "priors"), "gc_freed": g["bytes_total"], "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=6)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", default="all", help="comma-separated, or all")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    from edgecp.methods import method_names

    methods = method_names() if args.methods == "all" else args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecp-bytes-") as tmp:
        for m in methods:
            rows.append(measure(m, args.concepts, args.steps, Path(tmp)))
            print(f"{m}: {rows[-1]}", file=sys.stderr, flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=2))
    print(f"| method | bytes/concept before gc | after `gc --keep 1` | HEAD version | "
          f"all versions before / after (bytes), {args.concepts} concepts |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['method']} | {r['per_concept_before']:,.0f} | {r['per_concept_after']:,.0f} | {r['head_bytes']:,} | "
              f"{r['versions_bytes_before_gc']:,} / {r['versions_bytes_after_gc']:,} |")


if __name__ == "__main__":
    main()
