"""The files desktop tools read (issue 26): a kohya-format LoRA with the concepts' embeddings bundled as AUTOMATIC1111
reads them, each embedding also as its own file, and how to use them in each tool.

    OUT/NAME.safetensors            the LoRA: kohya keys (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` /
                                    `.alpha`), kohya's `ss_*` and SAI's `modelspec.*` metadata, and
                                    `bundle_emb.<trigger>.string_to_param.*` per concept (AUTOMATIC1111 PR #13568)
    OUT/NAME.json                   AUTOMATIC1111's user metadata of the LoRA (activation text, SD version)
    OUT/embeddings/<trigger>.safetensors   one concept's row under `emb_params` (kohya's textual-inversion key:
                                    AUTOMATIC1111, ComfyUI, InvokeAI and diffusers read it)
    OUT/HOW-TO-USE.txt              each concept's trigger word and an example prompt per tool
    OUT/edgecp-export.json          the report below

Readers: AUTOMATIC1111/Forge (`<lora:NAME:1>`, the bundled embedding by its trigger word), ComfyUI (LoraLoader,
`embedding:<trigger>` with the embeddings folder), InvokeAI (`<trigger>` in angle brackets), kohya sd-scripts, and
diffusers (`load_lora_weights` on the file without its `bundle_emb.*` keys, `load_textual_inversion`).

**Trigger words.** edgecp's token is `<name>`, one new token. In these tools an embedding is named after its file,
and AUTOMATIC1111 replaces every occurrence of that name in a prompt. A concept is usually named after its class
word ("cat" in "a photo of <cat> cat"), so the name alone would capture the class word too; and `<`, `>` cannot be in
file names on Windows. The trigger is `edgecp-<name>` (edgecp's choice): one embedding vector in place of the words,
exactly as edgecp's one token.

**What a LoRA file carries.** Only changes of the UNet's linear layers plus the concept rows:
- a LoRA store's adapter is written as it is (its A and B, alpha = the store's alpha at the version's rank), exact;
- everything else (VeRA, Custom Diffusion and its EWC variant, CNS, the 001 merges, a LoRA with merged tasks) is
  materialised as the weight difference against the base, `delta = W_version - W_base` per layer (the stored
  base deltas plus the adapter's `get_delta_weight`, peft's own), then factored by truncated SVD,
  `delta ~ (alpha / r) (U sqrt(r S / alpha))(sqrt(r S / alpha) V^T)`, as kohya's `extract_lora_from_models.py` does
  (it puts all of S in `up` with alpha = r; the square root on both sides keeps fp16 factors away from underflow).
  alpha is 1 in every layer, whatever its rank: diffusers 0.42 reads a kohya file's per-layer alphas as one alpha
  for all layers (a file with alpha = rank per layer loaded 8-26% off in the layers whose alpha differed from the
  most common one; found by this export's reader check), while every reader divides by each layer's own rank.
  The rank of each layer is the smallest whose relative Frobenius error ||delta - up down||_F / ||delta||_F is at most
  `max_error` (kohya's `resize_lora.py` `sv_fro` rule, stated as the error rather than the kept fraction), or
  `--rank` for every layer. Default `DEFAULT_MAX_ERROR` = 1% (our choice): the error is relative to the concept's
  own change, so the file carries 99% of what training learned in every layer, whatever the scale of the base; an
  image check cannot be the criterion, because a concept's change can move the gate image less than any
  truncation error shows (the report gives the image without the LoRA for that reason; measurements in
  docs/export/issue26).
- A change the format cannot carry (a convolution, a norm, anything outside the UNet's linear layers or the token
  rows) is refused with one line, never written as a different model.

**Checked by a reader edgecp did not write.** Before the folder is put in place, diffusers' `load_lora_weights` and
`load_textual_inversion` read the written files into a fresh base, and one image (the export image gate's prompt,
seed and steps) is drawn through them and through edgecp's own model: the PSNR goes in the report, and below
`MIN_PSNR` the export is refused, naming the PSNR and the fix (a larger `--rank`, a smaller `--max-error`).
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from edgecp import __version__, outputs
from edgecp.adapters.lora import ADAPTER_NAME, lora_modules
from edgecp.errors import EdgecpError
from edgecp.export.diffusers_format import concept_file_names
from edgecp.export.gates import gate_prompt, psnr
from edgecp.personal import (
    ADAPTER_FILE,
    DELTA_FILE,
    TOKENS_FILE,
    PersonalModel,
    effective_adapter,
    read_tensors,
)
from edgecp.progress import emit
from edgecp.store import Store, check_plain_name

SVD_ALPHA = 1.0  # one alpha for every factored layer (module docstring: diffusers applies one alpha to all)
DEFAULT_MAX_ERROR = 0.01  # relative Frobenius error of each layer's factored change (module docstring)
MIN_PSNR = 30.0  # dB, the file read by diffusers against edgecp's own model (the edge-int8 profile's floor)
REPORT = outputs.TOOLS_REPORT
EMBEDDINGS = "embeddings"
HOW_TO = "HOW-TO-USE.txt"
TRIGGER = "edgecp-{}"
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
BASE_NAMES = {"SD1": "Stable Diffusion 1.x", "SD2": "Stable Diffusion 2.x"}


def trigger_of(name: str) -> str:
    return TRIGGER.format(name)


def kohya_key(module: str) -> str:
    """diffusers UNet module path -> kohya's LoRA name (`lora_unet_` + the path with '_' for '.')."""
    return "lora_unet_" + module.replace(".", "_")


