"""The workstation GPU path, made correct before a GPU ever sees it (issue 22), proven on the CPU.

Each test fails without its fix: bf16 only where the GPU computes it natively (and the device index kept), loss
scaling for fp16 plans (training and the `torch.autograd.grad` helper of the Fisher/DSC phases and CNS), the VAE
outside the plan's autocast, the CUDA terms of the peak model, bitsandbytes' retained inputs, the memory of a run
that ran out of it, and bitsandbytes' per-call log line kept out of the terminal only while edgecp works.
CUDA itself is stood in for by monkeypatched `torch.cuda` functions; fp16 compute by CPU autocast to fp16.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from cli_util import run_cli
from conftest import make_photos, new_store
from test_planner import DSC_EWC_DC, SD15, TINY, lora_work
from torch import nn

from edgecp import memory
from edgecp.errors import EdgecpError
from edgecp.planner import (
    CUDA_CONTEXT,
    CUDA_FRAGMENTATION,
    GB,
    DeviceInfo,
    Plan,
    UNetShape,
    Workload,
    plan_training,
    predict_training_terms,
    unet_weight_bytes,
)
from edgecp.scaling import LossScale, grad_scaler, loss_scale, needs_scaling, scaled_grad
from edgecp.scoped import quiet_libraries

GIB = 2**30


def _import_model_stack() -> None:
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline  # noqa: F401

    memory.runtime_rss()  # diffusers' UNet and VAE, transformers' CLIP, torchao


# -- CUDA stood in for: the torch.cuda functions edgecp asks, answering for a GPU of a given capability ------------
@pytest.fixture
def fake_gpu(monkeypatch):
    """Two GPUs whose queries record the device they were asked about. `fake_gpu.capability` and `.free` set the
    answers. is_bf16_supported answers True, as torch's default (including_emulation=True) does on 7.x cards."""
    state = SimpleNamespace(capability=(7, 5), free=6 * GIB, card=8 * GIB, reserved=GIB // 2, asked=[])
    _import_model_stack()  # before torch.cuda says it is available: some imports then probe CUDA itself

    def idx(d):
        d = torch.device(d) if not isinstance(d, int) else torch.device("cuda", d)
        return d.index

    def record(name, result):
        def f(device=None, *a, **k):
            state.asked.append((name, idx(device) if device is not None else None))
            return result() if callable(result) else result
        return f

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(cuda, "get_device_capability", record("capability", lambda: state.capability))
    monkeypatch.setattr(cuda, "get_device_properties",
                        record("properties", lambda: SimpleNamespace(name="Fake GPU", total_memory=state.card)))
    monkeypatch.setattr(cuda, "mem_get_info", record("mem_get_info", lambda: (state.free, state.card)))
    monkeypatch.setattr(cuda, "memory_reserved", record("memory_reserved", lambda: state.reserved))
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", record("reset", None))
    monkeypatch.setattr(cuda, "max_memory_allocated", record("max_allocated", 0))
    monkeypatch.setattr(cuda, "max_memory_reserved", record("max_reserved", 0))
    return state


# -- 5. bf16 only where computed natively; the device index kept -------------------------------------------------
@pytest.mark.parametrize("capability,bf16", [((7, 5), False), ((7, 0), False), ((8, 0), True), ((8, 6), True),
                                             ((9, 0), True)])
def test_bf16_from_capability_not_from_emulation(fake_gpu, capability, bf16):
    fake_gpu.capability = capability
    info = memory.device_info(torch.device("cuda:1"))
    assert info.bf16 is bf16  # is_bf16_supported() said True for every one of them
    assert {i for name, i in fake_gpu.asked} == {1}  # every property was asked of GPU 1, none of GPU 0
    assert {name for name, _ in fake_gpu.asked} >= {"capability", "properties", "mem_get_info"}
    plan = plan_training(SD15, lora_work(512), info)
    if bf16:
        assert (plan.compute, plan.loss_scaling) == ("bf16", False)
        assert grad_scaler(plan, "cpu") is None
    else:  # a T4 / V100 / RTX 20xx: fp16 with loss scaling
        assert (plan.weights, plan.compute, plan.loss_scaling) == ("fp16", "fp16", True)
        assert isinstance(grad_scaler(plan, "cpu"), torch.amp.GradScaler)
        assert "loss scaling" in plan.line() and plan.to_json()["loss_scaling"] is True


def test_present_gpu_plans_from_free_memory_not_the_card(fake_gpu):
    """8 GB card, 6 GiB free (other programs hold the rest), this process's cache 0.5 GiB: usable 6.5 GiB."""
    info = memory.device_info(torch.device("cuda:1"))
    assert info.total == 6 * GIB + GIB // 2 and info.card == 8 * GIB
    fake_gpu.free = 2 * GIB  # another program took most of the card: the 8 GB plan no longer fits
    small = memory.device_info(torch.device("cuda:1"))
    with pytest.raises(EdgecpError, match="usable"):
        plan_training(SD15, lora_work(512, phase_rows=DSC_EWC_DC), small)
    # a budget above what the GPU has is capped by the GPU
    plan = plan_training(SD15, lora_work(512, phase_rows=DSC_EWC_DC), info, budget=40 * GB)
    assert plan.peak <= 0.92 * info.total


def test_cuda_1_is_kept_through_add_concept(fake_gpu, tmp_path, monkeypatch):
    """add-concept on cuda:1: planned for GPU 1 (capability 7.5: fp16 + loss scaling) and loaded onto cuda:1
    itself, not onto `device.type` ('cuda', which would be GPU 0)."""
    import edgecp.train as train

    root = tmp_path / "s"
    new_store(root)
    seen = {}

    def load_planned(spec, precision, device, fold=None):
        seen["device"], seen["precision"] = device, precision
        raise RuntimeError("stop here: no GPU to load onto")

    monkeypatch.setattr(train, "load_planned", load_planned)
    plans = []
    with pytest.raises(RuntimeError, match="stop here"):
        train.add_concept(root, "aa", make_photos(tmp_path / "p"), class_word="dog", device="cuda:1",
                          on_plan=plans.append)
    assert seen["device"] == torch.device("cuda:1")
    assert (plans[0].device, plans[0].compute, plans[0].loss_scaling) == ("cuda", "fp16", True)
    assert {i for name, i in fake_gpu.asked} == {1}


# -- 6. loss scaling: fp16 gradients that would underflow, kept ----------------------------------------------------
def _conv_stack(seed: int = 0) -> nn.Sequential:
    """A small denoiser stand-in: six 3x3 convolutions (PyTorch's default init), SiLU between them."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(4, 32, 3, padding=1)]
    for _ in range(4):
        layers += [nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1)]
    layers += [nn.SiLU(), nn.Conv2d(32, 4, 3, padding=1)]
    return nn.Sequential(*layers)


ACCUM = 8  # gradient accumulation: each micro-step's loss is divided by it


def _latent_case(net):
    """One 4x64x64 latent (SD at 512 px) and a target near the prediction (a model part-way through training)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 64, 64, generator=gen)
    with torch.no_grad():
        target = net(x) + 0.3 * torch.randn(1, 4, 64, 64, generator=gen)
    return x, target


