#!/usr/bin/env python
"""Load an `edgecp export` folder with optimum's ORTStableDiffusionPipeline, in optimum's own environment.

An SDXL export (model_index.json names StableDiffusionXLPipeline) loads with ORTStableDiffusionXLPipeline; the
negative prompt is passed as "" (as edgecp's runner and `generate` do: SDXL's pipeline would otherwise use zeros).

optimum-onnx pins transformers < 4.58, which edgecp (transformers 5) cannot share a venv with, so this script
imports nothing from edgecp: run it with the other environment's python.

    python3 -m venv .venv-optimum && .venv-optimum/bin/pip install -r requirements-optimum.txt   # or: make test
    .venv-optimum/bin/python tools/check_optimum_reader.py EXPORT_DIR --prompt "a photo of <alpha> dog" \
        --steps 2 --latents latents.npy --out image.png

Prints one JSON line: the versions, the prompt's input ids from transformers 4's slow CLIPTokenizer (which
optimum loads from tokenizer/vocab.json + merges.txt + the added concept tokens), the scheduler class, the
image's size (SDXL: also `ids_2`, from tokenizer_2). The caller compares ids and image with edgecp's own runner (tests/test_export.py does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--prompt", default="a photo of a dog")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--latents", help=".npy starting latents (B, C, h, w), already scaled by init_noise_sigma")
    ap.add_argument("--out", help="where to save the image (PNG)")
    a = ap.parse_args(argv)

    import numpy as np
    import optimum.onnxruntime
    import torch
    import transformers
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    with open(os.path.join(a.folder, "model_index.json"), encoding="utf-8") as f:
        sdxl = json.load(f).get("_class_name") == "StableDiffusionXLPipeline"
    cls = ORTStableDiffusionXLPipeline if sdxl else ORTStableDiffusionPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = cls.from_pretrained(a.folder, provider="CPUExecutionProvider")
    pipe.set_progress_bar_config(disable=True)

    def ids_of(tok):
        return tok(a.prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids

    ids = ids_of(pipe.tokenizer)
    kw = {"ids_2": ids_of(pipe.tokenizer_2)} if sdxl else {}
    call = {"negative_prompt": ""}
    if a.latents:
        call["latents"] = torch.from_numpy(np.load(a.latents))
        side = call["latents"].shape[-1] * pipe.vae_scale_factor
        call.update(height=side, width=side)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = pipe(a.prompt, num_inference_steps=a.steps, guidance_scale=a.guidance, **call).images[0]
    if a.out:
        image.save(a.out)
    print(json.dumps({
        "transformers": transformers.__version__, "optimum_onnx": getattr(optimum.onnxruntime, "__version__", None),
        "tokenizer_class": type(pipe.tokenizer).__name__, "ids": ids,
        "scheduler": type(pipe.scheduler).__name__, "size": list(image.size), "pipeline": cls.__name__, **kw,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
