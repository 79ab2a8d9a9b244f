"""LoRA sequential (paper 000's baseline; paper 001's "naive continual LoRA").

One LoRA carried from task to task: task n starts from the LoRA of task n-1 and trains it on concept n with
no protection of earlier concepts. Everything is in the base class; this file names it.
"""

from __future__ import annotations

from edgecp.methods.base import Method


class LoraSequential(Method):
    name = "lora-sequential"
    summary = "one LoRA continued from task to task, no consolidation (000's LoRA sequential, 001's naive)"