def _loss(net, x, target, fp16: bool):
    with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
        pred = net(x)
    assert pred.dtype == (torch.float16 if fp16 else torch.float32)  # CPU autocast really computes in fp16
    return F.mse_loss(pred.float(), target) / ACCUM  # per-element mean over 16,384 elements, / accumulation


def _rel(a, b):
    return float((a - b).norm() / b.norm())


FP16_PLAN = Plan("cuda", "fp16", None, "fp16", True, 1, 8, 1)
BF16_PLAN = dataclasses.replace(FP16_PLAN, weights="bf16", compute="bf16")


def test_training_loss_scaling_recovers_the_fp32_gradient_that_fp16_flushes_to_zero():
    net = _conv_stack()
    x, target = _latent_case(net)
    params = list(net.parameters())
    ref = torch.autograd.grad(_loss(net, x, target, fp16=False), params)  # fp32: the reference
    plain = torch.autograd.grad(_loss(net, x, target, fp16=True), params)  # fp16, unscaled
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = grad_scaler(FP16_PLAN, "cpu")  # what train.Trainer uses for an fp16 plan
    assert scaler is not None and grad_scaler(BF16_PLAN, "cpu") is None and grad_scaler(None, "cpu") is None
    scaler.scale(_loss(net, x, target, fp16=True)).backward()
    scaler.unscale_(opt)
    scaled = [p.grad for p in params]
    first = 0  # the first convolution's weight: farthest from the loss
    assert bool((ref[first] != 0).all())
    assert float((plain[first] == 0).float().mean()) > 0.99  # fp16 without scaling: the gradient is gone
    assert bool((scaled[first] != 0).all())
    for r, s in zip(ref, scaled):
        assert _rel(s, r) < 0.01  # scaled fp16 agrees with fp32 to 1%
    assert _rel(plain[first], ref[first]) == pytest.approx(1.0)


