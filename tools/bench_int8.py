#!/usr/bin/env python
"""edge-int8: dynamic vs static (QDQ) quantization, with and without convolutions, measured on a cpu-fp32 export.

    python tools/bench_int8.py --fp32 STORE/exports/cpu-fp32-v0002 --work /tmp/int8 [--steps 15] [--runs 10]

For each variant (the fp32 reference; dynamic MatMul/Gemm, edge-int8's fallback; dynamic with ConvInteger;
static QDQ on every model with onnxruntime's defaults, per-channel int8 weights and uint8 activations, convolutions
included: what edge-int8's static variant refines, see `_to_int8_static`) it writes a full export folder
and prints: model bytes, UNet call latency (batch 2, CFG) and seconds per image on onnxruntime's CPU provider, and
the PSNR of its image against the fp32 export's image (same prompt, seed, steps). Calibration inputs come from
running the fp32 export on the base prompt and on each concept's prompt (tokens from edgecp.json): the user's
photos are never read (they are purged after learning anyway). Imports no torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgecp.export.gates import psnr
from edgecp.export.ort_runner import OnnxStableDiffusion

MODELS = ("text_encoder", "unet", "vae_decoder")


def calibration(folder: Path, prompts: list[str], steps: int, size: int | None) -> dict[str, list[dict]]:
    """Per model, the feeds it sees when the fp32 export draws `prompts` (one image each, seeds 0..)."""
    pipe = OnnxStableDiffusion(folder, providers=["CPUExecutionProvider"])
    feeds: dict[str, list[dict]] = {m: [] for m in MODELS}
    for model in MODELS:
        sess = getattr(pipe, model)
        run = sess.run

        def record(output, f, batched, _run=run, _m=model):
            feeds[_m].append({k: np.asarray(v, dtype=sess_dtype(getattr(pipe, _m), k)) for k, v in f.items()})
            return _run(output, f, batched)

        sess.run = record
    for i, p in enumerate(prompts):
        pipe([p], steps=steps, seed=i, height=size, width=size)
    return feeds


def sess_dtype(model, name):
    return model.dtype(name)


class Reader:
    def __init__(self, feeds: list[dict]):
        self.it = iter(feeds)

    def get_next(self):
        return next(self.it, None)


def quantize(src: Path, dst: Path, kind: str, feeds: list[dict]) -> None:
    """One model; a model with external data (past 2 GiB of protobuf: the SD1.5 UNet) stays external."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst.parent.mkdir(parents=True, exist_ok=True)
    ext = (src.parent / "model.onnx_data").is_file()
    if kind == "dynamic-matmul":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                         use_external_data_format=ext)
    elif kind == "dynamic-conv":
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm", "Conv"], use_external_data_format=ext)
    elif kind == "qdq":
        pre = dst.with_suffix(".pre.onnx")
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=ext,
                          all_tensors_to_one_file=True, external_data_location=pre.name + ".data")
        quantize_static(str(pre), str(dst), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                        use_external_data_format=ext)
        pre.unlink()
        pre.with_name(pre.name + ".data").unlink(missing_ok=True)
    else:
        raise ValueError(kind)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for m in MODELS for f in (folder / m).glob("model.onnx*"))


def unet_latency(folder: Path, feeds: dict, runs: int, threads: int) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    s = ort.InferenceSession(str(folder / "unet" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    for _ in range(2):
        s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(runs):
        s.run(None, feeds)
    return (time.perf_counter() - t0) / runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", type=Path, required=True, help="a cpu-fp32 export folder")
    ap.add_argument("--work", type=Path, required=True, help="where the variant folders go")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--calib-steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--variants", default="dynamic-matmul,dynamic-conv,qdq")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of the UNet timing (0: all)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    a = ap.parse_args()
    logging.getLogger().setLevel(logging.ERROR)
    meta = json.loads((a.fp32 / "edgecp.json").read_text())
    prompts = ["a photo of a dog"] + [f"a photo of {c['token']} {c['class_word']}".strip() for c in meta["concepts"]]
    feeds = calibration(a.fp32, prompts, a.calib_steps, a.size)
    test_prompt = prompts[-1]
    ref = np.asarray(OnnxStableDiffusion(a.fp32, providers=["CPUExecutionProvider"])([test_prompt], steps=a.steps,
                                                                                      seed=123, height=a.size,
                                                                                      width=a.size)[0])
    unet_feed = feeds["unet"][len(feeds["unet"]) // 2]
    rows = []
    for kind in ["fp32", *a.variants.split(",")]:
        folder = a.fp32 if kind == "fp32" else a.work / kind
        if kind != "fp32":
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(a.fp32, folder, ignore=shutil.ignore_patterns("model.onnx*", "edgecp.json"))
            for m in MODELS:
                quantize(a.fp32 / m / "model.onnx", folder / m / "model.onnx", kind, feeds[m])
            (folder / "vae_encoder").exists() and shutil.rmtree(folder / "vae_encoder")
        pipe = OnnxStableDiffusion(folder, providers=["CPUExecutionProvider"])
        t0 = time.perf_counter()
        img = np.asarray(pipe([test_prompt], steps=a.steps, seed=123, height=a.size, width=a.size)[0])
        per_image = time.perf_counter() - t0
        rows.append({"variant": kind, "MB": round(folder_bytes(folder) / 1e6, 2),
                     "unet_ms": round(1000 * unet_latency(folder, unet_feed, a.runs, a.threads), 2),
                     "s_per_image": round(per_image, 3), "psnr_vs_fp32_db": round(psnr(img, ref), 2)})
        print(json.dumps(rows[-1]), flush=True)
    (a.work / "int8.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
