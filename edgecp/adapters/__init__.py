"""Adapters on the UNet through peft: attach, state dict in/out, delta weights, merge."""
