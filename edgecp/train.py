"""The one training loop: `add_concept(store, name, images, ...)` learns a concept and commits a version.

The GPU path (issue 22), each part proven on the CPU by tests/test_gpu_plumbing.py:
- the device keeps its index everywhere it selects one (`cuda:1` loads, quantizes and trains on GPU 1; autocast
  takes only the device's type, as it should);
- fp16 plans train with loss scaling (`scaling.grad_scaler`: torch.amp.GradScaler; a step whose gradients are not
  finite is skipped and the scale halved, as GradScaler does; the manifest records the skipped steps);
- an out-of-memory error lets go of the failed run's model, optimizer and activations before the one-line error is
  raised (outside the `except` block, so that it does not carry the failure as its context), and CUDA's cache is
  emptied: a retry in the same process starts from a clean GPU;
- bitsandbytes' and torchao's notices are quiet for the duration of `add_concept` only (`scoped.quiet_libraries`).
- Determinism, our choice: nothing is set. The same seed gives the same result on the CPU (the tests and the
  bench's resume and executor equality rely on it); on CUDA runs agree closely, not bit for bit (cuDNN picks its
  convolution algorithms, TF32 convolutions in fp32 plans, atomic adds in backward kernels such as nearest
  upsampling's). `torch.use_deterministic_algorithms(True)` would make those kernels raise or warn, and a
  process-wide CUBLAS_WORKSPACE_CONFIG is not the library's to set; unverified without a GPU, so not claimed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as replace_dc
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save

from edgecp import resumable, seeds
from edgecp.captions import PLACEHOLDER, caption_file, caption_prompt, read_caption
from edgecp.config import (
    AdapterConfig,
    TrainConfig,
    check_concept_name,
    from_dict,
    replace,
    stored_prior,
    to_dict,
)
from edgecp.diffusion import LatentSet, denoise_loss, draw_noise, encode_images  # noqa: F401 (public here too)
from edgecp.errors import EdgecpError
from edgecp.forgetting import CheckConfig, contact_sheet, run_check
from edgecp.images import given_files, purge_sources, validate_images
from edgecp.memory import (
    PeakMeter,
    device_info,
    forget_failure,
    is_oom,
    on_host,
    release_memory,
    resolve_device,
    training_workload,
    uses_priors,
)
from edgecp.methods import build_method
from edgecp.methods.base import TaskContext
from edgecp.methods.phases import autocast, checkpointing, concept_texts, reference_loss
from edgecp.model.quant import load_planned
from edgecp.model.tokens import (
    add_concept_token,
    concept_embedding,
    load_concept_tokens,
    token_of,
    word_embedding,
)
from edgecp.outputs import absolute, check_output_dir
from edgecp.personal import RECORD_FILE, TOKENS_FILE, encode_text, open_base, read_tensors
from edgecp.planner import GB, DeviceInfo, Plan, fmt_bytes, parse_bytes, plan_training, text_off_device
from edgecp.priors import ensure_priors, prior_key
from edgecp.progress import METRICS, Progress, ProgressEvent  # noqa: F401 (ProgressEvent: public here too)
from edgecp.progress import emit as report
from edgecp.prompts import concept_prompt, expand
from edgecp.scaling import grad_scaler
from edgecp.scoped import quiet_libraries
from edgecp.seeds import stream_seed
from edgecp.store import Store, sha256_file


@dataclass(frozen=True)
class SampleConfig:
    """Images drawn while a concept learns (`add-concept --sample-every N --sample-dir DIR`): `n` per prompt at
    iteration 0, every `every` iterations and at the last, into `out_dir` (outside the store), named
    `<concept>-<prompt>-step<NNNNN>-s<seed>-<i>.png`. `prompts` may use `<name>` (this concept and the earlier
    ones); empty: the concept's own training prompt. Sampling runs under torch.random.fork_rng and in eval mode, so
    the training draws exactly what it draws without samples."""

    every: int
    out_dir: Path
    prompts: tuple[str, ...] = ()
    n: int = 1
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise EdgecpError(f"--sample-every {self.every!r} must be a whole number of iterations, 1 or more")


@dataclass
class RunOptions:
    """What one add-concept run does besides learning: resumable checkpoints, samples, the forgetting check."""

    checkpoint_dir: Path | None = None  # STORE/resumable when the concept is resumable
    checkpoint_every: int = resumable.DEFAULT_EVERY
    resume: tuple[dict, dict] | None = None  # (tensors, meta) of the checkpoint to continue from
    samples: SampleConfig | None = None
    check: CheckConfig = field(default_factory=CheckConfig)
    contact_sheet: Path | None = None
    memory_budget: int | str | None = None
    captions: list[str | None] | None = None  # per photo; None: the method's prompt for every photo


@quiet_libraries()
def add_concept(
    store_root: str | Path,
    name: str,
    images: list[str | Path],
    *,
    class_word: str | None = None,
    init_word: str | None = None,
    overrides: dict | None = None,
    purge_source: bool = False,
    device: str | None = None,
    progress: Progress | None = None,
    memory_budget: int | str | None = None,
    plan_force: dict | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    resumable_: bool = False,
    checkpoint_every: int | None = None,
    samples: SampleConfig | None = None,
    check: CheckConfig | None = None,
    contact_sheet: str | Path | None = None,
    on_notice: Callable[[str], None] | None = None,
) -> dict:
    """Learn concept `name` from `images`, commit it as a new version, purge the staged copies. Returns the manifest.

    The memory planner picks how to run within `memory_budget` (bytes or '6GB'; default: the store's, else the
    device's memory) before anything is written; `on_plan` receives the plan. `plan_force` pins plan fields
    (e.g. {"weights": "int8"}). Every input is validated before anything is written; on any failure, an
    out-of-memory error included, the store is exactly as before and the staged images are purged.
    `class_word` goes into the concept's prompts; the token's embedding starts from `init_word` (default: the
    store's `token_init`, the rare token "ktn" on the papers' bases as CD and 000 App. A; on the tiny base the
    class word, else "object"), so a concept can start from its class without its prompts naming it.

    A `NAME.txt` beside an image is its caption (`edgecp.captions`: `[name]` is the concept).

    Training that diverges (a loss, or any tensor the method would store, NaN or infinite) commits nothing: one line
    names the tensor and suggests a lower learning rate; the store is unchanged and the staged images are purged.
    `purge_source` deletes every file given (folders as listed now, copies and links included) whose bytes were
    learned, and the caption beside each deleted photo, and reports each file kept and why (`images.purge_sources`).

    After an out-of-memory error (CUDA's, cuBLAS's or cuDNN's allocation failures, the CPU allocator's) nothing of
    the failed run stays alive in this process and CUDA's cache is emptied, so a retry with a smaller budget can run
    at once; the error raised is an EdgecpError without the failure attached (its type is named in the message).

    `resumable_`: the concept survives a crash, a kill or an out-of-memory error (`edgecp.resumable`): its photos
    stay staged in STORE/resumable/ with a checkpoint every `checkpoint_every` iterations until it commits;
    `resume_concept` continues it, `abandon_concept` drops it. `on_notice` receives the one line that says so.
    `samples`: images while it learns (SampleConfig). `check`: the forgetting check after training
    (`edgecp.forgetting`, default CheckConfig(); images=0 turns it off), its result in the manifest's `check`;
    `contact_sheet`: a PNG path for its images, written after the commit.
    """
    name = check_concept_name(name)
    store = Store.open(store_root)
    paths = validate_images(images)
    captions = [read_caption(p) for p in paths]
    given = given_files(images) if purge_source else []  # listed now: a file added to a folder later stays
    if class_word is not None and not class_word.strip():
        raise EdgecpError("--class-word is empty: pass a word such as 'dog', or leave it out")
    train_cfg = replace(from_dict(TrainConfig, store.info["train"], "train"), **(overrides or {}))
    run = _run_options(store, checkpoint_every, samples, check, contact_sheet, memory_budget, captions)
    with store.writer():
        waiting = resumable.pending(store)
        if waiting:
            raise EdgecpError(f"concept '{waiting['name']}' is pending in '{store.root}' (resumable): continue it with "
                              f"`edgecp add-concept --resume --store {store.root}` or drop it with `edgecp "
                              f"add-concept --abandon --store {store.root}` before adding another")
        if store.concept(name):
            raise EdgecpError(
                f"concept '{name}' already exists in '{store.root}': choose another name (see `edgecp concepts`)"
            )
        spec = open_base(store)
        dev = resolve_device(device)
        plan = plan_add_concept(store, spec, train_cfg, dev, memory_budget, len(paths), plan_force)
        if on_plan:
            on_plan(plan)
        if resumable_:
            info = {"name": name, "class_word": class_word, "init_word": init_word, "train": to_dict(train_cfg),
                    "head": store.head, "images": _image_records(paths, captions),
                    "checkpoint_every": run.checkpoint_every, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            d = resumable.create(store, info, paths, captions)
            if on_notice:
                on_notice(f"'{name}' is resumable: its {len(paths)} photo(s) stay staged in {d} until it commits or "
                          f"you run `edgecp add-concept --abandon --store {store.root}`")
            run.checkpoint_dir = d
            manifest = _learn_resumable(store, spec, name, paths, (class_word, init_word), train_cfg, dev, progress,
                                        plan, run)
        else:
            try:
                staged = store.stage(paths)
            except BaseException:  # a disk that filled up or a Ctrl-C mid-copy: the partial copies go now
                with contextlib.suppress(Exception):
                    store.recover()
                raise
            failed = None
            try:
                manifest = _learn(store, spec, name, sorted(staged.iterdir()), paths, (class_word, init_word),
                                  train_cfg, dev, progress, plan, run)
            except Exception as e:
                if not is_oom(e):
                    raise
                failed = type(e).__name__
                forget_failure(e)  # the frames' locals: model, optimizer, activations
            finally:
                store.purge_staging(staged)
            if failed is not None:  # raised here, not in the except block: no reference back to the failure
                release_memory(dev)
                raise EdgecpError(_oom_message(failed, plan, dev))
    if purge_source:  # what was and was not deleted (copies, links, hard links), for the CLI
        entry = manifest["concepts"][-1]
        manifest["purged"] = purge_sources(given, {i["sha256"] for i in entry["images"]})
        purge_captions(manifest["purged"], paths, captions)
    _write_sheet(manifest, run)
    return manifest


@quiet_libraries()
def resume_concept(store_root: str | Path, *, device: str | None = None, progress: Progress | None = None,
                   memory_budget: int | str | None = None, plan_force: dict | None = None,
                   on_plan: Callable[[Plan], None] | None = None, samples: SampleConfig | None = None,
                   check: CheckConfig | None = None, contact_sheet: str | Path | None = None) -> dict:
    """Continue the store's pending resumable concept from its last checkpoint and commit it (the same tensors as
    an uninterrupted run on a deterministic CPU run). The memory budget and plan may differ from the first run's.
    Source files are not deleted by a resume, even if the first run had `--purge-source`: edgecp never deletes
    a path it read from a store file."""
    store = Store.open(store_root)
    with store.writer():
        waiting = resumable.pending(store)
        if not waiting:
            raise EdgecpError(f"store '{store.root}' has no pending concept to resume: start one with `edgecp "
                              "add-concept NAME PHOTOS --resumable`")
        name = waiting["name"]
        if store.head != waiting["head"]:
            raise EdgecpError(f"HEAD of '{store.root}' moved from {waiting['head']} to {store.head} since '{name}' "
                              f"started: resuming would learn it on another model; drop it with `edgecp add-concept "
                              f"--abandon --store {store.root}` and add it again")
        photos, captions = resumable.staged_photos(store)
        train_cfg = from_dict(TrainConfig, waiting["train"], "train")
        run = _run_options(store, waiting.get("checkpoint_every"), samples, check, contact_sheet, memory_budget,
                           captions)
        run.checkpoint_dir = resumable.folder(store)
        run.resume = resumable.read_checkpoint(run.checkpoint_dir)
        spec = open_base(store)
        dev = resolve_device(device)
        plan = plan_add_concept(store, spec, train_cfg, dev, memory_budget, len(photos), plan_force)
        if on_plan:
            on_plan(plan)
        manifest = _learn_resumable(store, spec, name, photos, (waiting["class_word"], waiting["init_word"]),
                                    train_cfg, dev, progress, plan, run)
    _write_sheet(manifest, run)
    return manifest


def abandon_concept(store_root: str | Path) -> dict:
    """Drop the pending resumable concept: its staged photos, captions and checkpoints are deleted."""
    store = Store.open(store_root)
    with store.writer(check_head=False):
        waiting = resumable.pending(store)
        if not waiting:
            raise EdgecpError(f"store '{store.root}' has no pending concept to abandon")
        resumable.remove(store)
    return {"name": waiting["name"], "photos": len(waiting["images"]), "checkpoint": waiting["checkpoint"]}


def _default_check() -> CheckConfig:
    """The forgetting check add-concept runs when given none (the test suite replaces it to stay fast)."""
    return CheckConfig()


def _run_options(store, checkpoint_every, samples, check, contact_sheet, memory_budget, captions) -> RunOptions:
    every = resumable.DEFAULT_EVERY if checkpoint_every is None else checkpoint_every
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise EdgecpError(f"--checkpoint-every {every!r} must be a whole number of iterations, 1 or more")
    if samples is not None:
        samples = replace_dc(samples, out_dir=check_output_dir(samples.out_dir, store.root, kind="images"))
    if contact_sheet is not None:
        contact_sheet = absolute(contact_sheet)
        if contact_sheet.suffix.lower() != ".png":
            raise EdgecpError(f"--contact-sheet '{contact_sheet}' must be a .png file path")
        if contact_sheet.exists() and not contact_sheet.is_file():
            raise EdgecpError(f"--contact-sheet '{contact_sheet}' is a folder: pass a .png file path")
    return RunOptions(checkpoint_every=every, samples=samples, check=check or _default_check(),
                      contact_sheet=contact_sheet, memory_budget=memory_budget,
                      captions=captions if any(c is not None for c in captions) else None)


def _image_records(paths: list[Path], captions: list[str | None]) -> list[dict]:
    """What the manifest keeps of each photo: sha256 and bytes, and its caption's sha256 and length (never its text)."""
    out = []
    for p, c in zip(paths, captions):
        rec = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        if c is not None:
            raw = c.encode("utf-8")
            rec["caption"] = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
        out.append(rec)
    return out


