"""What the bench can tell apart (issue 24): 95% intervals and paired tests over the bench's own evaluations.

Every table metric of paper 000 (App. E) and 001 (App. A.3) is a mean over concepts of a per-concept term read
from the task matrices (`column_terms`), so both the interval and the test work concept by concept:
- **Interval** (`intervals`): a percentile bootstrap, hierarchical: seeds drawn with replacement (where there are
  several), then the concepts of each drawn seed, then the evaluation images of every set (each real target set
  and each generated set, rows drawn with replacement) from which the matrices are recomputed. 95%: the 2.5th
  and 97.5th percentiles of `B` replicates (default 1000), from a fixed generator, after shifting the replicates
  by their mean bias: the MMDs are V-statistics, which rows drawn twice inflate (our choice; unshifted, an F_MMD
  of 0.0015 got the interval [0.0023, 0.0081]).
- **Test** (`paired_test`): methods share seeds, task orders and views, so the unit is a (seed, concept) pair and
  the statistic the mean of the per-pair differences of two methods' terms; its two-sided p-value comes from the
  exact sign-flip permutation distribution (scipy's `permutation_test`, `permutation_type="samples"`), every one
  of the 2^n sign patterns where n <= 16, else 20,000 drawn ones. Significant: p < 0.05. No correction for the
  number of comparisons is made (the table says so).

KID's per-concept term is `metrics.kid` as the run computed it (50 subsets, the run's seed); inside the bootstrap,
where every replicate recomputes it, 5 subsets (the interval's own Monte-Carlo noise, our choice for speed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from edgecp.eval import metrics
from edgecp.eval.layout import eval_file, real_file

CONFIDENCE = 0.95
ALPHA = 0.05
# per metric: higher is better?
HIGHER_BETTER = {"KID": False, "A_MMD": False, "BwT_MMD": True, "CLIP_I2I": True, "F_MMD": False,
                 "avg_score": True, "avg_forgetting": False}
METRICS = tuple(HIGHER_BETTER)


@dataclass
class RunEmbeddings:
    """One run's evaluation: real[j] (n_target, d) and gen[i][j] (n_gen, d) for j <= i (after task i)."""

    real: list[np.ndarray]
    gen: list[list[np.ndarray]]
    seed: int = 0  # the run's seed (KID's subsets)


def _matrices(real, gen):
    n = len(real)
    m, d, s = (np.full((n, n), np.nan) for _ in range(3))
    for i in range(n):
        for j in range(i + 1):
            m[i, j] = metrics.mmd_quadratic(real[j], gen[i][j])
            d[i, j] = metrics.mmd_quadratic(gen[j][j], gen[i][j])
            s[i, j] = metrics.clip_i2i(gen[i][j], real[j])
    return m, d, s


def column_terms(real: list[np.ndarray], gen: list[list[np.ndarray]], seed: int = 0,
                 kid_subsets: int = 50) -> dict[str, np.ndarray]:
    """Per-concept terms whose mean over concepts is each metric (`metrics.a_mmd` etc.): A_MMD, KID, CLIP_I2I and
    avg_score over all N concepts; BwT_MMD, F_MMD and avg_forgetting over the N-1 concepts before the last."""
    m, d, s = _matrices(real, gen)
    n = len(real)
    last, past = n - 1, np.arange(n - 1)
    lower = np.where(np.tril(np.ones_like(s, dtype=bool)), s, -np.inf)
    kid = np.array([metrics.kid(gen[last][j], real[j], subsets=kid_subsets, seed=seed)[0] for j in range(n)])
    return {
        "KID": kid, "A_MMD": m[last], "BwT_MMD": m[past, past] - m[last, past], "CLIP_I2I": s[last],
        "F_MMD": d[last, past], "avg_score": s[last], "avg_forgetting": lower[:, past].max(axis=0) - s[last, past],
    }


def _resampled(run: RunEmbeddings, rng: np.random.Generator) -> RunEmbeddings:
    def draw(x):
        return x[rng.integers(0, len(x), len(x))]

    return RunEmbeddings([draw(r) for r in run.real], [[draw(g) for g in row] for row in run.gen], run.seed)