def test_grad_scaler_skips_a_step_whose_gradients_are_not_finite():
    """GradScaler's own rule, as the Trainer uses it: inf gradients -> no update, the scale halves; then a normal
    step updates and keeps the scale."""
    net = _conv_stack()
    x, target = _latent_case(net)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    scaler = grad_scaler(FP16_PLAN, "cpu")
    before = [p.detach().clone() for p in net.parameters()]
    scaler.scale(_loss(net, x, target, fp16=True) * float("inf")).backward()
    s0 = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == s0 / 2
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))  # skipped
    opt.zero_grad()
    scaler.scale(_loss(net, x, target, fp16=True)).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == s0 / 2 and not torch.equal(before[0], next(net.parameters()))


def test_fp16_plan_trains_with_grad_scaler_end_to_end(tmp_path, monkeypatch):
    """add-concept under an fp16 plan (CPU autocast to fp16 stands in for a 7.x GPU): the Trainer scales, the
    manifest records the final scale and the skipped steps, and the adapter learned (finite, non-zero)."""
    from safetensors.torch import load_file

    import edgecp.train as train
    from edgecp.store import Store

    real = train.plan_add_concept
    monkeypatch.setattr(train, "plan_add_concept",
                        lambda *a, **k: dataclasses.replace(real(*a, **k), weights="fp16", compute="fp16"))
    scalers = []
    orig_init = torch.amp.GradScaler.__init__

    def init(self, *a, **k):
        scalers.append(self)
        orig_init(self, *a, **k)

    monkeypatch.setattr(torch.amp.GradScaler, "__init__", init)
    root = tmp_path / "s"
    new_store(root, train={"steps": 2}, prior={"num_images": 1, "steps": 1})
    m = train.add_concept(root, "aa", make_photos(tmp_path / "p"), class_word="dog")
    entry = m["concepts"][-1]
    assert len(scalers) == 1 and entry["memory"]["plan"]["loss_scaling"] is True
    assert entry["loss_scaling"]["final_scale"] > 0 and 0 <= entry["loss_scaling"]["skipped_steps"] <= 2
    adapter = load_file(str(Store.open(root).version_dir() / "adapter.safetensors"))
    b = [v for k, v in adapter.items() if "lora_B" in k]
    assert all(bool(torch.isfinite(v).all()) for v in adapter.values()) and max(float(v.abs().max()) for v in b) > 0


