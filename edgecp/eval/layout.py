"""The bench's output folder, by name (the executor writes it, a run reads and fills it, resume reads it back)::

    OUT/config.json                       the BenchConfig the bench was started with
    OUT/data/seed<S>/                     the training views of each task (written whole or not at all)
    OUT/data/real-seed<S>.npz             the real targets' embeddings, per concept (the intervals read them)
    OUT/runs/<method>-s<seed>/store/      the run's own store
    OUT/runs/<method>-s<seed>/eval-task-<i>.npz   task i's evaluation (embeddings, seconds, last task's images)
    OUT/runs/<method>-s<seed>/worker.json the host and pid of the process running (or that last ran) the run
    OUT/runs/<method>-s<seed>/result.json the finished run, written last
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgecp.atomic import write_atomic

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
WORKER_FILE = "worker.json"
SAMPLES_FILE = "samples.png"


def run_dir(out: Path, method: str, seed: int) -> Path:
    return Path(out) / "runs" / f"{method}-s{seed}"


def store_dir(out: Path, method: str, seed: int) -> Path:
    return run_dir(out, method, seed) / "store"


def real_file(out: Path, seed: int) -> Path:
    return Path(out) / "data" / f"real-seed{seed}.npz"  # beside seed<S>/, whose existence means it is complete


def eval_file(out: Path, method: str, seed: int, task: int) -> Path:
    return run_dir(out, method, seed) / f"eval-task-{task}.npz"


def save_npz_atomic(path: Path, **arrays) -> None:
    write_atomic(path, lambda f: np.savez(f, **arrays), suffix=".npz")
