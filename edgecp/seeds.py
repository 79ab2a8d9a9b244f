"""Named random streams: every seeded draw of a run comes from `stream_seed(seed, STREAM, index)`, one place that
says which phase draws from which stream (issue 23: in place of unnamed salts). The values are the ones the code
used before it had names, so a seed draws exactly what it drew then (the bench's seed-0 tables do not move): a stream
is `seed * salt + index`, the salts distinct primes (and 1000 for the trainer and the bench's images, whose index is
a task or concept number below 1000)."""

from __future__ import annotations

TRAIN = 1000  # the Trainer: batches, noise and timesteps of task `index`
BENCH_IMAGES = 1000  # the bench's evaluation images of concept `index` (a separate use of the same arithmetic)
CNS_IMPORTANCE = 31  # CNS's Taylor importance batches
REFERENCE_LOSS = 613  # C-LoRA/CNS's L_0: the task's denoising loss at its start (phases.reference_loss)
FISHER = 7919  # the EWC / EWC DC Fisher phase
DSC = 104729  # the DSC phase
PRIORS = 1234  # the prior-class images (a fixed seed: the cache key does not hold the store's seed)


def stream_seed(seed: int, stream: int, index: int = 0) -> int:
    """The seed of `stream` for task (or concept) `index` of a run seeded with `seed`."""
    return seed * stream + index