def purge_captions(purged: dict, paths: list[Path], captions: list[str | None]) -> None:
    """Delete the caption beside each deleted photo when it still holds the caption that was learned."""
    deleted = set(purged["deleted"])
    for p, c in zip(paths, captions):
        if c is None:
            continue
        f = caption_file(p)
        if str(p) not in deleted and str(p.absolute()) not in deleted:
            continue
        try:
            now = read_caption(p)
        except EdgecpError:
            now = None
        if now == c and f.is_file() and not f.is_symlink():
            f.unlink()
            purged["deleted"].append(str(f))
        elif f.exists():
            purged["not_deleted"].append({"path": str(f), "reason": "the caption changed since it was read"})


def _write_sheet(manifest: dict, run: RunOptions) -> None:
    images = manifest.pop("_check_images", None)
    if run.contact_sheet is not None and images:
        manifest["contact_sheet"] = str(contact_sheet(images, manifest["check"], run.contact_sheet))


def _learn_resumable(store, spec, name, photos, words, cfg, dev, progress, plan, run: RunOptions) -> dict:
    """Learn a resumable concept: its staged photos stay on any failure but a divergence (which a resume would
    repeat); on success they go with STORE/resumable/."""
    try:
        manifest = _learn(store, spec, name, photos, photos, words, cfg, dev, progress, plan, run)
    except TrainingDiverged:
        resumable.remove(store)
        raise
    except Exception as e:
        if not is_oom(e):
            raise
        failed = type(e).__name__
        forget_failure(e)
        release_memory(dev)
        raise EdgecpError(_oom_message(failed, plan, dev, resumable_store=store.root)) from None
    resumable.remove(store)
    return manifest


