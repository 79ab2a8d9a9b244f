"""The shipped, pretrained tiny base (`--base tiny`) and its evaluation encoder."""

import json

import numpy as np
import torch

from edgecp.eval.features import load_features, tiny_evaluator_path
from edgecp.model.base import resolve_base
from edgecp.model.tiny import tiny_path


def test_base_tiny_is_the_shipped_pretrained_folder_within_25_mb():
    path = resolve_base("tiny").path
    assert path == tiny_path() and (path / "model_index.json").is_file()
    weights = [f for f in path.rglob("*") if f.is_file() and f.suffix == ".safetensors"]
    assert {f.parent.name for f in weights} == {"unet", "vae", "text_encoder", "evaluator"}
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 25 * 2**20
    report = json.loads((path / "train_report.json").read_text())
    assert report["seed"] == 0 and report["total_minutes"] <= 60
    assert tiny_evaluator_path().parent == path


def test_shipped_base_follows_the_colour_in_its_caption():
    """Eight captions that differ only in the colour word: the shipped evaluator must recognise the asked colour
    in clearly more than chance (1/8) of the generated images. Random weights land at chance."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path(), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    colours = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
    captions = [f"a photo of a large {c} circle in the center, gray background" for c in colours]
    images = pipe(captions, num_inference_steps=20, guidance_scale=6.0, height=64, width=64,
                  generator=torch.Generator().manual_seed(0)).images
    ev = load_features("tiny").ev
    picked = ev.similarity(images, captions).argmax(1)
    assert (picked == np.arange(len(colours))).mean() >= 3 / 8, picked


def test_shipped_evaluator_matches_held_out_scenes_to_their_captions():
    from edgecp.world.data import make_dataset

    images, captions = make_dataset(32, seed=12345, photo_fraction=0.0)  # a seed the pretraining never drew
    ev = load_features("tiny").ev
    sim = ev.similarity(list(images), captions)
    assert (sim.argmax(1) == np.arange(len(captions))).mean() >= 0.8
