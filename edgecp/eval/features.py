"""Image features for the metrics: the tiny world's evaluator, or a real CLIP model for real bases.

`--features tiny` uses the evaluation encoder shipped beside the tiny base (trained contrastively on the tiny
world's pretraining data, never on concept images). `--features PATH|HUB_ID` loads an edgecp evaluator folder, or
a transformers CLIPModel (e.g. openai/clip-vit-large-patch14) from a local folder or, when online, the hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import CLIPModel

from edgecp.errors import EdgecpError
from edgecp.images import fit_square
from edgecp.model.tiny import tiny_path
from edgecp.world.evaluator import FORMAT as EVALUATOR_FORMAT
from edgecp.world.evaluator import load_evaluator

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class Features(Protocol):
    name: str

    def embed_images(self, images) -> np.ndarray: ...  # (n, d), L2-normalised


class EvaluatorFeatures:
    def __init__(self, folder: Path):
        self.name = f"tiny-evaluator:{folder.name}"
        self.ev = load_evaluator(folder)

    def embed_images(self, images) -> np.ndarray:
        return self.ev.embed_images(images)


class ClipFeatures:
    """transformers CLIPModel image features (CLIP's own preprocessing: resize, centre crop, normalise)."""

    def __init__(self, source: str):
        self.name = f"clip:{source}"
        self.model = CLIPModel.from_pretrained(source).eval()
        self.size = self.model.config.vision_config.image_size

    def embed_images(self, images) -> np.ndarray:
        arr = np.stack([
            (np.asarray(fit_square(im.convert("RGB"), self.size),
                        dtype=np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
            for im in images
        ]).transpose(0, 3, 1, 2)
        with torch.no_grad():
            f = self.model.get_image_features(pixel_values=torch.from_numpy(arr))
            f = getattr(f, "pooler_output", f)  # transformers 5 may return a model output
        f = f.float().numpy()
        return f / np.linalg.norm(f, axis=1, keepdims=True)


def tiny_evaluator_path() -> Path:
    return tiny_path() / "evaluator"


def load_features(spec: str) -> Features:
    """'tiny', a folder holding an edgecp evaluator or a CLIP model, or a hub id (online only)."""
    if spec == "tiny":
        folder = tiny_evaluator_path()
        if not (folder / "config.json").is_file():
            raise EdgecpError(f"the tiny base has no evaluation encoder at '{folder}': rebuild it with "
                              "`python tools/train_tiny_world.py`, or pass --features PATH")
        return EvaluatorFeatures(folder)
    p = Path(spec).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("format") == EVALUATOR_FORMAT:
            return EvaluatorFeatures(p)
        try:
            return ClipFeatures(str(p))
        except Exception as e:
            raise EdgecpError(f"--features '{spec}' is neither an edgecp evaluator nor a CLIP model folder: "
                              f"{type(e).__name__}") from e
    try:
        return ClipFeatures(spec)
    except Exception as e:
        raise EdgecpError(f"could not load CLIP '{spec}' for the metrics (offline?): pass a local CLIP folder, "
                          "or --features tiny on the tiny base") from e