def _store_method(store):
    info = store.info["method"]
    return build_method(info["name"], info["params"], from_dict(AdapterConfig, store.info["adapter"], "adapter"))


def plan_add_concept(store, spec, train_cfg: TrainConfig, device: torch.device, memory_budget=None,
                     n_images: int = 4, force: dict | None = None, info: DeviceInfo | None = None) -> Plan:
    """The memory plan add-concept will run (no model loaded): `edgecp plan` shows the same. `info` describes the
    device instead of asking it (`edgecp plan --gpu-memory`: a GPU that is not here)."""
    method = _store_method(store)
    shape = method.base_shape(spec)
    resolution = train_cfg.resolution or shape.unet.sample_size * shape.vae_scale
    prior_cfg = stored_prior(store.info["prior"])
    cached = (store.prior_dir(prior_key(store.info["base"]["sha256"], prior_cfg, resolution)) / "done.json").exists()
    drawn = 0 if cached or not uses_priors(method, train_cfg) else prior_cfg.num_images
    work = training_workload(method, shape, train_cfg, resolution, len(store.concepts()), n_images, drawn,
                             prior_cfg.steps)
    if not train_cfg.gradient_checkpointing:
        force = {**(force or {}), "gradient_checkpointing": False}
    budget = parse_bytes(memory_budget if memory_budget is not None else store.info.get("memory_budget"))
    return plan_training(shape, work, info or device_info(device), budget, force)


