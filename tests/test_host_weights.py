"""Trained base weights in host memory (`--plan host_trained=true`, model/host.HostLinear): the K/V weights that
Custom Diffusion and CNS train stay fp32 in host memory with their gradients and AdamW state, and the device sees a
16-bit copy per call. What is checked:
- the arithmetic is autocast's on an fp32 weight, bit for bit (the reference: PyTorch's own autocast linear);
- the layer stays in host memory whatever the model is moved to, its copy goes to the input's device, and its
  gradient comes back through `edgecp.model.host.host` (the meta device stands in for CUDA);
- every base-training method runs its second task with the model on meta and these weights on the host;
- add-concept trains the same numbers with and without it;
- the planner: SDXL's CD/CNS at 1024 px within 8 GB with it, and what it counts, by hand.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_cuda_paths import _context, _layout, _meta_stand_ins, _task, _write_version
from test_planner import RTX_8GB, SD15
from torch import nn

from edgecp.methods import build_method
from edgecp.model.host import HostLinear, host_linear
from edgecp.model.quant import host_linears_
from edgecp.planner import (
    CUDA_CONTEXT,
    CUDA_FRAGMENTATION,
    GB,
    BaseShape,
    Plan,
    UNetShape,
    Workload,
    plan_training,
    predict_training,
    unet_weight_bytes,
)

META, CPU = torch.device("meta"), torch.device("cpu")
BASE_TRAINING = ("custom-diffusion", "custom-diffusion-sequential", "cd-ewc", "cns")


def _pair(seed=0, bias=True):
    torch.manual_seed(seed)
    ref = nn.Linear(48, 24, bias=bias)
    with torch.no_grad():  # a trained weight's magnitudes, with bits below bf16's 8-bit mantissa
        ref.weight.mul_(3.0).add_(1e-4)
    return ref, host_linear(ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None])
def test_host_linear_computes_what_autocast_computes_from_an_fp32_weight(dtype):
    """The reference is PyTorch's autocast linear on the fp32 weight: the same output and the same fp32 gradient,
    bit for bit, in bf16, fp16 and without autocast; accumulating over two calls as a micro-batch split does."""
    ref, hosted = _pair()
    x = torch.randn(3, 5, 48)
    outs, grads = [], []
    for layer in (ref, hosted):
        for _ in range(2):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                y = layer(x)
            (y.float() ** 2).sum().backward()
        outs.append(y)
        grads.append((layer.weight.grad, layer.bias.grad))
    assert outs[1].dtype == (dtype or torch.float32)
    assert torch.equal(outs[0], outs[1])
    assert grads[1][0].dtype == torch.float32 and torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_host_linear_stays_on_the_host_and_copies_to_the_inputs_device():
    """`model.to(meta)` and `.to(bf16)` move the other layers; the HostLinear keeps its fp32 weight in host memory and
    its call copies it to the input's device (meta stands in for CUDA)."""
    ref, hosted = _pair()
    model = nn.Sequential(nn.Linear(48, 48), hosted)
    model.to(META).to(torch.bfloat16)
    assert model[0].weight.device == META and model[0].weight.dtype == torch.bfloat16
    assert hosted.weight.device == CPU and hosted.weight.dtype == torch.float32
    y = model(torch.randn(2, 48, device=META, dtype=torch.bfloat16))
    assert (y.device, y.dtype, tuple(y.shape)) == (META, torch.bfloat16, (2, 24))


def test_the_gradient_comes_back_through_the_one_host_boundary(monkeypatch):
    """Backward from the device (meta): the weight's gradient arrives in host memory in fp32, and it crossed through
    `edgecp.model.host.host`, the one function a live tensor reaches the CPU by."""
    copies = _meta_stand_ins(monkeypatch)
    _, hosted = _pair()
    y = hosted(torch.randn(2, 48, device=META, dtype=torch.bfloat16))
    y.float().sum().backward()
    g = hosted.weight.grad
    assert (g.device, g.dtype, tuple(g.shape)) == (CPU, torch.float32, (24, 48))
    assert ("meta", (24, 48)) in copies and ("meta", (24,)) in copies


def test_host_linears_swap_only_the_named_plain_linears():
    model = nn.ModuleDict({"attn2": nn.ModuleDict({"to_k": nn.Linear(4, 4, bias=False), "to_q": nn.Linear(4, 4)}),
                           "proj": nn.Linear(4, 4)})
    model["attn2"]["to_k"].weight.requires_grad_(False)
    before = model["attn2"]["to_k"].weight.detach().clone()
    host_linears_(model, ("attn2.to_k",))
    k = model["attn2"]["to_k"]
    assert isinstance(k, HostLinear) and k.bias is None and not k.weight.requires_grad
    assert torch.equal(k.weight, before)
    assert type(model["attn2"]["to_q"]) is nn.Linear and type(model["proj"]) is nn.Linear
    assert set(model.state_dict()) == {"attn2.to_k.weight", "attn2.to_q.weight", "attn2.to_q.bias", "proj.weight",
                                       "proj.bias"}  # the stored keys are the model's own