def intervals(runs: list[RunEmbeddings], replicates: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """The 95% percentile-bootstrap interval of every metric of `runs` (one method, one run per seed)."""
    rng = np.random.default_rng(seed)
    values = {k: np.empty(replicates) for k in METRICS}
    for b in range(replicates):
        picks = rng.integers(0, len(runs), len(runs)) if len(runs) > 1 else [0]
        per_seed = {k: [] for k in METRICS}
        for p in picks:
            r = _resampled(runs[p], rng)
            terms = column_terms(r.real, r.gen, r.seed, kid_subsets=5)
            for k, t in terms.items():
                per_seed[k].append(t[rng.integers(0, len(t), len(t))].mean() if len(t) else np.nan)
        for k in METRICS:
            values[k][b] = np.mean(per_seed[k])
    # the MMDs are V-statistics: rows drawn twice raise them, so the replicates sit above the estimate (an F_MMD near
    # 0 got an interval above it). Shift the replicates by their bias (their mean minus the estimate) first.
    per_run = [column_terms(r.real, r.gen, r.seed, kid_subsets=5) for r in runs]
    point = {k: float(np.mean([t[k].mean() if len(t[k]) else np.nan for t in per_run])) for k in METRICS}
    lo, hi = 100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2
    out = {}
    for k, v in values.items():
        v = v - (np.nanmean(v) - point[k])
        out[k] = (float(np.nanpercentile(v, lo)), float(np.nanpercentile(v, hi)))
    return out


def paired_terms(runs: list[RunEmbeddings]) -> dict[str, np.ndarray]:
    """Every (seed, concept) term of each metric, seeds in order: the units of `paired_test`."""
    per = [column_terms(r.real, r.gen, r.seed) for r in runs]
    return {k: np.concatenate([p[k] for p in per]) for k in METRICS}


def paired_test(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
    """Two-sided p-value of mean(a - b) = 0 under the sign-flip permutation distribution of the paired units."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired units differ: {a.shape} vs {b.shape}")
    if a.size < 2 or np.allclose(a, b):  # one unit cannot be told apart from chance
        return 1.0
    n_resamples = np.inf if a.size <= 16 else 20_000
    res = sps.permutation_test((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples",
                               vectorized=True, n_resamples=n_resamples, alternative="two-sided",
                               rng=np.random.default_rng(seed))
    return float(res.pvalue)


def compare_terms(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, dict]:
    """Method a against method b over the same units (`paired_terms` of each): per metric, the mean difference
    a - b, the p-value, whether it is significant, and whether a is the better one."""
    row = {}
    for k in METRICS:
        diff = float(np.mean(a[k] - b[k]))
        p = paired_test(a[k], b[k])
        row[k] = {"diff": diff, "p": p, "significant": p < ALPHA,
                  "better": bool(diff > 0 if HIGHER_BETTER[k] else diff < 0)}
    return row


def load_run(out: Path, method: str, seed: int, n_tasks: int) -> RunEmbeddings | None:
    """A finished run's embeddings from the bench folder (None when its seed's real.npz or an evaluation is
    missing: a folder from before the intervals existed; `edgecp bench --resume OUT` writes real.npz)."""
    real_f = real_file(out, seed)
    files = [eval_file(out, method, seed, i) for i in range(n_tasks)]
    if not real_f.is_file() or not all(f.is_file() for f in files):
        return None
    with np.load(real_f) as z:
        real = [z[f"real{j}"] for j in range(n_tasks)]
    gen = []
    for i, f in enumerate(files):
        with np.load(f) as z:
            gen.append([z[f"emb{j}"] for j in range(i + 1)])
    return RunEmbeddings(real, gen, seed)


def bench_statistics(out: Path, methods: tuple[str, ...], runs: list[dict], n_tasks: int, references: tuple[str, ...],
                     replicates: int = 1000) -> dict:
    """Per method: the 95% interval of every metric; per reference method present: the paired tests of every other
    method against it, over the seeds both finished. Methods missing embeddings are left out."""
    by_method: dict[str, dict[int, RunEmbeddings]] = {}
    for m in methods:
        loaded = {r["seed"]: load_run(out, m, r["seed"], n_tasks) for r in runs if r["method"] == m}
        if loaded and all(v is not None for v in loaded.values()):
            by_method[m] = dict(sorted(loaded.items()))
    result: dict = {"confidence": CONFIDENCE, "alpha": ALPHA, "replicates": replicates, "intervals": {}, "tests": {}}
    for m, per_seed in by_method.items():
        result["intervals"][m] = intervals(list(per_seed.values()), replicates)
    for ref in references:
        if ref not in by_method:
            continue
        rows = {}
        for m, per_seed in by_method.items():
            shared = [sd for sd in per_seed if sd in by_method[ref]]
            if m != ref and shared:
                rows[m] = compare_terms(paired_terms([per_seed[sd] for sd in shared]),
                                        paired_terms([by_method[ref][sd] for sd in shared]))
        result["tests"][ref] = rows
    return result