def _oom_message(error_type: str, plan: Plan, device: torch.device, resumable_store: Path | None = None) -> str:
    """The one line after an out-of-memory error (computed after the failed run's memory was released)."""
    free = device_info(device).total
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    suggest = min(0.8 * plan.peak, 0.9 * free) / GB
    if resumable_store is not None:
        return (f"ran out of {device.type} memory while learning ({error_type}; the plan predicted "
                f"{fmt_bytes(plan.peak)}): nothing was committed; the concept stays resumable from its last "
                f"checkpoint: `edgecp add-concept --resume --store {resumable_store} --memory-budget {suggest:.1f}GB`")
    return (f"ran out of {device.type} memory while learning ({error_type}; the plan predicted "
            f"{fmt_bytes(plan.peak)}): the store is unchanged and the staged images were purged; "
            f"retry with --memory-budget {suggest:.1f}GB, or free memory held by other programs")


def _learn(store, spec, name, staged, sources, words, cfg: TrainConfig, device, progress, plan: Plan,
           run: RunOptions) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    method = _store_method(store)
    record: dict[str, list[float]] = {}
    with PeakMeter(device) as meter:
        def emit(phase, i, n, loss=None, metric=None):
            meter.enter(phase)
            if loss is not None and phase != "train":  # the training loop keeps its own losses
                record.setdefault(phase, []).append(round(float(loss), 6))
            report(progress, phase, i, n, loss, metric)

        emit("load", 0, 1)
        precision = method.precision(plan)
        # earlier base-weight changes folded in fp32 as the base loads, then held in the plan's dtype (model/quant.py)
        comps = load_planned(spec, precision, device, fold=method.base_changes(store.version_dir()))  # cuda:1 there
        for m in (comps.text_encoder, comps.vae, comps.unet):
            m.to(device)
        emit("load", 1, 1)
        files, manifest = _learn_loaded(store, comps, method, name, staged, sources, words, cfg, device, emit, plan,
                                        meter, t_start, run, record)
        del comps, method
        release_memory(device)  # the check loads the two versions' models: the training model goes first
    return _commit(store, files, manifest, run, device,
                   lambda phase, i, n, loss=None, metric=None: report(progress, phase, i, n, loss, metric), t_start)


