"""Continual-personalization metrics: pure numpy on precomputed features (no torch, no model).

Sources
-------
- Paper 000 (Jha et al., "Mining Your Own Secrets", arXiv 2410.00700), Sec. 4 "Evaluation" and App. E
  "Metrics definition": A_MMD (Eq. 7), F_MMD (Eq. 8), BwT_MMD (Eq. 9), CLIP image/text alignment, KID;
  Sec. 4.3 "Sanity check II" for the DC-score classification accuracy.
- Paper 001 (Staniszewski et al., "Low-Rank Continual Personalization of Diffusion Models"), App. A.3:
  average score and average forgetting over a score matrix.
- Bińkowski et al. 2018 ("Demystifying MMD GANs"), Gretton et al. 2012 ("A kernel two-sample test").

Matrix convention (0-based, shared by every continual metric here)
------------------------------------------------------------------
``M[i, j]`` is measured on task ``j`` with the model trained sequentially up to task ``i``; it exists for
``i >= j`` and is ``NaN`` above the diagonal. Paper 000 writes ``X_{i,j}`` with 1-based ``i, j`` and ``N``
tasks, so its ``X_{N,j}`` is row ``N - 1`` here.

Reported scale
--------------
Every function returns the raw value. The paper's tables multiply some metrics for display; that is
collected in :data:`PAPER_SCALE` and applied only by :func:`to_paper_scale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "PAPER_SCALE",
    "a_mmd",
    "average_forgetting",
    "average_score",
    "bwt_mmd",
    "clip_i2i",
    "clip_t2i",
    "dc_accuracy",
    "f_mmd",
    "kid",
    "mmd_matrices",
    "mmd_quadratic",
    "polynomial_kernel",
    "polynomial_mmd2",
    "to_paper_scale",
]

PAPER_SCALE: dict[str, float] = {
    "kid": 1e5,
    "a_mmd": 1e3,
    "clip_i2i": 1e2,
    "bwt_mmd": 1.0,
    "f_mmd": 1.0,
}
"""Display factors of paper 000's result tables (Tables 1-8).

There is no sentence in paper 000 about scaling; the factors are in the column headers, verbatim from
Table 1: ``$KID(\\downarrow)$ $(x 10^5)$``, ``$A_{MMD}(\\downarrow)$ $(x 10^3)$``, ``$BwTMMD$ (\\uparrow)``,
``CLIP I2I (\\uparrow) (x100)``, ``$F_{\\text{MMD}}(\\downarrow)$``. BwT_MMD and F_MMD carry no factor, so
they are 1.0 here. Caveat: Table 1's BwT_MMD values (e.g. -273.41 for CD next to A_MMD 121.89 x 10^3) cannot
be raw, nor x10^3 like A_MMD, because with a non-negative MMD ``BwT >= -N/(N-1) * A_MMD``; the paper's
BwT column is therefore on some unstated larger scale. Compare our BwT values with each other, not with
the paper's numbers.
"""


def to_paper_scale(name: str, value: float) -> float:
    """``value`` multiplied by paper 000's table factor for metric ``name`` (a key of :data:`PAPER_SCALE`)."""
    if name not in PAPER_SCALE:
        raise ValueError(f"unknown metric '{name}': expected one of {sorted(PAPER_SCALE)}")
    return float(value) * PAPER_SCALE[name]


# ----------------------------------------------------------------------------------------------------------
# Kernels and MMD
# ----------------------------------------------------------------------------------------------------------