def test_scaled_grad_for_fisher_and_dsc_recovers_the_fp32_gradient():
    """The helper the Fisher/DSC phases and CNS use in place of torch.autograd.grad: the loss form (one call) and
    the grad_outputs form (pass 2 of dc_scores.dc_grad: a prediction back-propagated with d loss / d prediction)."""
    net = _conv_stack()
    x, target = _latent_case(net)
    params = list(net.parameters())
    ref = torch.autograd.grad(_loss(net, x, target, fp16=False), params)
    plain = torch.autograd.grad(_loss(net, x, target, fp16=True), params)
    got = scaled_grad(_loss(net, x, target, fp16=True), params, loss_scale(FP16_PLAN))
    assert float((plain[0] == 0).float().mean()) > 0.99 and bool((got[0] != 0).all())
    assert all(_rel(g, r) < 0.01 and g.dtype == torch.float32 for g, r in zip(got, ref))
    # grad_outputs: the two-pass form; the gradient with respect to the fp32 prediction is computed in fp32
    with torch.autocast("cpu", dtype=torch.float16):
        out = net(x).float()
    leaf = out.detach().requires_grad_(True)
    (g_out,) = torch.autograd.grad(F.mse_loss(leaf, target) / ACCUM, leaf)
    plain2 = torch.autograd.grad(out, params, grad_outputs=g_out, retain_graph=True)
    got2 = scaled_grad(out, params, loss_scale(FP16_PLAN), grad_outputs=g_out)
    assert float((plain2[0] == 0).float().mean()) > 0.99
    assert all(_rel(g, r) < 0.01 for g, r in zip(got2, ref))


@pytest.mark.parametrize("chunk", [None, 1])
def test_dc_grad_of_the_fisher_and_dsc_phases_is_loss_scaled(chunk):
    """dc_scores.dc_grad, which the Fisher and DSC phases call, in one call (chunk None) and in chunks (the two-pass
    gradient): with the fp16 plan's scale its gradients match fp32; without, fp16 flushes the first layer to zero."""
    from diffusers import DDPMScheduler

    from edgecp.consolidation.dc_scores import dc_grad
    from edgecp.model.tiny import SD_SCHEDULER_CONFIG

    net = _conv_stack()
    sched = DDPMScheduler.from_config(SD_SCHEDULER_CONFIG)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 4, 64, 64, generator=gen)
    text = torch.zeros(2, 1, 1)  # two "concepts"; the stand-in ignores the text
    t = torch.tensor([10])
    noise = torch.randn(1, 4, 64, 64, generator=gen)
    params = list(net.parameters())

    def predict(fp16):
        def f(x, _t, _c):
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                return net(x)
        return f

    def loss_fn(err, _eps):  # the untrained stand-in's error is ~100x a trained model's: scaled to that size
        return err[:, 0].mean() / ACCUM / 100

    _, ref = dc_grad(predict(False), sched, x0, text, t, noise, loss_fn, params, chunk=chunk)
    _, plain = dc_grad(predict(True), sched, x0, text, t, noise, loss_fn, params, chunk=chunk)
    _, got = dc_grad(predict(True), sched, x0, text, t, noise, loss_fn, params, chunk=chunk,
                     scale=loss_scale(FP16_PLAN))
    assert float((plain[0] == 0).float().mean()) > 0.99 and bool((got[0] != 0).all())
    assert all(_rel(g, r) < 0.02 for g, r in zip(got, ref))


def test_scaled_grad_retries_with_a_smaller_scale_on_overflow_and_is_exact_when_off():
    net = _conv_stack()
    x, target = _latent_case(net)
    params = list(net.parameters())
    ref = torch.autograd.grad(_loss(net, x, target, fp16=False), params)
    scale = LossScale(True, init=2.0**40)  # 2^40 x 1e-5 overflows fp16 (max 65,504)
    got = scale.grad(_loss(net, x, target, fp16=True), params)
    assert scale.retries > 0 and scale.value < 2.0**40
    assert all(bool(torch.isfinite(g).all()) and _rel(g, r) < 0.01 for g, r in zip(got, ref))
    # disabled (bf16, fp32, no plan): torch.autograd.grad itself, bit for bit
    assert not needs_scaling(BF16_PLAN) and not needs_scaling(None) and needs_scaling(FP16_PLAN)
    off = loss_scale(BF16_PLAN)
    a = off.grad(_loss(net, x, target, fp16=False), params)
    assert all(torch.equal(u, r) for u, r in zip(a, ref)) and off.value == 1.0