@pytest.fixture(scope="module")
def tiny_comps():
    from edgecp.model.base import load_components, resolve_base

    comps = load_components(resolve_base("tiny"))
    comps.vae = None
    return comps


def _hosted(comps, method):
    import copy

    comps = copy.deepcopy(comps)
    host_linears_(comps.unet, method.keep_full_precision())
    return comps


@pytest.mark.parametrize("name", BASE_TRAINING)
def test_second_task_with_host_weights_beside_a_gpu_model(tiny_comps, tmp_path, monkeypatch, name):
    """Task 2 of every base-training method with the model on meta and its K/V in host memory: prepare (CNS's
    importance passes, EWC's anchor and Fisher), the penalty's backward, the consolidation (CD's merge, cd-ewc's
    Fisher phase through the meta UNet) and files() run without a device mix, and write the layout the CPU run
    writes."""
    from edgecp.config import AdapterConfig

    torch.manual_seed(0)
    method = build_method(name, {}, AdapterConfig(kind="none"))
    v0 = _write_version(tmp_path / "v0000", {}, {"concepts": []})
    ctx1 = _context(tiny_comps, 1, v0, CPU)
    files1 = _task(method, ctx1)
    v1 = _write_version(tmp_path / "v0001", files1, {"concepts": [{"name": "c1", "prompt": ctx1.prompt}],
                                                     **method.manifest_extra(ctx1)})
    torch.manual_seed(0)
    reference = _task(method, _context(tiny_comps, 2, v1, CPU))

    _meta_stand_ins(monkeypatch)
    torch.manual_seed(0)
    ctx2 = _context(_hosted(tiny_comps, method), 2, v1, META)
    on_gpu = _task(method, ctx2)
    assert _layout(on_gpu) == _layout(reference)
    assert {t.device for f in on_gpu.values() for t in f.values()} <= {CPU}
    live = method.tensors(ctx2)
    assert live and {p.device for p in live.values()} == {CPU}  # the trained K/V never left the host
    assert all(isinstance(m, HostLinear) for n, m in ctx2.comps.unet.named_modules() if n.endswith(("to_k", "to_v"))
               and "attn2" in n)


def _train(tmp_path, tag, plan):
    from conftest import make_photos, new_store

    from edgecp.personal import read_tensors
    from edgecp.train import add_concept

    root = tmp_path / tag
    new_store(root, method="custom-diffusion", train={"steps": 2})
    manifest = add_concept(root, "aa", make_photos(tmp_path / f"p-{tag}"), class_word="dog", device="cpu",
                           plan_force=plan)
    from edgecp.store import Store

    store = Store.open(root)
    return read_tensors(store.version_dir(), "base_delta.safetensors"), manifest


def test_add_concept_trains_the_same_numbers_with_the_weights_in_host_memory(tmp_path, monkeypatch):
    """Custom Diffusion, an fp32 plan on the CPU pinned with and without host_trained (the CPU planner never picks it:
    it saves nothing there): the loader swaps the K/V for HostLinears, AdamW steps on them, and the stored change is
    the same as the plain plan's, bit for bit."""
    import edgecp.model.quant as quant

    swapped = []
    monkeypatch.setattr(quant, "host_linear", lambda layer: swapped.append(layer) or host_linear(layer))
    plain, m_plain = _train(tmp_path, "plain", {"weights": "fp32"})
    assert swapped == []
    hosted, m_host = _train(tmp_path, "host", {"weights": "fp32", "host_trained": True})
    assert len(swapped) == 2 * 7  # the tiny UNet's seven cross-attention blocks, K and V
    assert m_host["concepts"][-1]["memory"]["plan"]["host_trained"] is True
    assert m_plain["concepts"][-1]["memory"]["plan"]["host_trained"] is False
    assert set(plain) == set(hosted) and plain
    assert any(bool(v.abs().sum() > 0) for v in plain.values())
    for k in plain:
        assert torch.equal(plain[k], hosted[k]), k


# -- the planner --------------------------------------------------------------------------------------------------
# SDXL's UNet by kind (tools/make_sd_fixture.py --preset sdxl, read by model/shape.base_shape for Custom Diffusion's
# K/V targets)
SDXL_KV = BaseShape(
    unet_conv=333_232_640, unet_linear=1_891_860_480, unet_other=1_583_364, unet_target=340_787_200,
    unet_linear_rows=1_288_640, text=817_720_320, vae=83_653_863, vae_channels=(128, 256, 512, 512), vae_scale=8,
    unet=UNetShape((320, 640, 1280), 2, (False, True, True), sample_size=128, linear_projection=True,
                   level_layers=(1, 2, 10)),
    largest_tensor=63_242_240, target_in_out=((2048, 640),) * 20 + ((2048, 1280),) * 120,
    text_linear=715_718_656, text_linear_rows=452_864,
)


