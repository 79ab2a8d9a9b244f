"""The registry of continual strategies: one class per strategy, one interface (methods/base.py)."""

from __future__ import annotations

from edgecp.config import AdapterConfig, from_dict
from edgecp.errors import EdgecpError
from edgecp.methods.base import Method
from edgecp.methods.clora import CLora
from edgecp.methods.cns import Cns
from edgecp.methods.custom_diffusion import CdEwc, CustomDiffusion, CustomDiffusionSequential
from edgecp.methods.dsc import Dsc, DscEwc, DscEwcDc
from edgecp.methods.ewc import EwcDc, LoraEwc
from edgecp.methods.lora_merge import LoraMerge
from edgecp.methods.lora_sequential import LoraSequential
from edgecp.methods.merging import MagMax, MergeOrthogonal, MergeReinit
from edgecp.methods.textual_inversion import TextualInversion
from edgecp.methods.vera import VeraEwc, VeraEwcDc, VeraSequential

_METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        # paper 000: baselines, then the DC-score family, then VeRA (App. G.1)
        LoraSequential, LoraMerge, CLora, LoraEwc, EwcDc, Dsc, DscEwc, DscEwcDc, VeraSequential, VeraEwc, VeraEwcDc,
        CustomDiffusion, CustomDiffusionSequential, CdEwc, TextualInversion,
        # paper 001: merging strategies (naive continual LoRA is lora-sequential)
        MergeReinit, MergeOrthogonal, MagMax,
        # paper 003
        Cns,
    )
}
ALIASES = {"naive": "lora-sequential", "naive-continual-lora": "lora-sequential"}


def method_names() -> list[str]:
    return list(_METHODS)


def method_class(name: str) -> type[Method]:
    cls = _METHODS.get(ALIASES.get(name, name))
    if cls is None:
        raise EdgecpError(f"unknown method '{name}': valid methods are {', '.join(method_names())} (see `edgecp methods`)")
    return cls


def build_method(name: str, params: dict, adapter: AdapterConfig) -> Method:
    cls = method_class(name)
    if adapter.kind != cls.adapter_kind:
        raise EdgecpError(f"method {cls.name} uses a {cls.adapter_kind} adapter, not {adapter.kind}: "
                          f"drop --adapter or choose a {adapter.kind} method")
    return cls(from_dict(cls.Params, params, f"{cls.name} hyperparameter"), adapter)
