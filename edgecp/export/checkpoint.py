"""One original-layout single-file checkpoint with every concept merged in (issue 26): the file people drop into a
models folder.

    OUT/NAME.safetensors        UNet (`model.diffusion_model.*`, the adapter and every base change merged), VAE
                                (`first_stage_model.*`), text encoder (SD 1.x CLIP `cond_stage_model.transformer.*` or
                                SD 2.x OpenCLIP `cond_stage_model.model.*`), fp16 by default; the concept tokens'
                                rows under `edgecp_token_rows.<token>` (metadata `edgecp_tokens` lists them)
    OUT/embeddings/<trigger>.safetensors, OUT/HOW-TO-USE.txt, OUT/edgecp-export.json   as `--format webui` writes them

**The tokens.** A single file has no tokenizer, so no desktop tool can learn a new word from it, and a text encoder
table grown beyond the base vocabulary (49,408 rows at SD 1.x/2.x) fails to load in the tools that build the text
encoder at that size (ComfyUI, AUTOMATIC1111). The table keeps the base's shape; the concept rows travel in the same
file under their own keys, which those tools ignore and `edgecp init --base` reads back
(`edgecp.model.single_file.load_token_rows`: the tokens become words of the new store's base); for the desktop tools
the rows are also written as embedding files beside it (`embeddings/`, trigger `edgecp-<name>`). Our choice, stated
in docs/export.

**Checked by a reader edgecp did not write.** Before the folder is put in place, the written file is loaded back as a
base the way `edgecp init --base` loads it (diffusers' `from_single_file`, then the token rows) and the export image
gate's prompt, seed and steps are drawn through it and through the store's model: the PSNR goes in the report, and
below `webui.MIN_PSNR` the export is refused.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from edgecp import __version__, outputs
from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.export.gates import gate_prompt, psnr
from edgecp.export.webui import (
    DTYPES,
    HOW_TO,
    MIN_PSNR,
    REPORT,
    base_model_version,
    concept_rows,
    file_stem,
    gate_image,
    how_to_use,
    write_embeddings,
)
from edgecp.model.ldm_layout import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from edgecp.model.single_file import TOKEN_ROWS, TOKENS_META
from edgecp.personal import PersonalModel
from edgecp.progress import emit
from edgecp.store import Store

ARCH = {"SD1": "stable-diffusion-v1", "SD2": "stable-diffusion-v2", "Unknown": "edgecp-tiny"}


def text_encoder_state(text_encoder) -> dict[str, torch.Tensor]:
    """The text encoder's weights with the base vocabulary's table only (the concept rows are written apart)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        if ".token_embedding.rows." in k:
            continue
        out[k.replace(".token_embedding.base.", ".token_embedding.")] = v
    return out


def checkpoint_tensors(model: PersonalModel, rows: list, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    comps = model.comps
    if lora.has_adapter(comps.unet):
        lora.merge(comps.unet)
    sd = unet_to_ldm(comps.unet.state_dict(), dict(comps.unet.config))
    sd.update(vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    sd.update(text_encoder_to_ldm(text_encoder_state(comps.text_encoder),
                                  openclip=comps.unet.config.cross_attention_dim == 1024))
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    for c, _trig, row in rows:
        sd[TOKEN_ROWS + c["token"]] = row[0].to(dtype).contiguous()
    return sd


def export_checkpoint(store_root: str | Path, out: str | Path, overwrite: bool = False, precision: str = "fp16",
                      progress=None) -> dict:
    """The store's current version (HEAD read once) as one single-file checkpoint in `out` (module docstring), plus
    the embedding files and HOW-TO-USE.txt. Written beside `out` and renamed into place: a refusal leaves nothing."""
    from edgecp.model.base import BaseSpec, load_components

    if precision not in DTYPES:
        raise EdgecpError(f"--precision '{precision}' is unknown: use fp16 or fp32")
    t0 = time.perf_counter()
    store = Store.open(outputs.absolute(store_root))
    version = store.check_version()
    out = outputs.check_output_dir(out, store.root, overwrite=overwrite, kind="checkpoint")
    rows = concept_rows(store, version)
    emit(progress, "load", 0, 3)
    model = PersonalModel.load(store, version, device=torch.device("cpu"))
    prompt = gate_prompt([c for c, _, _ in rows])
    ours = gate_image(model.comps, prompt)
    _, _, sd_version = base_model_version(model.comps.unet.config.cross_attention_dim)
    emit(progress, "write", 1, 3)
    tensors = checkpoint_tensors(model, rows, DTYPES[precision])
    del model
    stem = file_stem(store)
    method = store.info["method"]["name"]
    meta = {"format": "pt", "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCH[sd_version],
            "modelspec.title": stem, "modelspec.trigger_phrase": ", ".join(c["token"] for c, _, _ in rows),
            TOKENS_META: json.dumps([c["token"] for c, _, _ in rows]), "edgecp_version": __version__,
            "edgecp_method": method, "edgecp_store_version": version}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        ckpt = tmp / f"{stem}.safetensors"
        save_file(tensors, str(ckpt), metadata=meta)
        del tensors
        files = [ckpt.name, *write_embeddings(tmp, rows)]
        (tmp / HOW_TO).write_text(how_to_use(stem, rows, sd_version, lora=False)
                                  + f"\nedgecp: edgecp init --store NEW --base {ckpt.name}   (the concepts' tokens "
                                    "come with it: " + ", ".join(c["token"] for c, _, _ in rows) + ")\n")
        emit(progress, "check", 2, 3)
        try:
            theirs = gate_image(load_components(BaseSpec("single_file", str(ckpt), ckpt)), prompt)
        except EdgecpError as e:  # e.g. a reduced layout no single-file family describes (SD 2.x blocks at tiny size)
            raise EdgecpError(f"the checkpoint cannot be read back as a base, so it is not written: {e}; this base's "
                              "layout has no single-file form edgecp reads (SD 1.x, SD 2.x and the tiny base "
                              "do): use --format webui or --format diffusers") from None
        digest = hashlib.sha256()
        with open(ckpt, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        check = {"prompt": prompt, "psnr_db": round(psnr(ours, theirs), 2), "min_psnr_db": MIN_PSNR,
                 "reader": "diffusers from_single_file + the token rows, as `edgecp init --base` loads it"}
        report = {"format": "checkpoint", "store": str(store.root), "version": version, "method": method,
                  "checkpoint": {"file": ckpt.name, "bytes": ckpt.stat().st_size, "sha256": digest.hexdigest(),
                                 "precision": precision, "sd_version": sd_version,
                                 "tokens": [c["token"] for c, _, _ in rows]},
                  "embeddings": [{"concept": c["name"], "trigger": t, "file": f"embeddings/{t}.safetensors"}
                                 for c, t, _ in rows],
                  "image_check": check, "files": [*files, HOW_TO, REPORT],
                  "seconds": round(time.perf_counter() - t0, 1)}
        if check["psnr_db"] < MIN_PSNR:
            raise EdgecpError(f"the checkpoint loaded back draws the gate image at {check['psnr_db']} dB against the "
                              f"store's model, below {MIN_PSNR} dB: try --precision fp32")
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        outputs.put_in_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(progress, "check", 3, 3)
    return {**report, "out": str(out)}