def _features(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, d) of features but has shape {a.shape}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows but has {a.shape[0]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or inf values")
    return a


def _same_dim(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: x has d={x.shape[1]} but y has d={y.shape[1]}")


def polynomial_kernel(
    x: np.ndarray, y: np.ndarray, degree: int, gamma: float | None = None, coef0: float = 1.0
) -> np.ndarray:
    """Polynomial kernel matrix ``K[a, b] = (gamma * <x_a, y_b> + coef0) ** degree``.

    ``gamma=None`` means ``1 / d``, the convention of KID (Bińkowski et al. 2018, Sec. 4:
    ``k(x, y) = (x·y / d + 1)^3``) and of torchmetrics / clean-fid.

    Shapes: x (n, d), y (m, d) -> (n, m).
    """
    g = 1.0 / x.shape[1] if gamma is None else float(gamma)
    return (g * (x @ y.T) + coef0) ** degree  # (n, m)


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, unbiased: bool) -> float:
    """MMD² from kernel blocks kxx (n, n), kyy (m, m), kxy (n, m) (Gretton et al. 2012, Eq. 3 and Eq. 5)."""
    n, m = kxx.shape[0], kyy.shape[0]
    if unbiased:
        # MMD²_u: U-statistic, self-similarities k(x_a, x_a) left out of the within-set means.
        xx = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        yy = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    else:
        # MMD²_b: V-statistic over all pairs; >= 0 and exactly 0 for identical sets.
        xx = kxx.mean()
        yy = kyy.mean()
    return float(xx + yy - 2.0 * kxy.mean())


def polynomial_mmd2(
    x: np.ndarray,
    y: np.ndarray,
    degree: int,
    *,
    gamma: float | None = None,
    coef0: float = 1.0,
    unbiased: bool = True,
) -> float:
    """Squared MMD between feature sets x (n, d) and y (m, d) under :func:`polynomial_kernel`.

    ``unbiased=True`` is the U-statistic MMD²_u (Gretton et al. 2012, Lemma 6), which KID uses; it can be
    slightly negative. ``unbiased=False`` is the V-statistic MMD²_b (Gretton et al. 2012, Eq. 5).
    """
    x = _features(x, "x", 2 if unbiased else 1)
    y = _features(y, "y", 2 if unbiased else 1)
    _same_dim(x, y)
    kxx = polynomial_kernel(x, x, degree, gamma, coef0)  # (n, n)
    kyy = polynomial_kernel(y, y, degree, gamma, coef0)  # (m, m)
    kxy = polynomial_kernel(x, y, degree, gamma, coef0)  # (n, m)
    return _mmd2_from_kernels(kxx, kyy, kxy, unbiased)


def mmd_quadratic(
    x: np.ndarray,
    y: np.ndarray,
    *,
    gamma: float | None = None,
    coef0: float = 1.0,
    unbiased: bool = False,
) -> float:
    """Squared MMD with the quadratic kernel ``k(a, b) = (a·b / d + 1)^2``: the MMD of paper 000's A_MMD,
    F_MMD and BwT_MMD.

    Paper 000, App. E, below Eq. 7: "where the MMD is computed using a quadratic kernel function (Gretton
    et al., 2012)". The paper gives no kernel constants; we take the polynomial kernel of KID (Bińkowski et
    al. 2018), ``(a·b / d + 1)^p``, at degree p = 2, so that A_MMD and KID differ only in the degree.
    ``gamma`` (default 1/d) and ``coef0`` (default 1) expose the constants.

    Estimator: the biased V-statistic MMD²_b (Gretton et al. 2012, Eq. 5) by default. It is >= 0 and exactly 0
    for identical sets, which fits paper 000, Table 1, where Textual Inversion (frozen model, so ``X_{j,j}``
    and ``X_{N,j}`` presumably coincide) has F_MMD = 0. ``unbiased=True`` gives the U-statistic MMD²_u.

    The value is raw; paper 000 reports A_MMD "(x 10^3)" (see :data:`PAPER_SCALE`).

    Shapes: x (n, d) features of one set (e.g. CLIP features of real target images), y (m, d) of the other
    (generated images); returns a float.
    """
    return polynomial_mmd2(x, y, 2, gamma=gamma, coef0=coef0, unbiased=unbiased)


def kid(
    x: np.ndarray,
    y: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    *,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Bińkowski et al. 2018, Sec. 4), as in torchmetrics and clean-fid.

    KID = unbiased MMD²_u with the cubic kernel ``k(a, b) = (a·b / d + 1)^3``, averaged over ``subsets``
    random subsets of ``subset_size`` rows drawn without replacement from each set. Returns
    ``(mean, std)`` over the subsets (population std, as torchmetrics). ``subset_size`` is clamped to
    ``min(n, m)`` as clean-fid does, since personalization sets hold a few images; with
    ``subset_size >= min(n, m) == n == m`` every subset is the whole set and KID is the plain MMD²_u.

    Draws: ``rng = np.random.default_rng(seed)``; per subset ``rng.choice(n, s, replace=False)`` for x, then
    ``rng.choice(m, s, replace=False)`` for y.

    Paper 000 computes KID on CLIP features and reports it "(x 10^5)" (see :data:`PAPER_SCALE`).

    Shapes: x (n, d) real features, y (m, d) generated features.
    """
    x = _features(x, "x", 2)
    y = _features(y, "y", 2)
    _same_dim(x, y)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1 but is {subsets}")
    s = min(int(subset_size), x.shape[0], y.shape[0])
    if s < 2:
        raise ValueError(f"subset_size must be >= 2 for the unbiased estimator but is {subset_size}")
    rng = np.random.default_rng(seed)
    scores = np.empty(subsets)
    for k in range(subsets):
        xs = x[rng.choice(x.shape[0], s, replace=False)]  # (s, d)
        ys = y[rng.choice(y.shape[0], s, replace=False)]  # (s, d)
        scores[k] = polynomial_mmd2(xs, ys, degree, gamma=gamma, coef0=coef0, unbiased=True)
    return float(scores.mean()), float(scores.std())


# ----------------------------------------------------------------------------------------------------------
# Paper 000, App. E: A_MMD, F_MMD, BwT_MMD
# ----------------------------------------------------------------------------------------------------------


def _task_matrix(matrix: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    """A square (N, N) float matrix whose entries on and below the diagonal are finite."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty square (N, N) matrix but has shape {a.shape}")
    lower = np.tril(np.ones(a.shape, dtype=bool))
    bad = np.argwhere(lower & ~np.isfinite(a))
    if len(bad):
        i, j = bad[0]
        raise ValueError(f"{name}[{i}, {j}] is {a[i, j]}: entries with i >= j must be finite numbers")
    return a


