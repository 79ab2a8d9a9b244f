"""VeRA (Kopiczko et al. 2024) in place of LoRA, paper 000 App. G.1: frozen random A, B shared across layers,
trained per-layer scaling vectors; rank 256 as the paper. Training and consolidation are the LoRA methods'."""

from __future__ import annotations

from edgecp.methods.ewc import EwcDc, LoraEwc
from edgecp.methods.lora_sequential import LoraSequential


class VeraSequential(LoraSequential):
    name = "vera-sequential"
    summary = "VeRA (rank 256) continued from task to task, no consolidation (000 App. G.1)"
    adapter_kind = "vera"
    default_rank = 256


class VeraEwc(LoraEwc):
    name = "vera-ewc"
    summary = "VeRA + online EWC, Fisher from the denoising loss (000 App. G.1)"
    adapter_kind = "vera"
    default_rank = 256


class VeraEwcDc(EwcDc):
    name = "vera-ewc-dc"
    summary = "VeRA + online EWC with DC-score Fisher (000 App. G.1)"
    adapter_kind = "vera"
    default_rank = 256