def _commit(store, files: dict, manifest: dict, run: RunOptions, device, emit, t_start: float) -> dict:
    """Seal and commit the version, the forgetting check run on its files first (its result in the manifest)."""
    parent = store.head
    images: dict = {}

    def check(folder: Path) -> dict:
        result, drawn = run_check(store, parent, folder, manifest, run.check, device, run.memory_budget,
                                  lambda ev: emit("check", ev.step, ev.total))
        images.update(drawn)
        return {"check": result}

    emit("commit", 0, 1)
    manifest["concepts"][-1]["seconds"]["total"] = round(time.perf_counter() - t_start, 2)
    version = store.commit(files, manifest, before_seal=check)
    emit("commit", 1, 1)
    out = store.manifest(version)
    if images:
        out["_check_images"] = images  # for the contact sheet; never written to the store
    return out


def _learn_loaded(store, comps, method, name, staged, sources, words, cfg, device, emit, plan, meter,
                  t_start, run: RunOptions | None = None, record: dict | None = None) -> tuple[dict, dict]:
    """Train and consolidate; returns (files, manifest) of the version, not committed (`_commit` does)."""
    run = run or RunOptions()
    record = {} if record is None else record
    class_word, init_word = words
    init_word = init_word or store.info.get("token_init")
    size = cfg.resolution or comps.resolution
    prior_cfg = stored_prior(store.info["prior"])
    prior_paths = (ensure_priors(store, comps, prior_cfg, size, device, lambda ev: emit("priors", ev.step, ev.total),
                                 plan) if uses_priors(method, cfg) else [])

    head = store.manifest()
    previous = head["concepts"]
    load_concept_tokens(comps.tokenizer, comps.text_encoder, previous, read_tensors(store.version_dir(), TOKENS_FILE))
    token = token_of(name)
    init = word_embedding(comps.tokenizer, comps.text_encoder, init_word or class_word or "object")
    add_concept_token(comps.tokenizer, comps.text_encoder, name, init, trainable=cfg.token_lr > 0)
    token_row = concept_embedding(comps.text_encoder).rows[-1]

    method_info = store.info["method"]
    ctx = TaskContext(
        index=len(previous) + 1, name=name, token=token, class_word=class_word,
        prompt=concept_prompt(store.info["prompt_template"], token, class_word), prior_prompt=prior_cfg.prompt,
        previous=previous, prev_dir=store.version_dir(), train=cfg, comps=comps, device=device,
        noise_scheduler=DDPMScheduler.from_config(comps.scheduler.config),
        token_row=token_row if cfg.token_lr > 0 else None, plan=plan,
    )
    if run.captions is not None:  # each photo's rows (the photo, then its mirror image) train on its caption
        per_photo = [ctx.prompt if c is None else caption_prompt(c, token, class_word) for c in run.captions]
        ctx.extra["instance_prompts"] = per_photo + per_photo
    emit("encode", 0, 1)
    with on_host(comps.text_encoder, device, text_off_device(plan)):  # the VAE's phase: the encoders wait on the host
        ctx.instance = encode_images(comps, staged, size, device, flip=True)
        ctx.prior = encode_images(comps, prior_paths, size, device, flip=False) if prior_paths else None
    if plan.offload and run.samples is None:  # the latents are cached: the VAE is not needed again in this task
        comps.vae = None
        release_memory(device)
    emit("encode", 1, 1)

    method.prepare(ctx)
    n_train = method.n_trainable(ctx)
    entry_prompt = {"name": name, "token": token, "class_word": class_word}
    losses, fixed_before = _train_loop(ctx, method, emit, run, previous + [entry_prompt])
    record["train"] = losses
    t_train = time.perf_counter() - t_start
    with torch.no_grad(), autocast(ctx):
        fixed_text = encode_text(comps, [ctx.prompt], device).detach().float()
    if plan.offload:  # consolidation needs only the concepts' embeddings: cache them, drop the text encoder
        concept_texts(ctx)
        comps.text_encoder = None  # the token row lives on in ctx.token_row
        comps.vae = None
        release_memory(device)
    method.consolidate(ctx, lambda ev: emit(ev.phase, ev.step, ev.total, ev.loss, ev.metric))
    fixed_after = reference_loss(ctx, text=fixed_text)

    tensors = method.files(ctx)
    check_finite({**tensors, TOKENS_FILE: {token: token_row}}, cfg)
    n_store = sum(t.numel() for f in tensors.values() for t in f.values())
    files = {fname: _safetensors_bytes(t) for fname, t in tensors.items()}
    tokens = read_tensors(store.version_dir(), TOKENS_FILE)
    tokens[token] = token_row.detach().float().cpu().clone()
    files[TOKENS_FILE] = _safetensors_bytes(tokens)
    entry = {
        "name": name, "token": token, "class_word": class_word, "prompt": ctx.prompt, "task": ctx.index,
        "init_word": init_word or class_word or "object",
        "images": _image_records(sources, run.captions or [None] * len(sources)),
        "steps": cfg.steps, "train": to_dict(cfg),
        "seconds": {"train": round(t_train, 2), "total": round(time.perf_counter() - t_start, 2)},
        # single-batch losses are noisy (one random t and noise per row): the fixed loss is the comparable one,
        # the concept's prompt on its first 4 photos at 8 evenly spaced timesteps with fixed noise
        # (phases.reference_loss), before training and for the committed model
        "metrics": {"loss_fixed_before": round(fixed_before, 6), "loss_fixed_after": round(fixed_after, 6),
                    "loss_first": losses[0], "loss_last": losses[-1]},
        "seconds_per_iteration": {
            k: round(v, 4) for k, v in (("train", ctx.extra["train_seconds"] / cfg.steps),
                                        ("fisher", ctx.extra.get("fisher_seconds_per_iter")),
                                        ("dsc", ctx.extra.get("dsc_seconds_per_iter"))) if v is not None},
        "memory": {"plan": plan.to_json(), "predicted_peak": plan.peak, "measured_peak": meter.peak,
                   "measured_phases": dict(meter.phases), "device": str(device),
                   "measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS",
                   **({"measured_reserved_phases": dict(meter.reserved)} if meter.reserved else {})},
    }
    if "loss_scale" in ctx.extra:  # fp16 plans: GradScaler's final scale and the steps it skipped
        entry["loss_scaling"] = ctx.extra["loss_scale"]
    unet_params = sum(p.numel() for n, p in comps.unet.named_parameters() if "lora_" not in n and "vera_" not in n)
    manifest = {
        "concepts": previous + [entry], "method": method_info,
        # the paper's N_param Train / Store: % of the UNet's parameters trained per task / stored (base = 100)
        "n_param": {"unet": unet_params, "train": n_train, "store": n_store,
                    "train_pct": round(100 * n_train / unet_params, 4),
                    "store_pct": round(100 + 100 * n_store / unet_params, 4)},
        **method.manifest_extra(ctx),
    }
    files[RECORD_FILE] = json.dumps(training_record(record, cfg), indent=1).encode()
    if run.captions is not None:
        manifest["captions"] = {"placeholder": PLACEHOLDER, "used_by": "the training phase's denoising loss only; "
                                "the DC phases compare the method's prompts"}
    return files, manifest


