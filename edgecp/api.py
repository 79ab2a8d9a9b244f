"""Library entry points that the CLI calls one at a time (besides train.add_concept, generate, export)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from edgecp.config import DEFAULT_METHOD, AdapterConfig, PriorConfig, TrainConfig, from_dict, replace, to_dict
from edgecp.errors import EdgecpError
from edgecp.images import MAX_IMAGES
from edgecp.memory import given_device_info, resolve_device
from edgecp.methods import build_method, defaults, method_class
from edgecp.model.base import base_sha256, resolve_base
from edgecp.model.single_file import config_folder, detect_family, load_token_rows
from edgecp.personal import open_base
from edgecp.planner import parse_bytes
from edgecp.scoped import quiet_libraries
from edgecp.store import Store
from edgecp.train import plan_add_concept

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

    Every setting the user does not give comes from the defaults set of the base's family (`methods/defaults.py`):
    the papers' numbers on SD 1.x/2.x, the tiny world's calibrated values on the tiny base, the scale-free form on
    any other base. store.json records the set, the family and why (`"defaults"`), and where a concept's token
    starts (`"token_init"`). `memory_budget` ('6GB') becomes the default budget of add-concept and generate.
    """
    if "{}" not in prompt_template:
        raise EdgecpError(f"prompt template '{prompt_template}' has no '{{}}' where the concept goes: e.g. 'a photo of a {{}}'")
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise EdgecpError(f"'{root}' already exists and is not empty: choose a new folder for the store")
    method_class(method)  # an unknown name lists the valid ones before the base is read
    budget = parse_bytes(memory_budget)
    spec = resolve_base(base)
    family, unet_config = family_of(spec)
    dset = defaults.set_for(family)
    d = defaults.resolve(method, dset)
    m = make_method(method, {**d["method"], **(method_params or {})}, _adapter_with_defaults(d["adapter"], adapter))
    train_cfg = replace(TrainConfig(**d["train"]), **(train or {}))
    prior_cfg = from_dict(PriorConfig, {**d["prior"], **(prior or {})}, "prior")
    if unet_config is not None:  # before any prior image is drawn or any file written
        check_targets(unet_config, m.adapter, base)
    info = {
        "base": {**spec.to_json(), "sha256": base_sha256(spec)},
        "method": {"name": m.name, "params": to_dict(m.params)},
        "adapter": to_dict(m.adapter),
        "train": to_dict(train_cfg),
        "prior": to_dict(prior_cfg),
        "prompt_template": prompt_template,
        "token_init": d["token"]["init_word"],
        "defaults": {"set": dset, "family": family, "why": defaults.WHY[dset]},
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


def family_of(spec) -> tuple[str, Path | None]:
    """(family, the UNet config folder) of a resolved base: tiny, sd1 | sd2-base | sd2-v (single file), sd1 | sd2 |
    sdxl | other (a diffusers folder, by its UNet's architecture). A single file edgecp cannot load is refused."""
    if spec.kind == "tiny":
        return "tiny", spec.path / "unet"
    if spec.kind == "single_file":
        family = detect_family(spec.path)
        load_token_rows(spec.path)  # a checkpoint edgecp exported: its concept rows must agree with its metadata
        return family, config_folder(family) / "unet"
    unet_config = spec.path / "unet" if spec.path is not None and spec.path.is_dir() else None
    return base_family(unet_config), unet_config


def resolved_defaults(base: str, method: str) -> tuple[str, dict]:
    """(the defaults set, its values by section) that `init_store` would give `method` on `base`."""
    dset = defaults.set_for(family_of(resolve_base(base))[0])
    return dset, defaults.resolve(method, dset)


def base_family(unet_config: Path | None) -> str:
    """sd1 | sd2 | sdxl | other from a diffusers folder's UNet config (other: none to read, e.g. a hub id)."""
    f = unet_config / "config.json" if unet_config is not None else None
    if f is None or not f.is_file():
        return "other"
    try:
        return defaults.unet_family(json.loads(f.read_text()))
    except (ValueError, OSError):
        return "other"


def _adapter_with_defaults(default: dict, given: dict | None) -> dict:
    """The defaults set's adapter under the user's choices. A user's kind other than the default's drops the
    default's rank and alpha (make_method's then apply); a user's rank without an alpha keeps alpha = rank."""
    given = dict(given or {})
    if "kind" in given and given["kind"] != default.get("kind"):
        return given
    out = {**default, **given}
    if "rank" in given and "alpha" not in given:
        out["alpha"] = float(given["rank"])
    return out


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
    """Change the store's method; refused once the store holds concepts (their state belongs to the old one).

    The new method's hyperparameters and adapter come from the store's defaults set (store.json's "defaults"; a store
    from before the sets: "tiny" on the tiny base, else "scale-free"), under the ones given. The training and prior
    settings stay as `init` wrote them."""
    store = Store.open(root)
    dset = (store.info.get("defaults") or {}).get("set") or (
        defaults.TINY if store.info["base"].get("kind") == "tiny" else defaults.SCALE_FREE)
    d = defaults.resolve(method, dset)
    m = make_method(method, {**d["method"], **(params or {})}, _adapter_with_defaults(d["adapter"], adapter))
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
        "check": m.get("check"),  # the forgetting check when HEAD's concept was added (edgecp/forgetting.py)
        "concepts": [
            {k: c.get(k) for k in ("name", "token", "class_word", "task", "steps", "seconds", "metrics",
                                   "seconds_per_iteration")}
            | {"images": len(c["images"])}
            for c in m["concepts"]
        ],
    }
