"""Evaluation for edgecp: continual-learning metrics (pure numpy) and benchmark concept sequences.

- :mod:`edgecp.eval.metrics`: MMD with a quadratic kernel, KID, A_MMD / F_MMD / BwT_MMD (paper 000, App. E),
  average score / average forgetting (paper 001, App. A.3), CLIP image/text alignment, DC-score accuracy.
- :mod:`edgecp.eval.sequences`: the six-task sequence of scikit-image photos, a 50-concept procedural
  sequence, and a user's own sequence read from folders.

Nothing here imports torch; feature extraction (CLIP) lives elsewhere and hands these functions arrays.
"""
