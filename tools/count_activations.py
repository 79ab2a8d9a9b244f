"""Count the bytes of live tensors of one training step of a base's UNet, as CUDA's allocator counts them, on the CPU.

Why: `torch.cuda.max_memory_allocated` counts the tensors the caching allocator hands out (rounded up to 512 bytes),
no resident pages, no allocator slack. The planner's activation coefficients were fitted on the CPU's peak RSS
(glibc's heap, mapped pages, the Python runtime), which is not what a GPU's allocator counts. Without a GPU, a
`TorchDispatchMode` sees every tensor an operator returns: it counts each new storage once (views share one), drops
it when the storage dies (a weakref on the storage object, which PyTorch keeps alive with its storage), and keeps
the peak of their sum. Under bf16 autocast with gradient checkpointing and PyTorch's SDPA this is the same program
CUDA runs, with three known differences, all small at these sizes: the CPU's SDPA kernel is the flash-style
`_scaled_dot_product_flash_attention_for_cpu` (CUDA picks flash or memory-efficient attention: the same O(tokens)
saved tensors, output and log-sum-exp), cuBLAS/cuDNN workspaces are not seen, and CUDA rounds each block to 512
bytes.

What one step is: the frozen UNet as a bf16 plan holds it (`model/quant.load_planned`: norms fp32), the project's
LoRA of the given rank on the given targets (`adapters/lora.attach`, fp32 masters),
gradient checkpointing on, `rows` rows of noise at `resolution` px under bf16 autocast, an MSE loss, backward. The
weights, the inputs and the LoRA parameters exist before counting starts: what is counted is what the step adds
(activations, saved tensors, gradients, temporaries), i.e. the planner's activation term.

    python tools/count_activations.py --base /tmp/sdxl-mini --resolution 256,512,1024 --phases train,sample,vae \
        --md docs/memory/counted-activations.md   # the commands behind that file are in it
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class LiveBytes(TorchDispatchMode):
    """Sum of the bytes of storages created under the mode and still alive; its peak."""

    def __init__(self, *existing: torch.nn.Module | torch.Tensor):
        """`existing`: modules and tensors made before counting starts; an operator that returns a view of one of
        them (a weight's `.t()`) adds no storage."""
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}
        self._refs: list = []
        self._before = []
        for obj in existing:
            tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, torch.nn.Module) else [obj]
            for t in tensors:
                st = t.untyped_storage()
                self._before.append(st)  # held: its id stays its own while counting
                self._seen[id(st)] = 0

    def _drop(self, key: int) -> None:
        self.live -= self._seen.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self._seen:
                continue
            size = st.nbytes()
            self._seen[key] = size
            self.live += size
            self._refs.append(weakref.ref(st, lambda _, k=key: self._drop(k)))
            self.peak = max(self.peak, self.live)
        return out


def one_step(unet, rows: int, latent: int, text: torch.Tensor, added: dict | None) -> int:
    x = torch.randn(rows, unet.config.in_channels, latent, latent)
    t = torch.randint(0, 1000, (rows,))
    cond = text.expand(rows, -1, -1)
    with LiveBytes(unet, x, t, cond, *(added or {}).values()) as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kw = {"added_cond_kwargs": {k: v.expand(rows, -1) for k, v in added.items()}} if added else {}
            pred = unet(x, t, cond, **kw).sample
        loss = torch.nn.functional.mse_loss(pred.float(), x)
        loss.backward()
        del pred, loss
    return meter.peak


def sample_step(unet, rows: int, latent: int, text: torch.Tensor, added: dict | None) -> int:
    """One no-grad UNet call on 2 x rows rows (classifier-free guidance), as sampling makes it."""
    n = 2 * rows
    x = torch.randn(n, unet.config.in_channels, latent, latent)
    with torch.no_grad(), LiveBytes(unet, x, text, *(added or {}).values()) as meter, \
            torch.autocast("cpu", dtype=torch.bfloat16):
        kw = {"added_cond_kwargs": {k: v.expand(n, -1) for k, v in added.items()}} if added else {}
        unet(x, torch.full((n,), 500), text.expand(n, -1, -1), **kw)
    return meter.peak


