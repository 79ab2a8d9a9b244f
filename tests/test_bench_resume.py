"""Issue 13: the bench's executors and resumable folder. A bench killed with SIGKILL and resumed, and a bench on a
real local Ray cluster, give the metrics of an uninterrupted serial bench; --estimate prints runs, device-hours and
disk without running the bench; the Ray executor without Ray is one line naming the fix."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import SMALL_BENCH

from edgecp.errors import EdgecpError
from edgecp.eval.bench import BenchConfig
from edgecp.eval.executor import RayExecutor, run_bench
from edgecp.eval.layout import run_dir

CFG = SMALL_BENCH  # test_bench.py's smallest bench


@pytest.fixture(scope="module")
def reference(small_bench):
    """An uninterrupted serial bench (shared with test_bench.py)."""
    return small_bench[0]


def _same_metrics(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert [(r["method"], r["seed"]) for r in a["runs"]] == [(r["method"], r["seed"]) for r in b["runs"]]
    for ra, rb in zip(a["runs"], b["runs"]):
        for k, v in ra["metrics"].items():
            np.testing.assert_allclose(rb["metrics"][k], v, rtol=rtol, atol=1e-9, err_msg=f"{ra['method']} {k}")
        for k in ("M", "D", "S"):
            x = np.array(ra["matrices"][k], dtype=float)
            y = np.array(rb["matrices"][k], dtype=float)
            np.testing.assert_allclose(y, x, rtol=rtol, atol=1e-9, equal_nan=True)


KILLED = textwrap.dedent("""
    import sys
    sys.modules["ray"] = None  # the serial path must never import Ray: any import of it fails here
    from edgecp.eval.bench import BenchConfig
    from edgecp.eval.executor import run_bench
    run_bench(BenchConfig(**{cfg}), sys.argv[1])
""")


def test_a_bench_killed_mid_run_resumes_to_the_same_results(reference, tmp_path, capsys, monkeypatch):
    from edgecp.store import Store

    out = tmp_path / "b"
    script = KILLED.replace("{cfg}", repr(CFG))
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=f, stderr=subprocess.STDOUT)
    trigger = run_dir(out, "ewc-dc", 0) / "eval-task-0.npz"  # the first run finished, the second one task in
    t0 = time.monotonic()
    while not trigger.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() - t0 < 120, "the bench did not reach its second run"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first, second = run_dir(out, "lora-sequential", 0), run_dir(out, "ewc-dc", 0)
    assert (first / "result.json").is_file() and not (second / "result.json").exists()
    committed = sum(len(Store.open(d / "store").concepts()) for d in (first, second))
    saved = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*") if p.name.startswith(("eval-task", "result"))}
    assert committed >= 3 and len(saved) >= 4  # 2 tasks + result of the first run, >= 1 task of the second
    streamed = json.loads((out / "results.json").read_text())  # rebuilt when the first run finished
    assert streamed["runs_finished"] == 1 and list(streamed["summary"]) == ["lora-sequential"]
    assert (out / "table.md").is_file()

    import edgecp.train

    calls = []
    real_add = edgecp.train.add_concept
    monkeypatch.setattr(edgecp.train, "add_concept", lambda *a, **k: calls.append(a[1]) or real_add(*a, **k))
    code, stdout, err = run_cli(capsys, "bench", "--resume", out)
    assert code == 0, err
    assert len(calls) == 4 - committed  # only the tasks no store had committed are learned
    assert all(p.stat().st_mtime_ns == m for p, m in saved.items())  # nothing finished was rewritten
    assert "ewc-dc seed 0: A_MMD" in err and "lora-sequential seed 0: A_MMD" not in err  # one line per run finished now
    for d in (first, second):
        assert len(Store.open(d / "store").versions()) == 3  # v0000 + one version per task, none learned twice
    resumed = json.loads((out / "results.json").read_text())
    _same_metrics(reference, resumed)
    assert "| ewc-dc |" in stdout and (out / "table.md").read_text() == (reference_out(reference) / "table.md").read_text()


def reference_out(result: dict):
    from pathlib import Path

    return Path(result["runs"][0]["samples"]).parents[2]


def _ray_task_pids() -> list[int]:
    """Processes running a bench run for Ray (Ray titles a worker `ray::<function>` while it runs a task)."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::_ray_run"):
                    pids.append(int(d))
        except (OSError, ValueError):
            pass
    return pids


