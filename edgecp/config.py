"""Frozen, self-validating configuration dataclasses. Every value is recorded in the store: the adapter, training and
prior settings in store.json, and each concept's training settings (with its overrides) in its manifest entry."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields

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


# Bounds of the counts and rates a store records (issue 21). Our choice, generous around what the papers and SD
# use (paper 000: 1000 iterations, batch 1 x 8, rank 16 (VeRA 256), 200 prior images of 50 steps, lr 5e-4): a value
# past them is a typo or an overflow, never a setting that trains (1e20 steps would run for ever; lr 1e30 commits
# an all-NaN adapter). Every path to a config goes through them: `init --train`, `add-concept --steps/--lr/--seed`,
# `plan --resolution` and the values read back from store.json.
MAX_STEPS = 100_000
MAX_BATCH = 64
MAX_GRAD_ACCUM = 256
MAX_LR = 1.0
MAX_PRIOR_WEIGHT = 1000.0
MIN_RESOLUTION, MAX_RESOLUTION = 32, 4096
MAX_SEED = 2**32 - 1  # numpy's range; the trainer seeds torch generators with seed * 1000 + task, within int64
MAX_RANK = 4096
MAX_PRIOR_IMAGES = 10_000
MAX_PRIOR_STEPS = 1000
MAX_GUIDANCE = 100.0
_TARGET_RE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


def _shown(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _whole(value: object, lo: int, hi: int, what: str) -> int:
    """`value` as an int within [lo, hi] (bools and floats refused), or one line naming it and the range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise EdgecpError(f"{what} {_shown(value)} is not a whole number: use one from {lo:,} to {hi:,}")
    if not lo <= value <= hi:
        raise EdgecpError(f"{what} {_shown(value)} is out of range: use a whole number from {lo:,} to {hi:,}")
    return value


def _number(value: object, lo: float, hi: float, what: str, lo_open: bool = False, hint: str = "") -> float:
    """`value` as a finite float within [lo, hi] (or (lo, hi] when `lo_open`), or one line naming it and the range."""
    rng = f"{'above' if lo_open else 'from'} {lo:g} {'and at most' if lo_open else 'to'} {hi:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgecpError(f"{what} {_shown(value)} is not a number: use one {rng}{hint}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EdgecpError(f"{what} {_shown(value)} is not a finite number: use one {rng}{hint}")
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        raise EdgecpError(f"{what} {_shown(value)} is out of range: use a number {rng}{hint}")
    return float(value)


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)


ADAPTER_INITS = ("default", "gaussian")


@dataclass(frozen=True)
class AdapterConfig:
    """The per-concept adapter. `targets` are module-name suffixes inside the UNet (peft's target_modules)."""

    kind: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = ("attn2.to_k", "attn2.to_v")
    # LoRA's A at the start of a task: "default" (peft's Kaiming-uniform) or "gaussian" (A ~ N(0, I), B = 0: 001's
    # "standard initialization technique")
    init: str = "default"

    def __post_init__(self) -> None:
        _check(self.kind in ("lora", "vera", "none"), f"adapter '{self.kind}' is unknown: use --adapter lora or vera")
        _check(self.init in ADAPTER_INITS, f"adapter init '{self.init}' is unknown: use {' or '.join(ADAPTER_INITS)}")
        _whole(self.rank, 1, MAX_RANK, "adapter rank")
        _set(self, "alpha", _number(self.alpha, 0, 1e6, "adapter alpha", lo_open=True))
        targets = self.targets
        if isinstance(targets, str) or not isinstance(targets, (list, tuple)):
            raise EdgecpError(f"adapter targets {_shown(targets)} are not a list of module names: "
                              "e.g. --targets attn2.to_k,attn2.to_v")
        _check(len(targets) > 0, "adapter targets are empty: name at least one module, e.g. attn2.to_k")
        for t in targets:
            _check(isinstance(t, str) and bool(_TARGET_RE.fullmatch(t)),
                   f"adapter target {_shown(t)} is not a module name: use dotted names such as attn2.to_k")
        _set(self, "targets", tuple(targets))


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
        """Every value is checked against its range (the MAX_* bounds above) and type: one line naming it."""
        _whole(self.steps, 1, MAX_STEPS, "steps (--steps)")
        _whole(self.batch_size, 1, MAX_BATCH, "batch_size (--train batch_size=)")
        _whole(self.grad_accum, 1, MAX_GRAD_ACCUM, "grad_accum (--train grad_accum=)")
        lr_hint = " (LoRA trains at 1e-4 to 1e-3)"
        _set(self, "lr", _number(self.lr, 0, MAX_LR, "learning rate (--lr)", lo_open=True, hint=lr_hint))
        _set(self, "token_lr", _number(self.token_lr, 0, MAX_LR, "token_lr (--train token_lr=)",
                                        hint=" (0 freezes the token)"))
        _set(self, "prior_weight", _number(self.prior_weight, 0, MAX_PRIOR_WEIGHT, "prior_weight (--train prior_weight=)"))
        _whole(self.resolution, 0, MAX_RESOLUTION, "resolution (--train resolution=)")
        _check(self.resolution == 0 or (self.resolution >= MIN_RESOLUTION and self.resolution % 8 == 0),
               f"resolution (--train resolution=) {self.resolution} must be 0 (the base's own) or a multiple of 8 "
               f"from {MIN_RESOLUTION} to {MAX_RESOLUTION:,}")
        _check(isinstance(self.gradient_checkpointing, bool),
               f"gradient_checkpointing {_shown(self.gradient_checkpointing)} must be true or false")
        _whole(self.seed, 0, MAX_SEED, "seed (--seed)")


@dataclass(frozen=True)
class PriorConfig:
    """Prior preservation: c_0 and the images the base model generates for it once (cached in the store).

    Defaults for real bases are paper 000's App. H: "an auxiliary dataset of 200 images generated by the pretrained
    backbone using the prompt 'a photo of a person'", sampled with DDPM and 50 steps as 000 samples every image
    (the appendix does not name the prior set's sampler; edgecp uses the evaluation's). The tiny base keeps 8
    images, 10 steps and its own DDIM sampler (`methods/defaults.py`, the "tiny" set): the tiny world's tests and demo need seconds.
    """

    prompt: str = "a photo of a person"
    num_images: int = 200
    steps: int = 50
    guidance: float = 7.5
    sampler: str = "ddpm"  # ddpm | ddim | base (the base's own scheduler)

    def __post_init__(self) -> None:
        _whole(self.num_images, 1, MAX_PRIOR_IMAGES, "prior images (--prior-images)")
        _whole(self.steps, 1, MAX_PRIOR_STEPS, "prior sampling steps")
        _set(self, "guidance", _number(self.guidance, 0, MAX_GUIDANCE, "prior guidance"))
        _check(self.sampler in SAMPLERS, f"prior sampler '{self.sampler}' is unknown: use {', '.join(SAMPLERS)}")
        _check(isinstance(self.prompt, str) and bool(self.prompt.strip()),
               "the prior prompt is empty: pass --prior-prompt 'a photo of a person'")


SAMPLERS = ("ddpm", "ddim", "base")


def stored_prior(info: dict) -> PriorConfig:
    """A store's prior settings; stores made before the sampler setting existed sampled with the base's own."""
    return from_dict(PriorConfig, {"sampler": "base", **info}, "prior")
DEFAULT_METHOD = "dsc-ewc-dc"  # paper 000's full method (Algo 4)


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
