"""The measurement scripts run (their numbers are for people to read, not asserted as timings)."""

import importlib.util
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_iterations_times_every_path_with_synthetic_concepts():
    bench = _load("bench_iterations")
    ticks = []
    r = bench.measure(3, iters=1, warmup=0, batch=1, k=5, device=torch.device("cpu"), tick=lambda: ticks.append(1))
    assert set(r) == {"plain", "ewc-dc", "dsc", "c-lora"} and all(v > 0 for v in r.values())
    assert len(ticks) == 4


def test_bench_methods_reports_time_and_bytes(tmp_path):
    bench = _load("bench_methods")
    ticks = []
    r = bench.run_method("lora-ewc", steps=1, work=tmp_path, tick=lambda: ticks.append(1))
    assert len(ticks) == 3 and r["train"] > 0 and r["fisher"] > 0 and r["dsc"] == 0
    assert r["version_bytes"] > 0 and r["store_bytes"] >= r["version_bytes"]
