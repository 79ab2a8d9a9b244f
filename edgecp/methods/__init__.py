"""The registry of continual strategies: one class per file, one interface (methods/base.py)."""

from __future__ import annotations

from edgecp.config import AdapterConfig, from_dict
from edgecp.errors import EdgecpError
from edgecp.methods.base import Method
from edgecp.methods.lora_sequential import LoraSequential

_METHODS: dict[str, type[Method]] = {m.name: m for m in (LoraSequential,)}
ALIASES = {"naive": "lora-sequential", "lora": "lora-sequential"}


def method_names() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    cls = _METHODS.get(ALIASES.get(name, name))
    if cls is None:
        raise EdgecpError(f"unknown method '{name}': valid methods are {', '.join(method_names())} (see `edgecp methods`)")
    return cls


def build_method(name: str, params: dict, adapter: AdapterConfig) -> Method:
    cls = method_class(name)
    return cls(from_dict(cls.Params, params, f"{cls.name} hyperparameter"), adapter)
