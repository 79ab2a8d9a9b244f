"""Export a store version to ONNX for one device profile, in the folder layout optimum's ONNX SD pipelines read.

    OUT/text_encoder/model.onnx   input_ids -> last_hidden_state, pooler_output
    OUT/unet/model.onnx           sample, timestep, encoder_hidden_states -> out_sample
    OUT/vae_decoder/model.onnx    latent_sample -> sample
    OUT/vae_encoder/model.onnx    sample -> latent_parameters (profile permitting)
    OUT/tokenizer/ OUT/scheduler/ OUT/model_index.json OUT/edgecp.json

input_ids are int64 and timestep a float scalar, as optimum exports them since late 2024. The adapter is merged into a full-precision copy of the base and the concept tokens are baked into the text
encoder, so the device needs no peft and no torch. Each model is checked against PyTorch on the same inputs;
beyond the profile's tolerance the export is refused and nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.integrity import lock_dir, unlock_dir, write_export_meta
from edgecp.model.tokens import bake_tokens
from edgecp.profiles import DeviceProfile, load_profile
from edgecp.store import Store

ExportProgress = Callable[[str, int, int], None]


class _TextEncoder(torch.nn.Module):
    def __init__(self, te):
        super().__init__()
        self.te = te

    def forward(self, input_ids):
        out = self.te(input_ids.long(), return_dict=False)
        return out[0], out[1]


class _UNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):
        return self.vae.encode(sample, return_dict=False)[0].parameters  # (B, 2C, h, w): mean and logvar


def _specs(comps, batch: int = 2) -> dict:
    """Per model: wrapper, example inputs (seeded), input/output names, dynamic axes."""
    g = torch.Generator().manual_seed(0)
    lat = comps.unet.config.sample_size
    res = lat * comps.vae_scale
    c_in = comps.unet.config.in_channels
    d = comps.text_encoder.config.hidden_size
    ids = comps.tokenizer(["a photo", "a photo of a dog"], padding="max_length",
                          max_length=comps.tokenizer.model_max_length, return_tensors="pt").input_ids
    return {
        "text_encoder": (_TextEncoder(comps.text_encoder), (ids,), ["input_ids"], ["last_hidden_state", "pooler_output"],
                         {"input_ids": {0: "batch_size", 1: "sequence_length"}, "last_hidden_state": {0: "batch_size", 1: "sequence_length"},
                          "pooler_output": {0: "batch_size"}}),
        "unet": (_UNet(comps.unet),
                 (torch.randn(batch, c_in, lat, lat, generator=g), torch.tensor(981.0),
                  torch.randn(batch, comps.tokenizer.model_max_length, d, generator=g)),
                 ["sample", "timestep", "encoder_hidden_states"], ["out_sample"],
                 {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {},
                  "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
                  "out_sample": {0: "batch_size", 2: "height", 3: "width"}}),
        "vae_decoder": (_VaeDecoder(comps.vae), (torch.randn(1, comps.vae.config.latent_channels, lat, lat, generator=g),),
                        ["latent_sample"], ["sample"],
                        {"latent_sample": {0: "batch_size", 2: "height", 3: "width"}, "sample": {0: "batch_size", 2: "height", 3: "width"}}),
        "vae_encoder": (_VaeEncoder(comps.vae), (torch.rand(1, 3, res, res, generator=g) * 2 - 1,), ["sample"],
                        ["latent_parameters"],
                        {"sample": {0: "batch_size", 2: "height", 3: "width"}, "latent_parameters": {0: "batch_size", 2: "height", 3: "width"}}),
    }


def _torch_onnx_export(module, args, path: Path, inputs, outputs, axes, opset: int) -> None:
    # The TorchScript exporter is what optimum uses for these models and is exact and fast here; torch warns that
    # it is deprecated, so fall back to the dynamo exporter where it is gone.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
        except (TypeError, NotImplementedError, RuntimeError) as e:
            if "dynamo" not in str(e).lower() and "legacy" not in str(e).lower():
                raise
            dyn = {k: {i: torch.export.Dim.AUTO for i in v} for k, v in axes.items() if k in inputs}
            torch.onnx.export(module, args, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                              dynamic_shapes=dyn, opset_version=opset)


def _apply_precision(path: Path, precision: str) -> None:
    import onnx

    if precision == "fp16":
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True, disable_shape_infer=True,
                                         op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Resize"])
        _restore_resize_scales(model)
        onnx.save(model, str(path))
    elif precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        tmp = path.with_suffix(".fp32.onnx")
        path.rename(tmp)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # the quantizer warns on the root logger; the library never prints
        try:
            # MatMul/Gemm only: ConvInteger has no kernel on many execution providers
            quantize_dynamic(str(tmp), str(path), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        finally:
            root.setLevel(level)
            tmp.unlink()


def _restore_resize_scales(model) -> None:
    """Resize's `scales` input must be float32 (ONNX type constraint) but the fp16 converter also converts the
    Constant nodes that feed it; turn those back into float32 (a fix the converter lacks)."""
    import onnx
    from onnx import numpy_helper

    scales = {n.input[2] for n in model.graph.node if n.op_type == "Resize" and len(n.input) > 2 and n.input[2]}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in scales:
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT16:
                    arr = numpy_helper.to_array(attr.t).astype(np.float32)
                    attr.t.CopyFrom(numpy_helper.from_array(arr, attr.t.name))
    for init in model.graph.initializer:
        if init.name in scales and init.data_type == onnx.TensorProto.FLOAT16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))


def _session(path: Path, profile: DeviceProfile):
    import onnxruntime as ort

    avail = set(ort.get_available_providers())
    providers = [p for p in profile.providers if p in avail] or ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), providers=providers)


def _parity(path: Path, module, args, inputs, profile: DeviceProfile) -> tuple[float, float]:
    """(max |onnx - torch| over all outputs, tolerance) on the export's example inputs."""
    sess = _session(path, profile)
    feeds = {}
    for spec, name, a in zip(sess.get_inputs(), inputs, args):
        arr = a.numpy()
        feeds[name] = arr.astype(np.int32 if spec.type == "tensor(int32)" else arr.dtype)
    got = sess.run(None, feeds)
    with torch.no_grad():
        ref = module(*args)
    ref = ref if isinstance(ref, tuple) else (ref,)
    diff = max(float(np.abs(g.astype(np.float32) - r.float().numpy()).max()) for g, r in zip(got, ref))
    tol = profile.tolerance(max(float(r.abs().max()) for r in ref))
    return diff, tol


