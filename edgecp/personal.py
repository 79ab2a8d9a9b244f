"""A personal model: the base components with a store version's concept tokens and adapter installed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from edgecp.adapters import lora
from edgecp.config import AdapterConfig, from_dict, replace
from edgecp.errors import DamagedStoreError, EdgecpError
from edgecp.model import quant
from edgecp.model.base import BaseSpec, Components, base_sha256, load_components, resolve_base
from edgecp.model.host import host, to_host  # noqa: F401 (the boundary, re-exported)
from edgecp.model.tokens import load_concept_tokens
from edgecp.store import Store

ADAPTER_FILE = "adapter.safetensors"
TOKENS_FILE = "tokens.safetensors"
RECORD_FILE = "training_record.json"  # each concept's loss curves per phase (train.py writes, lifecycle reads)
KV = ("attn2.to_k", "attn2.to_v")  # cross-attention K/V: what Custom Diffusion and CNS train
DELTA_FILE = "base_delta.safetensors"  # changed base tensors (module.weight -> W - W_base), for merging methods


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def open_base(store: Store) -> BaseSpec:
    """Resolve the store's base and check that its weights are the ones the store was made with."""
    base = store.info["base"]
    spec = resolve_base(base["locator"])
    sha = base_sha256(spec)
    if sha != base["sha256"]:
        raise EdgecpError(
            f"base '{base['locator']}' has changed (weights sha256 {sha[:12]}, the store was made with "
            f"{base['sha256'][:12]}): restore the original weights, or create a new store for this base"
        )
    return spec


def read_tensors(version_dir: Path, fname: str) -> dict[str, torch.Tensor]:
    """A version's tensor file ({} when the version has none); a damaged file raises one line saying what to run."""
    f = version_dir / fname
    if not f.exists():
        return {}
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises SafetensorError (truncated, bad header) or OSError
        store = version_dir.parent.parent
        raise DamagedStoreError(
            f"store '{store}' is damaged: {version_dir.name}/{fname} cannot be read ({type(e).__name__}); run "
            f"`edgecp verify --store {store}`, then `edgecp rollback --store {store} VERSION` to an intact version"
        ) from None


@dataclass
class PersonalModel:
    comps: Components
    concepts: list[dict]
    adapter: AdapterConfig
    device: torch.device  # with its index (`cuda:1`): the model and every 8-bit conversion go there

    plan: object = None  # the memory plan it was loaded under (None: full precision)

    @classmethod
    def load(cls, store: Store, version: str | None = None, device: torch.device | None = None,
             plan=None, stream: bool = False) -> PersonalModel:
        """The version's model. With a memory `plan` the frozen base is held as the plan says (16-bit or 8-bit,
        the adapted layers fp32, the adapter unmerged and fp32); without one, in full precision (export, merges).

        `stream` (full precision): the UNet is read tensor by tensor (`edgecp.model.quant.stream_unet`) instead of
        by diffusers, whose fp32 load of an fp16 file holds the mapped fp16 file beside the fp32 copy of everything."""
        version = store.check_version(version)  # refuse files that fail the hashes the manifest recorded
        return cls.from_folder(store, store.version_dir(version), store.manifest(version), device, plan, stream)

    @classmethod
    def from_folder(cls, store: Store, vdir: Path, manifest: dict, device: torch.device | None = None,
                    plan=None, stream: bool = False) -> PersonalModel:
        """The model of a version's files in `vdir` with its `manifest`, not necessarily committed yet: the
        forgetting check draws from a version before it is sealed (`edgecp.forgetting`). The caller checks the
        files (`load` does, against the sealed manifest)."""
        device = torch.device(device) if device is not None else default_device()
        spec = open_base(store)
        if plan is None and not stream:
            comps = load_components(spec)
        else:
            # the adapter's targets are never 8-bit; stored base-weight changes (Custom Diffusion, CNS, the merging
            # methods: on the targets or K/V) are folded in fp32 as the base loads, then held in the plan's dtype,
            # which is what autocast reads from an fp32 W + delta at every call (model/quant.py)
            targets = generation_targets(store)
            precision = quant.precision_of(plan) if plan is not None else quant.Precision("fp32")
            comps = quant.load_planned(spec, replace(precision, plain=targets), device,  # cuda:1 quantizes there
                                       fold=read_tensors(vdir, DELTA_FILE))
        concepts = manifest["concepts"]
        load_concept_tokens(comps.tokenizer, comps.text_encoder, concepts, read_tensors(vdir, TOKENS_FILE))
        fold_base_delta(comps.unet, vdir)
        adapter = adapter_of(store, manifest)
        state = read_tensors(vdir, ADAPTER_FILE)
        if state:
            lora.attach(comps.unet, adapter)
            lora.load_adapter_state(comps.unet, state)
        for m in (comps.text_encoder, comps.vae, comps.unet):
            m.to(device)
        return cls(comps, concepts, adapter, device, plan)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return encode_text(self.comps, prompts, self.device)


def generation_targets(store: Store) -> tuple[str, ...]:
    """The layers a generation plan never makes 8-bit: the adapter's targets and K/V (where stored changes fold in)."""
    return tuple(from_dict(AdapterConfig, store.info["adapter"], "adapter").targets) + KV


def split_tasks(flat: dict[str, torch.Tensor]) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A tensor file keyed `tNNNN/<key>` (one entry per task) -> (the tasks in order, the keys without a task)."""
    tasks: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, v in flat.items():
        if "/" in key:
            task, name = key.split("/", 1)
            tasks.setdefault(task, {})[name] = v
        else:
            rest[key] = v
    return [tasks[t] for t in sorted(tasks)], rest


def join_tasks(tasks: list[dict[str, torch.Tensor]], **rest: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of `split_tasks`."""
    return {**{f"t{i + 1:04d}/{k}": v.contiguous() for i, task in enumerate(tasks) for k, v in task.items()}, **rest}


def fold_base_delta(unet, version_dir: Path | None) -> dict[str, torch.Tensor]:
    """W <- W + delta for every tensor in the version's base_delta.safetensors that the loader has not folded already
    (`quant.fold_into`: added in fp32, rounded once); returns the deltas (maybe empty)."""
    deltas = read_tensors(version_dir, DELTA_FILE) if version_dir else {}
    done = quant.folded(unet)
    quant.fold_into(unet, {k: v for k, v in deltas.items() if k not in done})
    return deltas


def effective_adapter(store: Store, version: str | None = None) -> AdapterConfig:
    """The store's adapter at the rank the version holds (task LoRAs concatenated by C-LoRA / LoRA merge)."""
    return adapter_of(store, store.manifest(version))


def adapter_of(store: Store, manifest: dict) -> AdapterConfig:
    """`effective_adapter` of a manifest (a version not committed yet)."""
    adapter = from_dict(AdapterConfig, store.info["adapter"], "adapter")
    rank = manifest.get("adapter_rank")
    if rank and rank != adapter.rank:
        adapter = lora.with_rank(adapter, rank)
    return adapter


def encode_text(comps: Components, prompts: list[str], device: torch.device) -> torch.Tensor:
    """(B, 77, D) last hidden states; differentiable w.r.t. the concept token rows."""
    ids = comps.tokenizer(
        prompts, padding="max_length", max_length=comps.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return comps.text_encoder(ids)[0]