def mmd_matrices(
    real: Sequence[np.ndarray],
    generated: Sequence[Sequence[np.ndarray]],
    *,
    mmd: Callable[[np.ndarray, np.ndarray], float] = mmd_quadratic,
) -> tuple[np.ndarray, np.ndarray]:
    """The two MMD matrices that paper 000's App. E metrics read, from features.

    ``real[j]`` (n_j, d): features of task j's real target images, ``F_clip(X_{D,j})``.
    ``generated[i][j]`` (g, d) for ``j <= i``: features of task j's images generated after training task i,
    ``F_clip(X_{i,j})`` (``generated[i]`` may be longer; entries ``j > i`` are ignored).

    Returns ``(M, D)``, both (N, N) with NaN above the diagonal:
    - ``M[i, j] = MMD(F(X_{D,j}), F(X_{i,j}))`` -> :func:`a_mmd`, :func:`bwt_mmd`;
    - ``D[i, j] = MMD(F(X_{j,j}), F(X_{i,j}))`` -> :func:`f_mmd` (``D[j, j] = 0`` for the biased MMD).
    """
    n = len(real)
    if len(generated) != n:
        raise ValueError(f"generated has {len(generated)} rows but real has {n} tasks: one row per task")
    m = np.full((n, n), np.nan)
    d = np.full((n, n), np.nan)
    for i in range(n):
        if len(generated[i]) < i + 1:
            raise ValueError(f"generated[{i}] has {len(generated[i])} entries but needs tasks 0..{i}")
        for j in range(i + 1):
            m[i, j] = mmd(real[j], generated[i][j])
            d[i, j] = mmd(generated[j][j], generated[i][j])
    return m, d


def a_mmd(matrix: np.ndarray | Sequence[Sequence[float]]) -> float:
    """A_MMD, paper 000 Eq. 7 (lower is better):

    ``A_MMD = 1/N sum_{j=1}^{N} MMD(F_clip(X_{D,j}), F_clip(X_{N,j}))``

    i.e. the mean of the last row of ``matrix`` (N, N), ``matrix[i, j] = MMD(real_j, generated_j after task
    i)`` (:func:`mmd_matrices`' ``M``). Raw value; the paper's tables show it "(x 10^3)".
    """
    m = _task_matrix(matrix, "matrix")
    return float(m[-1, :].mean())