def export_onnx(store_root: str | Path, profile_name: str = "cpu-fp32", out: str | Path | None = None,
                progress: ExportProgress | None = None) -> dict:
    """Export the store's current version for `profile_name`; returns the parity report. Refuses beyond tolerance."""
    from edgecp.personal import PersonalModel

    profile = load_profile(profile_name)
    store = Store.open(store_root)
    version = store.head
    out = Path(out) if out else store.root / "exports" / f"{profile.name}-{version}"
    if out.exists() and any(out.iterdir()):
        raise EdgecpError(f"export folder '{out}' exists and is not empty: remove it or pass another --out")
    model = PersonalModel.load(store, device=torch.device("cpu"))  # full precision, CPU: merge never touches int8
    comps = model.comps
    if lora.has_adapter(comps.unet):
        lora.merge(comps.unet)
    bake_tokens(comps.text_encoder)
    for m in (comps.text_encoder, comps.unet, comps.vae):
        m.eval().float()

    names = ["text_encoder", "unet", "vae_decoder"] + (["vae_encoder"] if profile.vae_encoder else [])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    lock = lock_dir(tmp)  # recovery and gc leave a temporary export alone while its writer lives
    report = {"profile": profile.name, "precision": profile.precision, "version": version, "models": {}}
    try:
        specs = _specs(comps)
        for i, name in enumerate(names):
            if progress:
                progress("export", i, len(names))
            module, args, inputs, outputs, axes = specs[name]
            (tmp / name).mkdir()
            path = tmp / name / "model.onnx"
            t0 = time.perf_counter()
            _torch_onnx_export(module, args, path, inputs, outputs, axes, profile.opset)
            _apply_precision(path, profile.precision)
            diff, tol = _parity(path, module, args, inputs, profile)
            report["models"][name] = {"max_abs_diff": diff, "tolerance": tol, "bytes": _dir_bytes(tmp / name),
                                      "seconds": round(time.perf_counter() - t0, 2)}
            if not diff <= tol:
                raise EdgecpError(
                    f"export refused: {name} differs from PyTorch by {diff:.3g} > {tol:.3g} allowed by profile "
                    f"'{profile.name}' ({profile.precision}); try a higher-precision profile such as cpu-fp32"
                )
        if progress:
            progress("export", len(names), len(names))
        _write_configs(tmp, comps, names)
        concepts = [{k: c[k] for k in ("name", "token", "class_word")} for c in model.concepts]
        meta = {**report, "concepts": concepts, "base": store.info["base"], "store": str(store.root),
                "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_export_meta(tmp, meta)  # edgecp.json with every file's sha256, last: only a complete export has it
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        unlock_dir(lock)
        shutil.rmtree(tmp, ignore_errors=True)
    report["out"] = str(out)
    return report


def _write_configs(folder: Path, comps, names: list[str]) -> None:
    """tokenizer/, scheduler/, per-model config.json and model_index.json as optimum's ORT SD pipeline reads them."""
    comps.tokenizer.save_pretrained(folder / "tokenizer")
    comps.scheduler.save_pretrained(folder / "scheduler")
    comps.text_encoder.config.to_json_file(str(folder / "text_encoder" / "config.json"))
    comps.unet.save_config(folder / "unet")
    for name in names:
        if name.startswith("vae_"):
            comps.vae.save_config(folder / name)
    # what optimum's exporter writes (the diffusers pipeline's config); its ORT loader adds the vae_* parts itself
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": __import__("diffusers").__version__,
        "requires_safety_checker": False,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "safety_checker": [None, None],
        "scheduler": ["diffusers", type(comps.scheduler).__name__],
        "text_encoder": ["transformers", type(comps.text_encoder).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
