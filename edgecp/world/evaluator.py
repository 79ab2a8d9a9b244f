"""The tiny world's evaluation encoder: a small CLIP-style image/text pair with one shared, L2-normalised space.

Image tower: a small CNN on 64x64 RGB (strided 3x3 convolutions down to 4x4, then an MLP; no global pooling,
so positions survive). Text tower: ``transformers.CLIPTextModel`` with the tiny config of
:mod:`edgecp.model.tiny` (the real 49,408-token CLIP tokenizer, width 64, 2 layers), pooled at the end-of-text
token as CLIP does, then a linear projection. Trained contrastively by ``tools/train_tiny_world.py``; its text
tower IS the tiny base's text encoder.

A saved evaluator is a folder::

    config.json          {"format": "edgecp-world-evaluator", "embed_dim", "image_size", "image_tower": {...},
                          "text_tower": {"config": {CLIPTextConfig}, "weights": "<file>", "sha256": "<hex>"},
                          "logit_scale", ...}
    model.safetensors    image tower + text projection (fp32)
    text_tower.safetensors   the CLIPTextModel weights, unless "weights" names another file: the trained base
                          stores them once, in its ``text_encoder/`` (``../text_encoder/model.safetensors``,
                          checked against the recorded sha256 when loaded)
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from edgecp.model.tokenizer import write_clip_tokenizer
from edgecp.store import sha256_file

FORMAT = "edgecp-world-evaluator"
IMAGE_SIZE = 64
EMBED_DIM = 64

DEFAULT_IMAGE_TOWER = {"channels": [32, 64, 128, 64], "hidden": 128, "stem": 0}
# the tiny base's text encoder config (edgecp/model/tiny.py)
DEFAULT_TEXT_TOWER = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, projection_dim=64, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)

__all__ = ["Evaluator", "build_evaluator", "save_evaluator", "load_evaluator", "IMAGE_SIZE", "EMBED_DIM"]


def make_image_tower(channels=(32, 64, 128, 64), hidden: int = 128, embed_dim: int = EMBED_DIM,
                     image_size: int = IMAGE_SIZE, stem: int = 0):
    """A small CNN: [a stride-1 3x3 stem of `stem` channels at full resolution], then 64 -> 32 -> 16 -> 8 -> 4
    (stride-2 3x3 convs, a 3x3 conv at 16 and 8), flatten (positions survive), MLP to `embed_dim`."""
    c1, c2, c3, c4 = channels

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

    layers = block(3, stem, 1) if stem else []
    layers += (block(stem or 3, c1, 2) + block(c1, c2, 2) + block(c2, c2, 1) + block(c2, c3, 2) + block(c3, c3, 1)
               + block(c3, c4, 2))
    side = image_size // 16
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c4 * side * side, hidden), nn.SiLU(),
                         nn.Linear(hidden, embed_dim))


@functools.lru_cache(maxsize=1)
def _tokenizer():
    tmp = Path(tempfile.mkdtemp(prefix="edgecp-eval-tok-"))
    try:
        return write_clip_tokenizer(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class EvaluatorModel(nn.Module):
    """The trainable pair; `Evaluator` wraps it for numpy in / numpy out."""

    def __init__(self, text_config: dict, image_config: dict, embed_dim: int):
        super().__init__()
        self.image_tower = make_image_tower(embed_dim=embed_dim, **image_config)
        self.text_model = CLIPTextModel(CLIPTextConfig(**text_config))
        self.text_projection = nn.Linear(text_config["hidden_size"], embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_images(self, x):  # x: (n, 3, 64, 64) in [-1, 1]
        return nn.functional.normalize(self.image_tower(x), dim=-1)

    def encode_texts(self, input_ids):
        pooled = self.text_model(input_ids=input_ids).pooler_output
        return nn.functional.normalize(self.text_projection(pooled), dim=-1)


class Evaluator:
    """Embeds images and captions of the tiny world into one L2-normalised space (numpy in, numpy out)."""

    def __init__(self, model, config: dict, tokenizer=None):
        self.model = model.eval()
        self.config = config
        self.embed_dim = int(config["embed_dim"])
        self.image_size = int(config["image_size"])
        self.tokenizer = tokenizer if tokenizer is not None else _tokenizer()

    # -- inputs --------------------------------------------------------------------------------------------
    def _image_batch(self, images) -> np.ndarray:
        if isinstance(images, np.ndarray):
            arr = images[None] if images.ndim == 3 else images
            if arr.shape[1:3] == (self.image_size, self.image_size) and arr.shape[-1] == 3:
                return np.ascontiguousarray(arr, dtype=np.uint8)
            images = [Image.fromarray(a) for a in arr]
        out = np.empty((len(images), self.image_size, self.image_size, 3), np.uint8)
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im))
            im = im.convert("RGB")
            s = min(im.size)  # centre square, then resize
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=(left, top, left + s, top + s))
            out[i] = np.asarray(im)
        return out

    def tokenize(self, texts: list[str]):
        ids = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=77,
                             return_tensors="np").input_ids
        return torch.from_numpy(ids.astype(np.int64))

    # -- embeddings ----------------------------------------------------------------------------------------
    def embed_images(self, images, batch_size: int = 256) -> np.ndarray:
        """(n, d) float32, rows of unit length; `images` is a list of PIL images or a uint8 (n, H, W, 3) array."""
        arr = self._image_batch(images)
        outs = []
        with torch.no_grad():
            for i in range(0, len(arr), batch_size):
                x = torch.from_numpy(arr[i:i + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                outs.append(self.model.encode_images(x).float().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.embed_dim), np.float32)

    def embed_texts(self, texts, batch_size: int = 256) -> np.ndarray:
        """(n, d) float32, rows of unit length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        outs = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                outs.append(self.model.encode_texts(self.tokenize(texts[i:i + batch_size])).float().numpy())
        return np.concatenate(outs) if outs else np.zeros((0, self.embed_dim), np.float32)

    def similarity(self, images, texts) -> np.ndarray:
        """Cosine similarities (n_images, n_texts)."""
        return self.embed_images(images) @ self.embed_texts(texts).T


