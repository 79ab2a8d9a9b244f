"""VeRA (Kopiczko et al. 2024) in place of LoRA, paper 000 App. G.1: frozen random A, B shared across layers,
trained per-layer scaling vectors; rank 256 as the paper. Training and consolidation are the LoRA methods'."""

from __future__ import annotations

from edgecp.methods.ewc import EwcDc, LoraEwc
from edgecp.methods.lora_sequential import LoraSequential


class VeraSequential(LoraSequential):
    name = "vera-sequential"
    summary = ("lora-sequential with a VeRA adapter (shared random matrices, far fewer trained numbers): no "
               "protection of earlier concepts; --format diffusers cannot export it")
    paper = "000 App. G.1 (VeRA, rank 256)"
    adapter_kind = "vera"
    default_rank = 256


class VeraEwc(LoraEwc):
    name = "vera-ewc"
    summary = "lora-ewc with a VeRA adapter: the same extra pass; --format diffusers cannot export it"
    paper = "000 App. G.1 (VeRA EWC)"
    adapter_kind = "vera"
    default_rank = 256


class VeraEwcDc(EwcDc):
    name = "vera-ewc-dc"
    summary = "ewc-dc with a VeRA adapter: the same extra pass; --format diffusers cannot export it"
    paper = "000 App. G.1 (VeRA EWC DC)"
    adapter_kind = "vera"
    default_rank = 256
