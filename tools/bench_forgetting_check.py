"""Does add-concept's forgetting check rank methods as the bench's forgetting does, and does over-training trigger it?

Part 1 (`--bench-out DIR`): an `edgecp bench` output (e.g. `edgecp bench --preset quick --seeds 0,1,2 --out DIR`,
the six photo tasks on the tiny base) holds one store per method and seed with a version per task. For every
version v_k (k >= 2) the check is run exactly as add-concept runs it (`edgecp.forgetting.run_check`, v_{k-1}
against v_k's files, default CheckConfig), and compared with the bench's own forgetting of that run
(avg_forgetting, F_MMD, BwT_MMD from result.json) and, pair by pair, with the bench's score drop of concept i
from after task k-1 to after task k (S[k-1, i] - S[k, i], the evaluator's image-to-target similarity).

Part 2 (`--overtrain OUT`): on a fresh tiny store (`--method`, default dsc-ewc-dc; the tiny set), the cat is learned as the
bench learns it, then the mug twice from the same version: as the bench learns it, and deliberately over-trained
(`--over-lr`, `--over-steps`); the check of each says whether the cat drifted past the threshold.

Part 3 (`--cost OUT --base BASE`): the check's cost as a share of add-concept's time. A store on BASE (the tiny base,
or an SD1.5-scale fixture from tools/make_sd_fixture.py) learns two concepts of the six photo tasks with the
store's method (paper 000's), `--train-steps` iterations at `--resolution`; the second add-concept runs the check
(`--images` images of `--steps` sampling steps at the training resolution). Reported: the check's seconds, the
add-concept's seconds (the check included), the share, and the training's seconds per iteration, from which the
share at the base's default iteration count (1000 on SD, the store's on tiny) is computed (said as computed).

Writes JSON (and prints a table); run alone on the machine for the seconds to mean anything.
    python tools/bench_forgetting_check.py --bench-out q24b --out check-rank.json
    python tools/bench_forgetting_check.py --overtrain /tmp/over --out check-over.json
    python tools/bench_forgetting_check.py --cost /tmp/cost-tiny --base tiny --out check-cost-tiny.json
    python tools/bench_forgetting_check.py --cost /tmp/cost-sd --base SD15_FIXTURE --resolution 256 \
        --train-steps 4 --steps 2 --out check-cost-sd.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np


def rank_part(bench_out: Path, images: int, steps: int) -> dict:
    import torch

    from edgecp.forgetting import CheckConfig, run_check
    from edgecp.store import Store

    cfg = CheckConfig(images=images, steps=steps)
    runs = {}
    pairs = []  # (method, seed, task k, concept i, drift, bench score drop)
    for run in sorted((bench_out / "runs").iterdir()):
        root = run / "store"
        res = run / "result.json"
        if not (root / "store.json").is_file() or not res.is_file():
            continue
        result = json.loads(res.read_text())
        store = Store.open(root)
        versions = [v for v in store.versions() if v != "v0000"]
        s = np.array(result["matrices"]["S"], dtype=float)
        rows, seconds, learn = [], [], []
        for k in range(1, len(versions)):
            parent, child = versions[k - 1], versions[k]
            t = time.perf_counter()
            out, _ = run_check(store, parent, store.version_dir(child), store.manifest(child), cfg, torch.device("cpu"))
            seconds.append(time.perf_counter() - t)
            learn.append(store.manifest(child)["concepts"][-1]["seconds"]["total"])
            for i, r in enumerate(out["concepts"]):
                drop = float(s[k - 1, i] - s[k, i])
                rows.append({"task": k + 1, "concept": r["name"], **{x: r[x] for x in r if x != "name"},
                             "bench_score_drop": round(drop, 4)})
                pairs.append((result["method"], result["seed"], k, i, r["drift"], drop, r["drift"] > cfg.threshold))
        m = result["metrics"]
        runs[run.name] = {"method": result["method"], "seed": result["seed"], "checks": rows,
                          "mean_drift": round(float(np.mean([r["drift"] for r in rows])), 4),
                          "warned": sum(r["drift"] > cfg.threshold for r in rows), "pairs": len(rows),
                          "bench": {k: m[k] for k in ("avg_forgetting", "F_MMD", "BwT_MMD") if k in m},
                          "check_seconds": round(sum(seconds), 1), "learn_seconds_in_bench": round(sum(learn), 1)}
    by_method: dict[str, dict] = {}
    for r in runs.values():
        b = by_method.setdefault(r["method"], {"mean_drift": [], "warned": 0, "pairs": 0, "avg_forgetting": [],
                                               "F_MMD": []})
        b["mean_drift"].append(r["mean_drift"])
        b["warned"] += r["warned"]
        b["pairs"] += r["pairs"]
        b["avg_forgetting"].append(r["bench"].get("avg_forgetting"))
        b["F_MMD"].append(r["bench"].get("F_MMD"))
    summary = {m: {"mean_drift": round(float(np.mean(b["mean_drift"])), 4), "warned": b["warned"], "pairs": b["pairs"],
                   "bench_avg_forgetting": round(float(np.mean(b["avg_forgetting"])), 4),
                   "bench_F_MMD": round(float(np.mean(b["F_MMD"])), 6)} for m, b in by_method.items()}
    drifts = np.array([p[4] for p in pairs])
    drops = np.array([p[5] for p in pairs])
    return {"config": {"images": images, "steps": steps, "threshold": cfg.threshold}, "summary": summary,
            "spearman_drift_vs_bench_drop": round(_spearman(drifts, drops), 4), "n_pairs": len(pairs), "runs": runs}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def overtrain_part(out: Path, over_lr: float, over_steps: int, images: int, steps: int, method: str) -> dict:
    from edgecp.api import init_store
    from edgecp.eval.sequences import six_tasks
    from edgecp.forgetting import CheckConfig
    from edgecp.lifecycle import gc, rollback
    from edgecp.train import add_concept

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    root = out / "store"
    init_store(root, "tiny", method=method, train={"steps": 100})
    seq = six_tasks()
    photos = {}
    for c in list(seq)[:2]:
        d = out / "photos" / c.name
        d.mkdir(parents=True)
        for j, im in enumerate(c.views("train", None, 64, 0)):
            im.save(d / f"{j}.png")
        photos[c.name] = (d, c.class_word)
    cat, mug = list(seq)[:2]
    cfg = CheckConfig(images=images, steps=steps)
    t = time.perf_counter()
    add_concept(root, cat.name, [photos[cat.name][0]], class_word=cat.class_word, check=cfg)
    first = time.perf_counter() - t
    result = {"method": method, "first_seconds": round(first, 1)}
    for label, overrides in (("as the bench", {}), ("over-trained", {"lr": over_lr, "steps": over_steps})):
        t = time.perf_counter()
        m = add_concept(root, mug.name, [photos[mug.name][0]], class_word=mug.class_word, overrides=overrides,
                        check=cfg, contact_sheet=out / f"sheet-{label.replace(' ', '-')}.png")
        result[label] = {"overrides": overrides, "check": m["check"], "seconds": round(time.perf_counter() - t, 1),
                         "loss_fixed": [m["concepts"][-1]["metrics"]["loss_fixed_before"],
                                        m["concepts"][-1]["metrics"]["loss_fixed_after"]]}
        rollback(root, "v0001")
        gc(root)
    return result


def cost_part(out: Path, base: str, resolution: int | None, train_steps: int | None, images: int,
              steps: int) -> dict:
    from edgecp.api import init_store
    from edgecp.eval.sequences import six_tasks
    from edgecp.forgetting import CheckConfig
    from edgecp.store import Store
    from edgecp.train import add_concept

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    root = out / "store"
    train = {**({"steps": train_steps} if train_steps else {}), **({"resolution": resolution} if resolution else {})}
    init_store(root, base, train=train, prior={"num_images": 2, "steps": 2})
    info = Store.open(root).info
    rows = []
    for c in list(six_tasks())[:2]:
        d = out / "photos" / c.name
        d.mkdir(parents=True)
        for j, im in enumerate(c.views("train", 4, resolution or 64, 0)):
            im.save(d / f"{j}.png")
        t = time.perf_counter()
        m = add_concept(root, c.name, [d], class_word=c.class_word,
                        check=CheckConfig(images=images, steps=steps, size=resolution))
        total = time.perf_counter() - t
        e = m["concepts"][-1]
        rows.append({"concept": c.name, "add_concept_seconds": round(total, 1),
                     "train_seconds_per_iteration": e["seconds_per_iteration"]["train"],
                     "check_seconds": m["check"].get("seconds", 0.0), "check": m["check"]})
    last = rows[-1]
    iters = 1000 if info["base"]["kind"] != "tiny" else info["train"]["steps"]
    learn = last["add_concept_seconds"] - last["check_seconds"]
    steps_run = info["train"]["steps"]
    at_default = learn + (iters - steps_run) * last["train_seconds_per_iteration"]
    return {"base": base, "method": info["method"]["name"], "resolution": resolution, "train_steps": steps_run,
            "check": {"images": images, "steps": steps}, "rows": rows,
            "share_measured": round(last["check_seconds"] / last["add_concept_seconds"], 4),
            "default_iterations": iters,
            "share_at_default_iterations_computed": round(last["check_seconds"] / (at_default + last["check_seconds"]), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench-out", type=Path)
    ap.add_argument("--overtrain", type=Path)
    ap.add_argument("--over-lr", type=float, default=3e-2)
    ap.add_argument("--over-steps", type=int, default=300)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--method", default="dsc-ewc-dc", help="--overtrain: the store's method")
    ap.add_argument("--cost", type=Path)
    ap.add_argument("--base", default="tiny")
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--train-steps", type=int)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(2)
    report = {}
    if a.bench_out:
        report["rank"] = rank_part(a.bench_out, a.images, a.steps)
        for m, s in report["rank"]["summary"].items():
            print(f"{m:18s} mean drift {s['mean_drift']:.4f}  warned {s['warned']}/{s['pairs']}  "
                  f"bench avg_forgetting {s['bench_avg_forgetting']:.4f}  F_MMD {s['bench_F_MMD']:.6f}")
        print("spearman(drift, bench score drop) =", report["rank"]["spearman_drift_vs_bench_drop"])
    if a.overtrain:
        report["overtrain"] = overtrain_part(a.overtrain, a.over_lr, a.over_steps, a.images, a.steps, a.method)
        for label in ("as the bench", "over-trained"):
            r = report["overtrain"][label]
            print(label, r["check"]["concepts"], "warn:", r["check"]["warn"])
    if a.cost:
        report["cost"] = c = cost_part(a.cost, a.base, a.resolution, a.train_steps, a.images, a.steps)
        print(f"{c['base']}: check {c['rows'][-1]['check_seconds']}s of add-concept "
              f"{c['rows'][-1]['add_concept_seconds']}s = {100 * c['share_measured']:.1f}% measured "
              f"({c['train_steps']} iterations); at {c['default_iterations']} iterations (computed): "
              f"{100 * c['share_at_default_iterations_computed']:.1f}%")
    a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
