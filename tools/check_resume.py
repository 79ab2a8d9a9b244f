"""Kill `edgecp add-concept --resumable` with SIGKILL at random points, resume it, compare with an uninterrupted run.

Each trial copies a store, starts the CLI in its own process, waits until the resumable concept's checkpoint has
reached a random iteration, sleeps a random fraction of a second more (so that the kill lands inside an iteration,
or inside a checkpoint write), sends SIGKILL, then runs `edgecp add-concept --resume` and compares every tensor of
the committed version with the uninterrupted run's (torch.equal). A kill before the first checkpoint leaves a
concept without a checkpoint: the resume then starts from iteration 0.

    python tools/check_resume.py --trials 4 --steps 12 --every 2 --out resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path


def cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgecp", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def tensors(root: Path, version: str) -> dict:
    from safetensors.torch import load_file

    vdir = root / "versions" / version
    return {f"{f.name}:{k}": v for f in sorted(vdir.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--method", default="dsc-ewc-dc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path("/tmp/check-resume"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    import torch

    from edgecp.api import init_store
    from edgecp.demo import write_demo_photos
    from edgecp.train import add_concept

    rng = random.Random(a.seed)
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    base = a.work / "base"
    init_store(base, "tiny", method=a.method)
    add_concept(base, "cat", write_demo_photos(a.work / "photos" / "cat", "chelsea"), class_word="cat",
                overrides={"steps": 10})  # an earlier concept: the method's consolidation phases run for the mug
    photos = write_demo_photos(a.work / "photos" / "mug", "coffee", seed=1)
    args = ["mug", *map(str, photos), "--class-word", "mug", "--steps", str(a.steps), "--resumable",
            "--checkpoint-every", str(a.every), "--check-images", "0"]
    whole = a.work / "whole"
    shutil.copytree(base, whole)
    p = cli("add-concept", *args, "--store", str(whole))
    assert p.wait() == 0, p.stderr.read()
    want = tensors(whole, "v0002")
    trials = []
    for i in range(a.trials):
        root = a.work / f"trial{i}"
        shutil.copytree(base, root)
        target = rng.randint(0, a.steps - 1)
        extra = rng.uniform(0.0, 1.0)
        p = cli("add-concept", *args, "--store", str(root))
        meta = root / "resumable" / "checkpoint.json"
        while p.poll() is None:
            try:
                if json.loads(meta.read_text())["step"] >= target:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.02)
        time.sleep(extra)
        killed = p.poll() is None
        if killed:
            os.kill(p.pid, signal.SIGKILL)
        p.wait()
        try:
            at = json.loads(meta.read_text())["step"]
        except (OSError, ValueError):
            at = None
        r = cli("add-concept", "--resume", "--store", str(root))
        code = r.wait()
        got = tensors(root, "v0002") if code == 0 else {}
        equal = code == 0 and got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        trials.append({"waited_for_checkpoint": target, "then_slept_s": round(extra, 3), "killed": killed,
                       "checkpoint_at_kill": at, "resume_exit": code, "equal": equal,
                       "stderr_tail": "" if code == 0 else r.stderr.read()[-400:]})
        print(trials[-1])
    a.out.write_text(json.dumps({"method": a.method, "steps": a.steps, "every": a.every, "trials": trials,
                                 "all_equal": all(t["equal"] for t in trials)}, indent=1))


if __name__ == "__main__":
    main()
