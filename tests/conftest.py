"""Shared fixtures: an isolated EDGECP_HOME, small test photos, and one trained store reused by read-only tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `-n 2` (pyproject addopts): one torch thread per worker, also for the
    os.environ["OMP_NUM_THREADS"] = "1"      # subprocesses and Ray workers a test starts (same arithmetic order)
    os.environ["MKL_NUM_THREADS"] = "1"

    import torch

    torch.set_num_threads(1)

FAST_TRAIN = {"steps": 3}
FAST_PRIOR = {"num_images": 2, "steps": 2}


@pytest.fixture(scope="session", autouse=True)
def edgecp_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("edgecp-home")
    os.environ["EDGECP_HOME"] = str(home)
    return home


@pytest.fixture(scope="session", autouse=True)
def no_default_check():
    """add-concept's forgetting check (edgecp/forgetting.py: two model loads and a few images per earlier concept)
    is off in-process unless a test passes a CheckConfig: tests/test_everyday.py tests it, and the CLI's own
    processes run it as users get it."""
    import edgecp.train as train
    from edgecp.forgetting import CheckConfig

    mp = pytest.MonkeyPatch()
    mp.setattr(train, "_default_check", lambda: CheckConfig(images=0))
    yield
    mp.undo()


@pytest.fixture(scope="module", autouse=True)
def gc_frozen_before_each_module():
    """What is alive when a test module starts (torch, diffusers, transformers, the session's fixtures: ~600k objects)
    leaves the cyclic collector's generations, so that edgecp's gc.collect() calls (release_memory, the streamed
    loads, the export's sessions) walk only the objects made since: 0.3 s a call otherwise, hundreds of calls a
    session. Garbage is collected first, so nothing but live objects is frozen; refcounting frees frozen objects as
    usual, and what a test makes (what the tests' weakref checks watch) is collected as before."""
    import gc

    gc.collect()
    gc.freeze()
    yield


def make_photos(folder: Path, n: int = 2, seed: int = 0, size: int = 72) -> list[Path]:
    """Distinct little photos: a coloured disc on a noisy background."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = rng.integers(0, 80, (size, size, 3)).astype(np.uint8)
        cx, cy, r = rng.integers(20, size - 20, 2).tolist() + [int(rng.integers(8, 16))]
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.integers(120, 255, 3)
        p = folder / f"photo{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return make_photos(tmp_path / "photos")


def new_store(root: Path, **kw):
    """A tiny-base store with fast settings; lora-sequential unless `method` says otherwise (the library's default,
    dsc-ewc-dc, adds two consolidation phases that most tests do not need)."""
    from edgecp.api import init_store

    kw.setdefault("method", "lora-sequential")
    return init_store(root, "tiny", train={**FAST_TRAIN, **kw.pop("train", {})}, prior={**FAST_PRIOR, **kw.pop("prior", {})}, **kw)


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory) -> Path:
    """A store with two concepts (<alpha> dog, <beta> mug); tests must not modify it (copy it first)."""
    from edgecp.train import add_concept

    root = tmp_path_factory.mktemp("stores") / "trained"
    new_store(root)
    tmp = tmp_path_factory.mktemp("photos")
    add_concept(root, "alpha", make_photos(tmp / "a", seed=1), class_word="dog")
    add_concept(root, "beta", make_photos(tmp / "b", seed=2), class_word="mug")
    return root


@pytest.fixture(scope="session")
def fp32_export_dir(trained_store, tmp_path_factory) -> Path:
    """A cpu-fp32 ONNX export of trained_store (outside the store); tests must not modify it (copy it first)."""
    from edgecp.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("exports") / "cpu"
    export_onnx(trained_store, "cpu-fp32", out)
    return out


@pytest.fixture
def store_copy(trained_store, tmp_path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(trained_store, dst)
    return dst


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its content (to assert 'the store is exactly as before')."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


# test_bench.py's smallest bench, shared by test_bench.py, test_bench_resume.py and test_bench_stats.py (one run).
# threads 1: BenchConfig's default 2 beside the other xdist worker oversubscribes the 2 cores (a bench took 160 s at
# 2 threads, 25 s at 1); the Ray test starts its workers at 2 threads, so the config's 1 must still reach them
SMALL_BENCH = {"methods": ("lora-sequential", "ewc-dc"), "tasks": 2, "steps": 2, "n_train": 2, "n_target": 3,
               "n_gen": 2, "gen_steps": 2, "dc_trials": 1, "prior": {"num_images": 2, "steps": 2}, "threads": 1}


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    """(result, folder) of one uninterrupted serial bench with SMALL_BENCH; tests must not modify it. Under xdist the
    first worker to ask runs it into the run's shared temporary folder; the others wait for it and read its
    results.json (what run_bench returned, written by it)."""
    import json

    from filelock import FileLock

    from edgecp.eval.bench import BenchConfig
    from edgecp.eval.executor import run_bench

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp("bench") / "b"
        return run_bench(BenchConfig(**SMALL_BENCH), out), out
    shared = tmp_path_factory.getbasetemp().parent  # this run's, above every worker's own
    out, done = shared / "small-bench", shared / "small-bench.done"
    with FileLock(str(shared / "small-bench.lock")):
        if done.is_file():
            return json.loads((out / "results.json").read_text()), out
        shutil.rmtree(out, ignore_errors=True)  # left by a worker whose bench failed
        result = run_bench(BenchConfig(**SMALL_BENCH), out)
        done.touch()
    return result, out