def family_of(comps) -> str:
    """sd1 | sd2-base | sd2-v | tiny: the single-file family of a loaded base (SD 2.x by its prediction type)."""
    dim = comps.unet.config.cross_attention_dim
    if dim == 768:
        return "sd1"
    if dim == 1024:
        return "sd2-v" if comps.scheduler.config.get("prediction_type") == "v_prediction" else "sd2-base"
    return "tiny"


SAI_ARCH = {"sd1": "stable-diffusion-v1", "sd2-base": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
            "tiny": "edgecp-tiny"}  # SAI model spec architectures; the tiny base is edgecp's own


def base_model_version(family: str) -> tuple[str, str, str]:
    """(kohya's ss_base_model_version, SAI modelspec architecture of a LoRA, AUTOMATIC1111's "sd version")."""
    kohya = {"sd1": "sd_v1", "sd2-base": "sd_v2", "sd2-v": "sd_v2"}.get(family, "edgecp_tiny")
    a1111 = {"sd1": "SD1", "sd2-base": "SD2", "sd2-v": "SD2"}.get(family, "Unknown")
    return kohya, SAI_ARCH[family] + "/lora", a1111


# ----------------------------------------------------------------------------------------- the weight changes


def rank_for_error(s: torch.Tensor, max_error: float) -> int:
    """The smallest rank r >= 1 whose truncation error sqrt(sum_{i >= r} s_i^2) is at most max_error * ||s||_2
    (the relative Frobenius error of the best rank-r approximation, Eckart-Young), `s` sorted descending."""
    total = float((s.double() ** 2).sum())
    if total == 0.0:
        return 1
    tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])  # tail[r] = sum_{i >= r} s_i^2
    ok = (tail <= (max_error**2) * total).nonzero()
    return max(1, int(ok[0])) if len(ok) else len(s)