def vae_steps(vae, resolution: int, scale: int) -> tuple[int, int]:
    """(decode of one latent, encode of one image) live-byte peaks, no grad, in the VAE's own dtype: one row per
    call, as `generate` decodes (VAE slicing) and `diffusion.encode_images` encodes."""
    dtype = next(vae.parameters()).dtype
    z = torch.randn(1, vae.config.latent_channels, resolution // scale, resolution // scale, dtype=dtype)
    with torch.no_grad(), LiveBytes(vae, z) as dec:
        vae.decode(z)
    img = torch.randn(1, 3, resolution, resolution, dtype=dtype)
    with torch.no_grad(), LiveBytes(vae, img) as enc:
        vae.encode(img).latent_dist.sample()
    return dec.peak, enc.peak


def predictions(shape, latent: int, rows: int, ckpt: bool, vae_px: int, vae_dtype: str) -> dict:
    """The planner's activation terms for what one_step / sample_step / vae_steps run, per device kind."""
    from edgecp.planner import ACTIVATIONS, _activation_bytes

    out = {}
    for kind, a in ACTIVATIONS.items():
        out[kind] = {"train": _activation_bytes(shape, latent, rows, ckpt, "bf16", kind=kind),
                     "sample": _activation_bytes(shape, latent, 2 * rows, False, "bf16", grad=False, kind=kind),
                     "decode": a.vae_bytes("decode", vae_dtype) * vae_px,
                     "encode": a.vae_bytes("encode", vae_dtype) * vae_px}
    return out


MD_HEAD = ("| base | px | phase | counted MB | CUDA model MB | model/counted | CPU (RSS-fitted) model MB |\n"
           "| --- | --- | --- | --- | --- | --- | --- |\n")


def md_rows(base: str, rows: list[dict]) -> str:
    lines = []
    for r in rows:
        for phase in ("train", "sample", "decode", "encode"):
            counted = r.get(f"{phase}_counted_bytes")
            if counted is None:
                continue
            label = {"train": "train, 1 row" + (", ckpt" if r.get("checkpointing") else ", no ckpt"),
                     "sample": "sample, 2 rows (CFG)", "decode": "VAE decode, 1 row", "encode": "VAE encode, 1 row"}[phase]
            cuda, cpu = r["predicted"]["cuda"][phase], r["predicted"]["cpu"][phase]
            lines.append(f"| {base} | {r['resolution']} | {label} | {counted / 1e6:.1f} | {cuda / 1e6:.1f} | "
                         f"{cuda / counted:.2f} | {cpu / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a diffusers folder (make_sd_fixture.py)")
    ap.add_argument("--resolution", default="256,512", help="comma-separated pixel sizes")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--targets", default="attn2.to_k,attn2.to_v")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--phases", default="train", help="comma-separated: train, sample, vae (decode and encode)")
    ap.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    ap.add_argument("--vae-dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--out", default=None, help="JSON of the rows")
    ap.add_argument("--md", default=None, help="append the rows to this markdown file's table (its header first if it has none)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from edgecp.adapters import lora
    from edgecp.config import AdapterConfig
    from edgecp.errors import EdgecpError
    from edgecp.model.base import resolve_base
    from edgecp.model.quant import Precision, load_planned
    from edgecp.model.shape import base_shape

    try:
        spec = resolve_base(args.base)
    except EdgecpError as e:
        print(f"count_activations: {e}", file=sys.stderr)
        return 2
    targets = tuple(args.targets.split(","))
    shape = base_shape(spec, targets, False)
    # the base as a bf16 plan holds it (norms fp32), and the project's LoRA on it (fp32 masters)
    comps = load_planned(spec, Precision("bf16", None, "bf16", plain=targets))
    unet = comps.unet
    lora.attach(unet, AdapterConfig(rank=args.rank, alpha=float(args.rank), targets=targets))
    lora.set_trainable(unet, True)
    if not args.no_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    cfg = unet.config
    text = torch.randn(1, 77, cfg.cross_attention_dim)
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])}
    phases = args.phases.split(",")
    vae = None
    if "vae" in phases:  # bf16 as the plan loads it, or fp32
        vae = comps.vae.float() if args.vae_dtype == "fp32" else comps.vae
    del comps
    rows = []
    for res in (int(r) for r in args.resolution.split(",")):
        latent = res // shape.vae_scale
        u_res, u_attn, biggest = shape.unet.units(latent)
        row = {"resolution": res, "rows": args.rows, "u_res": u_res, "u_attn": u_attn, "biggest": biggest}
        t0 = time.perf_counter()
        ckpt = not args.no_checkpointing
        vae_px = shape.vae_channels[0] * res**2
        if "train" in phases:
            row["train_counted_bytes"] = one_step(unet, args.rows, latent, text, added)
            row["checkpointing"] = ckpt
        if "sample" in phases:
            row["sample_counted_bytes"] = sample_step(unet, args.rows, latent, text, added)
        if vae is not None:
            dec, enc = vae_steps(vae, res, shape.vae_scale)
            row.update(vae_dtype=args.vae_dtype, vae_px=vae_px, decode_counted_bytes=dec, encode_counted_bytes=enc)
        row["predicted"] = predictions(shape, latent, args.rows, ckpt, vae_px, args.vae_dtype)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"base": str(args.base), "targets": targets, "rank": args.rank,
                                              "rows": rows}, indent=1) + "\n")
    if args.md:
        md = Path(args.md)
        has_table = md.exists() and MD_HEAD.splitlines()[0] in md.read_text()
        with md.open("a") as f:
            f.write(("" if has_table else MD_HEAD) + md_rows(Path(args.base).name, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
