"""One original-layout single-file checkpoint with every concept merged in (issue 26): the file people drop into a
models folder.

    OUT/NAME.safetensors        UNet (`model.diffusion_model.*`, the adapter and every base change merged), VAE
                                (`first_stage_model.*`), text encoder (SD 1.x CLIP `cond_stage_model.transformer.*` or
                                SD 2.x OpenCLIP `cond_stage_model.model.*`), fp16 by default; the concept tokens'
                                rows under `edgecp_token_rows.<token>` (metadata `edgecp_tokens` lists them), and
                                the family in `edgecp_family` (SD 2.x's prediction type is not in its weights)
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

import gc
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
    SAI_ARCH,
    base_model_version,
    family_of,
    file_stem,
    gate_image,
    how_to_use,
    open_export,
    write_embeddings,
)
from edgecp.integrity import sha256_file
from edgecp.model.ldm_layout import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
from edgecp.model.single_file import FAMILY_META, TOKEN_ROWS, TOKENS_META, load_token_rows
from edgecp.personal import PersonalModel, open_base
from edgecp.progress import emit


def text_encoder_state(text_encoder, vocab: int) -> dict[str, torch.Tensor]:
    """The text encoder's weights with the first `vocab` rows of its table (the family's vocabulary: the rows of
    tokens a checkpoint base carried and the concept rows are written apart)."""
    out = {}
    for k, v in text_encoder.state_dict().items():
        if ".token_embedding.rows." in k:
            continue
        k = k.replace(".token_embedding.base.", ".token_embedding.")
        out[k] = v[:vocab] if k.endswith("token_embedding.weight") else v
    return out


def checkpoint_tensors(model: PersonalModel, carried: list[tuple[str, torch.Tensor]], rows: list,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The merged model in the original layout; `carried`: the token rows the store's base (an edgecp checkpoint)
    already carried, kept before the store's own concepts."""
    comps = model.comps
    if lora.has_adapter(comps.unet):
        lora.merge(comps.unet)
    vocab = concept_embedding_base_rows(comps.text_encoder) - len(carried)
    sd = unet_to_ldm(comps.unet.state_dict(), dict(comps.unet.config))
    sd.update(vae_to_ldm(comps.vae.state_dict(), dict(comps.vae.config)))
    sd.update(text_encoder_to_ldm(text_encoder_state(comps.text_encoder, vocab),
                                  openclip=comps.unet.config.cross_attention_dim == 1024))
    sd = {k: v.detach().to(dtype).contiguous() for k, v in sd.items()}
    for token, row in carried:
        sd[TOKEN_ROWS + token] = row.reshape(-1).to(dtype).contiguous()
    for c, _trig, row in rows:
        sd[TOKEN_ROWS + c["token"]] = row[0].to(dtype).contiguous()
    return sd


def concept_embedding_base_rows(text_encoder) -> int:
    emb = text_encoder.get_input_embeddings()
    return int(getattr(emb, "base_vocab", emb.weight.shape[0]))


def export_checkpoint(store_root: str | Path, out: str | Path, overwrite: bool = False, precision: str = "fp16",
                      progress=None) -> dict:
    """The store's current version (HEAD read once) as one single-file checkpoint in `out` (module docstring), plus
    the embedding files and HOW-TO-USE.txt. Written beside `out` and renamed into place: a refusal leaves nothing."""
    from edgecp.model.base import BaseSpec, load_components

    t0 = time.perf_counter()
    store, version, out, rows = open_export(store_root, out, overwrite, "checkpoint", precision)
    emit(progress, "load", 0, 3)
    spec = open_base(store)
    carried = load_token_rows(spec.path) if spec.kind == "single_file" else []  # a checkpoint base's own tokens
    model = PersonalModel.load(store, version, device=torch.device("cpu"))
    prompt = gate_prompt([c for c, _, _ in rows])
    ours = gate_image(model.comps, prompt)
    family = family_of(model.comps)
    _, _, sd_version = base_model_version(family)
    emit(progress, "write", 1, 3)
    tensors = checkpoint_tensors(model, carried, rows, DTYPES[precision])  # peak: the fp32 model and this copy
    del model
    gc.collect()
    stem = file_stem(store)
    method = store.info["method"]["name"]
    tokens = [t for t, _ in carried] + [c["token"] for c, _, _ in rows]
    meta = {"format": "pt", "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": SAI_ARCH[family],
            "modelspec.title": stem, "modelspec.trigger_phrase": ", ".join(tokens), TOKENS_META: json.dumps(tokens),
            FAMILY_META: family, "edgecp_version": __version__, "edgecp_method": method,
            "edgecp_store_version": version}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        ckpt = tmp / f"{stem}.safetensors"
        save_file(tensors, str(ckpt), metadata=meta)
        del tensors
        files = [ckpt.name, *write_embeddings(tmp, rows)]
        (tmp / HOW_TO).write_text(how_to_use(stem, rows, sd_version, lora=False)
                                  + f"\nedgecp: edgecp init NEW-STORE --base {ckpt.name}   (the concepts' tokens "
                                    "come with it: " + ", ".join(tokens) + ")\n")
        emit(progress, "check", 2, 3)
        try:
            theirs = gate_image(load_components(BaseSpec("single_file", str(ckpt), ckpt)), prompt)
        except EdgecpError as e:  # e.g. a reduced layout no single-file family describes (SD 2.x blocks at tiny size)
            raise EdgecpError(f"the checkpoint cannot be read back as a base, so it is not written: {e}; this base's "
                              "layout has no single-file form edgecp reads (SD 1.x, SD 2.x and the tiny base "
                              "do): use --format webui or --format diffusers") from None
        check = {"prompt": prompt, "psnr_db": round(psnr(ours, theirs), 2), "min_psnr_db": MIN_PSNR,
                 "reader": "diffusers from_single_file + the token rows, as `edgecp init --base` loads it"}
        report = {"format": "checkpoint", "store": str(store.root), "version": version, "method": method,
                  "checkpoint": {"file": ckpt.name, "bytes": ckpt.stat().st_size, "sha256": sha256_file(ckpt),
                                 "precision": precision, "sd_version": sd_version,
                                 "family": family, "tokens": tokens},
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
