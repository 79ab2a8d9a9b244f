"""Frozen, self-validating configuration dataclasses. Every value is recorded in the store's manifest."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields

from edgecp.errors import EdgecpError

CONCEPT_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}")


def check_concept_name(name: str) -> str:
    if not CONCEPT_NAME_RE.fullmatch(name or ""):  # fullmatch: `$` alone would accept a trailing newline
        raise EdgecpError(
            f"concept name {name!r} is not a valid token: use 1-32 lowercase letters, digits, '-' or '_', "
            "starting with a letter (e.g. 'my-dog')"
        )
    return name


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise EdgecpError(msg)


@dataclass(frozen=True)
class AdapterConfig:
    """The per-concept adapter. `targets` are module-name suffixes inside the UNet (peft's target_modules)."""

    kind: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")

    def __post_init__(self) -> None:
        _check(self.kind in ("lora", "vera", "none"), f"adapter '{self.kind}' is unknown: use --adapter lora or vera")
        _check(self.rank >= 1, f"adapter rank {self.rank} must be >= 1")
        _check(len(self.targets) > 0, "adapter targets are empty: name at least one module, e.g. attn2.to_k")
        object.__setattr__(self, "targets", tuple(self.targets))


@dataclass(frozen=True)
class TrainConfig:
    """One concept's training run. Paper 000 defaults: 1000 iterations, batch 1 x accumulation 8, lr 5e-4."""

    steps: int = 1000
    batch_size: int = 1
    grad_accum: int = 8
    lr: float = 5e-4
    token_lr: float = 5e-3
    prior_weight: float = 1.0
    resolution: int = 0  # 0: the base's native resolution
    gradient_checkpointing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"--steps {self.steps} must be >= 1")
        _check(self.batch_size >= 1, f"batch size {self.batch_size} must be >= 1")
        _check(self.grad_accum >= 1, f"gradient accumulation {self.grad_accum} must be >= 1")
        _check(self.lr > 0 and self.token_lr >= 0, f"learning rates must be positive (lr={self.lr})")
        _check(self.prior_weight >= 0, f"prior weight {self.prior_weight} must be >= 0")
        _check(self.resolution == 0 or self.resolution % 8 == 0, f"resolution {self.resolution} must be a multiple of 8")


@dataclass(frozen=True)
class PriorConfig:
    """Prior preservation: c_0 and the images the base model generates for it once (cached in the store)."""

    prompt: str = "a photo of a person"
    num_images: int = 16
    steps: int = 25
    guidance: float = 7.5

    def __post_init__(self) -> None:
        _check(self.num_images >= 1, f"prior images {self.num_images} must be >= 1")
        _check(bool(self.prompt.strip()), "the prior prompt is empty: pass --prior-prompt 'a photo of a person'")


@dataclass(frozen=True)
class MethodConfig:
    name: str = "lora-sequential"
    params: dict = field(default_factory=dict)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def from_dict(cls, d: dict, what: str):
    """Build a config from a dict, rejecting unknown keys with the list of valid ones."""
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - valid)
    if unknown:
        raise EdgecpError(f"unknown {what} setting '{unknown[0]}': valid ones are {', '.join(sorted(valid))}")
    return cls(**d)


def replace(cfg, **overrides):
    """`dataclasses.replace` that ignores None overrides (unset CLI flags) and names unknown keys."""
    valid = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        what = type(cfg).__name__.removesuffix("Config").lower()
        raise EdgecpError(f"unknown {what} setting '{unknown[0]}': valid ones are {', '.join(sorted(valid))}")
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
