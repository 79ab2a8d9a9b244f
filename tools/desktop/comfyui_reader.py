#!/usr/bin/env python
"""Reference harness (issue 26): run ComfyUI's own code (an unmodified checkout: $COMFYUI_DIR) on CPU to load a single-file SD
checkpoint, apply a LoRA and encode a prompt with textual-inversion embeddings, exactly along the code paths of
the CheckpointLoaderSimple, LoraLoader and CLIPTextEncode nodes, and dump what ComfyUI computed.

OUT.safetensors:  every diffusion-model weight whose value changed when ComfyUI patched the model, under
                  ComfyUI's key names (diffusion_model.…), float32; "cond" (the conditioning tensor),
                  "pooled_output", "cond_input_embeds" (the token embeddings ComfyUI fed the text encoder,
                  embedding rows included), and with --write-deltas "delta.<key>" = patched - unpatched.
OUT.json:         comfy commit, detected model classes/dtypes, every log line, tokens, patched keys,
                  LoRA keys not loaded, embedding found or not.
"""
import argparse
import io
import json
import logging
import os
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
COMFY_DIR = os.environ.get("COMFYUI_DIR", os.path.join(HERE, "ComfyUI"))  # setup_comfyui.sh puts it there


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="single-file checkpoint (.safetensors)")
    p.add_argument("--lora", help="LoRA file (.safetensors); omit to run without one")
    p.add_argument("--embeddings", help="embedding directory (ComfyUI's models/embeddings)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="OUT.safetensors; OUT.json is written next to it")
    p.add_argument("--strength", type=float, default=1.0, help="LoRA strength (model and clip, as LoraLoader)")
    p.add_argument("--strength-clip", type=float, default=None, help="clip strength if different from --strength")
    p.add_argument("--write-deltas", action="store_true", help="also write delta.<key> = patched - unpatched (float32)")
    p.add_argument("--comfy-arg", action="append", default=[],
                   help="extra ComfyUI command-line flag, e.g. --comfy-arg=--fp32-text-enc (repeatable); --cpu is always on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dump", action="append", default=[],
                   help="also write weight.<key> (after patching, float32) for every diffusion-model key containing "
                        "this text (repeatable), e.g. --dump attn2.to_k")
    p.add_argument("--debug-log", action="store_true", help="also keep ComfyUI's DEBUG log lines in OUT.json (many)")
    return p.parse_args()


class Tee(io.TextIOBase):
    """Copies writes to the real stream and keeps the complete lines (ComfyUI also print()s)."""

    def __init__(self, real, sink, tag):
        self.real, self.sink, self.tag, self.buf = real, sink, tag, ""

    def write(self, s):
        self.real.write(s)
        self.buf += s
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if line.strip():
                self.sink.append({"stage": STAGE[0], "level": self.tag, "msg": line})
        return len(s)

    def flush(self):
        self.real.flush()


STAGE = ["import"]


class ListHandler(logging.Handler):
    def __init__(self, sink, level):
        super().__init__(level)
        self.sink = sink

    def emit(self, record):
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001
            msg = str(record.msg)
        self.sink.append({"stage": STAGE[0], "level": record.levelname, "logger": record.name, "msg": msg})


def stub_torchvision():
    """PyPI's torchvision wheels are CUDA builds that fail to import next to a CPU torch ('operator torchvision::nms
    does not exist'). ComfyUI imports torchvision at module level only for Stable Cascade / Cosmos / ACE, none of
    which the SD1.x path touches, so when the real one cannot be imported an inert placeholder stands in."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:  # noqa: BLE001
        for n in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[n]
    import transformers  # noqa: F401  (import before the stub: transformers probes find_spec("torchvision"))
    from transformers import CLIPTokenizer  # noqa: F401
    root = types.ModuleType("torchvision")
    for sub in ("transforms", "models"):
        m = types.ModuleType("torchvision." + sub)
        sys.modules["torchvision." + sub] = m
        setattr(root, sub, m)
    sys.modules["torchvision"] = root
    return True


def comfy_commit():
    info = {}
    f = os.path.join(COMFY_DIR, "COMFY_COMMIT")
    if os.path.isfile(f):
        with open(f) as fh:
            info["commit"] = fh.read().strip()
    try:
        sys.path.insert(0, COMFY_DIR)
        import comfyui_version
        info["version"] = comfyui_version.__version__
    except Exception:  # noqa: BLE001
        pass
    return info


def main():
    a = parse()
    t0 = time.time()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    logs = []
    root = logging.getLogger()
    root.setLevel(logging.DEBUG)
    root.addHandler(ListHandler(logs, logging.DEBUG if a.debug_log else logging.INFO))
    console = logging.StreamHandler(sys.__stderr__)
    console.setLevel(logging.INFO)
    root.addHandler(console)
    sys.stdout = Tee(sys.__stdout__, logs, "stdout")
    sys.stderr = Tee(sys.__stderr__, logs, "stderr")

    import torch
    torch.set_num_threads(a.threads)
    stubbed = stub_torchvision()
    sys.path.insert(0, COMFY_DIR)
    import comfy.options
    saved_argv, sys.argv = sys.argv, ["main.py", "--cpu"] + a.comfy_arg  # as main.py: ComfyUI parses its own flags
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    sys.argv = saved_argv
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    report = {"comfy": comfy_commit(), "comfy_dir": COMFY_DIR, "torch": torch.__version__,
              "torchvision_stubbed": stubbed, "comfy_args": ["--cpu"] + a.comfy_arg, "args": vars(a)}

    # ---- CheckpointLoaderSimple ----
    STAGE[0] = "checkpoint"
    emb_dir = [a.embeddings] if a.embeddings else None  # the node passes folder_paths.get_folder_paths("embeddings")
    out = comfy.sd.load_checkpoint_guess_config(a.ckpt, output_vae=True, output_clip=True, embedding_directory=emb_dir)
    model, clip, vae = out[:3]
    bm = model.model
    report["model"] = {
        "base_model_class": type(bm).__name__,
        "model_config_class": type(bm.model_config).__name__,
        "model_type": str(bm.model_type),
        "unet_dtype": str(bm.get_dtype()),
        "manual_cast_dtype": str(bm.manual_cast_dtype),
        "unet_config": {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
                        for k, v in bm.model_config.unet_config.items()},
        "clip_class": type(clip.cond_stage_model).__name__ if clip else None,
        "clip_dtypes": [str(d) for d in clip.cond_stage_model.dtypes] if clip else None,
        "vae_loaded": vae is not None,
    }
    STAGE[0] = "snapshot"
    before = {k: v.detach().clone() for k, v in model.model_state_dict(filter_prefix="diffusion_model.").items()}

    # ---- LoraLoader ----
    model_l, clip_l = model, clip
    if a.lora:
        STAGE[0] = "lora"
        lora = comfy.utils.load_torch_file(a.lora, safe_load=True)
        sc = a.strength if a.strength_clip is None else a.strength_clip
        model_l, clip_l = comfy.sd.load_lora_for_models(model, clip, lora, a.strength, sc)
        report["lora"] = {
            "file_keys": len(lora),
            "model_patched_keys": sorted(model_l.patches.keys()),
            "clip_patched_keys": sorted(clip_l.patcher.patches.keys()) if clip_l else [],
            "keys_not_loaded": [e["msg"].split(": ", 1)[1] for e in logs
                                if e["stage"] == "lora" and e["msg"].startswith("lora key not loaded: ")],
            "NOT_LOADED": [e["msg"][len("NOT LOADED "):] for e in logs
                           if e["stage"] == "lora" and e["msg"].startswith("NOT LOADED ")],
        }

    # ---- patch the diffusion model as sampling would, read the weights back ----
    STAGE[0] = "patch"
    tensors = {}
    model_l.patch_model(device_to=mm.get_torch_device(), force_patch_weights=True)
    try:
        after = model_l.model_state_dict(filter_prefix="diffusion_model.")
        changed = []
        for k, v in after.items():
            b = before[k]
            if v.shape != b.shape or not torch.equal(v.to(b.device), b):
                changed.append(k)
                tensors[k] = v.detach().to("cpu", torch.float32).contiguous()
                if a.write_deltas:
                    tensors["delta." + k] = (v.detach().to("cpu", torch.float32) - b.to("cpu", torch.float32)).contiguous()
        for k, v in after.items():
            if any(m in k for m in a.dump):
                tensors["weight." + k] = v.detach().to("cpu", torch.float32).contiguous()
    finally:
        model_l.unpatch_model(device_to=mm.unet_offload_device())
    del before
    report["patched"] = {"n_changed": len(changed), "changed_keys": changed}

    # ---- CLIPTextEncode ----
    STAGE[0] = "encode"
    captured = []
    for m in clip_l.cond_stage_model.modules():
        if hasattr(m, "process_tokens") and hasattr(m, "transformer"):
            orig = m.process_tokens

            def wrapped(tokens, device, _orig=orig):
                r = _orig(tokens, device)
                captured.append(r)
                return r
            m.process_tokens = wrapped
    tokens = clip_l.tokenize(a.prompt)
    tok_report, weights_report = {}, {}
    embeds_used = 0
    for name, batches in tokens.items():
        rows, wrows = [], []
        for batch in batches:
            row, wrow = [], []
            for t in batch:
                tok = t[0]
                if torch.is_tensor(tok):
                    embeds_used += 1
                    row.append(f"embedding{list(tok.shape)}")
                else:
                    row.append(int(tok))
                wrow.append(float(t[1]))
            rows.append(row)
            wrows.append(wrow)
        tok_report[name] = rows
        weights_report[name] = wrows if any(w != 1.0 for r in wrows for w in r) else "all 1.0"
    scheduled = clip_l.encode_from_tokens_scheduled(tokens)  # what CLIPTextEncode returns
    cond, extra = scheduled[0]
    tensors["cond"] = cond.detach().to(torch.float32).contiguous()
    if extra.get("pooled_output") is not None:
        tensors["pooled_output"] = extra["pooled_output"].detach().to(torch.float32).contiguous()
    # the same call the brief names, to make sure both node paths agree
    cond2, pooled2 = clip_l.encode_from_tokens(tokens, return_pooled=True)
    if captured:
        embeds, mask, num_tokens, embeds_info = captured[0][:4]
        tensors["cond_input_embeds"] = embeds.detach().to(torch.float32).contiguous()
        tensors["cond_attention_mask"] = mask.detach().to(torch.float32).contiguous()
        report_embeds = [{k: (v if k != "extra" else str(v)) for k, v in e.items()} for e in embeds_info]
    else:
        report_embeds = None
    report["encode"] = {
        "prompt": a.prompt,
        "tokens": tok_report,
        "token_weights": weights_report,
        "embedding_found": embeds_used > 0,
        "embedding_rows_in_tokens": embeds_used,
        "embeds_info": report_embeds,
        "embedding_missing_warnings": [e["msg"] for e in logs if "does not exist" in e["msg"]],
        "cond_shape": list(cond.shape),
        "encode_from_tokens_equal_scheduled": bool(torch.equal(cond2, cond)),
    }

    STAGE[0] = "save"
    os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
    save_file(tensors, a.out, metadata={"comfy_commit": report["comfy"].get("commit", ""), "tool": "run_comfy.py"})
    report["wall_s"] = round(time.time() - t0, 2)
    report["log"] = logs
    with open(a.out + ".json" if not a.out.endswith(".safetensors") else a.out[: -len(".safetensors")] + ".json", "w") as f:
        json.dump(report, f, indent=1, default=str)
    sys.stdout = sys.__stdout__
    print(json.dumps({"out": a.out, "changed": len(changed), "embedding_rows": embeds_used,
                      "lora_keys_not_loaded": report.get("lora", {}).get("keys_not_loaded"),
                      "wall_s": report["wall_s"]}))


if __name__ == "__main__":
    main()
