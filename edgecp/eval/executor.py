"""Where `edgecp bench` runs execute, and the resumable output folder they write.

A bench is a set of independent runs, one per (method, seed): each trains the method over the sequence in its own
store and evaluates after every task (`bench.run_method`). Executors:

- `serial` (the default): the runs one after another in this process. Nothing on this path imports Ray.
- `ray`: each run is one `ray.remote` task asking for `num_cpus` CPUs and `num_gpus` GPUs (a fraction shares a
  GPU). Placement, GPU accounting and retries are Ray's: a task whose worker dies (preemption, OOM kill) is
  retried up to `max_retries` times, and the retry resumes from the run's last committed task (below).
  Application exceptions are not retried by default (`retry_exceptions=False`): a bench run is deterministic,
  so the same seed fails the same way again and a retry would only spend GPU-hours. The output folder must be on
  a file system every node sees (the driver writes the training views and the config; the tasks write the runs).

The output folder OUT (every file is written to a temporary name and renamed into place, so a crash leaves
either the old state or the new one):
    config.json                                the BenchConfig, written before anything runs
    data/seed<S>/                              the training views of seed S (written whole, then renamed)
    runs/<method>-s<seed>/store/               the run's store: one atomic version per finished task
    runs/<method>-s<seed>/eval-task-<i>.npz    the evaluation after task i: embeddings of every seen concept's
                                               images, the task's training seconds (and the images, last task)
    runs/<method>-s<seed>/worker.json          host and pid of the process that runs it (written when it starts)
    runs/<method>-s<seed>/result.json          the finished run (its metrics and matrices), written last
    results.json, results.csv, table.md, curves.png, heatmaps   rebuilt from the finished runs (`rebuild`)

Resume (`resume_bench`, `edgecp bench --resume OUT`): a run with a result.json is not touched; in an unfinished run
the tasks its store's HEAD holds are not learned again and evaluations with an eval-task file are not generated
again. What a resumed run recomputes is the DC-score accuracy and the metrics from the saved embeddings (seconds).

Determinism: every random draw of a run is seeded by (seed, task): `train._learn` seeds torch's global generator
with the store's seed at the start of every task, the Trainer, Fisher and DSC phases use generators of their named
streams (`edgecp.seeds`: `stream_seed(seed, FISHER, task)`, ...), LoRA init forks the global RNG with (seed + task),
priors are generated with the fixed seed `seeds.PRIORS`, the evaluation images of concept j with
`stream_seed(seed, BENCH_IMAGES, j)`, the DC accuracy and KID with the seed itself. Nothing depends on what ran
before in the process, so a run gives the same metrics serially, as a Ray task, or resumed after task k.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch

from edgecp.atomic import write_json_atomic
from edgecp.config import DEFAULT_METHOD
from edgecp.errors import EdgecpError
from edgecp.eval.bench import BenchConfig, load_sequence, run_method, summarize, view_size, write_outputs
from edgecp.eval.features import load_features
from edgecp.eval.layout import (
    CONFIG_FILE,
    RESULT_FILE,
    WORKER_FILE,
    eval_file,
    real_file,
    run_dir,
    save_npz_atomic,
)
from edgecp.eval.stats import bench_statistics
from edgecp.progress import Progress, emit  # events: phase "runs" counts runs, any other tasks

RAY_FIX = "pip install 'edgecp[distributed]'"
REFERENCE = "lora-sequential"  # the table marks differences from it and from the default method

Log = Callable[[str], None]


def config_from_dict(d: dict):
    """A BenchConfig from its asdict(): lists back to tuples; keys this edgecp does not know are refused."""

    known = {f.name for f in fields(BenchConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise EdgecpError(f"the bench config has fields this edgecp does not know ({', '.join(unknown)}): resume it "
                          "with the edgecp version that started it")
    return BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def check_required(cfg) -> None:
    """What a preset leaves to the user (`--preset paper`: the task folder and the CLIP folder)."""
    if not cfg.sequence:
        raise EdgecpError("--preset paper needs --sequence DIR: a folder of task folders (DIR/<task>/train/*.png, "
                          "DIR/<task>/target/*.png), e.g. the six Custom Concept tasks of 000's App. H")
    if not cfg.features:
        raise EdgecpError("--preset paper needs --features DIR: a local CLIP folder (e.g. ./clip-vit-l14), or "
                          "--features tiny on the tiny base")


def check_new_folder(out: Path) -> None:
    """Refuse a non-empty folder (it may hold another bench)."""
    if out.exists() and any(out.iterdir()):
        hint = f"; to finish it, run `edgecp bench --resume {out}`" if (out / CONFIG_FILE).is_file() else ""
        raise EdgecpError(f"bench folder '{out}' exists and is not empty: pass a new --out{hint}")


def start_folder(cfg, out: Path) -> None:
    """A new bench folder, config.json written before anything runs."""
    check_new_folder(out)
    write_json_atomic(out / CONFIG_FILE, {"format": 1, "config": asdict(cfg)})


def load_config(out: Path):
    f = Path(out) / CONFIG_FILE
    if not f.is_file():
        raise EdgecpError(f"'{out}' is not a bench folder (no {CONFIG_FILE}): pass the --out of an earlier "
                          "`edgecp bench`")
    try:
        return config_from_dict(json.loads(f.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise EdgecpError(f"'{f}' cannot be read ({type(e).__name__}): start a new bench with --out") from None


def all_runs(cfg) -> list[tuple[str, int]]:
    """Every (method, seed) in the order of the serial bench and of results.json: seed by seed."""
    return [(m, s) for s in cfg.seeds for m in cfg.methods]


def finished(out: Path, method: str, seed: int) -> dict | None:
    f = run_dir(out, method, seed) / RESULT_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def tasks_done(cfg, out: Path, n_tasks: int) -> int:
    """Evaluated tasks over every run (the unit of the task bar); a finished run counts all its tasks."""
    done = 0
    for m, s in all_runs(cfg):
        if (run_dir(out, m, s) / RESULT_FILE).is_file():
            done += n_tasks
        else:
            done += sum(eval_file(out, m, s, i).is_file() for i in range(n_tasks))
    return done


def prepare_seed(cfg, seq, out: Path, seed: int) -> Path:
    """The training views of `seed` under out/data/seed<S>, written to a temporary folder and renamed, so a folder
    that exists is complete (the runs' stores record the images' sha256s: the same views must come back)."""
    data = out / "data" / f"seed{seed}"
    if not data.is_dir():
        data.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".seed{seed}-", dir=data.parent))
        try:
            seq.write(tmp, n_train=cfg.n_train, n_target=cfg.n_target, size=view_size(cfg), seed=seed)
            os.replace(tmp, data)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return data


@dataclass
class SeedInputs:
    """What every run of one seed shares: the sequence, its views on disk, the features and the real embeddings."""

    seq: object
    data: Path
    features: object
    real: list


def seed_inputs(cfg, out: Path, seed: int, seq=None, features=None) -> SeedInputs:

    seq = seq if seq is not None else load_sequence(cfg)
    features = features if features is not None else load_features(cfg.features)
    data = prepare_seed(cfg, seq, out, seed)
    real = real_embeddings(cfg, out, seed, seq, features)
    return SeedInputs(seq, data, features, real)


def real_embeddings(cfg, out: Path, seed: int, seq, features) -> list[np.ndarray]:
    """The real targets' embeddings of `seed`, per concept, saved once in data/real-seed<S>.npz (the bench's
    intervals read them back with every run's evaluations)."""
    f = real_file(out, seed)
    if f.is_file():
        with np.load(f) as z:
            return [z[f"real{j}"] for j in range(len(seq))]
    real = [features.embed_images(c.target_views(cfg.n_target, view_size(cfg), seed)) for c in seq]
    save_npz_atomic(f, **{f"real{j}": r for j, r in enumerate(real)})
    return real


