"""Library entry points that the CLI calls one at a time (besides train.add_concept, generate, export)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from edgecp.config import DEFAULT_METHOD, AdapterConfig, PriorConfig, TrainConfig, from_dict, replace, to_dict
from edgecp.errors import EdgecpError
from edgecp.images import MAX_IMAGES
from edgecp.memory import given_device_info, resolve_device
from edgecp.methods import build_method, method_class
from edgecp.model.base import base_sha256, resolve_base
from edgecp.model.single_file import config_folder, detect_family
from edgecp.personal import open_base
from edgecp.planner import parse_bytes
from edgecp.scoped import quiet_libraries
from edgecp.store import Store
from edgecp.train import plan_add_concept

# The embedded tiny model learns in seconds; paper-scale defaults (1000 x 8 iterations) would only waste time.
TINY_TRAIN = dict(steps=150, batch_size=4, grad_accum=1, lr=1e-3, token_lr=5e-3)
TINY_PRIOR = dict(prompt="a photo", num_images=8, steps=10, sampler="base")
DEFAULT_TEMPLATE = "a photo of a {}"


@quiet_libraries()  # the model stack's notices (torchao, bitsandbytes) while the base is read
def init_store(
    root: str | Path,
    base: str,
    method: str = DEFAULT_METHOD,
    method_params: dict | None = None,
    adapter: dict | None = None,
    train: dict | None = None,
    prior: dict | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
    memory_budget: str | int | None = None,
) -> Store:
    """Create a store on `base` ('tiny', a diffusers folder, a .safetensors file or a hub id).

    `memory_budget` ('6GB') becomes the default budget of add-concept and generate for this store.
    """
    if "{}" not in prompt_template:
        raise EdgecpError(f"prompt template '{prompt_template}' has no '{{}}' where the concept goes: e.g. 'a photo of a {{}}'")
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise EdgecpError(f"'{root}' already exists and is not empty: choose a new folder for the store")
    m = make_method(method, method_params, adapter)  # validates name, hyperparameters and adapter
    tiny = base == "tiny"
    defaults = {**(TINY_TRAIN if tiny else {}), **type(m).train_defaults(tiny)}
    train_cfg = replace(TrainConfig(**defaults), **(train or {}))
    prior_cfg = from_dict(PriorConfig, {**(TINY_PRIOR if tiny else {}), **(prior or {})}, "prior")
    budget = parse_bytes(memory_budget)
    spec = resolve_base(base)
    unet_config = spec.path / "unet" if spec.path is not None and spec.path.is_dir() else None
    if spec.kind == "single_file":  # read the checkpoint's configuration now, refuse one we cannot load
        unet_config = config_folder(detect_family(spec.path)) / "unet"
    if unet_config is not None:  # before any prior image is drawn or any file written
        check_targets(unet_config, m.adapter, base)
    info = {
        "base": {**spec.to_json(), "sha256": base_sha256(spec)},
        "method": {"name": m.name, "params": to_dict(m.params)},
        "adapter": to_dict(m.adapter),
        "train": to_dict(train_cfg),
        "prior": to_dict(prior_cfg),
        "prompt_template": prompt_template,
        **({"memory_budget": budget} if budget else {}),
    }
    return Store.create(root, info)


@quiet_libraries()  # the model stack's notices (torchao, bitsandbytes) while the plan is made
def plan_store(root: str | Path, memory_budget: str | int | None = None, overrides: dict | None = None,
               device: str | None = None, n_images: int = 4, force: dict | None = None,
               gpu_memory: str | int | None = None, gpu_capability: str | float | None = None):
    """The plan `add-concept` would run on this store now (no model loaded, nothing written).

    `gpu_memory` ('8GB') and `gpu_capability` ('8.6') plan for a GPU that need not be here (`memory.given_device_info`:
    bf16 from capability 8.0, fp16 below; default capability 7.5); `device` is then cuda. Asked for cuda without
    them on a machine without CUDA, one line says to pass them. A CUDA plan's `cuda_terms` name, per phase, what
    its peak adds to the allocator's bytes: the context reserve, the fragmentation margin and bitsandbytes'
    retained inputs (edgecp/planner.py).
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or not 1 <= n_images <= MAX_IMAGES:
        raise EdgecpError(f"--images {n_images} is out of range: a concept has 1 to {MAX_IMAGES} photos")
    info = None
    if gpu_memory is not None or gpu_capability is not None:
        if device is not None and not str(device).strip().lower().startswith("cuda"):
            raise EdgecpError(f"--gpu-memory and --gpu-capability describe a GPU: drop them, or pass --device cuda "
                              f"instead of --device {device}")
        if gpu_memory is None:
            raise EdgecpError("--gpu-capability needs --gpu-memory too: e.g. --gpu-memory 8GB --gpu-capability 8.6")
        info = given_device_info(gpu_memory, gpu_capability)
        dev = torch.device("cuda")
    elif device is not None and str(device).strip().lower().startswith("cuda") and not torch.cuda.is_available():
        raise EdgecpError("CUDA is not available here: to plan for a GPU that is not present, pass its memory and "
                          "compute capability, e.g. --device cuda --gpu-memory 8GB --gpu-capability 8.6")
    else:
        dev = resolve_device(device)
    store = Store.open(root)
    train_cfg = replace(from_dict(TrainConfig, store.info["train"], "train"), **(overrides or {}))
    return plan_add_concept(store, open_base(store), train_cfg, dev, memory_budget, n_images, force, info)