def test_ray_executor_gives_the_serial_metrics(reference, tmp_path, monkeypatch):
    """Two runs as Ray tasks on a local 2-CPU cluster; one worker is SIGKILLed mid-run, Ray retries its task, which
    resumes from the run's last committed task. The metrics are the serial bench's."""
    import threading

    import ray

    out = tmp_path / "ray"
    killed, saved = [], {}

    def kill_a_worker():
        """SIGKILL the Ray worker of a run with one task evaluated and no result yet."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            for run in out.glob("runs/*"):
                if (run / "eval-task-0.npz").is_file() and not (run / "result.json").exists():
                    pid = json.loads((run / "worker.json").read_text())["pid"]
                    assert pid in _ray_task_pids()  # a Ray worker running a task
                    saved.update({p: p.stat().st_mtime_ns for p in run.glob("eval-task-*.npz")})
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    # the workers start at 2 torch threads and the config (CFG) says 1: its threads must reach them (issue 24)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # torch reads it after OMP_NUM_THREADS (conftest sets both to 1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a real local cluster: two workers
    try:
        @ray.remote(num_cpus=1)
        def worker_threads():
            import torch

            return torch.get_num_threads()

        assert ray.get(worker_threads.remote()) == 2 != CFG["threads"]
        logs = []
        executor = RayExecutor(num_cpus=1, max_retries=2)
        killer = threading.Thread(target=kill_a_worker)
        killer.start()
        result = run_bench(BenchConfig(**CFG), out, executor=executor, log=logs.append)
        killer.join()

        @ray.remote
        def bad_input():
            raise EdgecpError("--sequence 'x': no task folders")

        with pytest.raises(EdgecpError, match=r"^--sequence 'x': no task folders$"):  # one line, not Ray's traceback
            executor._get(bad_input.remote(), "lora-sequential", 0, tmp_path)
    finally:
        ray.shutdown()
    # the config's thread count (BenchConfig.threads) holds in the Ray workers too: the same numbers (issue 24)
    _same_metrics(reference, result, rtol=1e-6)
    assert all(r["worker"]["pid"] != os.getpid() for r in result["runs"])  # each run ran in a Ray worker
    assert killed and killed[0] not in [r["worker"]["pid"] for r in result["runs"]]  # the killed task was retried
    assert all(p.stat().st_mtime_ns == m for p, m in saved.items())  # and did not redo its saved evaluations
    from edgecp.store import Store

    for r in result["runs"]:
        assert len(Store.open(run_dir(out, r["method"], 0) / "store").versions()) == 3  # no task learned twice
    assert sorted(line.split(":")[0] for line in logs) == ["ewc-dc seed 0", "lora-sequential seed 0"]
    assert (out / "table.md").is_file() and result["runs_finished"] == 2


def test_ray_executor_without_ray_names_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as without the extra
    code, _, err = run_cli(capsys, "bench", "--executor", "ray", "--tasks", "1", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "--executor ray", "pip install 'edgecp[distributed]'")
    assert not (tmp_path / "x").exists()


def test_bench_option_errors_name_the_fix(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", "--resume", tmp_path, "--methods", "c-lora")
    assert_one_line_error(code, err, "--resume", "leave out --methods")
    code, _, err = run_cli(capsys, "bench", "--resume", tmp_path / "nothing")
    assert_one_line_error(code, err, "is not a bench folder")
    code, _, err = run_cli(capsys, "bench", "--preset", "paper", "--features", "tiny", "--estimate")
    assert_one_line_error(code, err, "--preset paper needs --sequence DIR")
    code, _, err = run_cli(capsys, "bench", "--executor", "dask", "--out", tmp_path / "y")
    assert_one_line_error(code, err, "unknown executor 'dask'")
    code, _, err = run_cli(capsys, "bench", "--features", tmp_path / "no-clip", "--tasks", "1", "--out", tmp_path / "z")
    assert_one_line_error(code, err, "--features")
    assert not (tmp_path / "z").exists()  # nothing written before the inputs are checked
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, "bench", "--tasks", "1", "--out", started)
    assert_one_line_error(code, err, "exists and is not empty", f"edgecp bench --resume {started}")


@pytest.fixture
def task_folder(tmp_path):
    from edgecp.eval.sequences import six_tasks

    return six_tasks()[:2].write(tmp_path / "tasks", n_train=2, n_target=2, size=64)


def test_estimate_prints_runs_hours_and_disk_without_running(task_folder, tmp_path, capsys, monkeypatch):
    from edgecp.methods import method_names

    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_cli(capsys, "bench", "--preset", "paper", "--sequence", task_folder, "--features", "tiny",
                                "--estimate")
    assert code == 0, err
    runs = 3 * len(method_names())
    assert f"runs: {runs} (2 tasks x 150 iterations each)" in stdout  # each method's own: the tiny set's 150
    hours = float(stdout.split("device-hours: ")[1].split()[0])
    assert hours > 0 and "disk: " in stdout and "s/iteration" in stdout
    assert not (tmp_path / "edgecp-bench").exists()  # nothing ran


def test_estimate_multiplies_the_calibration(task_folder):
    """With a given calibration (no timing): training hours = runs x tasks x iterations x s/iteration."""
    from dataclasses import replace

    from edgecp.eval.bench import preset
    from edgecp.eval.estimate import estimate
    from edgecp.model.base import resolve_base
    from edgecp.model.shape import base_shape

    cfg = replace(preset("paper"), sequence=str(task_folder), features="tiny", methods=("lora-sequential", "ewc-dc"))
    cal = {"seconds_per_iteration": 2.0, "seconds_per_image_step": 0.5, "seconds_per_load": 10.0, "device": "cpu",
           "batch_size": 4, "grad_accum": 1, "precision": "fp32", "resolution": 64,
           "shape": base_shape(resolve_base("tiny"))}
    e = estimate(cfg, calibration=cal)
    assert e.runs == 6 and e.tasks == 2
    assert e.iterations == "150"  # the paper preset trains each method its own iterations: the tiny set's here
    assert e.hours["training"] == pytest.approx(6 * 2 * 150 * 2.0 / 3600)
    assert e.hours["loading"] == pytest.approx(6 * 2 * 2 * 10.0 / 3600)
    # evaluations after task 1 and 2: (1 + 2) concepts x 400 images x 50 DDPM steps (000 Sec. 4), + the priors
    # (8 x 10 on tiny)
    assert e.hours["generation"] == pytest.approx(6 * (3 * 400 * 50 + 8 * 10) * 0.5 / 3600)
    # ewc-dc's Fisher phase: 0.2 x 150 iterations of B x rows rows (rows 2 at task 1, 3 at task 2), lora-sequential none
    row_s = 2.0 / (1 * 4 * 2)
    assert e.hours["consolidation"] == pytest.approx(3 * 30 * row_s * 4 * (2 + 3) / 3600)
    # the training views at the base's resolution (64 on tiny): 3 seeds x 2 tasks x (6 + 16) views
    assert e.disk_bytes["data"] == 3 * 2 * (6 + 16) * 64 * 64 * 3
    assert e.disk_bytes["total"] == sum(v for k, v in e.disk_bytes.items() if k != "total") > 0
