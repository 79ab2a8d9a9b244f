#!/usr/bin/env python
"""edgecp's desktop files read by ComfyUI's own code (issue 26), compared with edgecp's own model.

    bash tools/desktop/setup_comfyui.sh                                   # once: ComfyUI + its venv in /tmp/comfy
    python tools/check_comfyui.py --store STORE --out /tmp/cc [--comfy /tmp/comfy]

For the store's current version: `edgecp export --format webui` and `--format checkpoint` (fp16) are written (or
reused from OUT), the store's base is written as an original-layout single file (fp16, what people download), and
tools/desktop/comfyui_reader.py runs under ComfyUI's venv, as the nodes CheckpointLoaderSimple, LoraLoader and
CLIPTextEncode run:
1. base checkpoint + the LoRA + the embeddings folder, prompt "a photo of embedding:<trigger> <class>": ComfyUI's
   change of every patched UNet weight against edgecp's merged-minus-base weights (relative Frobenius error per
   layer), the embedding row ComfyUI fed the text encoder against the store's row, and what ComfyUI printed;
2. the checkpoint + the embeddings folder: the K/V weights ComfyUI holds against edgecp's merged weights, the
   model type it detected, what it printed (the token-row keys it does not know).
Writes OUT/check_comfyui.json and prints a summary. ComfyUI runs on 1 thread (its peak RSS ~8 GB at SD1.5).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent


def run_reader(comfy: Path, args: list[str]) -> dict:
    env = {**os.environ, "COMFYUI_DIR": str(comfy / "ComfyUI"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([str(comfy / "venv" / "bin" / "python"), str(HERE / "desktop" / "comfyui_reader.py"), *args],
                       capture_output=True, text=True, env=env)
    if p.returncode:
        raise SystemExit(f"ComfyUI's reader failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}")
    out = Path(args[args.index("--out") + 1])
    return json.loads(out.with_suffix(".json").read_text())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    n = float(torch.linalg.norm(b.double()))
    return float(torch.linalg.norm(a.double() - b.double())) / n if n else float(torch.linalg.norm(a.double()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--comfy", type=Path, default=Path("/tmp/comfy"), help="where setup_comfyui.sh put ComfyUI + venv")
    args = ap.parse_args()

    from edgecp.adapters import lora
    from edgecp.export.checkpoint import export_checkpoint
    from edgecp.export.webui import export_webui, trigger_of
    from edgecp.model.base import load_components
    from edgecp.model.ldm_layout import text_encoder_to_ldm, unet_to_ldm, vae_to_ldm
    from edgecp.personal import PersonalModel, open_base
    from edgecp.store import Store

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = Store.open(args.store.resolve())
    webui, ckdir = out / "webui", out / "checkpoint"
    if not (webui / "edgecp-export.json").exists():
        export_webui(store.root, webui)
    if not (ckdir / "edgecp-export.json").exists():
        export_checkpoint(store.root, ckdir)
    wrep = json.loads((webui / "edgecp-export.json").read_text())
    crep = json.loads((ckdir / "edgecp-export.json").read_text())

    base = load_components(open_base(store))
    base_ckpt = out / "base.safetensors"
    if not base_ckpt.exists():
        sd = unet_to_ldm(base.unet.state_dict(), dict(base.unet.config))
        sd.update(vae_to_ldm(base.vae.state_dict(), dict(base.vae.config)))
        sd.update(text_encoder_to_ldm(base.text_encoder.state_dict(),
                                      openclip=base.unet.config.cross_attention_dim == 1024))
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(base_ckpt))
    model = PersonalModel.load(store, device=torch.device("cpu"))
    if lora.has_adapter(model.comps.unet):
        lora.merge(model.comps.unet)
    cfg = dict(model.comps.unet.config)
    merged = {k.replace("model.", "", 1): v for k, v in unet_to_ldm(model.comps.unet.state_dict(), cfg).items()}
    plain = {k.replace("model.", "", 1): v for k, v in unet_to_ldm(base.unet.state_dict(), cfg).items()}
    want_changed = sorted(k for k in merged if not torch.equal(merged[k], plain[k]))
    want = {k: (merged[k] - plain[k]) for k in want_changed}  # the change edgecp's model makes, per layer
    kept = {k: merged[k].clone() for k in want_changed if ("attn2.to_k" in k or "attn2.to_v" in k)}
    concepts = model.concepts
    del base, model, merged, plain  # ComfyUI's process needs the memory (~8 GB at SD1.5)
    c = concepts[0]
    trig = trigger_of(c["name"])
    prompt = f"a photo of embedding:{trig} {c.get('class_word') or ''}".strip()
    row = load_file(str(webui / "embeddings" / f"{trig}.safetensors"))["emb_params"][0]

    # 1. the base checkpoint + the LoRA + the embeddings, as LoraLoader and CLIPTextEncode run
    lora_file = webui / wrep["lora"]["file"]
    r1 = run_reader(args.comfy, ["--ckpt", str(base_ckpt), "--lora", str(lora_file), "--embeddings",
                                 str(webui / "embeddings"), "--prompt", prompt, "--out", str(out / "comfy-lora.safetensors"),
                                 "--write-deltas"])
    got = load_file(str(out / "comfy-lora.safetensors"))
    errors = {}
    for k in want_changed:
        d = got.get("delta." + k)
        errors[k] = rel(d, want[k]) if d is not None else None
    ids = r1["encode"]["tokens"]["l"][0] if "l" in r1["encode"]["tokens"] else next(iter(r1["encode"]["tokens"].values()))[0]
    pos = next((i for i, t in enumerate(ids) if isinstance(t, str) and t.startswith("embedding")), None)
    emb_diff = (float((got["cond_input_embeds"][0, pos].float() - row.float()).abs().max())
                if pos is not None and "cond_input_embeds" in got else None)
    lora_check = {"prompt": prompt, "model": r1["model"], "comfy": r1["comfy"],
                  "lora_keys_not_loaded": r1["lora"]["keys_not_loaded"], "not_loaded": r1["lora"]["NOT_LOADED"],
                  "changed_by_edgecp": len(want_changed), "changed_by_comfyui": r1["patched"]["n_changed"],
                  "missing_in_comfyui": [k for k, e in errors.items() if e is None],
                  "max_layer_relative_error": max((e for e in errors.values() if e is not None), default=None),
                  "file_max_layer_error": wrep["lora"]["max_relative_error"],
                  "embedding_position": pos, "embedding_row_max_abs_diff": emb_diff,
                  "embedding_found": r1["encode"]["embedding_found"],
                  "warnings": [e["msg"] for e in r1["log"] if e["level"] in ("WARNING", "ERROR")
                               or "not loaded" in e["msg"] or "does not exist" in e["msg"]],
                  "wall_s": r1["wall_s"]}

    # 2. the checkpoint + the embeddings, as CheckpointLoaderSimple and CLIPTextEncode run
    ckpt = ckdir / crep["checkpoint"]["file"]
    r2 = run_reader(args.comfy, ["--ckpt", str(ckpt), "--embeddings", str(ckdir / "embeddings"), "--prompt", prompt,
                                 "--out", str(out / "comfy-checkpoint.safetensors"), "--dump", "attn2.to_k",
                                 "--dump", "attn2.to_v"])
    got2 = load_file(str(out / "comfy-checkpoint.safetensors"))
    kv_err = {k: rel(got2["weight." + k], w) for k, w in kept.items() if "weight." + k in got2}
    cond_diff = float((got2["cond"] - got["cond"]).abs().max())
    ck_check = {"model": r2["model"], "kv_layers": len(kv_err),
                "max_kv_relative_error_vs_merged": max(kv_err.values(), default=None),
                "cond_max_abs_diff_vs_base_plus_lora_run": cond_diff,
                "embedding_found": r2["encode"]["embedding_found"],
                "printed": [e["msg"] for e in r2["log"] if e["stage"] == "checkpoint"][:40], "wall_s": r2["wall_s"]}
    report = {"store": str(store.root), "method": store.info["method"]["name"], "lora": lora_check,
              "checkpoint": ck_check}
    (out / "check_comfyui.json").write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({"method": report["method"],
                      "lora": {k: lora_check[k] for k in ("changed_by_edgecp", "changed_by_comfyui",
                                                          "max_layer_relative_error", "file_max_layer_error",
                                                          "embedding_row_max_abs_diff", "lora_keys_not_loaded")},
                      "checkpoint": {k: ck_check[k] for k in ("kv_layers", "max_kv_relative_error_vs_merged",
                                                              "cond_max_abs_diff_vs_base_plus_lora_run")}}, indent=1))
    sys.exit(0)


if __name__ == "__main__":
    main()