# -- 7. the VAE decodes outside the plan's autocast --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_comps():
    from edgecp.model.base import load_components, resolve_base

    return load_components(resolve_base("tiny"))


@pytest.mark.parametrize("compute", ["bf16", "fp16"])
def test_vae_decodes_outside_the_plans_autocast(tiny_comps, compute):
    from edgecp.generate import GenerateConfig, torch_generate

    plan = Plan("cpu", compute, None, compute, False, 2, 1, 1, purpose="generate")
    seen = {"vae": [], "unet": []}

    def record(name):
        def hook(module, args, output):
            seen[name].append((torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled(), args[0].dtype))
        return hook

    hooks = [tiny_comps.vae.decoder.register_forward_hook(record("vae")),
             tiny_comps.unet.register_forward_hook(record("unet"))]
    try:
        images = torch_generate(tiny_comps, "a photo", GenerateConfig(n=2, steps=2), "cpu", plan=plan)
    finally:
        for h in hooks:
            h.remove()
    assert len(images) == 2 and seen["vae"] and seen["unet"]
    assert all(cpu for cpu, _, _ in seen["unet"])  # the UNet did run under the plan's autocast
    assert all(not cpu and not cuda for cpu, cuda, _ in seen["vae"])  # the VAE did not
    assert {dtype for _, _, dtype in seen["vae"]} == {tiny_comps.vae.dtype}  # in its own dtype (fp32 here)


def test_own_decode_gives_the_pipelines_images(tiny_comps):
    """Decoding outside the pipeline keeps its operations: without a plan, the same pixels as the pipeline's own
    output_type='pil' (the reference)."""
    import numpy as np
    from diffusers import StableDiffusionPipeline

    from edgecp.export.ort_runner import initial_latents
    from edgecp.generate import GenerateConfig, torch_generate

    cfg = GenerateConfig(n=1, steps=2, seed=3)
    ours = torch_generate(tiny_comps, "a photo", cfg, "cpu")
    c = tiny_comps
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=c.unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    lat = c.resolution // c.vae_scale
    latents = torch.from_numpy(initial_latents(cfg.seed, 1, c.unet.config.in_channels, lat, lat))
    with torch.no_grad():
        ref = pipe(["a photo"], negative_prompt=[""], height=c.resolution, width=c.resolution, num_inference_steps=2,
                   guidance_scale=cfg.guidance, latents=latents * c.scheduler.init_noise_sigma).images
    assert np.array_equal(np.asarray(ours[0]), np.asarray(ref[0]))


# -- 9/10. the CUDA peak model: named terms, by hand -------------------------------------------------------------
# A small case to do by hand: the tiny UNet's structure (levels of 32 and 64 channels, one layer per block, attention
# at both levels) at 64 px (latent 16, VAE factor 4).
HAND = dataclasses.replace(
    TINY, unet_conv=1_000_000, unet_linear=500_000, unet_other=10_000, unet_target=20_000, unet_linear_rows=1_000,
    text=2_000_000, vae=900_000, vae_channels=(32, 64, 64), vae_scale=4, unet=UNetShape((32, 64), 1, (True, True)),
    largest_tensor=300_000, target_in_out=((64, 32),) * 4, single_file=False)
GPU = DeviceInfo("cuda", 8 * GB, True, card=8 * GB)


