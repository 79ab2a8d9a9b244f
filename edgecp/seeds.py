"""Named random streams: the one place that says which phase draws from which stream.

Three kinds, each used through its own helper:

- torch seeds of a run: `stream_seed(seed, STREAM, index)` is `seed * STREAM + index` for task (or concept) `index`.
  The multipliers are distinct primes, and 1000 for the trainer and the bench's images, whose index is a task or
  concept number below 1000, so two streams of one run seed never share a seed.
- numpy generators of a run: `numpy_stream(seed, STREAM, *keys)` is numpy's generator seeded with the entropy words
  `[seed, STREAM, *keys]` (a SeedSequence), so a stream is apart from every other by its word, not by arithmetic.
- fixed seeds, the same whatever the run's seed (what a seed's cache key or a fixed picture does not hold).
"""

from __future__ import annotations

import numpy as np

# -- torch seeds of a run: stream_seed(seed, STREAM, index) --------------------------------------------------------
TRAIN = 1000  # the Trainer: batches, noise and timesteps of task `index`
BENCH_IMAGES = 1000  # the bench's evaluation images of concept `index` (a separate use of the same arithmetic)
CNS_IMPORTANCE = 31  # CNS's Taylor importance batches
REFERENCE_LOSS = 613  # C-LoRA/CNS's L_0: the task's denoising loss at its start (phases.reference_loss)
FISHER = 7919  # the EWC / EWC DC Fisher phase
DSC = 104729  # the DSC phase
CHECK = 1299709  # the forgetting check's DC trials (t, noise) of earlier concept `index` (edgecp/forgetting.py)

# -- numpy generators of a run: numpy_stream(seed, STREAM, *keys) ---------------------------------------------------
TRAIN_VIEWS = 1  # a benchmark concept's training views (crops, flips, jitter, procedural draws), keyed by concept
TARGET_VIEWS = 2  # its held-out target views: never the training views' stream
PROCEDURAL_CONCEPTS = 0x5EC  # which concepts `procedural_sequence` picks, and each one's pattern frequency and angle

# -- fixed seeds ------------------------------------------------------------------------------------------------------
PRIORS = 1234  # the prior-class images (the prior cache's key does not hold the store's seed)
WORLD_NOISE = 12345  # the tiny world's noise banks (numpy_stream(WORLD_NOISE)): every scene slices the same fields
CAPTION_WORDING = 0  # canonical captions' wording of scenic backgrounds (numpy_stream(CAPTION_WORDING))
EXPORT_GATE = 0  # the export's gate image
EXPORT_CALIBRATION = 1000  # static int8's calibration image i: EXPORT_CALIBRATION + i, never the gate's seed
TRACE_EXAMPLE = 0  # the example inputs the export traces its graphs with (the graph does not depend on them)
CALIBRATION_RUN = 0  # `edgecp bench --estimate`'s timing run (its draws only have to repeat)


def stream_seed(seed: int, stream: int, index: int = 0) -> int:
    """The torch seed of `stream` for task (or concept) `index` of a run seeded with `seed`."""
    return seed * stream + index


def numpy_stream(seed: int, *stream: int) -> np.random.Generator:
    """numpy's generator of `stream` (a stream constant and its keys, or nothing for a fixed seed) of `seed`:
    `np.random.default_rng([seed, *stream])`."""
    return np.random.default_rng([seed, *stream])
