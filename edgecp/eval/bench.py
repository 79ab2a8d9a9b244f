"""`edgecp bench`: continual-learning benchmark of several methods over a concept sequence, measured as paper 000
(App. E: N_param, KID, A_MMD, BwT_MMD, CLIP I2I, F_MMD, DC-score accuracy) and paper 001 (average score and
average forgetting of the I2I score matrix) do.

For every method and seed: a fresh store on the base; task after task, learn the concept from its training views;
after every task generate `n_gen` images of every concept seen so far ("a photo of a <name>", 000 Sec. 4's "a photo
of a V*"; the class word follows the token for CD, TI and CNS) and embed them. Then:
    M[i, j] = MMD(real_j, gen_{i,j}),  D[i, j] = MMD(gen_{j,j}, gen_{i,j}),  S[i, j] = I2I(gen_{i,j}, real_j).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from edgecp import seeds, train
from edgecp.api import init_store
from edgecp.consolidation.dc_scores import dc_forward, trial
from edgecp.diffusion import encode_images
from edgecp.errors import EdgecpError
from edgecp.eval import metrics
from edgecp.eval.layout import SAMPLES_FILE, eval_file, run_dir, save_npz_atomic, store_dir
from edgecp.eval.sequences import folder_sequence, procedural_sequence, six_tasks
from edgecp.forgetting import CheckConfig
from edgecp.generate import GenerateConfig, torch_generate
from edgecp.methods import method_class, method_names
from edgecp.model.base import resolve_base
from edgecp.model.shape import base_shape
from edgecp.personal import PersonalModel, encode_text
from edgecp.prompts import expand
from edgecp.seeds import stream_seed
from edgecp.store import Store

QUICK_METHODS = ("lora-sequential", "c-lora", "dsc-ewc-dc")
CLASS_WORD_MODES = ("paper", "always", "never")
SAMPLERS = ("base", "ddim", "ddpm")
EVAL_PROMPT = "a photo of a <{}>"  # 000 Sec. 4: "a photo of a V*"


def view_size(cfg) -> int:
    """The training resolution of the bench's base (its UNet's sample size x the VAE's factor): the training views
    and the real targets are written at it (64 on the tiny base, 512 on SD 1.x)."""
    shape = base_shape(resolve_base(cfg.base), ())
    return shape.unet.sample_size * shape.vae_scale


def uses_class_word(cfg: BenchConfig, method: str) -> bool:
    """Whether `method`'s prompts name the concept's class in this bench (000 Sec. 4: "For CD and TI, we
    additionally include the concept name after the modifier token"; 003's CNS prompts: "A <new3> dog")."""
    return {"always": True, "never": False}.get(cfg.class_word, method_class(method).bench_class_word)


@dataclass(frozen=True)
class BenchConfig:
    methods: tuple[str, ...] = QUICK_METHODS
    sequence: str = "six"  # six | procedural | a folder of task folders
    tasks: int | None = None  # the first N tasks only
    seeds: tuple[int, ...] = (0,)
    base: str = "tiny"
    features: str = "tiny"
    steps: int | None = 100  # training iterations per task; None: each method's own default (000: 1000, 001: 850)
    n_train: int = 6  # training views per concept
    n_target: int = 8  # held-out target views per concept
    n_gen: int = 8  # generated images per concept per evaluation
    gen_steps: int = 20
    sampler: str = "base"  # the evaluation's sampler: "base" (the base's own scheduler), "ddim" or "ddpm" (000)
    # torch threads of every run on every executor: thread counts change float reduction order, so a run's metrics
    # depend on them; one number in the config makes serial and Ray runs agree (2: the CPU the tables were made on)
    threads: int = 2
    guidance: float = 7.5
    dc_trials: int = 4  # (t, eps) trials per training image for the DC-score accuracy
    method_params: dict = field(default_factory=dict)  # method -> {hyperparameter: value}
    prior: dict = field(default_factory=dict)  # prior-preservation overrides (num_images, steps, prompt)
    train: dict = field(default_factory=dict)  # training overrides of every run's store (lr, token_lr, batch_size ...)
    # the class word in a method's prompts: "paper" (000: for CD and TI only), "always" or "never"; the token's
    # embedding starts from the class word in every case
    class_word: str = "paper"

    def __post_init__(self) -> None:
        for m in self.methods:
            method_class(m)  # unknown names list the valid ones
        for m in self.method_params:
            if m not in self.methods:
                raise EdgecpError(f"hyperparameters given for '{m}', which is not among the bench's methods "
                                  f"({', '.join(self.methods)}): add it to --methods or drop its -p")
        if self.class_word not in CLASS_WORD_MODES:
            raise EdgecpError(f"--class-word '{self.class_word}' is unknown: use {', '.join(CLASS_WORD_MODES)}")
        if self.sampler not in SAMPLERS:
            raise EdgecpError(f"--sampler '{self.sampler}' is unknown: use {', '.join(SAMPLERS)}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or not 1 <= self.threads <= 256:
            raise EdgecpError(f"threads {self.threads!r} is out of range: use a whole number from 1 to 256")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise EdgecpError(f"--steps {self.steps!r} is not a positive whole number")
        if self.n_gen < 2 or self.n_target < 2:
            raise EdgecpError("the MMD needs at least 2 generated and 2 target images per concept (--n-gen >= 2)")


PRESETS = {
    # three methods over the six photo tasks, sized for a CPU
    "quick": BenchConfig(),
    # the paper's setting, for GPUs: every method, 1000 iterations, three seeds
    "full": BenchConfig(methods=(), steps=1000, seeds=(0, 1, 2), n_gen=32, gen_steps=50, n_target=16),
    # 000 Sec. 4 and App. H: every method with its paper's iterations (000: 1000, 001: 850; an SD base trains 1 x 8),
    # 3 seeds, "DDPM sampling with 50 inference steps to generate 400 images" per concept; the task folder
    # (--sequence DIR) and the CLIP folder (--features DIR) are the user's (eval/executor.check_required)
    "paper": BenchConfig(methods=(), sequence="", features="", steps=None, seeds=(0, 1, 2), n_gen=400, gen_steps=50,
                         sampler="ddpm", n_target=16),
}


def preset(name: str) -> BenchConfig:
    if name not in PRESETS:
        raise EdgecpError(f"unknown preset '{name}': use {', '.join(PRESETS)}")
    cfg = PRESETS[name]
    if not cfg.methods:
        cfg = replace(cfg, methods=tuple(method_names()))
    return cfg


def parse_methods(spec: str) -> tuple[str, ...]:
    """`--methods`: 'all' (every registered method) or comma-separated names."""
    if spec.strip() == "all":
        return tuple(method_names())
    return tuple(m.strip() for m in spec.split(",") if m.strip())


def load_sequence(cfg: BenchConfig):
    if cfg.sequence == "six":
        seq = six_tasks()
    elif cfg.sequence == "procedural":
        seq = procedural_sequence(50)
    else:
        try:
            seq = folder_sequence(cfg.sequence)
        except (ValueError, FileNotFoundError) as e:
            raise EdgecpError(f"--sequence '{cfg.sequence}': {e}") from None
    return seq[: cfg.tasks] if cfg.tasks else seq


def run_method(cfg: BenchConfig, method: str, seed: int, seq, data: Path, real, features, out: Path, tick) -> dict:
    root = store_dir(out, method, seed)
    if not (root / "store.json").is_file():  # resume: a store exists (Store.create is atomic) with its tasks
        init_store(root, cfg.base, method=method, method_params=cfg.method_params.get(method, {}),
                   train={**cfg.train, "seed": seed, **({"steps": cfg.steps} if cfg.steps else {})}, prior=cfg.prior)
    n = len(seq)
    learned = len(Store.open(root).concepts())  # tasks committed by an earlier, interrupted process
    gen: list[list[np.ndarray]] = []
    last_images = []
    t_train = 0.0
    named = uses_class_word(cfg, method)
    own_init = Store.open(root).info.get("token_init")  # the papers' bases: a rare token; tiny: the class word
    model, model_version = None, None
    for i, concept in enumerate(seq):
        saved = eval_file(out, method, seed, i)
        t = time.perf_counter()
        if i >= learned:
            tick(f"learn <{concept.name}>", i)
            train.add_concept(root, concept.name, [data / concept.name / "train"],  # via the module: tests wrap it
                              class_word=concept.class_word if named else None,
                              init_word=None if own_init else concept.class_word,
                              check=CheckConfig(images=0))  # the bench measures forgetting itself
        seconds = time.perf_counter() - t
        if saved.is_file():  # resume: this task's evaluation was saved by an earlier process
            row, images_last, seconds = _load_eval(saved)
        else:
            tick(f"evaluate after task {i + 1}", i)
            store = Store.open(root)
            version = _version_with(store, i + 1)
            model, model_version = PersonalModel.load(store, version), version
            concepts = store.manifest(version)["concepts"]
            row, images_last = [], []
            for j in range(i + 1):
                prompt = expand(EVAL_PROMPT.format(seq[j].name), concepts)
                gcfg = GenerateConfig(n=cfg.n_gen, seed=stream_seed(seed, seeds.BENCH_IMAGES, j), steps=cfg.gen_steps,
                                      guidance=cfg.guidance, sampler=None if cfg.sampler == "base" else cfg.sampler)
                images = torch_generate(model.comps, prompt, gcfg, model.device)
                row.append(features.embed_images(images))
                if i == n - 1:
                    images_last.append(images)
            if i < learned:  # learned by a process that crashed before this evaluation: the manifest's time
                seconds = concepts[i]["seconds"]["total"]
            _save_eval(saved, row, images_last, seconds)
        t_train += seconds
        if i == n - 1:
            last_images = images_last
        gen.append(row)
    store = Store.open(root)
    if model_version != store.head:  # every evaluation was saved before a crash
        model = PersonalModel.load(store)
    acc = dc_accuracy(model, store, seq, data, cfg.dc_trials, seed)
    m, d = metrics.mmd_matrices(real, gen)
    s = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(i + 1):
            s[i, j] = metrics.clip_i2i(gen[i][j], real[j])
    kid = float(np.mean([metrics.kid(gen[n - 1][j], real[j], subsets=50, seed=seed)[0] for j in range(n)]))
    n_param = store.manifest()["n_param"]
    samples = run_dir(out, method, seed) / SAMPLES_FILE
    _save_grid(last_images, [c.name for c in seq], samples)
    return {
        "method": method, "seed": seed, "train_seconds": round(t_train, 1),
        "metrics": {
            "N_param_Train": n_param["train_pct"], "N_param_Store": n_param["store_pct"],
            "KID": kid, "A_MMD": metrics.a_mmd(m), "BwT_MMD": metrics.bwt_mmd(m) if n > 1 else math.nan,
            "CLIP_I2I": float(np.nanmean(s[n - 1])), "F_MMD": metrics.f_mmd(d) if n > 1 else math.nan,
            "avg_score": metrics.average_score(s), "avg_forgetting": metrics.average_forgetting(s) if n > 1 else math.nan,
            "DC_accuracy": acc,
        },
        "matrices": {"M": _nan_list(m), "D": _nan_list(d), "S": _nan_list(s)},
        "samples": str(samples),
    }


def _version_with(store, n_concepts: int) -> str:
    """The version on HEAD's line that holds the first `n_concepts` tasks (HEAD itself unless a crash came between
    a task's commit and its evaluation's file)."""
    version = store.head
    while len(store.manifest(version)["concepts"]) > n_concepts:
        version = store.manifest(version)["parent"]
    return version


def _save_eval(path: Path, row: list[np.ndarray], images: list, seconds: float) -> None:
    """One task's evaluation (embeddings of each seen concept's images; the images themselves after the last task)."""

    arrays = {f"emb{j}": e for j, e in enumerate(row)}
    arrays.update({f"img{j}": np.stack([np.asarray(im) for im in ims]) for j, ims in enumerate(images)})
    save_npz_atomic(path, seconds=np.float64(seconds), **arrays)


def _load_eval(path: Path) -> tuple[list[np.ndarray], list, float]:
    with np.load(path) as z:
        row = [z[f"emb{j}"] for j in range(sum(k.startswith("emb") for k in z.files))]
        images = [[Image.fromarray(a) for a in z[f"img{j}"]] for j in range(sum(k.startswith("img") for k in z.files))]
        return row, images, float(z["seconds"])


def dc_accuracy(model, store, seq, data: Path, trials: int, seed: int) -> float:
    """Paper 000's Sanity check II: classify every training image among all learned concepts by DC scores
    (argmin of the denoising error averaged over `trials` shared (t, eps) trials, one batched UNet call each)."""
    comps = model.comps
    sched = DDPMScheduler.from_config(comps.scheduler.config)
    with torch.no_grad():
        texts = encode_text(comps, [expand(EVAL_PROMPT.format(c.name), store.concepts()) for c in seq], model.device)
    gen = torch.Generator().manual_seed(seed)
    errors, labels = [], []
    for j, c in enumerate(seq):
        paths = sorted((data / c.name / "train").glob("*.png"))
        lat = encode_images(comps, paths, comps.resolution, model.device, flip=False)
        x0 = lat.mean * lat.scale
        err = torch.zeros(len(paths), len(seq))
        with torch.no_grad():
            for _ in range(trials):
                t, noise = trial(x0, sched.config.num_train_timesteps, gen)
                e, _ = dc_forward(lambda x, tt, cc: comps.unet(x, tt, cc).sample, sched, x0, texts, t, noise)
                err += e.cpu()
        errors.append(err.numpy())
        labels += [j] * len(paths)
    return metrics.dc_accuracy(np.concatenate(errors), np.array(labels))


def _nan_list(a: np.ndarray) -> list:
    return [[None if math.isnan(v) else float(v) for v in row] for row in a]


TABLE_COLUMNS = ["N_param_Train", "N_param_Store", "KID", "A_MMD", "BwT_MMD", "CLIP_I2I", "F_MMD",
                 "avg_score", "avg_forgetting", "DC_accuracy"]


def summarize(methods, runs: list[dict]) -> dict:
    """Mean and std over seeds of every table column, per method in `methods`."""
    out = {}
    for method in methods:
        rs = [r["metrics"] for r in runs if r["method"] == method]
        out[method] = {k: {"mean": float(np.nanmean([r[k] for r in rs])) if any(not math.isnan(r[k]) for r in rs) else None,
                           "std": float(np.nanstd([r[k] for r in rs])) if len(rs) > 1 else 0.0} for k in TABLE_COLUMNS}
    return out


def _fmt(stat: dict | None, key: str) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    s = _scale(key)
    return _num(stat["mean"] * s, 2, 4) + (f" ± {_num(stat['std'] * s, 1, 2)}" if stat["std"] else "")


def _num(x: float, decimals: int, significant: int) -> str:
    """Fixed decimals from 1 up, significant digits below: raw BwT_MMD and F_MMD are often of order 1e-4."""
    return f"{x:.{decimals}f}" if abs(x) >= 1 else f"{x:.{significant}g}"


def _scale(key: str) -> float:
    """Paper 000's table factor (metrics.PAPER_SCALE; the raw numbers are in results.json)."""
    return metrics.PAPER_SCALE.get(key.lower(), 1.0)


def table_markdown(result: dict) -> str:
    """Mean ± std over seeds; with the statistics, the 95% interval in brackets and the marks of the paired tests
    (* differs from the reference, † from the default method, p < alpha; the legend under the table)."""
    cols = TABLE_COLUMNS
    st = result.get("statistics") or {}
    head = ["method"] + [f"{c} (x{_scale(c):g})" if _scale(c) != 1.0 else c for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, stats in result["summary"].items():
        lines.append("| " + " | ".join([method] + [_fmt(stats[c], c) + _extras(st, method, c) for c in cols]) + " |")
    if st.get("intervals"):
        refs = list(st.get("tests", {}))
        marks = ", ".join(f"{m} differs from {r}" for m, r in zip(MARKS, refs))
        lines += ["", f"[lo, hi]: {st['confidence']:.0%} bootstrap interval over seeds, concepts and evaluation images "
                      f"({st['replicates']} replicates). {marks}: paired sign-flip test over (seed, concept) units, "
                      f"p < {st['alpha']}, no correction for multiple comparisons; unmarked differences are not "
                      "distinguishable at this size."]
    return "\n".join(lines) + "\n"


MARKS = ("*", "†")


def _extras(st: dict, method: str, key: str) -> str:
    iv = st.get("intervals", {}).get(method, {}).get(key)
    if iv is None:
        return ""
    s = _scale(key)
    text = f" [{_num(iv[0] * s, 2, 3)}, {_num(iv[1] * s, 2, 3)}]"
    for mark, rows in zip(MARKS, st.get("tests", {}).values()):
        if rows.get(method, {}).get(key, {}).get("significant"):
            text += mark
    return text


def write_outputs(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", *TABLE_COLUMNS])
        for r in result["runs"]:
            w.writerow([r["method"], r["seed"], *(r["metrics"][c] for c in TABLE_COLUMNS)])
    (out / "table.md").write_text(table_markdown(result))
    _plots(out, result)


def _plots(out: Path, result: dict) -> None:
    """curves.png (mean MMD and I2I over the seen tasks, per method) and each run's heatmaps.png, through
    matplotlib's object API (a `Figure` per plot, no pyplot): no global figure registry, no GUI backend."""
    names = result["sequence"]
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for method in result["summary"]:
        runs = [r for r in result["runs"] if r["method"] == method]
        for ax, key, label in ((axes[0], "M", "mean MMD to targets over seen tasks (lower is better)"),
                               (axes[1], "S", "mean I2I over seen tasks (higher is better)")):
            curves = np.array([[np.nanmean([v for v in row if v is not None]) for row in r["matrices"][key]] for r in runs])
            ax.plot(range(1, len(names) + 1), curves.mean(0), marker="o", label=method)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("after task")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    for r in result["runs"]:
        fig = Figure(figsize=(10, 4.2))
        axes = fig.subplots(1, 2)
        for ax, key, title in ((axes[0], "M", "MMD(real_j, gen_ij)"), (axes[1], "S", "I2I(gen_ij, real_j)")):
            a = np.array([[np.nan if v is None else v for v in row] for row in r["matrices"][key]])
            im = ax.imshow(a, cmap="viridis")
            ax.set_title(f"{r['method']} s{r['seed']}: {title}", fontsize=9)
            ax.set_xticks(range(len(names)), names, rotation=45, fontsize=7)
            ax.set_yticks(range(len(names)), [f"after {n}" for n in names], fontsize=7)
            fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        fig.savefig(Path(r["samples"]).parent / "heatmaps.png", dpi=110)


def _save_grid(images_per_concept: list[list], names: list[str], path: Path) -> None:
    """Rows: concepts (after the last task); columns: generated samples."""
    w, h = images_per_concept[0][0].size
    cols = max(len(r) for r in images_per_concept)
    label = 70
    grid = Image.new("RGB", (label + cols * w, len(names) * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (row, name) in enumerate(zip(images_per_concept, names)):
        draw.text((4, i * h + h // 2 - 5), f"<{name}>", fill="black")
        for j, im in enumerate(row):
            grid.paste(im, (label + j * w, i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
