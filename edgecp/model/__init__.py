"""Base models: the embedded tiny model, loading real Stable Diffusion weights, concept tokens."""
