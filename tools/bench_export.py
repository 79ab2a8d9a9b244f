#!/usr/bin/env python
"""Latency of one UNet call, PyTorch vs onnxruntime, on a store's export; and the export's parity (issue 2).

    python tools/bench_export.py --store edgecp-demo/store --onnx edgecp-demo/onnx-cpu-fp32
    python tools/bench_export.py --store S --onnx DIR --batch 2 --runs 50

Both run the merged model on the same inputs: batch 2 (classifier-free guidance) at the model's resolution.
Also prints each concept's seconds per training step from the store's manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def timed(fn, runs: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - t0) / runs


def main() -> None:
    import onnxruntime as ort

    from edgecp.adapters import lora
    from edgecp.personal import PersonalModel
    from edgecp.store import Store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--onnx", required=True, help="the export folder of the store's current version")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()

    store = Store.open(args.store)
    model = PersonalModel.load(store, device=torch.device("cpu"))
    unet = model.comps.unet
    if lora.has_adapter(unet):
        lora.merge(unet)  # what the export runs
    unet.eval()
    lat = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, unet.config.in_channels, lat, lat, generator=g)
    t = torch.tensor(500.0)
    c = torch.randn(args.batch, 77, model.comps.text_encoder.config.hidden_size, generator=g)
    with torch.inference_mode():
        t_torch = timed(lambda: unet(x, t, c), args.runs)
        ref = unet(x, t, c).sample.numpy()
    sess = ort.InferenceSession(str(Path(args.onnx) / "unet" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"sample": x.numpy(), "timestep": np.array(500.0, dtype=np.float32), "encoder_hidden_states": c.numpy()}
    t_ort = timed(lambda: sess.run(None, feeds), args.runs)
    got = sess.run(None, feeds)[0]
    meta = json.loads((Path(args.onnx) / "edgecp.json").read_text())
    print(f"UNet call, batch {args.batch}, {lat}x{lat} latents, torch threads {torch.get_num_threads()}, mean of {args.runs}:")
    print(f"  PyTorch      {t_torch * 1e3:8.2f} ms")
    print(f"  onnxruntime  {t_ort * 1e3:8.2f} ms")
    print(f"  ONNX / PyTorch latency ratio  {t_ort / t_torch:.3f}")
    print(f"  max |onnx - torch| on these inputs  {np.abs(got - ref).max():.2e}")
    print("export parity (edgecp.json):")
    for name, r in meta["models"].items():
        data = ", model.onnx_data" if r.get("external_data") else ""
        print(f"  {name:<13} max abs diff {r['max_abs_diff']:.2e} (tolerance {r['tolerance']:.1e}), "
              f"{r['bytes'] / 1e6:.1f} MB{data}, {r.get('seconds', 0):.1f} s")
    gate = meta.get("image_gate")
    if gate:  # exports since issue 11
        sim = f", evaluator similarity {gate['evaluator_similarity']:.4f}" if "evaluator_similarity" in gate else ""
        print(f"  image gate: {gate['psnr_db']:.2f} dB PSNR vs PyTorch (min {gate['min_psnr_db']:g}), "
              f"{gate['steps']} steps at {gate['size'][0]} px{sim}")
    print("training seconds per step (manifest):")
    for cpt in store.concepts():
        print(f"  <{cpt['name']}>  {cpt['seconds_per_iteration']['train']:.4f} s/step over {cpt['steps']} steps")


if __name__ == "__main__":
    main()
