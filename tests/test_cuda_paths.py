"""The workstation GPU path proven on the CPU (issue 22): the meta device stands in for CUDA.

A meta tensor fails like a CUDA tensor when it meets a CPU tensor (`torch.cat`, `+`, `torch.where` raise "Tensor on
device meta is not on the expected device cpu"), and a model on meta runs forward and backward, shapes only. So every
method runs its task 2 with the whole model on meta (the live device) and task 1's version read from disk (CPU
tensors, as `personal.read_tensors` gives them): prepare, a penalty with its backward, the consolidation phases,
files() and remove_concept(). Meta holds no data, so three things are stood in for: the copy to the host
(`edgecp.model.host.host`, the one function every live tensor crosses to the CPU through) returns CPU numbers of the same
shape and dtype, and `.item()` / `float()` of a meta tensor return a number. Any other path from the device to the
CPU (a stray `.cpu()`) raises NotImplementedError here, so the rule is checked to be the only boundary.

The reference: the same task 2 run on the CPU, whose files must have the same names, keys, shapes and dtypes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from edgecp import personal
from edgecp.config import AdapterConfig, TrainConfig
from edgecp.methods import build_method, method_class, method_names
from edgecp.methods.base import LatentSet, TaskContext
from edgecp.model import host as host_module

META = torch.device("meta")
CPU = torch.device("cpu")
LORA_RANK = 4  # merge-orthogonal needs in >= 2r on the tiny base's narrow layers


@pytest.fixture(scope="module")
def tiny_comps():
    from edgecp.model.base import load_components, resolve_base

    comps = load_components(resolve_base("tiny"))
    comps.vae = None  # latents are given; no phase decodes
    return comps


def _adapter(name: str) -> AdapterConfig:
    cls = method_class(name)
    if cls.adapter_kind == "none":
        return AdapterConfig(kind="none")
    return AdapterConfig(kind=cls.adapter_kind, rank=LORA_RANK if cls.adapter_kind == "lora" else cls.default_rank,
                         alpha=float(LORA_RANK) if cls.adapter_kind == "lora" else 16.0)


def _context(comps, index: int, prev_dir: Path, device: torch.device) -> TaskContext:
    from diffusers import DDPMScheduler

    comps = copy.deepcopy(comps)
    for m in (comps.text_encoder, comps.unet):
        m.to(device)
    gen = torch.Generator().manual_seed(index)
    ch, side = comps.unet.config.in_channels, 8

    def latents(n):
        return LatentSet(torch.randn(n, ch, side, side, generator=gen).to(device),
                         torch.full((n, ch, side, side), 0.1).to(device), 0.18215)

    previous = [{"name": f"c{i}", "prompt": f"a photo of <c{i}> dog"} for i in range(1, index)]
    train = TrainConfig(steps=5, batch_size=2, grad_accum=1, lr=1e-3, token_lr=5e-3, gradient_checkpointing=False)
    d = comps.text_encoder.config.hidden_size
    return TaskContext(index=index, name=f"c{index}", token=f"<c{index}>", class_word="dog",
                       prompt=f"a photo of <c{index}> dog", prior_prompt="a photo of a dog", previous=previous,
                       prev_dir=prev_dir, train=train, comps=comps, device=device,
                       noise_scheduler=DDPMScheduler.from_config(comps.scheduler.config),
                       token_row=torch.nn.Parameter(torch.zeros(d, device=device)),
                       instance=latents(4), prior=latents(4))


def _task(method, ctx: TaskContext) -> dict[str, dict[str, torch.Tensor]]:
    """One task as train.py runs it, the training loop replaced by a penalty backward and a step of noise."""
    method.prepare(ctx)
    penalty = method.penalty(ctx)
    if penalty is not None:
        penalty.backward()
    with torch.no_grad():  # "training" moved every trained tensor (LoRA's B leaves zero)
        gen = torch.Generator().manual_seed(ctx.index)
        for p in method.tensors(ctx).values():
            p.add_(0.01 * torch.randn(p.shape, generator=gen).to(p))
            p.grad = None
    method.consolidate(ctx)
    return method.files(ctx)


def _write_version(folder: Path, files: dict, manifest: dict) -> Path:
    folder.mkdir(parents=True)
    for fname, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / fname))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def _meta_stand_ins(monkeypatch) -> list[tuple[str, tuple]]:
    """What meta cannot do, done as CUDA would: copies to the host (recorded), and numbers of scalars."""
    copies = []
    real_host, real_item, real_float = host_module.host, torch.Tensor.item, torch.Tensor.__float__

    def host(t):
        if t.is_meta:
            copies.append((str(t.device), tuple(t.shape)))
            gen = torch.Generator().manual_seed(t.numel())
            return (torch.rand(t.shape, generator=gen, dtype=torch.float64) + 0.5).to(t.dtype)
        return real_host(t)

    monkeypatch.setattr(host_module, "host", host)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: 0.5 if self.is_meta else real_item(self))
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: 0.5 if self.is_meta else real_float(self))
    return copies


def _layout(files):
    return {f: {k: (tuple(v.shape), v.dtype) for k, v in t.items()} for f, t in files.items()}


@pytest.mark.parametrize("name", method_names())
def test_second_task_on_a_gpu_combines_stored_and_live_state_on_the_cpu(tiny_comps, tmp_path, monkeypatch, name):
    """c-lora, lora-merge, merge-orthogonal and magmax raised "Expected all tensors to be on the same device" at the
    second concept's commit on CUDA (torch.cat / add_deltas / torch.where of stored CPU tensors and the live adapter);
    the other methods wrote device tensors that only train.py's serialiser moved. Every method now hands back CPU
    tensors, and the phases between (penalties, DSC teachers, Fisher, CD merge, CNS, orthogonal init) run on the
    device without meeting a CPU tensor."""
    torch.manual_seed(0)
    method = build_method(name, {}, _adapter(name))
    v0 = _write_version(tmp_path / "v0000", {}, {"concepts": []})
    ctx1 = _context(tiny_comps, 1, v0, CPU)
    files1 = _task(method, ctx1)
    concept = {"name": "c1", "prompt": ctx1.prompt}
    manifest1 = {"concepts": [concept], **method.manifest_extra(ctx1)}
    v1 = _write_version(tmp_path / "v0001", files1, manifest1)

    torch.manual_seed(0)
    reference = _task(method, _context(tiny_comps, 2, v1, CPU))

    copies = _meta_stand_ins(monkeypatch)
    torch.manual_seed(0)
    ctx2 = _context(tiny_comps, 2, v1, META)
    on_gpu = _task(method, ctx2)
    assert {t.device for f in on_gpu.values() for t in f.values()} <= {CPU}
    assert _layout(on_gpu) == _layout(reference)
    if method.adapter.kind != "none" or name in ("custom-diffusion", "custom-diffusion-sequential", "cd-ewc", "cns"):
        assert copies, "the live state reached the files without crossing edgecp.model.host.host"

    if method.removal == "exact":  # removing concept 1 from what task 2 wrote: CPU in, CPU out
        files = {f: dict(t) for f, t in on_gpu.items()}
        manifest = {"concepts": [concept, {"name": "c2", "prompt": ctx2.prompt}], **method.manifest_extra(ctx2)}
        method.remove_concept(files, 0, manifest)
        assert {t.device for f in files.values() for t in f.values()} <= {CPU}


def test_meta_stands_in_for_cuda_in_the_combinations_that_crashed():
    """The stand-in fails the way CUDA does in each combination of the old files(); the rule removes the mix."""
    from edgecp.adapters.lora import concat_loras
    from edgecp.consolidation.merge import magmax
    from edgecp.methods.merging import add_deltas

    stored = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    live = {k: v.to(META) for k, v in stored.items()}
    for combine in (lambda: concat_loras([stored, live], [1.0, 1.0]), lambda: add_deltas(stored, live),
                    lambda: magmax(stored["m.lora_A.weight"], live["m.lora_A.weight"])):
        with pytest.raises(RuntimeError, match="device"):
            combine()
    host = {k: torch.zeros(v.shape) for k, v in live.items()}  # what personal.to_host gives on CUDA
    assert concat_loras([stored, host], [1.0, 1.0])["m.lora_A.weight"].device == CPU


def test_to_host_copies_never_views():
    p = torch.nn.Parameter(torch.ones(2, 2))
    out = personal.to_host({"p": p})["p"]
    assert out.device == CPU and not out.requires_grad and out.data_ptr() != p.data_ptr()
    with torch.no_grad():
        p.add_(1)
    assert out.sum() == 4  # the file's tensor does not follow the live parameter


# -- the GPU index (cuda:1) reaches the 8-bit conversion ------------------------------------------------------


class _FakeInt8Params(torch.nn.Parameter):
    moves: list = []

    def __new__(cls, data, requires_grad=False, has_fp16_weights=False):
        return super().__new__(cls, data, requires_grad)

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        _FakeInt8Params.moves.append(device)
        return self  # no CUDA here: the device argument is what is checked


class _FakeLinear8bitLt(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, has_fp16_weights=False, threshold=6.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        self.weight.to(device)  # as nn.Module.to reaches the parameter
        return self


@pytest.fixture
def fake_bnb(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")  # the [test] install has it; its CUDA kernels are not needed here
    monkeypatch.setattr(bnb.nn, "Linear8bitLt", _FakeLinear8bitLt)
    monkeypatch.setattr(bnb.nn, "Int8Params", _FakeInt8Params)
    _FakeInt8Params.moves = []
    return _FakeInt8Params.moves


def test_bitsandbytes_quantizes_on_the_gpu_the_model_goes_to(fake_bnb):
    """Int8Params quantize on their first move to a device. Given "cuda" (device.type) they quantized on cuda:0 and
    kept CB/SCB there when the model then went to cuda:1; the planned load now quantizes each Linear on the device
    it is given, index included (the tiny base's UNet, streamed tensor by tensor)."""
    from edgecp.model.base import resolve_base
    from edgecp.model.quant import Precision, convert_, load_planned

    comps = load_planned(resolve_base("tiny"), Precision("int8", "bitsandbytes", "fp16"), torch.device("cuda", 1))
    n_unet = sum(isinstance(m, _FakeLinear8bitLt) for m in comps.unet.modules())
    n_text = sum(isinstance(m, _FakeLinear8bitLt) for m in comps.text_encoder.modules())  # 8-bit too (issue 28)
    assert n_unet > 10 and n_text > 5 and fake_bnb == [torch.device("cuda", 1)] * (n_unet + n_text)
    fake_bnb.clear()
    convert_(torch.nn.Sequential(torch.nn.Linear(4, 4)), Precision("int8", "bitsandbytes", "fp16"), "cuda:1")
    assert fake_bnb == [torch.device("cuda", 1)]  # the single-file path (convert_ in place)


def test_the_personal_model_passes_the_device_index_to_the_planned_load(monkeypatch, trained_store):
    """PersonalModel.load handed `device.type` to the 8-bit loader: cuda:1 became cuda (the current GPU, cuda:0)."""
    import edgecp.model.quant as quant
    from edgecp.store import Store

    seen = []

    def load_planned(spec, precision, device="cpu", fold=None):
        seen.append(device)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(quant, "load_planned", load_planned)
    with pytest.raises(RuntimeError, match="stop after the call"):
        personal.PersonalModel.load(Store.open(trained_store), device=torch.device("cuda", 1), stream=True)
    assert seen == [torch.device("cuda", 1)]


# -- what verified a cuda-fp16 export (the GPU branch; the CPU branch runs in tests/test_export.py) -------------


def test_an_export_verified_on_a_gpu_keeps_its_fp16_vae_and_says_so(monkeypatch):
    from edgecp.export.onnx_export import CPU_ONLY_NOTE, cpu_kept_fp32, verified_on
    from edgecp.profiles import load_profile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"NVIDIA H200 (device {i})")
    fp16, fp32 = load_profile("cuda-fp16"), load_profile("cpu-fp32")
    assert verified_on(fp16, True, "CUDAExecutionProvider") == {
        "provider": "CUDAExecutionProvider", "device": "NVIDIA H200 (device 0)",
        "fp16_overflow": "checked on NVIDIA H200 (device 0)"}
    assert verified_on(fp16, False, "CPUExecutionProvider")["fp16_overflow"] == CPU_ONLY_NOTE
    assert "fp16_overflow" not in verified_on(fp32, False, "CPUExecutionProvider")
    assert [cpu_kept_fp32(n, gpu) for gpu in (False, True) for n in ("unet", "vae_decoder", "vae_encoder")] == [
        False, True, True, False, False, False]