def training_record(record: dict[str, list[float]], cfg: TrainConfig) -> dict:
    """The loss curve of every phase that has one, with what each number is (`progress.METRICS`)."""
    return {"format": "edgecp-training-record/1", "seed": cfg.seed,
            "phases": {phase: {"metric": METRICS.get(phase, "loss"), "values": values}
                       for phase, values in record.items() if values}}


class Trainer:
    """One training iteration = grad_accum batches of (instance + prior) rows, then an optimizer step.

    A memory plan may split each batch of B images into micro-batches of m: the B instance and B prior latents, their
    noise and timesteps are drawn exactly as for one call, then the UNet runs on m + m rows at a time and the
    gradients add up (each call's loss is weighted by its share of the rows), so the step is the same.
    """

    def __init__(self, ctx: TaskContext, method):
        comps, cfg = ctx.comps, ctx.train
        self.ctx, self.method = ctx, method
        self.micro = ctx.plan.micro_batch if ctx.plan is not None else cfg.batch_size
        if checkpointing(ctx):
            comps.unet.enable_gradient_checkpointing()
            if ctx.token_row is not None:
                te = comps.text_encoder
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        comps.unet.train()
        comps.text_encoder.train(ctx.token_row is not None)
        self.opt = torch.optim.AdamW(method.param_groups(ctx), weight_decay=1e-2)
        self.scaler = grad_scaler(ctx.plan, ctx.device)  # fp16 plans only (edgecp/scaling.py)
        self.skipped = 0  # optimizer steps GradScaler skipped (inf/NaN gradients)
        self.gen = torch.Generator().manual_seed(stream_seed(cfg.seed, seeds.TRAIN, ctx.index))
        self.prompts = ctx.extra.get("instance_prompts")  # per instance row (captions), or None: ctx.prompt
        with torch.no_grad(), autocast(ctx):
            self.prior_text = encode_text(comps, [ctx.prior_prompt], ctx.device)

    def step(self) -> float:
        ctx, cfg, gen = self.ctx, self.ctx.train, self.gen
        total = 0.0
        b, m = cfg.batch_size, self.micro
        for _ in range(cfg.grad_accum):
            idx = torch.randint(len(ctx.instance), (b,), generator=gen)
            inst = ctx.instance.draw(idx, gen)
            with_prior = ctx.prior is not None  # no prior rows when the task trains without the prior loss
            if with_prior:
                prior = ctx.prior.draw(torch.randint(len(ctx.prior), (b,), generator=gen), gen)
                latents = torch.cat([inst, prior])  # (2B, C, h, w)
            else:
                latents = inst
            noise, t = draw_noise(latents, ctx.noise_scheduler, gen)
            for start in range(0, b, m):
                rows = torch.arange(start, start + m)
                if with_prior:
                    rows = torch.cat([rows, torch.arange(b + start, b + start + m)])
                with autocast(ctx):
                    if self.prompts is None:
                        text = encode_text(ctx.comps, [ctx.prompt], ctx.device)
                        text = text.expand(m, -1, -1)
                    else:  # captions: each row's own prompt
                        text = encode_text(ctx.comps, [self.prompts[int(i)] for i in idx[start:start + m]],
                                             ctx.device)
                    if ctx.token_row is None:
                        text = text.detach()
                    if with_prior:
                        text = torch.cat([text, self.prior_text.expand(m, -1, -1)])
                    per_row = denoise_loss(ctx.comps.unet, ctx.noise_scheduler, latents[rows], text, gen,
                                           (noise[rows], t[rows]))
                loss = (per_row[:m].sum() + (cfg.prior_weight * per_row[m:].sum() if with_prior else 0.0)) / b
                if start == 0:
                    pen = self.method.penalty(ctx)
                    if pen is not None:  # computed where the trained tensors live (host memory: HostLinear)
                        loss = loss + pen.to(loss.device)
                part = loss / cfg.grad_accum
                (part if self.scaler is None else self.scaler.scale(part)).backward()
                total += loss.item() / cfg.grad_accum
        if self.scaler is None:
            self.opt.step()
        else:  # unscale in fp32, skip the step when a gradient is inf/NaN, then adapt the scale
            before = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.skipped += self.scaler.get_scale() < before  # the scale shrinks exactly when the step was skipped
        self.opt.zero_grad(set_to_none=True)
        return total

    def close(self) -> None:
        comps = self.ctx.comps
        comps.unet.eval()
        comps.text_encoder.eval()
        comps.unet.disable_gradient_checkpointing()


