"""The export's gates: each model against PyTorch on the inputs it saw (tensor gate), then one image through the
export against PyTorch's (image gate), and what a refusal tells the user.

Tensor gate: each model's outputs on what it was fed while PyTorch drew the gate image (recorded by
`references.recording`), within the profile's tolerance. Image gate: the gate prompt, seed and steps through
edgecp's onnxruntime runner against PyTorch's image, PSNR at least the profile's `min_psnr`. A gate's refusal is
`Refused`; the profile's next variant may pass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from edgecp import seeds
from edgecp.errors import EdgecpError
from edgecp.eval.features import EvaluatorFeatures, tiny_evaluator_path
from edgecp.export import references
from edgecp.export.ort_runner import OnnxStableDiffusion, available_providers, session_options
from edgecp.export.trace import ModelSpec
from edgecp.profiles import DeviceProfile, load_profile
from edgecp.progress import Progress

GATE_SEED = seeds.EXPORT_GATE  # the gate image's seed (edgecp.seeds), also in edgecp.json
CPU_ONLY_NOTE = "cpu-only: fp16 overflow not checked"


class Refused(EdgecpError):
    """A gate refused the export: the profile's next variant may pass (int8 static -> dynamic)."""


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images (peak 255); identical images give 100.0 (a finite, JSON-safe stand-in)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * float(np.log10(255.0**2 / mse)))


def gate_prompt(concepts: list[dict]) -> str:
    """The image gate's prompt: the first concept in its class (its token through every model), else a plain one."""
    if concepts:
        c = concepts[0]
        return " ".join(w for w in ("a photo of", c["token"], c.get("class_word")) if w)
    return "a photo of a dog"


def step_ms(seconds: list[float]) -> float | None:
    """A denoising step's time in ms from each step's wall time: the median of all but the first (which carries
    a session's or a module's first run); None under two steps."""
    return round(float(np.median(seconds[1:])) * 1e3, 1) if len(seconds) > 1 else None