def build_evaluator(seed: int = 0, text_config: dict | None = None, image_config: dict | None = None,
                    embed_dim: int = EMBED_DIM, tokenizer=None) -> Evaluator:
    """A freshly initialised (random) evaluator, deterministic in `seed` (`tokenizer`: a CLIP tokenizer to
    reuse; by default the real CLIP tokenizer is built once per process)."""
    cfg = {
        "format": FORMAT, "version": 1, "embed_dim": embed_dim, "image_size": IMAGE_SIZE,
        "image_tower": dict(image_config or DEFAULT_IMAGE_TOWER),
        "text_tower": {"config": dict(text_config or DEFAULT_TEXT_TOWER)},
    }
    torch.manual_seed(seed)
    model = EvaluatorModel(cfg["text_tower"]["config"], cfg["image_tower"], embed_dim)
    return Evaluator(model, cfg, tokenizer)


def save_evaluator(ev: Evaluator, folder: str | Path, text_weights: str | Path | None = None, **extra) -> Path:
    """Write `ev` to `folder`. With `text_weights` (a safetensors file holding exactly the text tower's
    state dict, e.g. the base's ``text_encoder/model.safetensors``) the text tower is referenced by relative
    path + sha256 instead of copied. `extra` goes into config.json (training notes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = ev.model
    own = {f"image_tower.{k}": v for k, v in m.image_tower.state_dict().items()}
    own["text_projection.weight"] = m.text_projection.weight
    own["logit_scale"] = m.logit_scale.detach().reshape(1)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in own.items()}, folder / "model.safetensors")
    text_sd = {k: v.detach().to(torch.float32).contiguous() for k, v in m.text_model.state_dict().items()}
    if text_weights is None:
        save_file(text_sd, folder / "text_tower.safetensors")
        text_file = folder / "text_tower.safetensors"
        rel = "text_tower.safetensors"
    else:
        text_file = Path(text_weights)
        theirs = load_file(text_file)
        missing = set(text_sd) - set(theirs)
        if missing or any(not torch.equal(text_sd[k], theirs[k].to(torch.float32)) for k in text_sd):
            raise ValueError(f"{text_file} does not hold this evaluator's text tower")
        rel = os.path.relpath(text_file.resolve(), folder.resolve())
    cfg = dict(ev.config)
    cfg["text_tower"] = {"config": dict(cfg["text_tower"]["config"]), "weights": rel, "sha256": sha256_file(text_file)}
    cfg["logit_scale"] = float(m.logit_scale.detach().exp())
    cfg.update(extra)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    ev.config = cfg
    return folder


def load_evaluator(folder: str | Path) -> Evaluator:
    """Load an evaluator written by :func:`save_evaluator` (CPU, fp32, eval mode)."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{folder} is not an edgecp world evaluator (config.json format {cfg.get('format')!r})")
    text_file = (folder / cfg["text_tower"]["weights"]).resolve()
    if not text_file.is_file():
        raise FileNotFoundError(f"evaluator text tower weights not found: {text_file}")
    if sha256_file(text_file) != cfg["text_tower"]["sha256"]:
        raise ValueError(f"evaluator text tower weights {text_file} do not match the sha256 in {folder / 'config.json'}")
    model = EvaluatorModel(cfg["text_tower"]["config"], cfg["image_tower"], int(cfg["embed_dim"]))
    own = load_file(folder / "model.safetensors")
    model.image_tower.load_state_dict({k[len("image_tower."):]: v.float() for k, v in own.items()
                                       if k.startswith("image_tower.")})
    model.text_projection.weight.data.copy_(own["text_projection.weight"].float())
    model.logit_scale.data.copy_(own["logit_scale"].float().reshape(()))
    text_sd = {k: v.float() for k, v in load_file(text_file).items()}
    model.text_model.load_state_dict(text_sd, strict=False)
    missing = set(model.text_model.state_dict()) - set(text_sd)
    missing = {k for k in missing if not k.endswith("position_ids")}
    if missing:
        raise ValueError(f"text tower weights {text_file} lack {sorted(missing)[:3]}")
    model.to(torch.float32)
    return Evaluator(model, cfg)