def f_mmd(drift: np.ndarray | Sequence[Sequence[float]]) -> float:
    """F_MMD, paper 000 Eq. 8 (lower is better), the forgetting metric of C-LoRA (Smith et al. 2024b):

    ``F_MMD = 1/(N-1) sum_{j=1}^{N-1} MMD(F_clip(X_{j,j}), F_clip(X_{N,j}))``

    It compares GENERATED images with GENERATED images: task j's images right after learning task j against
    task j's images after the last task N; no real images enter. So it needs ``drift`` (N, N),
    ``drift[i, j] = MMD(generated_j after task j, generated_j after task i)`` (:func:`mmd_matrices`' ``D``),
    not the matrix of :func:`a_mmd`. Returns the mean of ``drift[N-1, :N-1]``; NaN when N == 1 (no past task).
    App. E calls it "a *relative* measure of divergence": a task that was never learned well and then does not
    change scores 0.
    """
    d = _task_matrix(drift, "drift")
    n = d.shape[0]
    if n == 1:
        return math.nan
    return float(d[-1, : n - 1].mean())


def bwt_mmd(matrix: np.ndarray | Sequence[Sequence[float]]) -> float:
    """BwT_MMD, paper 000 Eq. 9 (HIGHER is better):

    ``BwT_MMD = 1/(N-1) sum_{j=1}^{N-1} ( MMD(F(X_{D,j}), F(X_{j,j})) - MMD(F(X_{D,j}), F(X_{N,j})) )``

    Both terms compare with the REAL target images ("the *absolute* ground truth counterparts"): the MMD of
    task j right after learning it (diagonal ``matrix[j, j]``) minus its MMD after the last task
    (``matrix[N-1, j]``). Forgetting makes the second term larger, so BwT_MMD < 0; App. E: "a larger BwT_MMD
    is desirable as it implies that learning the Nth task helps improve the generative quality of the jth task
    images". ``matrix`` is :func:`mmd_matrices`' ``M`` (as for :func:`a_mmd`). NaN when N == 1.
    """
    m = _task_matrix(matrix, "matrix")
    n = m.shape[0]
    if n == 1:
        return math.nan
    past = np.arange(n - 1)
    return float((m[past, past] - m[n - 1, past]).mean())


# ----------------------------------------------------------------------------------------------------------
# Paper 001, App. A.3: average score and average forgetting
# ----------------------------------------------------------------------------------------------------------


