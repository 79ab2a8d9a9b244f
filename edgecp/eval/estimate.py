"""`edgecp bench --estimate`: runs, device-hours and disk of a bench, from one short calibration on this device.

Calibration (the same code path as `add_concept` and the bench's evaluation, nothing written anywhere): the base is
loaded as `add_concept` would load it (the memory planner's plan for a LoRA task); `warmup` + `iterations` real
training iterations (`train.Trainer.step`, the store's batch size: 1 on an SD base, 4 on the tiny one) run on
synthetic latents at the base's resolution with accumulation 1, and the time is multiplied by the store's
accumulation (our choice: an iteration is `grad_accum` identical batches, so timing one is 8x shorter on an SD
base); one image is generated with 2 sampling steps (`generate.torch_generate`, classifier-free guidance).
The estimate then multiplies:

    training       iterations x tasks x s/iteration
    consolidation  per task, each phase of `method.phase_rows` beyond training: ratio x iterations (the method's
                   `consolidation_ratio`, 0.2 in 000) x rows / 2 training iterations' worth of UNet rows (a
                   consolidation iteration runs training's accumulation too); DSC's two no-grad teacher calls count
                   a third of a gradient call each, so its phase weighs 5/3 (our choice: a forward is about a
                   third of forward + backward)
    generation     priors (num_images x prior steps, once per store) and the evaluations: after task i, i seen
                   concepts x n_gen images x gen_steps, i.e. n(n+1)/2 x n_gen x gen_steps image-steps per run
    loading        two base loads per task (add_concept and the evaluation), timed by the calibration's load

Not counted: the DC-score accuracy (n x n_train x dc_trials UNet rows, seconds) and the metrics (numpy). The
generation is timed at the training plan's precision (the bench evaluates in full precision: on a CPU whose plan
is bf16 this underestimates generation). Disk per run: every version's state (adapter and trained base weights,
fp32; x2 with an EWC Fisher; + one adapter per task learned so far for DSC's teacher pool and the concatenated
task LoRAs of C-LoRA and LoRA merge), the evaluation files and the training views. The base is not copied into stores.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from diffusers import DDPMScheduler

from edgecp import seeds
from edgecp.adapters import lora
from edgecp.api import make_method, resolved_defaults
from edgecp.config import PriorConfig, TrainConfig, from_dict, replace
from edgecp.eval.bench import load_sequence
from edgecp.eval.executor import all_runs, check_required
from edgecp.generate import GenerateConfig, torch_generate
from edgecp.memory import device_info, training_workload
from edgecp.methods import defaults
from edgecp.methods.base import LatentSet, TaskContext
from edgecp.model.base import resolve_base
from edgecp.model.quant import load_planned
from edgecp.model.tokens import add_concept_token, concept_embedding, token_of, word_embedding
from edgecp.personal import default_device
from edgecp.planner import fmt_bytes, plan_training
from edgecp.progress import Progress, emit
from edgecp.train import Trainer


@dataclass(frozen=True)
class Estimate:
    runs: int
    tasks: int  # per run
    iterations: str  # training iterations per task ("850-1000" where the methods' own differ)
    device: str
    seconds_per_iteration: float  # measured
    seconds_per_image_step: float  # measured (one image, one sampling step, with guidance)
    seconds_per_load: float  # measured
    hours: dict  # device-hours by part: training, consolidation, generation, loading, total
    disk_bytes: dict  # stores, evaluations, data, total
    calibration: dict  # what was timed

    def to_json(self) -> dict:
        return asdict(self)


def calibrate(base: str, device: str | None = None, iterations: int = 3, warmup: int = 1,
              progress: Progress | None = None) -> dict:
    """Seconds per training iteration / image-step / base load of `base` on `device` (see the module docstring)."""
    dev = torch.device(device) if device else default_device()
    spec = resolve_base(base)
    _, d = resolved_defaults(base, "lora-sequential")
    method = make_method("lora-sequential", d["method"], d["adapter"])
    train = replace(TrainConfig(**d["train"]), steps=iterations, seed=seeds.CALIBRATION_RUN)
    accum, train = train.grad_accum, replace(train, grad_accum=1)  # timed: one batch; an iteration is `accum` of them
    shape = method.base_shape(spec)
    resolution = shape.unet.sample_size * shape.vae_scale
    work = training_workload(method, shape, train, resolution, 0, 4, 0, 0)
    plan = plan_training(shape, work, device_info(dev), None, None)

    def tick(phase, i, n):
        if progress:
            emit(progress, phase, i, n)

    tick("load", 0, 1)
    t = time.perf_counter()
    comps = load_planned(spec, method.precision(plan), dev)
    for m in (comps.text_encoder, comps.vae, comps.unet):
        m.to(dev)
    t_load = time.perf_counter() - t
    tick("load", 1, 1)

    torch.manual_seed(seeds.CALIBRATION_RUN)
    init = word_embedding(comps.tokenizer, comps.text_encoder, "dog")
    add_concept_token(comps.tokenizer, comps.text_encoder, "calibration", init, trainable=True)
    c, lat = comps.unet.config.in_channels, shape.unet.sample_size
    latents = lambda n: LatentSet(torch.randn(n, c, lat, lat, device=dev), 0.1 * torch.ones(n, c, lat, lat, device=dev),
                                  1.0)
    ctx = TaskContext(
        index=1, name="calibration", token=token_of("calibration"), class_word="dog",
        prompt=f"a photo of a {token_of('calibration')} dog", prior_prompt="a photo", previous=[], prev_dir=None,
        train=train, comps=comps, device=dev, noise_scheduler=DDPMScheduler.from_config(comps.scheduler.config),
        token_row=concept_embedding(comps.text_encoder).rows[-1], instance=latents(4), prior=latents(4), plan=plan,
    )
    lora.attach(comps.unet, method.adapter, seed=seeds.CALIBRATION_RUN)
    lora.set_trainable(comps.unet, True)
    trainer = Trainer(ctx, method)
    for i in range(warmup):
        trainer.step()
        tick("calibrate", i + 1, warmup + iterations)
    t = time.perf_counter()
    for i in range(iterations):
        trainer.step()
        tick("calibrate", warmup + i + 1, warmup + iterations)
    s_iter = accum * (time.perf_counter() - t) / iterations
    trainer.close()
    steps = 2
    with torch.no_grad():
        gen = lambda n_steps: GenerateConfig(n=1, seed=seeds.CALIBRATION_RUN, steps=n_steps)
        torch_generate(comps, "a photo", gen(1), dev, plan=plan)  # warm-up
        t = time.perf_counter()
        torch_generate(comps, "a photo", gen(steps), dev, plan=plan)
        s_step = (time.perf_counter() - t) / steps
    return {"seconds_per_iteration": s_iter, "seconds_per_image_step": s_step, "seconds_per_load": t_load,
            "device": str(dev), "base": base, "precision": plan.weights, "batch_size": train.batch_size,
            "grad_accum": accum, "iterations_timed": iterations, "resolution": resolution,
            "shape": shape}


def estimate(cfg, device: str | None = None, iterations: int = 3,
             progress: Progress | None = None, calibration: dict | None = None) -> Estimate:
    """The estimate of bench `cfg` (see the module docstring); `calibration` skips the timing (tests, reuse)."""
    check_required(cfg)
    seq = load_sequence(cfg)  # a bad --sequence fails before the calibration
    n = len(seq)
    cal = calibration or calibrate(cfg.base, device, iterations, progress=progress)
    shape = cal["shape"]
    s_iter, s_step, s_load = cal["seconds_per_iteration"], cal["seconds_per_image_step"], cal["seconds_per_load"]
    dset, _ = resolved_defaults(cfg.base, cfg.methods[0])  # the base is resolved once, not per run
    prior = from_dict(PriorConfig, {**defaults.resolve(cfg.methods[0], dset)["prior"], **cfg.prior}, "prior")
    res = cal["resolution"]
    train_s = cons_s = gen_s = load_s = 0.0
    steps: set[int] = set()  # the methods' iterations (the paper preset: each its paper's)
    store_bytes = 0
    for method_name, _seed in all_runs(cfg):
        d = defaults.resolve(method_name, dset)
        method = make_method(method_name, {**d["method"], **cfg.method_params.get(method_name, {})}, d["adapter"])
        train = replace(TrainConfig(**d["train"]), **({"steps": cfg.steps} if cfg.steps else {}))
        steps.add(train.steps)
        # a training iteration's cost per UNet row with gradients (instance + prior rows; instance rows alone
        # without the prior loss); the calibration's accumulation and batch
        row_s = s_iter / (cal["grad_accum"] * cal["batch_size"] * 2)
        rows = 2 if train.prior_weight > 0 else 1
        train_s += n * train.steps * row_s * train.grad_accum * train.batch_size * rows
        ratio = getattr(method.params, "consolidation_ratio", 0.2)
        adapter, base_w = method.trainable_numbers(shape.target_in_out)
        state = 4 * (adapter + base_w)
        for i in range(n):
            for phase, rows in method.phase_rows(i).items():
                if phase == "train":
                    continue
                weight = 5 / 3 if phase == "dsc" else 1.0
                # a consolidation iteration sees training's effective batch (batch x accumulation), as training does
                cons_s += (max(1, round(ratio * train.steps)) * row_s * train.batch_size * train.grad_accum * rows
                           * weight)
            extra = state if "ewc" in method_name else 0
            if method_name.startswith("dsc") or method_name in ("c-lora", "lora-merge"):
                extra += state * (i + 1)
            store_bytes += state + extra + 4 * 768 * (i + 1)  # + tokens
        priors = prior.num_images * prior.steps if train.prior_weight > 0 or method.needs_prior_images else 0
        gen_s += (priors + n * (n + 1) // 2 * cfg.n_gen * cfg.gen_steps) * s_step
        load_s += 2 * n * s_load
        store_bytes += prior.num_images * res * res * 3  # the prior images (PNG, at most raw size)
    runs = len(all_runs(cfg))
    feat_dim = 768  # CLIP ViT-L/14's projection; an upper bound for the tiny evaluator
    eval_bytes = runs * (n * (n + 1) // 2 * cfg.n_gen * feat_dim * 4 + n * cfg.n_gen * res * res * 3)
    data_bytes = len(cfg.seeds) * n * (cfg.n_train + cfg.n_target) * res * res * 3  # views at the base's resolution
    hours = {"training": train_s / 3600, "consolidation": cons_s / 3600, "generation": gen_s / 3600,
             "loading": load_s / 3600}
    hours["total"] = sum(hours.values())
    disk = {"stores": store_bytes, "evaluations": eval_bytes, "data": data_bytes}
    disk["total"] = sum(disk.values())
    calib = {k: v for k, v in cal.items() if k != "shape"}
    return Estimate(runs=runs, tasks=n, iterations=f"{min(steps)}" if len(steps) == 1 else f"{min(steps)}-{max(steps)}",
                    device=cal["device"], seconds_per_iteration=s_iter,
                    seconds_per_image_step=s_step, seconds_per_load=s_load, hours=hours, disk_bytes=disk,
                    calibration=calib)


def estimate_lines(e: Estimate) -> list[str]:
    """What the CLI prints (plain lines; the library prints nothing)."""
    h = e.hours
    return [
        f"runs: {e.runs} ({e.tasks} tasks x {e.iterations} iterations each)",
        f"calibration on {e.device}: {e.seconds_per_iteration:.3f} s/iteration (batch {e.calibration['batch_size']} x "
        f"{e.calibration['grad_accum']}, {e.calibration['precision']}), {e.seconds_per_image_step:.3f} s/image-step, "
        f"{e.seconds_per_load:.1f} s/load",
        f"device-hours: {h['total']:.2f} (training {h['training']:.2f}, consolidation {h['consolidation']:.2f}, "
        f"generation {h['generation']:.2f}, loading {h['loading']:.2f}); divide by the devices running in parallel",
        f"disk: {fmt_bytes(e.disk_bytes['total'])} (stores {fmt_bytes(e.disk_bytes['stores'])}, evaluations "
        f"{fmt_bytes(e.disk_bytes['evaluations'])}, training views {fmt_bytes(e.disk_bytes['data'])}; the base is not "
        "copied)",
    ]