def test_bitsandbytes_retained_inputs_by_hand():
    work = Workload(resolution=64, batch_size=1, grad_accum=1, phase_rows={"train": 2}, adapter_params=1_000)
    ckpt = Plan("cuda", "int8", "bitsandbytes", "fp16", True, 1, 1, 1)
    _, terms = predict_training_terms(HAND, work, GPU, ckpt)
    # per token of a block, bytes: 3 LayerNorm outputs in fp32 (3 x 4C) + 2 attention outputs in fp16 (2 x 2C) +
    # GEGLU's output, 4C values in fp32 (16C) = 32C. Level 0: C=32, 16x16 = 256 tokens, 1 down + 2 up blocks;
    # level 1: C=64, 8x8 = 64 tokens, 1 down + 2 up + the mid block. Rows: instance + prior = 2.
    per_row = 3 * 256 * 32 * 32 + 4 * 64 * 32 * 64
    assert per_row == 1_310_720
    assert terms["train"]["bitsandbytes_retained_inputs"] == 2 * per_row
    # without checkpointing SDPA saves the attention outputs anyway: 28C per token
    _, terms_full = predict_training_terms(HAND, work, GPU, dataclasses.replace(ckpt, gradient_checkpointing=False))
    assert terms_full["train"]["bitsandbytes_retained_inputs"] == 2 * (3 * 256 * 28 * 32 + 4 * 64 * 28 * 64)
    # only where a gradient flows, only for bitsandbytes' int8 on CUDA
    assert terms["load"]["bitsandbytes_retained_inputs"] == terms["encode"]["bitsandbytes_retained_inputs"] == 0
    fp16 = dataclasses.replace(ckpt, weights="fp16", backend=None)
    assert predict_training_terms(HAND, work, GPU, fp16)[1]["train"]["bitsandbytes_retained_inputs"] == 0
    cpu = DeviceInfo("cpu", 8 * GB, True)
    assert predict_training_terms(HAND, work, cpu, dataclasses.replace(ckpt, backend="torchao"))[1] == {}


def test_cuda_terms_add_up_by_hand():
    work = Workload(resolution=64, batch_size=1, grad_accum=1, phase_rows={"train": 2}, adapter_params=1_000,
                    trains_token=False)
    plan = Plan("cuda", "int8", "bitsandbytes", "fp16", True, 1, 1, 1)
    predicted, terms = predict_training_terms(HAND, work, GPU, plan)
    assert set(terms) == set(predicted) and all(set(t) == {"context_reserve", "fragmentation_margin",
                                                           "bitsandbytes_retained_inputs"} for t in terms.values())
    # load, by hand: int8 UNet (1 byte per Linear weight + a 4-byte scale per row; convs, others fp16; the adapted
    # layers fp32), fp16 text encoder, fp32 VAE (fp16 plans keep it fp32), bitsandbytes' fp16 copy of the largest
    # tensor; no host-side transients (no 64 MB streaming batch), no runtime (the context is its own term)
    unet = 500_000 + 4 * 1_000 + 2 * (1_000_000 + 10_000) + 4 * 20_000
    assert unet == unet_weight_bytes(HAND, "int8", "fp16")
    load_alloc = unet + 2 * 2_000_000 + 4 * 900_000 + 2 * 300_000
    assert terms["load"] == {"context_reserve": 500_000_000, "fragmentation_margin": int(0.10 * load_alloc),
                             "bitsandbytes_retained_inputs": 0}
    assert predicted["load"] == load_alloc + 500_000_000 + int(0.10 * load_alloc)
    # train: allocated + retained + 10% of both + the context
    t = terms["train"]
    alloc = predicted["train"] - sum(t.values())
    assert t["fragmentation_margin"] == int(0.10 * (alloc + t["bitsandbytes_retained_inputs"]))
    assert t["context_reserve"] == CUDA_CONTEXT == 0.5e9 and CUDA_FRAGMENTATION == 0.10
    # the same plan on the CPU predicts the allocator's bytes with the CPU's runtime and host transients instead
    cpu_pred, cpu_terms = predict_training_terms(HAND, work, DeviceInfo("cpu", 8 * GB, True, runtime=0),
                                                 dataclasses.replace(plan, backend="torchao"))
    assert cpu_terms == {} and cpu_pred["load"] == int(0.5e9 + unet + 2 * 2_000_000 + 4 * 900_000
                                                       + 64 * 2**20 + 4 * 300_000)