class TrainingDiverged(EdgecpError):
    """A loss or a tensor to be stored is NaN or infinite: a resume would repeat it."""


def _diverged(what: str, cfg: TrainConfig, token: bool | None) -> EdgecpError:
    """`token`: the token's row diverged (True), the UNet's tensors (False), unknown (None: name both rates)."""
    tok = (f"a token_lr below this store's {cfg.token_lr:g} (a store setting: "
           f"`edgecp init --train token_lr={cfg.token_lr / 10:g}` for a new store)")
    lower = tok if token else f"--lr {cfg.lr / 10:g}"
    if token is None and cfg.token_lr > 0:
        lower += f", or {tok}"
    return TrainingDiverged(f"training diverged: {what}; nothing was committed (the store is unchanged, the staged "
                       f"images were purged): retry with a lower learning rate, e.g. {lower}")


def check_finite(files: dict[str, dict[str, torch.Tensor]], cfg: TrainConfig) -> None:
    """Refuse to commit a NaN or infinite tensor (an lr far too high, fp16 overflow): names the first one."""
    for fname, tensors in files.items():
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise _diverged(f"{fname} '{key}' has {bad:,} of {t.numel():,} values NaN or infinite", cfg,
                                token=fname == TOKENS_FILE)


def _train_loop(ctx: TaskContext, method, emit, run: RunOptions | None = None,
                concepts: list[dict] | None = None) -> tuple[list[float], float]:
    """The training iterations: (per-iteration losses, the fixed loss before training). With a checkpoint folder
    (a resumable concept) a checkpoint is written before the first iteration, every `checkpoint_every`, at the end
    and on SIGINT/SIGTERM (then ConceptInterrupted); `run.resume` continues from one. Samples are drawn at
    iteration 0 (of a fresh run), every `samples.every` and at the last."""
    run = run or RunOptions()
    trainer = Trainer(ctx, method)
    steps = ctx.train.steps
    losses: list[float] = []
    start = 0
    seconds = 0.0
    if run.resume is not None:
        tensors, meta = run.resume
        resumable.restore_trainer(trainer, tensors, meta)
        start, losses, seconds = meta["step"], list(meta["losses"]), meta.get("train_seconds", 0.0)
        fixed_before = meta["loss_fixed_before"]
        emit("train", start, steps)
    else:
        fixed_before = _fixed_loss(ctx)
    d = run.checkpoint_dir

    def checkpoint(step: int) -> None:
        tensors, meta = resumable.trainer_state(trainer, step, losses, {
            "loss_fixed_before": fixed_before, "train_seconds": seconds + time.perf_counter() - t0})
        resumable.write_checkpoint(d, tensors, meta)

    t0 = time.perf_counter()
    if d is not None and run.resume is None:
        checkpoint(0)  # the initial state: a resume before the first periodic checkpoint starts from exactly it
    if run.samples is not None and start == 0:
        _samples(ctx, run.samples, 0, concepts)
    with resumable.deferred_signals() if d is not None else contextlib.nullcontext({}) as caught:
        for step in range(start, steps):
            loss = trainer.step()
            if not math.isfinite(loss):  # the next steps would only spread it: stop now
                raise _diverged(f"the loss is {loss} at iteration {step + 1} of {steps}", ctx.train, token=None)
            losses.append(round(loss, 6))
            emit("train", step + 1, steps, loss)
            done = step + 1
            if run.samples is not None and (done % run.samples.every == 0 or done == steps):
                _samples(ctx, run.samples, done, concepts)
            if d is not None and (done % run.checkpoint_every == 0 or done == steps or caught):
                checkpoint(done)
            if caught:
                sig = caught["signal"]
                import signal as _signal

                raise resumable.ConceptInterrupted(
                    f"interrupted ({_signal.Signals(sig).name}) at iteration {done} of {steps}: a checkpoint was "
                    f"written, nothing was committed; continue with `edgecp add-concept --resume --store "
                    f"{d.parent}`, or drop the concept and its staged photos with `--abandon`", sig)
    ctx.extra["train_seconds"] = seconds + time.perf_counter() - t0
    if trainer.scaler is not None:
        ctx.extra["loss_scale"] = {"final_scale": trainer.scaler.get_scale(), "skipped_steps": trainer.skipped}
    trainer.close()
    return losses, fixed_before


