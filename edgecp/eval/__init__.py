"""Evaluation for edgecp: continual-learning metrics (pure numpy) and benchmark concept sequences.

- :mod:`edgecp.eval.metrics`: MMD with a quadratic kernel, KID, A_MMD / F_MMD / BwT_MMD (paper 000, App. E),
  average score / average forgetting (paper 001, App. A.3), CLIP image/text alignment, DC-score accuracy.
- :mod:`edgecp.eval.sequences`: the six-task sequence of scikit-image photos, a 50-concept procedural
  sequence, and a user's own sequence read from folders.

`metrics` and `sequences` import no torch (tested): feature extraction (`features`, a torch model) hands them
arrays. `features`, `bench`, `executor` and `estimate` run models (embed, train, generate), so they import torch;
`layout` imports none.
"""
