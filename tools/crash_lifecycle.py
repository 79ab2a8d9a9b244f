"""SIGKILL `remove-concept`, `rollback` and `gc` at random instants; after each kill the store must verify and hold
either the old state or the new one, with nothing the user still holds lost.

    OMP_NUM_THREADS=1 python tools/crash_lifecycle.py --trials 20 --seed 0

A template store (lora-merge, concepts a, b, c, 2 steps each) is built once. Each trial copies it, starts the
command in a child process that has already imported edgecp (so the instants fall in the command's own work, not
in Python's start-up), kills it after a delay drawn uniformly from [0, 1.1 x the command's measured duration],
then checks:
  - `verify` finds no problem (every file of every version matches its recorded sha256, HEAD is sound);
  - HEAD and its concepts are the old ones or the new ones;
  - every version the user held before still exists (gc: every version it keeps), byte-identical;
  - a following writer's recovery leaves the store verifying, and running the command again completes.

Damaged chains (issue 21: gc used to delete every version below a damaged HEAD): the same kills on copies whose
HEAD manifest is truncated, whose HEAD adapter has one flipped byte, or whose v0002 was removed by hand. There
gc must refuse (exit 4) whether killed or not, and every file of the store must stay byte-identical: the
summary counts the versions lost (target 0).
Prints one line per trial and a summary; exits 1 if any trial fails.
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
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

COMMANDS = {
    "remove-concept": ["remove-concept", "b"],
    "rollback": ["rollback", "v0001"],
    "gc": ["gc", "--keep", "1"],
    "gc/truncated-head": ["gc"],
    "gc/flipped-head": ["gc", "--keep", "1"],
    "gc/missing-parent": ["gc"],
}


def damage(root: Path, cmd: str) -> None:
    """The damage a `gc/...` scenario starts from (none for the others)."""
    head = root / "versions" / "v0003"
    if cmd == "gc/truncated-head":
        f = head / "manifest.json"
        f.write_bytes(f.read_bytes()[:40])
    elif cmd == "gc/flipped-head":
        f = head / "adapter.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif cmd == "gc/missing-parent":
        shutil.rmtree(root / "versions" / "v0002")


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def versions_lost(before: dict[str, bytes], now: dict[str, bytes]) -> list[str]:
    """Versions of which any file is gone or changed."""
    return sorted({k.split("/")[1] for k, v in before.items() if k.startswith("versions/") and now.get(k) != v})
CHILD = (
    "import sys\n"
    "from edgecp.cli import main\n"
    "import edgecp.lifecycle, edgecp.methods, edgecp.personal, safetensors.torch  # noqa\n"
    "print('ready', flush=True)\n"
    "sys.argv = ['edgecp'] + sys.argv[1:]\n"
    "main()\n"
)


def photos(folder: Path, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "p.png"
    Image.fromarray(rng.integers(0, 255, (72, 72, 3)).astype(np.uint8)).save(p)
    return [p]


def build_template(root: Path) -> None:
    from edgecp.api import init_store
    from edgecp.train import add_concept

    init_store(root, "tiny", method="lora-merge", train={"steps": 2}, prior={"num_images": 2, "steps": 2})
    for i, n in enumerate("abc"):
        add_concept(root, n, photos(root.parent / f"photos-{n}", i + 1))


def snapshot(root: Path) -> dict:
    """HEAD, its concepts, and every version's recorded files."""
    from edgecp.store import Store

    s = Store.open(root)
    return {"head": s.head, "concepts": [c["name"] for c in s.concepts()],
            "versions": {v: s.manifest(v).get("files") for v in s.versions()}}