def _fixed_loss(ctx: TaskContext) -> float:
    """`phases.reference_loss` with the UNet in eval mode (no dropout draws from the global generator)."""
    unet = ctx.comps.unet
    was = unet.training
    unet.eval()
    try:
        return reference_loss(ctx)
    finally:
        unet.train(was)


def _samples(ctx: TaskContext, cfg: SampleConfig, step: int, concepts: list[dict] | None) -> None:
    """Draw the sample prompts with the model as it is at `step`, into cfg.out_dir; the training's generators and
    modes are as before after it."""
    from edgecp.generate import GenerateConfig, slug, torch_generate

    comps = ctx.comps
    prompts = [expand(p, concepts or []) for p in cfg.prompts] or [ctx.prompt]
    names = list(cfg.prompts) or [ctx.prompt]
    gcfg = GenerateConfig(n=cfg.n, seed=cfg.seed, steps=cfg.steps, guidance=cfg.guidance,
                          size=ctx.train.resolution or None)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    modes = (comps.unet.training, comps.text_encoder.training)
    devices = [ctx.device] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        comps.unet.eval()
        comps.text_encoder.eval()
        try:
            for prompt, shown in zip(prompts, names):
                images = torch_generate(comps, prompt, gcfg, ctx.device, None, ctx.plan)
                for i, im in enumerate(images):
                    im.save(cfg.out_dir / f"{slug(ctx.name, 24)}-{slug(shown, 40)}-step{step:05d}-s{cfg.seed}-{i}.png")
        finally:
            comps.unet.train(modes[0])
            comps.text_encoder.train(modes[1])


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