def average_score(acc: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Average score, paper 001 App. A.3: ``S̄_T = 1/T sum_{j=1}^{T} S_j^T``, with ``S_j^i`` the "performance
    on j-th task of a model that was trained on i consecutive tasks".

    ``acc`` (T, T): ``acc[i, j]`` = score on task j after training task i (``S_j^{i+1}``); NaN above the
    diagonal. Returns the mean of the last row. Paper 001 uses higher-is-better scores (CLIP-I, DINO, CSD
    cosine similarities; "Average Score S̄_T (↑)").
    """
    a = _task_matrix(acc, "acc")
    return float(a[-1, :].mean())


def average_forgetting(acc: np.ndarray | Sequence[Sequence[float]]) -> float:
    """Average forgetting, paper 001 App. A.3, for a higher-is-better score ("Average Forgetting F̄_T (↓)"):

    ``F̄_T = 1/(T-1) sum_{j=1}^{T-1} max_{1<=k<=T} (S_j^k - S_j^T)``

    ``acc`` as in :func:`average_score`. The max runs over the models that have seen task j (rows ``k >= j``
    here): entries above the diagonal (task j measured before it was learned) are ignored even if the caller
    filled them in, as in the usual definition of forgetting (Chaudhry et al. 2018). As written, ``k``
    includes ``T``, whose term is 0, so each task's forgetting is >= 0. NaN when T == 1.

    (The authors' repository computes ``max_k (S_j^j - S_j^k)`` instead, the drop from the first measurement;
    we follow the formula in the paper.) For a lower-is-better metric such as MMD pass ``-matrix``.
    """
    a = _task_matrix(acc, "acc")
    t = a.shape[0]
    if t == 1:
        return math.nan
    lower = np.where(np.tril(np.ones_like(a, dtype=bool)), a, -np.inf)  # (T, T), -inf above the diagonal
    best = lower[:, : t - 1].max(axis=0)  # (T-1,) max_k S_j^k over k >= j
    return float((best - a[-1, : t - 1]).mean())


# ----------------------------------------------------------------------------------------------------------
# CLIP alignment and DC-score accuracy
# ----------------------------------------------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    if (norms == 0).any():
        raise ValueError("a feature vector has zero norm: cosine similarity is undefined")
    return x / norms


def clip_i2i(gen_feats: np.ndarray, real_feats: np.ndarray) -> float:
    """CLIP I2I image alignment (paper 000 App. E (vi), following Custom Diffusion, Kumari et al. 2023):
    "the visual similarity of the generated images with their ground truth targets in the CLIP visual feature
    space", computed as the mean cosine similarity over ALL (generated, real) pairs, as Custom Diffusion's
    evaluation (``customconcept101/evaluate.py``, ``clipeval_image``) and paper 001's code do. Higher is
    better; raw value in [-1, 1], the paper shows it "(x100)".

    Shapes: gen_feats (g, d), real_feats (r, d) -> float.
    """
    g = _unit_rows(_features(gen_feats, "gen_feats"))
    r = _unit_rows(_features(real_feats, "real_feats"))
    _same_dim(g, r)
    return float((g @ r.T).mean())  # mean of the (g, r) cosine matrix


def clip_t2i(img_feats: np.ndarray, txt_feats: np.ndarray, *, w: float = 2.5) -> float:
    """CLIP T2I text alignment (paper 000 App. E (vii), "Following Kumari et al. (2023)"): "the text-to-image
    similarity of the generated images with their respective prompts in the CLIP multimodal feature space".

    Custom Diffusion's evaluation (``customconcept101/evaluate.py``, ``get_clip_score``) computes it as
    CLIPScore (Hessel et al. 2021): ``mean_b w * max(cos(img_b, txt_b), 0)`` with ``w = 2.5``; we do the same
    (``w=1`` gives the clipped mean cosine). Higher is better. Paper 000 defines it but shows no T2I column.

    Shapes: img_feats (n, d); txt_feats (n, d) paired row by row with the images, or (d,) / (1, d) for one
    prompt shared by all images -> float. Both must be in the shared CLIP space (projected features).
    """
    im = _unit_rows(_features(img_feats, "img_feats"))
    tx = np.asarray(txt_feats, dtype=np.float64)
    if tx.ndim == 1:
        tx = tx[None, :]
    tx = _unit_rows(_features(tx, "txt_feats"))
    _same_dim(im, tx)
    if tx.shape[0] not in (1, im.shape[0]):
        raise ValueError(
            f"txt_feats has {tx.shape[0]} rows but img_feats has {im.shape[0]}: "
            "pass one prompt row per image or one"
        )
    cos = (im * tx).sum(axis=1)  # (n,)
    return float(w * np.clip(cos, 0.0, None).mean())


def dc_accuracy(errors: np.ndarray, labels: np.ndarray) -> float:
    """DC-score classification accuracy (paper 000 Sec. 4.3, "Sanity check II: DC scores help with training
    set classification").

    ``errors[b, i]`` is the diffusion-classifier error of image b under concept i (mean squared
    noise-prediction error, Eq. 3; lower = more likely). The prediction is ``argmin_i errors[b, i]``, the same
    as argmax of the DC scores ``softmax(-errors / tau)`` for any tau > 0; ties go to the lowest index.

    Shapes: errors (n_images, n_concepts), labels (n_images,) integer concept indices -> accuracy in [0, 1].
    """
    e = np.asarray(errors, dtype=np.float64)
    y = np.asarray(labels)
    if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
        raise ValueError(f"errors must be a non-empty (n_images, n_concepts) array but has shape {e.shape}")
    if y.shape != (e.shape[0],):
        raise ValueError(f"labels must have shape ({e.shape[0]},) to match errors but has shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (y < 0).any() or (y >= e.shape[1]).any():
        raise ValueError(f"labels must be integer concept indices in [0, {e.shape[1] - 1}]")
    if np.isnan(e).any():
        raise ValueError("errors holds NaN values")
    return float((e.argmin(axis=1) == y).mean())