def run_one(cfg, method: str, seed: int, out: str | Path, inputs: SeedInputs | None = None, tick=None) -> dict:
    """One (method, seed) run, resumed from whatever it left: the unit of work of every executor (and one Ray task).
    Writes runs/<method>-s<seed>/result.json atomically and returns the run."""

    out = Path(out)
    done = finished(out, method, seed)
    if done is not None:
        return done
    worker = {"host": socket.gethostname(), "pid": os.getpid()}  # where it runs (a Ray node, or this process)
    write_json_atomic(run_dir(out, method, seed) / WORKER_FILE, {**worker, "started": time.time()})
    with torch_threads(cfg.threads):
        inputs = inputs or seed_inputs(cfg, out, seed)
        run = run_method(cfg, method, seed, inputs.seq, inputs.data, inputs.real, inputs.features, out,
                         tick or (lambda phase, task: None))
    run["features"] = inputs.features.name
    run["worker"] = worker
    write_json_atomic(run_dir(out, method, seed) / RESULT_FILE, run)
    return run


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads at `n` for one run, then back to what they were (the config's `threads`: serial and
    Ray runs, whose workers start with one thread, then compute the same numbers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_line(run: dict) -> str:
    """The one log line of a finished run."""
    m = run["metrics"]
    return (f"{run['method']} seed {run['seed']}: A_MMD {m['A_MMD']:.4g}, BwT_MMD {m['BwT_MMD']:.4g}, "
            f"CLIP_I2I {m['CLIP_I2I']:.4g}, avg_forgetting {m['avg_forgetting']:.4g} ({run['train_seconds']:.0f}s training)")


# -- executors --------------------------------------------------------------------------------------------------
class SerialExecutor:
    """The runs one after another in this process (seed by seed, sharing each seed's features and embeddings)."""

    name = "serial"

    def run(self, cfg, out: Path, todo: list[tuple[str, int]], seq, features, progress: Progress | None,
            on_run: Callable[[dict], None]) -> None:
        n = len(seq)
        total = len(all_runs(cfg)) * n
        inputs: dict[int, SeedInputs] = {}
        for method, seed in todo:
            if seed not in inputs:
                with torch_threads(cfg.threads):  # the embeddings too, as a Ray worker computes them
                    inputs = {seed: seed_inputs(cfg, out, seed, seq, features)}  # one seed's inputs at a time
            base = tasks_done(cfg, out, n) - sum(eval_file(out, method, seed, i).is_file() for i in range(n))

            def tick(phase: str, task: int, _m=method, _s=seed, _b=base) -> None:
                if progress:
                    emit(progress, f"{_m} s{_s}: {phase}", _b + task, total)

            run = run_one(cfg, method, seed, out, inputs[seed], tick)
            if progress:
                emit(progress, "tasks", base + n, total)
            on_run(run)


def _ray_run(cfg, method: str, seed: int, out: str) -> dict:
    """The body of one Ray task (module level, so workers import it by name)."""
    return run_one(cfg, method, seed, out)


class RayExecutor:
    """Each run is one Ray task: `ray.remote(num_cpus, num_gpus, max_retries, retry_exceptions)`. `address` None starts
    a local cluster (or uses the one this process already started, e.g. `ray.init(num_cpus=2)`); "auto" or
    "ray://host:port" joins an existing one. `num_gpus` None: 1 per run when the cluster has GPUs, else 0."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: float = 1, num_gpus: float | None = None,
                 max_retries: int = 3, retry_exceptions: bool | list = False, poll_seconds: float = 2.0):
        self.ray = import_ray()
        if (num_gpus is not None and num_gpus < 0) or num_cpus <= 0:
            raise EdgecpError(f"--gpus-per-run {num_gpus} / --cpus-per-run {num_cpus}: use a number >= 0 "
                              "(a fraction shares a GPU), and more than 0 CPUs")
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.max_retries, self.retry_exceptions, self.poll_seconds = max_retries, retry_exceptions, poll_seconds

    def _init(self) -> None:
        ray = self.ray
        if ray.is_initialized():
            return
        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING,
                     include_dashboard=False if self.address is None else None)
        except ConnectionError as e:
            raise EdgecpError(f"--address {self.address}: no Ray cluster answered ({e}); start one with "
                              "`ray start --head`, or leave --address out to start a local one") from None

    def run(self, cfg, out: Path, todo: list[tuple[str, int]], seq, features, progress: Progress | None,
            on_run: Callable[[dict], None]) -> None:
        ray = self.ray
        self._init()
        gpus = self.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        for seed in sorted({s for _, s in todo}):  # the views every task reads, written once by the driver
            prepare_seed(cfg, seq, out, seed)
        task = ray.remote(num_cpus=self.num_cpus, num_gpus=gpus, max_retries=self.max_retries,
                          retry_exceptions=self.retry_exceptions)(_ray_run)
        refs = {task.remote(cfg, m, s, str(out)): (m, s) for m, s in todo}
        n = len(seq)
        total = len(all_runs(cfg)) * n
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=self.poll_seconds)
                for ref in ready:
                    on_run(self._get(ref, *refs[ref], out))
                if progress:
                    emit(progress, "tasks", tasks_done(cfg, out, n), total)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def _get(self, ref, method: str, seed: int, out: Path) -> dict:
        """The run's result; an EdgecpError raised in the task comes back as itself (one line), a worker that died
        more than `max_retries` times as an EdgecpError naming the resume."""
        exc = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exc.RayTaskError as e:
            if isinstance(e.cause, EdgecpError):
                raise e.cause from None
            raise
        except exc.RayError as e:
            raise EdgecpError(f"run {method} seed {seed} failed on Ray ({type(e).__name__}, after {self.max_retries} "
                              f"retries); what it finished is kept: `edgecp bench --resume {out} --executor ray`") from e


def import_ray():
    """Ray, imported only by the Ray executor: it is an optional extra (`edgecp[distributed]`), not in
    `edgecp[train]`, and the serial path never imports it."""
    try:
        import ray  # lazy: optional extra, not in edgecp[train]
    except ImportError:
        raise EdgecpError(f"--executor ray needs Ray, which is not installed: {RAY_FIX}") from None
    return ray


EXECUTORS = ("serial", "ray")


def make_executor(name: str = "serial", **options):
    """`serial` or `ray`; options go to RayExecutor (address, num_cpus, num_gpus, max_retries, retry_exceptions)."""
    if name == "serial":
        return SerialExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise EdgecpError(f"unknown executor '{name}': use {' or '.join(EXECUTORS)}")


# -- the bench over an executor -----------------------------------------------------------------------------------
def _inputs(cfg):
    """The sequence and the features, loaded before anything is written: a bad --sequence or --features fails here."""

    check_required(cfg)
    return load_sequence(cfg), load_features(cfg.features)


def execute(cfg, out: Path, executor=None, progress: Progress | None = None, log: Log | None = None,
            inputs=None) -> dict:
    """Run every (method, seed) of `cfg` that has no result in `out` yet, then rebuild the outputs."""
    executor = executor or SerialExecutor()
    t0 = time.perf_counter()
    seq, features = inputs or _inputs(cfg)
    runs = all_runs(cfg)
    todo = [(m, s) for m, s in runs if finished(out, m, s) is None]
    n_done = len(runs) - len(todo)
    if progress:
        emit(progress, "runs", n_done, len(runs))
        emit(progress, "tasks", tasks_done(cfg, out, len(seq)), len(runs) * len(seq))

    names = [c.name for c in seq]
    for seed in cfg.seeds:  # the intervals read them (a folder from before them gets them on --resume)
        with torch_threads(cfg.threads):
            real_embeddings(cfg, out, seed, seq, features)

    def on_run(run: dict) -> None:
        """Results stream into the folder: the table, CSV, JSON and plots cover every run finished so far (the
        intervals and tests, which take a while, once every run is done)."""
        nonlocal n_done
        n_done += 1
        rebuild(out, cfg, names=names, statistics=False)
        if log:
            log(run_line(run))
        if progress:
            emit(progress, "runs", n_done, len(runs))

    executor.run(cfg, out, todo, seq, features, progress, on_run)
    return rebuild(out, cfg, seconds=round(time.perf_counter() - t0, 1), names=names)


def absolute_paths(cfg):
    """Local paths in the config (base, sequence folder, features folder) made absolute, so that Ray workers (whose
    working folder is not ours) and a `--resume` from another folder find them; names (tiny, six, a hub id) stay."""
    def fix(value: str, names: tuple[str, ...]) -> str:
        p = Path(value).expanduser()
        return str(p.resolve()) if value and value not in names and p.exists() else value

    return replace(cfg, base=fix(cfg.base, ("tiny",)), sequence=fix(cfg.sequence, ("six", "procedural")),
                   features=fix(cfg.features, ("tiny",)))


def run_bench(cfg, out: str | Path, progress: Progress | None = None, log: Log | None = None, executor=None) -> dict:
    check_new_folder(Path(out))
    cfg = absolute_paths(cfg)
    inputs = _inputs(cfg)
    out = Path(out).expanduser().resolve()
    start_folder(cfg, out)
    return execute(cfg, out, executor, progress, log, inputs)


def resume_bench(out: str | Path, progress: Progress | None = None, log: Log | None = None, executor=None) -> dict:
    """Finish the bench in `out` with the config it was started with (`edgecp bench --resume OUT`)."""
    out = Path(out).expanduser().resolve()
    return execute(load_config(out), out, executor, progress, log)


def rebuild(out: str | Path, cfg=None, seconds: float | None = None, names: list[str] | None = None,
            statistics: bool = True) -> dict:
    """results.json, results.csv, table.md and the plots from the runs finished so far (callable at any time, also
    while a bench runs; a torn file, from a crash while writing them, is rewritten by the next rebuild)."""

    out = Path(out)
    cfg = cfg or load_config(out)
    names = names or [c.name for c in load_sequence(cfg)]
    runs = [r for r in (finished(out, m, s) for m, s in all_runs(cfg)) if r is not None]
    methods = tuple(m for m in cfg.methods if any(r["method"] == m for r in runs))
    result = {"config": asdict(cfg), "sequence": names,
              "features": runs[0].get("features") if runs else None, "seconds": seconds,
              "runs_finished": len(runs), "runs_total": len(all_runs(cfg)),
              "summary": summarize(methods, runs) if runs else {}, "runs": runs}
    if runs and statistics:
        result["statistics"] = bench_statistics(out, methods, runs, len(names), (REFERENCE, DEFAULT_METHOD))
    if runs:
        write_outputs(out, result)
    return result