def run_child(store: Path, args: list[str], kill_after: float | None) -> tuple[float, int | None]:
    """Start the command; kill it `kill_after` seconds after it is ready (None: let it finish). -> (seconds, rc)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, *args, "--store", str(store)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=env)
    assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    if kill_after is None:  # the command's own work ends when it prints its result (exit takes longer)
        first = p.stdout.readline()
        t_work = time.perf_counter() - t0
        p.communicate()
        return (t_work if first else time.perf_counter() - t0), p.returncode
    try:
        p.wait(timeout=kill_after)
        return time.perf_counter() - t0, p.returncode  # finished before the kill
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        return time.perf_counter() - t0, None


def check_damaged(store: Path, before: dict[str, bytes], rc: int | None) -> list[str]:
    """A damaged chain: gc refuses (4) or was killed, and not one byte of the store changed."""
    problems = [] if rc in (None, 4) else [f"exit {rc}, not the refusal (4)"]
    lost = versions_lost(before, files_of(store))
    if lost:
        problems.append(f"versions lost or changed: {', '.join(lost)}")
    return problems


def check(store: Path, before: dict, after_ok: dict, cmd: str) -> list[str]:
    from edgecp.lifecycle import verify
    from edgecp.store import Store

    problems = []
    r = verify(store)
    problems += [f"verify: {p}" for p in r["problems"]]
    now = snapshot(store)
    states = [(before["head"], before["concepts"]), (after_ok["head"], after_ok["concepts"])]
    if (now["head"], now["concepts"]) not in states:
        problems.append(f"HEAD {now['head']} {now['concepts']} is neither the old nor the new state")
    held = before["versions"] if cmd != "gc" else {v: f for v, f in before["versions"].items() if v in after_ok["versions"]}
    for v, files in held.items():
        if v not in now["versions"]:
            problems.append(f"{v} was lost")
        elif now["versions"][v] != files:
            problems.append(f"{v} changed")
    with Store.open(store).writer(check_head=False):
        pass  # the next writer's recovery
    if not verify(store)["ok"]:
        problems.append("does not verify after recovery")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where the stores go (default: a temp folder)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgecp-crash-"))
    template = work / "template" / "store"
    print(f"building the template store in {template} ...", flush=True)
    build_template(template)
    before = snapshot(template)
    durations, finals = {}, {}
    for cmd, cargs in COMMANDS.items():  # measure each command's duration and its completed state
        d = work / f"measure-{cmd.replace('/', '-')}"
        shutil.copytree(template, d)
        damage(d, cmd)
        durations[cmd], rc = run_child(d, cargs, None)
        if cmd.startswith("gc/"):
            assert rc == 4, f"{cmd} did not refuse the damaged chain (exit {rc})"
            continue
        assert rc == 0, f"{cmd} failed on the template"
        finals[cmd] = snapshot(d)
    print("command work durations (import excluded): " + ", ".join(f"{c} {t:.3f}s" for c, t in durations.items()),
          flush=True)
    results = []
    for i in range(args.trials):
        cmd = list(COMMANDS)[i % len(COMMANDS)]
        d = work / f"trial-{i:02d}"
        shutil.copytree(template, d)
        delay = rng.uniform(0, 1.1 * durations[cmd])
        if cmd.startswith("gc/"):
            damage(d, cmd)
            start = files_of(d)
            _, rc = run_child(d, COMMANDS[cmd], delay)
            problems = check_damaged(d, start, rc)
            _, rc2 = run_child(d, COMMANDS[cmd], None)  # and once more, to the end
            problems += check_damaged(d, start, rc2)
            outcome = "killed" if rc is None else f"finished rc={rc}"
            results.append({"trial": i, "command": cmd, "kill_at_s": round(delay, 3), "outcome": outcome,
                            "head_after_kill": "v0003", "state": "old", "problems": problems,
                            "versions_lost": len(versions_lost(start, files_of(d)))})
            print(f"trial {i:2d} {cmd:<18} kill at {delay:6.3f}s {outcome:<14} damaged chain: "
                  + ("OK, nothing deleted" if not problems else "FAIL " + "; ".join(problems)), flush=True)
            shutil.rmtree(d, ignore_errors=True)
            continue
        _, rc = run_child(d, COMMANDS[cmd], delay)
        state = snapshot(d)["head"]
        which = "old" if state == before["head"] else "new"
        problems = check(d, before, finals[cmd], cmd)
        again, rc2 = run_child(d, COMMANDS[cmd], None)  # the command completes after the crash (or says it is done)
        end = snapshot(d)
        if (end["head"], end["concepts"]) != (finals[cmd]["head"], finals[cmd]["concepts"]):
            problems.append(f"re-running {cmd} did not reach the new state (rc {rc2})")
        outcome = "killed" if rc is None else f"finished rc={rc}"
        lost = [p for p in problems if "was lost" in p]
        results.append({"trial": i, "command": cmd, "kill_at_s": round(delay, 3), "outcome": outcome,
                        "head_after_kill": state, "state": which, "problems": problems, "versions_lost": len(lost)})
        print(f"trial {i:2d} {cmd:<18} kill at {delay:6.3f}s {outcome:<14} HEAD {state} ({which} state): "
              + ("OK" if not problems else "FAIL " + "; ".join(problems)), flush=True)
        shutil.rmtree(d, ignore_errors=True)
    failed = [r for r in results if r["problems"]]
    killed = sum(r["outcome"] == "killed" for r in results)
    old = sum(r["state"] == "old" for r in results)
    print(f"{len(results)} trials, {killed} killed before exit, {old} left the old state, "
          f"{len(results) - old} the new, {len(failed)} failed, "
          f"{sum(r['versions_lost'] for r in results)} versions lost "
          f"({sum(r['command'].startswith('gc/') for r in results)} trials on damaged chains)")
    (work / "crash-results.json").write_text(json.dumps(results, indent=2))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