def check_targets(unet_config: Path, adapter: AdapterConfig, base: str) -> None:
    """Refuse adapter targets that name no layer of the base's UNet, or a layer the adapter cannot train.

    The UNet is built from its config on the meta device (no weights read or allocated), so the names are
    diffusers' module names whatever the base's file layout. A target matches a module whose name is it or ends
    with '.' + it (peft's rule). Every matched module must be an nn.Linear (LoRA also takes
    nn.Conv2d): VeRA, Custom Diffusion and CNS train Linear weights only, and peft refuses other modules.
    """
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(unet_config))
    kinds = (torch.nn.Linear, torch.nn.Conv2d) if adapter.kind == "lora" else (torch.nn.Linear,)
    modules = dict(unet.named_modules())
    layers = [n for n, mod in modules.items() if isinstance(mod, torch.nn.Linear) and n.endswith("attn2.to_k")]
    example = layers[0] if layers else "attn2.to_k"
    for t in adapter.targets:
        hits = {n: mod for n, mod in modules.items() if n == t or n.endswith("." + t)}
        if not hits:
            raise EdgecpError(f"adapter target '{t}' names no layer of the UNet of base '{base}': pass module-name "
                              f"suffixes such as attn2.to_k,attn2.to_v (full names look like {example})")
        wrong = next((n for n, mod in hits.items() if not isinstance(mod, kinds)), None)
        if wrong is not None:
            what = "Linear or Conv2d" if adapter.kind == "lora" else "Linear"
            inside = f"{t}.to_k" if hasattr(hits[wrong], "to_k") else "attn2.to_k"
            raise EdgecpError(f"adapter target '{t}' matches {wrong} ({type(hits[wrong]).__name__}), which this "
                              f"method cannot train (it trains {what} layers): name such layers, e.g. {inside}")


def make_method(method: str, params: dict | None, adapter: dict | None):
    """The method object; the adapter defaults to the method's kind and rank (VeRA methods: vera, 256)."""
    cls = method_class(method)
    a = dict(adapter or {})
    a.setdefault("kind", cls.adapter_kind)
    if "rank" not in a:
        a["rank"] = cls.default_rank if a["kind"] == cls.adapter_kind else AdapterConfig.rank
        a.setdefault("alpha", float(a["rank"]))
    return build_method(method, params or {}, from_dict(AdapterConfig, a, "adapter"))




@quiet_libraries()  # the model stack's notices (torchao, bitsandbytes) while the method is built
def set_method(root: str | Path, method: str, params: dict | None = None, adapter: dict | None = None) -> Store:
    """Change the store's method; refused once the store holds concepts (their state belongs to the old one)."""
    store = Store.open(root)
    m = make_method(method, params, adapter)
    with store.writer():
        n = len(store.concepts())
        if n:
            raise EdgecpError(
                f"store '{store.root}' already holds {n} concept(s) learned with {store.info['method']['name']}: "
                f"their stored state (adapter, Fisher, teachers) belongs to that method, so switching to {m.name} "
                "would break them; create a new store with `edgecp init --method " + m.name + "`"
            )
        store.write_info({**store.info, "method": {"name": m.name, "params": to_dict(m.params)},
                          "adapter": to_dict(m.adapter)})
    return Store.open(root)


def concepts_summary(root: str | Path) -> dict:
    """What `edgecp concepts` shows: the version, the method and each concept (never any pixels or paths)."""
    store = Store.open(root)
    m = store.manifest()
    return {
        "store": str(store.root),
        "version": store.head,
        "base": store.info["base"],
        "method": store.info["method"],
        "adapter": store.info["adapter"],
        "bytes": store.disk_bytes(),
        "n_param": m.get("n_param"),
        "concepts": [
            {k: c.get(k) for k in ("name", "token", "class_word", "task", "steps", "seconds", "metrics",
                                   "seconds_per_iteration")}
            | {"images": len(c["images"])}
            for c in m["concepts"]
        ],
    }