def test_plan_command_prints_and_records_the_cuda_terms(tmp_path, capsys):
    root = tmp_path / "s"
    new_store(root)
    code, out, err = run_cli(capsys, "plan", "--store", root, "--device", "cuda", "--gpu-memory", "8GB",
                             "--plan", "weights=int8", "--json")
    assert code == 0, err
    plan = json.loads(out)
    # CUDA's 8-bit default is torchao (nothing retained); bitsandbytes when pinned, with its retained inputs
    assert plan["backend"] == "torchao" and plan["loss_scaling"] is True  # capability 7.5 assumed: fp16
    assert plan["cuda_terms"]["train"]["bitsandbytes_retained_inputs"] == 0
    code, out, err = run_cli(capsys, "plan", "--store", root, "--device", "cuda", "--gpu-memory", "8GB",
                             "--plan", "weights=int8", "--plan", "backend=bitsandbytes", "--json")
    assert code == 0, err
    bnb = json.loads(out)
    assert bnb["backend"] == "bitsandbytes" and bnb["peak"] > plan["peak"]
    for phase, peak in bnb["predicted"].items():
        t = bnb["cuda_terms"][phase]
        assert t["context_reserve"] == 500_000_000 and t["fragmentation_margin"] > 0
        assert peak > sum(t.values())
    assert bnb["cuda_terms"]["train"]["bitsandbytes_retained_inputs"] > 0
    code, out, err = run_cli(capsys, "plan", "--store", root, "--device", "cuda", "--gpu-memory", "8GB",
                             "--gpu-capability", "8.6", "--plan", "weights=int8", "--plan", "backend=bitsandbytes")
    assert code == 0, err
    flat = " ".join(out.split())
    for name in ("context", "reserve", "fragmentation", "margin", "bitsandbytes", "retained", "inputs"):
        assert name in flat
    assert "loss scaling" not in flat  # 8.6: bf16
    code, out, _ = run_cli(capsys, "plan", "--store", root, "--json")  # the CPU: no CUDA terms
    assert code == 0 and json.loads(out)["cuda_terms"] == {}


def test_bitsandbytes_keeps_the_input_of_an_8bit_linear_through_checkpointing():
    """The claim the retained-inputs term rests on, observed: bitsandbytes' MatMul8bitLt (what Linear8bitLt runs on
    CUDA; on the CPU in eval mode) keeps its input alive after a checkpointed forward, an nn.Linear does not; and
    the installed source still stores it as a plain attribute."""
    import bitsandbytes as bnb
    import bitsandbytes.autograd._functions as bnb_functions
    from torch.utils.checkpoint import checkpoint

    source = Path(bnb_functions.__file__).read_text()
    assert "ctx.tensors = (CAt, subA, A)" in source
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    q = bnb.nn.Linear8bitLt(64, 32, bias=True, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    q = q.to("cpu").eval()
    half = nn.Linear(64, 32).half().requires_grad_(False)
    alive = {}
    for name, layer in (("bitsandbytes", q), ("nn.Linear", half)):
        h = torch.randn(4, 64, dtype=torch.float16, requires_grad=True)
        refs = []

        def block(h, layer=layer, refs=refs):
            a = h * 2  # the layer's input: needs a gradient, made inside the checkpointed region
            refs.append(weakref.ref(a))
            return layer(a)

        with quiet_libraries():
            y = checkpoint(block, h, use_reentrant=False)
        gc.collect()
        alive[name] = refs[0]() is not None
        y.float().sum().backward()
        assert h.grad is not None
    assert alive == {"bitsandbytes": True, "nn.Linear": False}


# -- 11. after an out-of-memory error nothing of the run stays alive ----------------------------------------------
@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
])
def test_out_of_memory_frees_the_run_and_empties_the_cache(tmp_path, monkeypatch, exc):
    import edgecp.train as train

    root = tmp_path / "s"
    new_store(root)
    refs, emptied, levels = [], [], []

    def boom(self):
        refs.append(weakref.ref(self.ctx.comps.unet))
        levels.append(logging.getLogger("bitsandbytes").getEffectiveLevel())
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # as if CUDA were in use from here on
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
        raise exc

    monkeypatch.setattr(train.Trainer, "step", boom)
    with pytest.raises(EdgecpError) as info:
        train.add_concept(root, "aa", make_photos(tmp_path / "p"), class_word="dog")
    assert str(info.value).startswith("ran out of") and type(exc).__name__ in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None  # no reference back to the failure
    assert refs and refs[0]() is None  # the UNet (and with it the run's optimizer and activations) is gone
    assert emptied  # torch.cuda.empty_cache() was called
    assert levels == [logging.ERROR] and logging.getLogger("bitsandbytes").level == logging.NOTSET


