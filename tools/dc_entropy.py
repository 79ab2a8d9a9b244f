#!/usr/bin/env python
"""Entropy of the DC scores that DSC's teachers produce, under both readings of Eq. 3 (issue 10).

000 Sec. 3.2: "The teacher LoRAs should thus generate low-entropy DC scores for their corresponding concepts."
This measures them: for every concept i of a trained DSC store, teacher theta_i (the consolidated adapter of task
i, from the version's teacher pool) scores concept i's training images over S = {c_0, c_i, c_j} (c_j another
learned concept, as in Algo 3), `--trials` (t, eps) trials per image; errors reduced by the per-element mean or the
squared norm (sum), DC scores at the teachers' temperature. Reports the mean entropy (nats; ln 3 = 1.099 is
uniform over three concepts) and the mean score of the teacher's own concept.

    python tools/dc_entropy.py --run BENCH_OUT/runs/dsc-ewc-dc-s0 --data BENCH_OUT/data/seed0
    python tools/dc_entropy.py --base /tmp/sd15 --resolution 256       # untrained base: 3 prompts, random latents

On a base alone (e.g. the SD1.5-scale fixture with random weights) there are no teachers: the base scores random
latents over three prompts ("a photo of a person" / "cat" / "cup"), which shows how the reduction scales the
error gaps with the latent size D, not how a trained teacher behaves.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _stats(errors: torch.Tensor, own: int, taus: list[float], d: int) -> dict:
    """errors: (N, k) per-element-mean errors; own: the column of the teacher's concept."""
    from edgecp.consolidation.dc_scores import dc_scores, entropy

    out = {}
    for reduction, e in (("mean", errors), ("sum", errors * d)):
        for tau in taus:
            p = dc_scores(e, tau)
            out[f"{reduction}@tau={tau:g}"] = {"entropy": round(float(entropy(p).mean()), 4),
                                               "p_own": round(float(p[:, own].mean()), 4)}
    return out


def _errors(unet_fn, sched, x0, texts, trials, gen) -> torch.Tensor:
    from edgecp.consolidation.dc_scores import dc_forward, trial

    rows = []
    with torch.no_grad():
        for _ in range(trials):
            t, noise = trial(x0, sched.config.num_train_timesteps, gen)
            err, _ = dc_forward(unet_fn, sched, x0, texts, t, noise, "mean")
            rows.append(err)
    return torch.cat(rows)  # (trials * N, k), one row per (image, trial)


def measure_run(run: Path, data: Path, trials: int, taus: list[float]) -> dict:
    from diffusers import DDPMScheduler

    from edgecp.adapters import lora
    from edgecp.diffusion import encode_images
    from edgecp.methods.dsc import read_pool
    from edgecp.methods.phases import predictor
    from edgecp.personal import PersonalModel, encode_text
    from edgecp.store import Store

    store = Store.open(run / "store")
    model = PersonalModel.load(store, device=torch.device("cpu"))
    comps = model.comps
    sched = DDPMScheduler.from_config(comps.scheduler.config)
    pool = read_pool(store.version_dir())
    concepts = store.concepts()
    names = lora.param_names(comps.unet)
    prior = store.info["prior"]["prompt"]
    gen = torch.Generator().manual_seed(0)
    per_concept = []
    with torch.no_grad():
        texts_all = encode_text(comps, [prior] + [c["prompt"] for c in concepts], model.device)
    for i, c in enumerate(concepts):
        j = (i + 1) % len(concepts)  # another learned concept (Algo 3 draws one; any other serves here)
        paths = sorted((data / c["name"] / "train").glob("*.png"))
        lat = encode_images(comps, paths, comps.resolution, model.device, flip=False)
        x0 = lat.mean * lat.scale
        teacher = {names[k]: v for k, v in pool[i].items() if k in names}
        err = _errors(predictor(comps.unet, teacher), sched, x0, texts_all[[0, 1 + i, 1 + j]], trials, gen)
        per_concept.append(_stats(err, 1, taus, int(x0[0].numel())))
    keys = per_concept[0].keys()
    return {"store": str(run / "store"), "concepts": [c["name"] for c in concepts], "latent_elements": int(x0[0].numel()),
            "trials": trials, "mean_over_concepts": {
                k: {m: round(sum(pc[k][m] for pc in per_concept) / len(per_concept), 4) for m in ("entropy", "p_own")}
                for k in keys}}


def measure_base(base: str, resolution: int, trials: int, taus: list[float], images: int) -> dict:
    from diffusers import DDPMScheduler

    from edgecp.model.base import load_components, resolve_base
    from edgecp.personal import encode_text

    comps = load_components(resolve_base(base))
    sched = DDPMScheduler.from_config(comps.scheduler.config)
    lat = resolution // comps.vae_scale
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(images, comps.unet.config.in_channels, lat, lat, generator=gen)
    with torch.no_grad():
        texts = encode_text(comps, ["a photo of a person", "a photo of a cat", "a photo of a cup"], torch.device("cpu"))
    err = _errors(lambda x, t, c: comps.unet(x, t, c).sample, sched, x0, texts, trials, gen)
    return {"base": base, "resolution": resolution, "latent_elements": int(x0[0].numel()), "trials": trials,
            "images": images, "note": "untrained base, random latents; column 1 ('cat') taken as 'own'",
            "scores": _stats(err, 1, taus, int(x0[0].numel()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a bench run folder (runs/<dsc method>-s<seed>)")
    ap.add_argument("--data", type=Path, help="the bench's data/seed<N> folder (the concepts' training views)")
    ap.add_argument("--base", help="measure an untrained base instead (tiny or a diffusers folder)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--taus", default="0.05,1", help="temperatures (000: teachers 0.05, student and EWC DC 1)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    taus = [float(x) for x in a.taus.split(",")]
    if a.run:
        result = measure_run(a.run, a.data, a.trials, taus)
    elif a.base:
        result = measure_base(a.base, a.resolution, a.trials, taus, a.images)
    else:
        ap.error("pass --run and --data, or --base")
    text = json.dumps(result, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
