"""LoRA sequential (paper 000's baseline; paper 001's "naive continual LoRA").

One LoRA carried from task to task: task n starts from the LoRA of task n-1 and trains it on concept n with
no protection of earlier concepts. Everything is in the base class; this file names it.
"""

from __future__ import annotations

from edgecp.methods.base import Method


class LoraSequential(Method):
    name = "lora-sequential"
    summary = ("keeps training one small adapter (LoRA) for every concept: the fastest and smallest, but a new concept "
               "can overwrite earlier ones")
    paper = "000 LoRA sequential; 001 naive continual LoRA"