def _cd_work(n_previous=0, ewc=False):
    held = 4.0 + (8.0 if ewc and n_previous else 0.0)
    rows = {"train": 2, **({"fisher": 1} if ewc else {})}
    return Workload(resolution=1024, batch_size=1, grad_accum=8, phase_rows=rows, adapter_params=0,
                    base_params_trained=SDXL_KV.unet_target, n_images=4, priors_to_generate=200, prior_steps=50,
                    held_per_number=held)


def test_the_trained_kv_counts_once_with_its_start_copy():
    """By hand, Custom Diffusion on SDXL, a bf16 plan on a 24 GB card: training holds the fp32 K/V (counted with the
    UNet), its gradient and two AdamW moments (12 bytes each), and the copy of W when the task started (4 bytes);
    host_trained takes all of them off the device and adds one layer's bf16 copy pair (checkpointing)."""
    from edgecp.planner import DeviceInfo

    gpu = DeviceInfo("cuda", 24 * GB, True)
    kv = SDXL_KV.unet_target
    plan = Plan("cuda", "bf16", None, "bf16", True, 1, 8, 1)
    on_device = predict_training(SDXL_KV, _cd_work(), gpu, plan)
    hosted = predict_training(SDXL_KV, _cd_work(), gpu, dataclasses.replace(plan, host_trained=True))
    alloc = lambda v: (v - CUDA_CONTEXT) / (1 + CUDA_FRAGMENTATION)  # noqa: E731
    pair = 2 * 2 * 2048 * 1280
    assert alloc(on_device["train"]) - alloc(hosted["train"]) == pytest.approx(4 * kv + 16 * kv - pair, abs=4)
    assert alloc(on_device["load"]) - alloc(hosted["load"]) == pytest.approx(4 * kv, abs=4)
    assert unet_weight_bytes(SDXL_KV, "bf16", "bf16") - unet_weight_bytes(SDXL_KV, "bf16", "bf16", True) == 4 * kv
    # cd-ewc from its second concept holds the anchor and the Fisher too (8 bytes a number)
    ewc2 = predict_training(SDXL_KV, _cd_work(1, ewc=True), gpu, plan)
    assert alloc(ewc2["train"]) - alloc(on_device["train"]) == pytest.approx(8 * kv, abs=4)
    assert alloc(ewc2["fisher"]) - alloc(hosted_fisher := predict_training(
        SDXL_KV, _cd_work(1, ewc=True), gpu, dataclasses.replace(plan, host_trained=True))["fisher"]) > 20 * kv - pair
    assert hosted_fisher < on_device["train"]


@pytest.mark.parametrize("ewc,n_previous", [(False, 0), (True, 0), (True, 3)])
def test_sdxl_custom_diffusion_fits_8gb_at_1024px_with_the_kv_on_the_host(ewc, n_previous):
    """The issue's target (a prediction): Custom Diffusion, cd-ewc and CNS within 8 GB on SDXL at 1024 px. On the
    device alone their K/V state does not fit (the refusal names the budget); the plan that fits keeps it in host
    memory, with an 8-bit base and checkpointing."""
    work = _cd_work(n_previous, ewc)
    plan = plan_training(SDXL_KV, work, RTX_8GB, 8 * GB)
    assert plan.host_trained and plan.weights == "int8" and plan.gradient_checkpointing
    assert plan.peak <= 0.92 * 8 * GB
    assert "host memory" in plan.line()
    if not ewc:  # by hand: 341 M fp32 numbers, their gradients, two AdamW moments and the start copy, 20 bytes each
        assert plan.host_memory == 20 * 340_787_200 == 6_815_744_000
    from edgecp.errors import EdgecpError

    with pytest.raises(EdgecpError, match="below the smallest plan"):
        plan_training(SDXL_KV, work, RTX_8GB, 8 * GB, force={"host_trained": False})


def test_host_trained_is_offered_only_for_base_training_methods_and_only_on_cuda():
    from test_planner import CPU_BF16, lora_work

    lora = lora_work(512)
    assert not any(p.host_trained for p in [plan_training(SD15, lora, RTX_8GB, 8 * GB)])
    from edgecp.errors import EdgecpError

    with pytest.raises(EdgecpError, match="host_trained a method that trains base weights"):
        plan_training(SD15, lora, RTX_8GB, 8 * GB, force={"host_trained": True})
    cd = dataclasses.replace(_cd_work(), resolution=512, base_params_trained=SD15.unet_target)
    shape = SD15
    assert not plan_training(shape, cd, CPU_BF16, 16 * GB).host_trained  # the CPU never picks it
    pinned = plan_training(shape, cd, CPU_BF16, 16 * GB, force={"host_trained": True})
    unpinned = plan_training(shape, cd, CPU_BF16, 16 * GB, force={"weights": pinned.weights,
                                                                   "gradient_checkpointing": pinned.gradient_checkpointing,
                                                                   "micro_batch": pinned.micro_batch})
    assert pinned.peak >= unpinned.peak  # on the CPU host memory is the planned memory: it saves nothing
