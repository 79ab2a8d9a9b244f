#!/usr/bin/env python
"""One paper-000 table from several `edgecp bench` folders (e.g. the methods split over two processes, or seeds
run apart): their runs are pooled, and methods x seeds summarised as `edgecp bench` does (mean ± std over seeds).

    python tools/merge_bench.py b-first b-second --out docs/bench/table.md [--methods m1,m2] [--json merged.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def merge(folders: list[Path], methods: list[str] | None = None) -> dict:
    from edgecp.eval.bench import summarize

    runs, order, seqs = [], [], set()
    for f in folders:
        r = json.loads((f / "results.json").read_text())
        seqs.add(tuple(r["sequence"]))
        for run in r["runs"]:
            runs.append(run)
            if run["method"] not in order:
                order.append(run["method"])
    if len(seqs) != 1:
        raise SystemExit(f"the folders ran different sequences: {sorted(seqs)}")
    keep = methods or order
    missing = [m for m in keep if m not in order]
    if missing:
        raise SystemExit(f"no run of '{missing[0]}' in {', '.join(map(str, folders))}")
    return {"sequence": list(seqs.pop()), "summary": summarize(keep, runs),
            "runs": [{"method": r["method"], "seed": r["seed"], "metrics": r["metrics"],
                      "train_seconds": r.get("train_seconds")} for r in runs if r["method"] in keep]}


def main() -> None:
    from edgecp.eval.bench import table_markdown

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--methods", help="comma-separated, in this order (default: as found)")
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    ap.add_argument("--json", type=Path, help="write the pooled runs and summary here")
    a = ap.parse_args()
    merged = merge(a.folders, a.methods.split(",") if a.methods else None)
    table = table_markdown(merged)
    if a.out:
        a.out.write_text(table)
    if a.json:
        a.json.write_text(json.dumps(merged, indent=2))
    print(table, end="")


if __name__ == "__main__":
    main()