def gate_args(calls: list[dict], spec: ModelSpec) -> tuple:
    """The tensor gate's inputs of one model: what it was fed at the middle of PyTorch's gate image (a text encoder
    and a VAE are called once, a UNet once per step), as the export's example inputs' dtypes. Inputs from the model's
    own use, not random ones: a statically quantized model is calibrated for the ranges generation produces."""
    call = calls[len(calls) // 2]
    return tuple(torch.from_numpy(np.asarray(call[n])).to(e.dtype).reshape(e.shape if e.dim() == 0 else call[n].shape)
                 for n, e in zip(spec.inputs, spec.example))


def verify_optimization(profile: DeviceProfile, gpu: bool) -> str:
    """onnxruntime's optimization level of the gates' sessions: "disabled" for an fp16 export verified on the CPU,
    whose provider has no fp16 kernels for most ops: the other levels fold a Cast of every such weight into an fp32
    copy beside the fp16 one, "disabled" casts each as its node runs (`ort_runner.session_options`; SDXL's fp16 UNet
    peaked at 14.9 GB at "basic", 5.7 GB at "disabled", the same image). The graph was optimized offline
    (`export.optimize`); the outputs are the same computation."""
    return "disabled" if profile.precision == "fp16" and not gpu else "all"


def parity(path: Path, args, ref: tuple, inputs, profile: DeviceProfile, optimization: str = "all"
           ) -> tuple[float, float]:
    """(max |onnx - torch| over all outputs, tolerance) on `args` (what the model saw while PyTorch drew the gate
    image); `ref` is PyTorch's output."""
    sess = ort.InferenceSession(str(path), sess_options=session_options(optimization),
                                providers=available_providers(profile.providers))
    feeds = {}
    for spec, name, a in zip(sess.get_inputs(), inputs, args):
        arr = a.numpy()
        feeds[name] = arr.astype(np.int32 if spec.type == "tensor(int32)" else arr.dtype)
    got = sess.run(None, feeds)
    del sess
    diff = max(float(np.abs(g.astype(np.float32) - r.float().numpy()).max()) for g, r in zip(got, ref))
    tol = profile.tolerance(max(float(r.abs().max()) for r in ref))
    return diff, tol


def image_gate(folder: Path, profile: DeviceProfile, ref: references.Job, is_tiny: bool,
               on_step: Progress | None = None, optimization: str = "all", update: Path | None = None) -> dict:
    """`ref`'s prompt, seed and steps through the export in `folder` (edgecp's onnxruntime runner, one session at a
    time) against `ref.image` (PyTorch's). `on_step` gets a ProgressEvent ("sample") after each denoising step.

    Speed beside it: the median step (UNet call with both halves of guidance, and the DDIM update) of this image
    against PyTorch's steps drawing `ref` (`ref.step_seconds`; PyTorch's side always runs fp32 on the CPU), on
    this machine, in this process, one after the other. A rough figure from few steps: `tools/bench_export.py`
    times whole images. `update`: draw through the export in `folder` with this concept update (base + update)."""
    try:
        # one session at a time: the export's peak stays one model's; the CPU memory arena kept but for fp16, whose
        # casts grow it, since without it fp32 runs slower and the speed is reported (docs/export/README.md)
        pipe = OnnxStableDiffusion(folder, providers=available_providers(profile.providers), optimization=optimization,
                                   reduce_memory=True, arena=profile.precision != "fp16", update=update)
    except ValueError as e:  # e.g. a CUDA provider onnxruntime lists but cannot start: the runner names the fix
        raise EdgecpError(f"image gate of profile '{profile.name}': {str(e).splitlines()[0]}") from None
    h, w = ref.image.shape[:2]
    seconds: list[float] = []
    img = np.asarray(pipe([ref.prompt], steps=ref.steps, seed=ref.seed, height=h, width=w,
                          callback=references.step_timer(seconds, on_step))[0].convert("RGB"))
    provider = pipe.unet.providers[0]
    del pipe
    gate = {"prompt": ref.prompt, "seed": ref.seed, "steps": ref.steps, "size": [h, w],
            "psnr_db": round(psnr(img, ref.image), 2), "min_psnr_db": profile.min_psnr, "provider": provider}
    onnx_ms, torch_ms = step_ms(seconds), step_ms(ref.step_seconds)
    if onnx_ms is not None and torch_ms is not None:
        gate["unet_step_ms"] = {"onnx": onnx_ms, "pytorch": torch_ms, "ratio": round(onnx_ms / torch_ms, 3),
                                "provider": provider, "steps_timed": ref.steps - 1}
    if is_tiny:  # the tiny world's evaluator: does the export's image still read as the same picture?
        e = EvaluatorFeatures(tiny_evaluator_path()).embed_images([img, ref.image])
        gate["evaluator_similarity"] = round(float(e[0] @ e[1]), 4)
    return gate


def check_image_gate(gate: dict, profile: DeviceProfile) -> None:
    """Refused when the image gate's PSNR is below the profile's `min_psnr`, in one line saying by how much."""
    if not gate["psnr_db"] >= profile.min_psnr:
        raise Refused(
            f"export refused: its image is {gate['psnr_db']:.2f} dB PSNR from PyTorch's, "
            f"{profile.min_psnr - gate['psnr_db']:.2f} dB below the {profile.min_psnr:g} dB profile "
            f"'{profile.name}' requires; " + refusal_advice(profile))


def check_tensor_gate(name: str, diff: float, tol: float, profile: DeviceProfile, variant: str | None) -> None:
    """Refused when model `name` differs from PyTorch by more than the profile allows."""
    if not diff <= tol:
        raise Refused(
            f"export refused: {name} differs from PyTorch by {diff:.3g} > {tol:.3g} allowed by profile "
            f"'{profile.name}' ({profile.precision}{f' {variant}' if variant else ''}); "
            + refusal_advice(profile, model=name))


def refusal_advice(profile: DeviceProfile, model: str | None = None) -> str:
    """What to do after a gate refused an export of `profile` (the tensor gate's `model`, else the image gate).
    Below fp32 a higher precision helps. fp32 is the top: when the profile asks no more than the shipped cpu-fp32
    (an fp32 export matches PyTorch to rounding) the disagreement is an edgecp bug, and the advice says to report it
    with what it needs; a user profile stricter than cpu-fp32 is told which setting to loosen."""
    if profile.precision != "fp32":
        return "try a higher-precision profile such as cpu-fp32"
    ref = load_profile("cpu-fp32")
    if model is None and profile.min_psnr > ref.min_psnr:
        return (f"fp32 is the highest precision: lower the profile's min_psnr (the shipped cpu-fp32 asks "
                f"{ref.min_psnr:g} dB)")
    if model is not None and (profile.atol < ref.atol or profile.rtol < ref.rtol):
        return (f"fp32 is the highest precision: loosen the profile's atol/rtol (the shipped cpu-fp32 allows atol "
                f"{ref.atol:g}, rtol {ref.rtol:g})")
    what = f"the {model} graph" if model else "the export's image"
    return (f"fp32 is the highest precision and should match PyTorch to rounding, so {what} disagreeing is an edgecp "
            "bug for this base: please report it with this line and the base's scheduler/scheduler_config.json and "
            "unet/config.json (EDGECP_DEBUG=1 adds the traceback)")


def verified_on(profile: DeviceProfile, gpu: bool, provider: str | None) -> dict:
    """What the export's gates ran on, for edgecp.json: the provider the image gate's UNet ran on, the GPU's name
    (CUDA device 0, where onnxruntime's sessions run by default) when one verified it, and for fp16 exports whether
    fp16 overflow could be seen (only a GPU computes fp16 nodes in fp16)."""
    device = None
    if gpu:
        try:
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        except Exception:  # a CPU build of torch beside onnxruntime-gpu: the provider still names the GPU path
            device = None
    out = {"provider": provider or ("CUDAExecutionProvider" if gpu else "CPUExecutionProvider"), "device": device}
    if profile.precision == "fp16":
        out["fp16_overflow"] = f"checked on {device or 'CUDA'}" if gpu else CPU_ONLY_NOTE
    return out