def factor(delta: torch.Tensor, rank: int | None, max_error: float, dtype: torch.dtype) -> dict:
    """Truncated SVD of one (out, in) change: {"down", "up", "alpha", "rank", "relative_error", "full_rank"}, the
    error measured after the factors are cast to `dtype` (what a reader multiplies); without `rank`, the smallest rank
    whose cast factors meet `max_error` (fp16 rounding can add a rank to what the singular values alone say)."""
    d = delta.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)

    def at(r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        root = (s[:r] * r / SVD_ALPHA).sqrt()  # a reader applies (alpha / rank) * up @ down
        up = (u[:, :r] * root).to(dtype).contiguous()
        down = (root[:, None] * vh[:r]).to(dtype).contiguous()
        return up, down, relative_error(d, SVD_ALPHA / r * up.double() @ down.double())

    if rank:
        r = min(rank, len(s))
        up, down, err = at(r)
    else:  # the bound holds for the cast factors: the smallest rank from the singular values up that meets it
        lo, hi = rank_for_error(s, max_error), len(s)
        up, down, err = at(lo)
        if err > max_error:
            best = at(hi)
            if best[2] > max_error:
                raise EdgecpError(f"--max-error {max_error:g} cannot be met in {DTYPE_NAMES[dtype]}: even at full rank "
                                  f"a layer's factors are {best[2]:.2g} off after rounding; pass --precision fp32 or "
                                  "a larger --max-error")
            while hi - lo > 1:  # err(lo) > bound >= err(hi); the error falls as the rank grows
                mid = (lo + hi) // 2
                if at(mid)[2] <= max_error:
                    hi = mid
                else:
                    lo = mid
            up, down, err = at(hi)
            lo = hi
        r = lo
    return {"down": down, "up": up, "alpha": SVD_ALPHA, "rank": r, "full_rank": int(min(d.shape)),
            "relative_error": err}


def relative_error(want: torch.Tensor, got: torch.Tensor) -> float:
    norm = float(torch.linalg.matrix_norm(want.double()))
    return float(torch.linalg.matrix_norm(want.double() - got.double())) / norm if norm else 0.0


def adapter_changes(unet) -> dict[str, torch.Tensor]:
    """module -> the (out, in) change its adapter makes, from peft's own `get_delta_weight` (LoRA and VeRA alike)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, BaseTunerLayer) and hasattr(m, "get_delta_weight"):
            with torch.no_grad():
                out[name] = m.get_delta_weight(ADAPTER_NAME).detach().float().cpu()
    return out


def check_linear(unet, deltas: dict[str, torch.Tensor], method: str) -> None:
    """Every stored base change, and every adapted layer, must be one of the UNet's linear layers: what a LoRA
    carries (an adapter on a convolution, `--targets proj_in` on SD 1.x, is refused like a convolution's delta)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(unet.named_modules())
    for name, m in modules.items():
        if isinstance(m, BaseTunerLayer) and not isinstance(m.get_base_layer(), torch.nn.Linear):
            raise EdgecpError(f"method '{method}' adapts '{name}' ({type(m.get_base_layer()).__name__}), which a LoRA "
                              "file cannot carry (it holds changes of linear layers only): use --format onnx or "
                              "--format checkpoint")
    for key, d in deltas.items():
        module = modules.get(key.removesuffix(".weight")) if key.endswith(".weight") else None
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear) or d.dim() != 2:
            raise EdgecpError(f"method '{method}' changes '{key}' {tuple(d.shape)}, which a LoRA file cannot carry (it "
                              "holds changes of linear layers only): use --format onnx or --format checkpoint")


def lora_tensors(model: PersonalModel, store: Store, version: str, rank: int | None, max_error: float,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The kohya tensors of the version's UNet change and what was done: {"path": "exact" | "svd", "why", "modules":
    {module: {"rank", "full_rank", "relative_error"}}}."""
    vdir = store.version_dir(version)
    method = store.info["method"]["name"]
    adapter = effective_adapter(store, version)
    deltas = read_tensors(vdir, DELTA_FILE)
    check_linear(model.comps.unet, deltas, method)
    state = read_tensors(vdir, ADAPTER_FILE)
    tensors, modules = {}, {}
    if adapter.kind == "lora" and not deltas and (rank is None or rank >= adapter.rank):
        scale = adapter.alpha / adapter.rank
        for m in lora_modules(state):
            a, b = state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
            down, up = a.to(dtype).contiguous(), b.to(dtype).contiguous()
            k = kohya_key(m)
            tensors.update({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up,
                            f"{k}.alpha": torch.tensor(float(adapter.alpha))})  # fp32: readers call .item()
            modules[m] = {"rank": adapter.rank, "full_rank": int(min(b.shape[0], a.shape[1])),
                          "relative_error": relative_error(scale * b.double() @ a.double(),
                                                           scale * up.double() @ down.double())}
        why = f"a LoRA of rank {adapter.rank}: written as it is"
        return tensors, {"path": "exact", "why": why, "modules": modules}
    changes = adapter_changes(model.comps.unet)
    for key, d in deltas.items():
        m = key.removesuffix(".weight")
        changes[m] = changes[m] + d.float() if m in changes else d.float()
    if not any(bool(d.any()) for d in changes.values()):
        return {}, {"path": "none", "why": f"method '{method}' leaves the UNet as it is: the file holds only the "
                    "bundled embeddings", "modules": {}}
    for m in sorted(changes):
        if not bool(changes[m].any()):
            continue
        f = factor(changes[m], rank, max_error, dtype)
        k = kohya_key(m)
        tensors.update({f"{k}.lora_down.weight": f["down"], f"{k}.lora_up.weight": f["up"],
                        f"{k}.alpha": torch.tensor(f["alpha"])})
        modules[m] = {key: f[key] for key in ("rank", "full_rank", "relative_error")}
    what = ("a VeRA adapter" if adapter.kind == "vera" else "full-weight changes" if not state
            else "a LoRA plus full-weight changes" if deltas else "a LoRA reduced to a lower rank")
    rule = f"rank {rank} for every layer" if rank else f"per-layer rank for at most {max_error:.0%} relative error"
    return tensors, {"path": "svd", "why": f"{what}: the weight difference factored by truncated SVD, {rule}",
                     "modules": modules}


# ----------------------------------------------------------------------------------------- the files


def concept_rows(store: Store, version: str) -> list[tuple[dict, str, torch.Tensor]]:
    """(concept, trigger word, its (1, D) fp32 row) per concept, names checked as file names first."""
    concepts = store.manifest(version)["concepts"]
    concept_file_names(concepts, f"store '{store.root}', {version}/manifest.json", reserved=())  # plain, distinct
    tokens = read_tensors(store.version_dir(version), TOKENS_FILE)
    return [(c, trigger_of(c["name"]), tokens[c["token"]].float().reshape(1, -1).contiguous()) for c in concepts]


def file_stem(store: Store) -> str:
    """The LoRA's file name: the store folder's name when it is a plain name that is not one of the export's own
    names (edgecp-export, HOW-TO-USE, embeddings), else 'edgecp'."""
    try:
        stem = check_plain_name(store.root.name, "store folder name")
    except EdgecpError:
        return "edgecp"
    reserved = {REPORT.removesuffix(".json"), HOW_TO.removesuffix(".txt"), EMBEDDINGS}
    return "edgecp" if stem.lower() in {r.lower() for r in reserved} else stem


def how_to_use(stem: str, rows: list, sd_version: str, lora: bool = True) -> str:
    lines = [f"edgecp {__version__}: {'LoRA ' + stem + '.safetensors' if lora else 'checkpoint ' + stem + '.safetensors'}"
             f" and its concept embeddings (base: {BASE_NAMES.get(sd_version, 'the tiny base of edgecp')}).", ""]
    for c, trig, _ in rows:
        cls = c.get("class_word") or ""
        lines += [f"concept '{c['name']}': trigger word {trig}",
                  f"  AUTOMATIC1111 / Forge: a photo of {trig} {cls}".rstrip()
                  + (f" <lora:{stem}:1>   (the embedding is bundled in the LoRA)" if lora else
                     f"   (copy {EMBEDDINGS}/{trig}.safetensors to the embeddings folder)"),
                  f"  ComfyUI:  a photo of embedding:{trig} {cls}".rstrip()
                  + ("   (LoraLoader with the LoRA; the embeddings folder holds the file)" if lora else ""),
                  f"  InvokeAI: a photo of <{trig}> {cls}".rstrip(), ""]
    if lora:
        lines += ["diffusers:",
                  "  sd = safetensors.torch.load_file(LORA)",
                  "  pipe.load_lora_weights({k: v for k, v in sd.items() if not k.startswith('bundle_emb.')})",
                  f"  pipe.load_textual_inversion('{EMBEDDINGS}/<trigger>.safetensors', token='<trigger>')", ""]
    return "\n".join(lines)


def write_embeddings(folder: Path, rows: list) -> list[str]:
    (folder / EMBEDDINGS).mkdir()
    written = []
    for _c, trig, row in rows:
        save_file({"emb_params": row}, str(folder / EMBEDDINGS / f"{trig}.safetensors"),
                  metadata={"format": "pt", "edgecp_version": __version__})
        written.append(f"{EMBEDDINGS}/{trig}.safetensors")
    return written


# ----------------------------------------------------------------------------------------- the reader's image


def gate_image(comps, prompt: str) -> np.ndarray:
    """One image through `comps` at the cpu-fp32 export gate's size, steps and seed (guidance 7.5)."""
    from edgecp import seeds
    from edgecp.generate import GenerateConfig, torch_generate
    from edgecp.profiles import load_profile

    profile = load_profile("cpu-fp32")
    size = min(comps.resolution, profile.gate_size) // comps.vae_scale * comps.vae_scale
    cfg = GenerateConfig(n=1, seed=seeds.EXPORT_GATE, steps=profile.gate_steps, size=size)
    return np.asarray(torch_generate(comps, prompt, cfg, "cpu")[0])


def diffusers_reads(store: Store, lora_file: Path | None, emb_files: list[tuple[str, Path]]):
    """(components, pipeline) of a fresh base with the written files loaded by diffusers' own loaders (the reader a
    user of diffusers runs)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from edgecp.model.base import load_components, quiet_loading
    from edgecp.personal import open_base

    comps = load_components(open_base(store))
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=comps.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    with quiet_loading():
        if lora_file is not None:
            sd = load_file(str(lora_file))
            pipe.load_lora_weights({k: v for k, v in sd.items() if not k.startswith("bundle_emb.")})
        for trig, f in emb_files:
            pipe.load_textual_inversion(str(f), token=trig)
    comps.text_encoder, comps.unet = pipe.text_encoder, pipe.unet
    return comps, pipe


def reader_check(store: Store, ours: np.ndarray, rows: list, lora_file: Path | None, emb_dir: Path) -> dict:
    """The image gate's prompt through diffusers' reading of the files against `ours` (edgecp's own image of it,
    `gate_image(model.comps, gate_prompt(concepts))`): PSNR. One base is held at a time."""
    ours_prompt = gate_prompt([c for c, _, _ in rows])
    theirs_prompt = ours_prompt.replace(rows[0][0]["token"], rows[0][1]) if rows else ours_prompt
    embeddings = [(t, emb_dir / f"{t}.safetensors") for _, t, _ in rows]
    comps, pipe = diffusers_reads(store, lora_file, embeddings)
    theirs = gate_image(comps, theirs_prompt)
    check = {"prompt": ours_prompt, "reader_prompt": theirs_prompt, "psnr_db": round(psnr(ours, theirs), 2),
             "reader": "diffusers load_lora_weights + load_textual_inversion", "min_psnr_db": MIN_PSNR}
    if lora_file is not None:  # how far the image moves without the LoRA: what the PSNR above can tell apart
        from edgecp.model.base import quiet_loading

        with quiet_loading():
            pipe.unload_lora_weights()  # the same base and embeddings, the LoRA layers removed: no second load
        comps.unet = pipe.unet
        check["without_lora_psnr_db"] = round(psnr(ours, gate_image(comps, theirs_prompt)), 2)
    return check


# ----------------------------------------------------------------------------------------- the export


def open_export(store_root: str | Path, out: str | Path, overwrite: bool, kind: str, precision: str):
    """(store, version, out, concept rows) for a webui or checkpoint export: the precision checked, HEAD read once
    and its files checked, `out` checked (`outputs.check_output_dir`), the concepts' names checked as file names."""
    if precision not in DTYPES:
        raise EdgecpError(f"--precision '{precision}' is unknown: use fp16 or fp32")
    store = Store.open(outputs.absolute(store_root))
    store.refuse_sdxl(f"the {kind} export")
    version = store.check_version()
    out = outputs.check_output_dir(out, store.root, overwrite=overwrite, kind=kind)
    return store, version, out, concept_rows(store, version)


def export_webui(store_root: str | Path, out: str | Path, overwrite: bool = False, rank: int | None = None,
                 max_error: float = DEFAULT_MAX_ERROR, precision: str = "fp16", progress=None) -> dict:
    """The store's current version (HEAD read once) as the desktop tools' files in `out` (module docstring).
    `rank`: every layer's rank (None: per layer, from `max_error`); `precision`: the LoRA factors' dtype. `out` is
    checked like every export's (`outputs.check_output_dir`), written beside it and renamed into place: a refusal
    leaves nothing. Returns the report (also OUT/edgecp-export.json)."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= 4096):
        raise EdgecpError(f"--rank {rank!r} is out of range: use a whole number from 1 to 4096, or leave it out "
                          "to choose each layer's rank from --max-error")
    if not isinstance(max_error, (int, float)) or not 0.0 < max_error < 1.0:
        raise EdgecpError(f"--max-error {max_error!r} is out of range: use a fraction above 0 and below 1 "
                          f"(default {DEFAULT_MAX_ERROR})")
    t0 = time.perf_counter()
    store, version, out, rows = open_export(store_root, out, overwrite, "webui", precision)
    emit(progress, "load", 0, 3)
    model = PersonalModel.load(store, version, device=torch.device("cpu"))
    emit(progress, "factor", 1, 3)
    tensors, lora = lora_tensors(model, store, version, rank, max_error, DTYPES[precision])
    family = family_of(model.comps)
    ss_version, arch, sd_version = base_model_version(family)
    ours = gate_image(model.comps, gate_prompt([c for c, _, _ in rows]))
    del model  # the reader check loads the base again: one model in memory at a time
    gc.collect()  # a VeRA UNet and its PeftModel refer to each other: freed by the collector only
    stem = file_stem(store)
    ranks = sorted({m["rank"] for m in lora["modules"].values()})
    method = store.info["method"]["name"]
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": ss_version,
            "ss_v2": str(sd_version == "SD2"), "ss_v_parameterization": str(family == "sd2-v"),
            "ss_output_name": stem,
            "ss_network_dim": str(ranks[0]) if len(ranks) == 1 else "Dynamic" if ranks else "0",
            "ss_network_alpha": str(float(tensors[next(k for k in tensors if k.endswith(".alpha"))])) if tensors else "0",
            "ss_tag_frequency": json.dumps({"edgecp": {t: 1 for _, t, _ in rows}}),
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": arch, "modelspec.implementation":
            "https://github.com/kohya-ss/sd-scripts", "modelspec.title": stem,
            "modelspec.trigger_phrase": ", ".join(t for _, t, _ in rows),
            "edgecp_version": __version__, "edgecp_method": method, "edgecp_store_version": version,
            "edgecp_concepts": json.dumps([{"name": c["name"], "trigger": t, "class_word": c.get("class_word")}
                                           for c, t, _ in rows])}
    bundle = {f"bundle_emb.{t}.string_to_param.*": row for _, t, row in rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        lora_file = tmp / f"{stem}.safetensors"
        save_file({**tensors, **bundle}, str(lora_file), metadata=meta)
        files = [lora_file.name, *write_embeddings(tmp, rows)]
        (tmp / f"{stem}.json").write_text(json.dumps({
            "description": f"edgecp {method}, store version {version}", "sd version": sd_version,
            "activation text": " ".join(t for _, t, _ in rows), "preferred weight": 1.0,
            "notes": "the embeddings are bundled in the LoRA (AUTOMATIC1111); ComfyUI and InvokeAI read embeddings/",
        }, indent=1))
        (tmp / HOW_TO).write_text(how_to_use(stem, rows, sd_version))
        emit(progress, "check", 2, 3)
        check = reader_check(store, ours, rows, lora_file if tensors else None, tmp / EMBEDDINGS)
        errors = [m["relative_error"] for m in lora["modules"].values()]
        report = {"format": "webui", "store": str(store.root), "version": version, "method": method,
                  "lora": {"file": lora_file.name, "bytes": lora_file.stat().st_size, "precision": precision,
                           "path": lora["path"], "why": lora["why"], "layers": len(lora["modules"]),
                           "rank_min": ranks[0] if ranks else 0, "rank_max": ranks[-1] if ranks else 0,
                           "max_relative_error": max(errors, default=0.0),
                           "max_error_bound": None if lora["path"] == "exact" or rank else max_error,
                           "modules": lora["modules"]},
                  "embeddings": [{"concept": c["name"], "trigger": t, "file": f"{EMBEDDINGS}/{t}.safetensors"}
                                 for c, t, _ in rows],
                  "image_check": check, "files": [*files, f"{stem}.json", HOW_TO, REPORT],
                  "seconds": round(time.perf_counter() - t0, 1)}
        if check["psnr_db"] < MIN_PSNR:
            fix = ("pass --precision fp32" if lora["path"] != "svd" else "pass a larger --rank or leave it out"
                   if rank else "pass a smaller --max-error")
            raise EdgecpError(f"the LoRA file read by diffusers draws the gate image at {check['psnr_db']} dB against "
                              f"edgecp's own model, below {MIN_PSNR} dB: {fix} (largest layer error "
                              f"{report['lora']['max_relative_error']:.2%})")
        (tmp / REPORT).write_text(json.dumps(report, indent=1))
        outputs.put_in_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(progress, "check", 3, 3)
    return {**report, "out": str(out)}
