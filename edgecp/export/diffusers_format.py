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
    from edgecp.config import AdapterConfig
    from edgecp.personal import ADAPTER_FILE, DELTA_FILE, TOKENS_FILE, effective_adapter, read_tensors

    store = Store.open(store_root)
    store.check_version()
    adapter = effective_adapter(store)
    if adapter.kind == "vera":
        raise EdgecpError("--format diffusers exports LoRA; this store uses VeRA, which diffusers cannot load: use --format onnx")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise EdgecpError(f"export folder '{out}' exists and is not empty: remove it or pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    vdir = store.version_dir()
    written = []
    state = read_tensors(vdir, ADAPTER_FILE)
    deltas = read_tensors(vdir, DELTA_FILE)
    if deltas:  # changed base tensors (merge & re-init, Custom Diffusion, CNS ...) as one exact LoRA
        from edgecp.adapters.lora import concat_loras, with_rank

        if adapter.kind != "lora":
            adapter = AdapterConfig(kind="lora", rank=1, alpha=1.0, targets=adapter.targets)
        parts = ([state] if state else []) + [delta_to_lora(deltas, scaling=adapter.alpha / adapter.rank)]
        state = concat_loras(parts, [1.0] * len(parts))
        adapter = with_rank(adapter, next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")))
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


def delta_to_lora(deltas: dict, scaling: float, rtol: float = 1e-6) -> dict:
    """module.weight deltas (out, in) -> LoRA factors with scaling * B A == delta, all at one rank (the largest
    numerical rank among the modules; smaller ones are zero-padded). Exact up to `rtol` of the top singular value."""
    import torch

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
