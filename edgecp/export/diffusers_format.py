"""Export the concepts for other Stable Diffusion tools: the LoRA in the file `load_lora_weights` reads and one
textual-inversion file per concept token for `load_textual_inversion`.

    pipe.load_lora_weights(OUT)                                   # pytorch_lora_weights.safetensors
    pipe.load_textual_inversion(OUT / "<name>.safetensors")      # one per concept, token "<name>"

`how_to_load` gives that code for one export, on the store's base, with each concept's prompt words (the CLI prints
it after the export).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from safetensors.torch import save_file

from edgecp import outputs
from edgecp.adapters.lora import concat_loras, peft_config, with_rank
from edgecp.config import AdapterConfig
from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.model.tiny import tiny_path
from edgecp.personal import ADAPTER_FILE, DELTA_FILE, TOKENS_FILE, effective_adapter, read_tensors
from edgecp.prompts import expand
from edgecp.store import Store, check_plain_name

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights / load_lora_weights use


def concept_file_names(concepts: list[dict], where: str, reserved: tuple[str, ...] = (LORA_FILE,)) -> list[str]:
    """The textual-inversion file name of each concept, `<name>.safetensors`, each name checked first: a name read
    from a store file becomes a file name only when it is a plain name (one path component: no '/', '\\', '..',
    NUL, not hidden; `edgecp.store.check_plain_name`), so a hand-edited manifest (`../escaped`, `/abs/victim`) can
    never make the export write outside its folder. `where` names the manifest in the error (DamagedStoreError,
    exit 4). Two concepts of one name are damage too; a concept whose file would replace the LoRA's is refused."""
    names = []
    for c in concepts:
        name = c.get("name") if isinstance(c, dict) else None
        check_plain_name(name, f"{where}: concept name")
        if name in names:
            raise DamagedStoreError(f"{where}: concept name {name!r} appears twice (a store file was edited or "
                                    "damaged); run `edgecp verify --store STORE`")
        names.append(name)
    files = [f"{n}.safetensors" for n in names]
    if LORA_FILE in reserved and LORA_FILE in files:
        raise EdgecpError(f"concept '{LORA_FILE.removesuffix('.safetensors')}' would overwrite the LoRA file "
                          f"{LORA_FILE} of a diffusers export: remove the concept and learn it again under another name")
    return files


def export_diffusers(store_root: str | Path, out: str | Path, overwrite: bool = False) -> list[Path]:
    """The store's current version (HEAD read once) as the LoRA file and one textual-inversion file per concept in
    `out`. `out` is made absolute first; it may not be inside the store, nor an existing file, nor a non-empty
    folder unless `overwrite` (which replaces an earlier diffusers export: `edgecp.outputs.check_output_dir`). The
    files are written to a temporary folder beside `out` and renamed into place: a refusal leaves nothing."""
    store = Store.open(outputs.absolute(store_root))
    store.refuse_sdxl("the diffusers export")
    version = store.check_version()
    out = outputs.check_output_dir(out, store.root, overwrite=overwrite, kind="diffusers")
    adapter = effective_adapter(store, version)
    if adapter.kind == "vera":
        raise EdgecpError("--format diffusers exports LoRA; this store uses VeRA, which diffusers cannot load: use --format onnx")
    concepts = store.manifest(version)["concepts"]
    names = concept_file_names(concepts, f"store '{store.root}', {version}/manifest.json")
    vdir = store.version_dir(version)
    state = read_tensors(vdir, ADAPTER_FILE)
    deltas = read_tensors(vdir, DELTA_FILE)
    if deltas:  # changed base tensors (merge & re-init, Custom Diffusion, CNS ...) as one exact LoRA
        if adapter.kind != "lora":
            adapter = AdapterConfig(kind="lora", rank=1, alpha=1.0, targets=adapter.targets)
        parts = ([state] if state else []) + [delta_to_lora(deltas, scaling=adapter.alpha / adapter.rank)]
        state = concat_loras(parts, [1.0] * len(parts))
        adapter = with_rank(adapter, next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")))
    tokens = read_tensors(vdir, TOKENS_FILE)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    written = []
    try:
        if state:
            cfg = peft_config(adapter).to_dict()
            cfg["target_modules"] = sorted(cfg["target_modules"])
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=convert_state_dict_to_diffusers(state), safe_serialization=True,
                unet_lora_adapter_metadata=cfg,
            )
            written.append(LORA_FILE)
        for c, fname in zip(concepts, names):
            save_file({c["token"]: tokens[c["token"]].contiguous()}, str(tmp / fname))
            written.append(fname)
        outputs.put_in_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / f for f in written]


def how_to_load(store_root: str | Path, files: list[Path]) -> dict:
    """How to use the diffusers export whose files `export_diffusers` returned: each concept's token and the words
    to write in a prompt ("a photo of <alpha> dog": the token, then the class word), and Python that loads the
    export on the store's base with diffusers (`from_pretrained`, or `from_single_file` for a .safetensors base).
    Reads store.json and HEAD's manifest; loads no model. {"tokens": [{name, token, words, prompt}], "code": str}."""
    store = Store.open(outputs.absolute(store_root))
    concepts = store.manifest()["concepts"]
    written = {Path(f).name: Path(f) for f in files}
    base = store.info["base"]
    if base.get("kind") == "tiny":
        load = f"StableDiffusionPipeline.from_pretrained({str(tiny_path())!r})  # edgecp's embedded tiny base"
    elif base.get("kind") == "single_file":
        load = f"StableDiffusionPipeline.from_single_file({base['locator']!r})"
    else:
        load = f"StableDiffusionPipeline.from_pretrained({base['locator']!r})"
    lines = ["from diffusers import StableDiffusionPipeline", "", f"pipe = {load}"]
    if LORA_FILE in written:
        lines.append(f"pipe.load_lora_weights({str(written[LORA_FILE].parent)!r})")
    tokens = []
    for c in concepts:
        f = written.get(f"{c['name']}.safetensors")
        if f is None:
            continue
        words = expand(f"<{c['name']}>", [c])  # the token, then the class word
        tokens.append({"name": c["name"], "token": c["token"], "words": words, "prompt": f"a photo of {words}"})
        lines.append(f"pipe.load_textual_inversion({str(f)!r})  # token {c['token']}")
    if tokens:
        lines.append(f"image = pipe({tokens[0]['prompt']!r}).images[0]")
        lines.append(f"image.save({tokens[0]['name'] + '.png'!r})")
    return {"tokens": tokens, "code": "\n".join(lines)}


def delta_to_lora(deltas: dict, scaling: float, rtol: float = 1e-6) -> dict:
    """module.weight deltas (out, in) -> LoRA factors with scaling * B A == delta, all at one rank (the largest
    numerical rank among the modules; smaller ones are zero-padded). Exact up to `rtol` of the top singular value."""
    factors, rank = {}, 1
    for key, d in deltas.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        r = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 1
        factors[key.removesuffix(".weight")] = (u, s, vh)
        rank = max(rank, r)
    out = {}
    for m, (u, s, vh) in factors.items():
        k = min(rank, s.numel())
        a = torch.zeros(rank, vh.shape[1], dtype=torch.float64)
        b = torch.zeros(u.shape[0], rank, dtype=torch.float64)
        a[:k] = vh[:k]
        b[:, :k] = u[:, :k] * s[:k] / scaling
        out[f"{m}.lora_A.weight"] = a.float().contiguous()
        out[f"{m}.lora_B.weight"] = b.float().contiguous()
    return out
