"""Library entry points that the CLI calls one at a time (besides train.add_concept, generate, export)."""

from __future__ import annotations

from pathlib import Path

from edgecp.config import AdapterConfig, PriorConfig, TrainConfig, from_dict, replace, to_dict
from edgecp.errors import EdgecpError
from edgecp.store import Store

# The embedded tiny model learns in seconds; paper-scale defaults (1000 x 8 iterations) would only waste time.
TINY_TRAIN = dict(steps=150, grad_accum=1, lr=1e-3, token_lr=5e-3)
TINY_PRIOR = dict(prompt="a photo", num_images=8, steps=10)
DEFAULT_TEMPLATE = "a photo of a {}"


def init_store(
    root: str | Path,
    base: str,
    method: str = "lora-sequential",
    method_params: dict | None = None,
    adapter: dict | None = None,
    train: dict | None = None,
    prior: dict | None = None,
    prompt_template: str = DEFAULT_TEMPLATE,
) -> Store:
    """Create a store on `base` ('tiny', a diffusers folder, a .safetensors file or a hub id)."""
    from edgecp.methods import build_method
    from edgecp.model.base import base_sha256, resolve_base

    if "{}" not in prompt_template:
        raise EdgecpError(f"prompt template '{prompt_template}' has no '{{}}' where the concept goes: e.g. 'a photo of a {{}}'")
    root = Path(root).expanduser()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise EdgecpError(f"'{root}' already exists and is not empty: choose a new folder for the store")
    adapter_cfg = from_dict(AdapterConfig, adapter or {}, "adapter")
    m = build_method(method, method_params or {}, adapter_cfg)  # validates name and hyperparameters
    tiny = base == "tiny"
    train_cfg = replace(TrainConfig(**(TINY_TRAIN if tiny else {})), **(train or {}))
    prior_cfg = from_dict(PriorConfig, {**(TINY_PRIOR if tiny else {}), **(prior or {})}, "prior")
    spec = resolve_base(base)
    info = {
        "base": {**spec.to_json(), "sha256": base_sha256(spec)},
        "method": {"name": m.name, "params": to_dict(m.params)},
        "adapter": to_dict(adapter_cfg),
        "train": to_dict(train_cfg),
        "prior": to_dict(prior_cfg),
        "prompt_template": prompt_template,
    }
    return Store.create(root, info)


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
        "concepts": [
            {k: c.get(k) for k in ("name", "token", "class_word", "task", "steps", "seconds", "metrics")}
            | {"images": len(c["images"])}
            for c in m["concepts"]
        ],
    }