@pytest.mark.parametrize("text,oom", [
    ("CUDA out of memory. Tried to allocate 20.00 MiB", True),
    ("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", True),
    ("cuDNN error: CUDNN_STATUS_ALLOC_FAILED", True),
    ("cuDNN error: CUDNN_STATUS_NOT_ALLOCATED", True),
    ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED", True),
    ("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory", True),
    ("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm`", False),
    ("cuDNN error: CUDNN_STATUS_BAD_PARAM", False),
    ("mat1 and mat2 shapes cannot be multiplied", False),
])
def test_is_oom_recognises_cublas_and_cudnn_allocation_failures(text, oom):
    assert memory.is_oom(RuntimeError(text)) is oom
    assert memory.is_oom(ValueError(text)) is False


# -- 12. bitsandbytes' per-call log line: quiet while edgecp works, the level restored after -----------------------
def _bnb_cast_line():
    """Run an 8-bit layer on an fp32 input: bitsandbytes logs 'MatMul8bitLt: inputs will be cast ...'."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=False, threshold=6.0)
    q.weight = bnb.nn.Int8Params(torch.randn(8, 16), requires_grad=False, has_fp16_weights=False)
    q = q.to("cpu").eval()
    with torch.no_grad():
        q(torch.randn(2, 16))


def test_bitsandbytes_log_line_is_quiet_inside_and_restored_after(caplog):
    with quiet_libraries():
        import bitsandbytes  # noqa: F401  (its import notices too)
    name = "bitsandbytes.autograd._functions"
    caplog.set_level(logging.WARNING, logger="tests")  # attach the handler; leave bitsandbytes' levels alone
    logging.getLogger("torchao").setLevel(logging.INFO)  # a level the caller chose: given back exactly
    try:
        with quiet_libraries():
            assert logging.getLogger("bitsandbytes").level == logging.ERROR
            _bnb_cast_line()
        assert not [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
        assert logging.getLogger("bitsandbytes").level == logging.NOTSET
        assert logging.getLogger("torchao").level == logging.INFO
        _bnb_cast_line()  # outside: the line is there (it is bitsandbytes' logger, not a warning)
        lines = [r for r in caplog.records if "inputs will be cast" in r.getMessage()]
        assert lines and lines[0].name == name and lines[0].levelno == logging.WARNING
    finally:
        logging.getLogger("torchao").setLevel(logging.NOTSET)


def test_importing_edgecp_sets_no_log_levels():
    code = ("import logging\nimport edgecp, edgecp.train, edgecp.api, edgecp.generate, edgecp.memory\n"
            "bad = [n for n in ('torchao', 'bitsandbytes', 'kernels', 'torch.utils._pytree') "
            "if logging.getLogger(n).level != logging.NOTSET]\nassert not bad, bad\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
