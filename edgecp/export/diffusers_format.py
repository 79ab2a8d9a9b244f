"""Export the concepts for other Stable Diffusion tools: the LoRA in the file `load_lora_weights` reads and one
textual-inversion file per concept token for `load_textual_inversion`.

    pipe.load_lora_weights(OUT)                                   # pytorch_lora_weights.safetensors
    pipe.load_textual_inversion(OUT / "<name>.safetensors")      # one per concept, token "<name>"
"""

from __future__ import annotations

from pathlib import Path

from edgecp.errors import EdgecpError
from edgecp.store import Store


def export_diffusers(store_root: str | Path, out: str | Path) -> list[Path]:
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    from edgecp.adapters.lora import peft_config
    from edgecp.personal import ADAPTER_FILE, TOKENS_FILE, effective_adapter, read_tensors

    store = Store.open(store_root)
    adapter = effective_adapter(store)
    if adapter.kind != "lora":
        raise EdgecpError(f"--format diffusers exports LoRA adapters; this store uses {adapter.kind}: use --format onnx")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgecpError(f"export folder '{out}' exists and is not empty: remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    vdir = store.version_dir()
    written = []
    state = read_tensors(vdir, ADAPTER_FILE)
    if state:
        cfg = peft_config(adapter).to_dict()
        cfg["target_modules"] = sorted(cfg["target_modules"])
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=convert_state_dict_to_diffusers(state), safe_serialization=True,
            unet_lora_adapter_metadata=cfg,
        )
        written.append(out / "pytorch_lora_weights.safetensors")
    tokens = read_tensors(vdir, TOKENS_FILE)
    for c in store.concepts():
        f = out / f"{c['name']}.safetensors"
        save_file({c["token"]: tokens[c["token"]].contiguous()}, str(f))
        written.append(f)
    return written
