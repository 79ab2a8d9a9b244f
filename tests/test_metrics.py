"""edgecp.eval.metrics against hand computations and direct O(n^2) loops."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from edgecp.eval.metrics import (
    a_mmd,
    average_forgetting,
    average_score,
    bwt_mmd,
    clip_i2i,
    clip_t2i,
    dc_accuracy,
    f_mmd,
    kid,
    mmd_matrices,
    mmd_quadratic,
    to_paper_scale,
)

NAN = math.nan


def _feats(n: int, d: int = 8, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


def _loop_mmd2(x: np.ndarray, y: np.ndarray, degree: int, unbiased: bool) -> float:
    """MMD² written out pair by pair with k(a, b) = (a·b / d + 1)^degree."""
    d = x.shape[1]

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1.0) ** degree

    n, m = len(x), len(y)
    if unbiased:
        xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    else:
        xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n)) / n**2
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m)) / m**2
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


# --- MMD -----------------------------------------------------------------------------------------------


def test_mmd_of_identical_sets_is_zero():
    x = _feats(20)
    assert abs(mmd_quadratic(x, x)) < 1e-9
    assert abs(mmd_quadratic(x, x.copy()[::-1])) < 1e-9  # order does not matter


def test_mmd_grows_with_a_shift():
    x = _feats(40, seed=0)
    values = [mmd_quadratic(x, _feats(40, seed=1, shift=s)) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[0] < 0.1 * values[-1]


@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd_quadratic_matches_direct_loop(unbiased):
    x, y = _feats(7, d=5, seed=2), _feats(9, d=5, seed=3, shift=0.3)
    assert mmd_quadratic(x, y, unbiased=unbiased) == pytest.approx(_loop_mmd2(x, y, 2, unbiased), rel=1e-10)


def test_mmd_rejects_bad_shapes():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        mmd_quadratic(_feats(4, d=3), _feats(4, d=5))
    with pytest.raises(ValueError, match="2-D"):
        mmd_quadratic(np.zeros(5), np.zeros(5))


# --- KID -----------------------------------------------------------------------------------------------


def test_kid_on_whole_sets_equals_direct_unbiased_mmd():
    x, y = _feats(10, d=6, seed=4), _feats(10, d=6, seed=5, shift=0.5)
    mean, std = kid(x, y, subsets=5, subset_size=1000)  # clamped to 10: every subset is the whole set
    assert mean == pytest.approx(_loop_mmd2(x, y, 3, unbiased=True), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_follow_the_documented_draws():
    x, y = _feats(12, d=4, seed=6), _feats(15, d=4, seed=7, shift=0.2)
    mean, std = kid(x, y, subsets=4, subset_size=5, seed=3)
    rng = np.random.default_rng(3)
    ref = []
    for _ in range(4):
        xs = x[rng.choice(12, 5, replace=False)]
        ys = y[rng.choice(15, 5, replace=False)]
        ref.append(_loop_mmd2(xs, ys, 3, unbiased=True))
    assert mean == pytest.approx(np.mean(ref), rel=1e-10)
    assert std == pytest.approx(np.std(ref), rel=1e-8)
    assert kid(x, y, subsets=4, subset_size=5, seed=3) == (mean, std)


# --- paper 000, App. E ------------------------------------------------------------------------------------

# M[i][j]: MMD(real_j, generated_j after task i)
M = [
    [0.10, NAN, NAN],
    [0.30, 0.20, NAN],
    [0.40, 0.25, 0.15],
]
# D[i][j]: MMD(generated_j after task j, generated_j after task i)
D = [
    [0.00, NAN, NAN],
    [0.05, 0.00, NAN],
    [0.12, 0.03, 0.00],
]


def test_a_mmd_is_the_mean_of_the_last_row():
    assert a_mmd(M) == pytest.approx((0.40 + 0.25 + 0.15) / 3)


def test_bwt_mmd_is_diagonal_minus_last_row_over_past_tasks():
    # ((0.10 - 0.40) + (0.20 - 0.25)) / 2: forgetting makes it negative
    assert bwt_mmd(M) == pytest.approx(-0.175)


def test_f_mmd_averages_the_drift_of_past_tasks():
    assert f_mmd(D) == pytest.approx((0.12 + 0.03) / 2)


def test_single_task_has_no_forgetting_terms():
    assert a_mmd([[0.2]]) == pytest.approx(0.2)
    assert math.isnan(bwt_mmd([[0.2]])) and math.isnan(f_mmd([[0.0]]))


def test_missing_lower_entry_is_named():
    bad = [[0.1, NAN], [NAN, 0.2]]
    with pytest.raises(ValueError, match=r"matrix\[1, 0\]"):
        a_mmd(bad)
    with pytest.raises(ValueError, match="square"):
        bwt_mmd([[0.1, 0.2]])


def test_mmd_matrices_build_m_and_d_from_features():
    real = [_feats(6, d=4, seed=10 + j) for j in range(3)]
    gen = [[_feats(5, d=4, seed=100 * i + j, shift=0.1 * i) for j in range(i + 1)] for i in range(3)]
    m, d = mmd_matrices(real, gen)
    assert np.isnan(m[0, 1]) and np.isnan(d[0, 2])
    assert m[2, 1] == pytest.approx(mmd_quadratic(real[1], gen[2][1]))
    assert d[2, 0] == pytest.approx(mmd_quadratic(gen[0][0], gen[2][0]))
    assert np.allclose(np.diag(d), 0.0, atol=1e-9)
    assert a_mmd(m) == pytest.approx(np.mean([mmd_quadratic(real[j], gen[2][j]) for j in range(3)]))


def test_paper_scale():
    assert to_paper_scale("a_mmd", 0.1) == pytest.approx(100.0)
    assert to_paper_scale("kid", 2e-3) == pytest.approx(200.0)
    with pytest.raises(ValueError, match="unknown metric"):
        to_paper_scale("fid", 1.0)


# --- paper 001, App. A.3 ------------------------------------------------------------------------------------

ACC = [
    [0.80, NAN, NAN],
    [0.70, 0.90, NAN],
    [0.75, 0.60, 0.85],
]


def test_average_score_is_the_mean_of_the_last_row():
    assert average_score(ACC) == pytest.approx((0.75 + 0.60 + 0.85) / 3)


def test_average_forgetting_is_best_minus_final_over_past_tasks():
    # task 0: max(0.80, 0.70, 0.75) - 0.75 = 0.05; task 1: max(0.90, 0.60) - 0.60 = 0.30
    assert average_forgetting(ACC) == pytest.approx((0.05 + 0.30) / 2)


def test_average_forgetting_ignores_scores_above_the_diagonal():
    filled = np.array(ACC)
    filled[np.triu_indices(3, k=1)] = 0.99  # task j measured before it was learned
    assert average_forgetting(filled) == pytest.approx(average_forgetting(ACC))
    assert average_score(filled) == pytest.approx(average_score(ACC))


def test_no_forgetting_when_scores_only_improve():
    assert average_forgetting([[0.5, NAN], [0.6, 0.7]]) == pytest.approx(0.0)
    assert math.isnan(average_forgetting([[0.5]]))


# --- CLIP alignment and DC accuracy ------------------------------------------------------------------------


def test_clip_i2i_is_the_mean_pairwise_cosine():
    gen = np.array([[1.0, 0.0], [0.0, 2.0]])
    real = np.array([[3.0, 0.0], [1.0, 1.0]])
    # cosines: (1, 1/sqrt2) for gen 0, (0, 1/sqrt2) for gen 1
    assert clip_i2i(gen, real) == pytest.approx((1 + 2 / math.sqrt(2)) / 4)
    assert clip_i2i(gen, gen * 5) == pytest.approx(0.5)  # scale-free


def test_clip_t2i_pairs_rows_or_broadcasts_one_prompt():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = np.array([1.0, 0.0])
    # cosines 1, 0, -1 -> clipped at 0 -> mean 1/3, times w
    assert clip_t2i(img, txt, w=1.0) == pytest.approx(1 / 3)
    assert clip_t2i(img, txt) == pytest.approx(2.5 / 3)
    assert clip_t2i(img, img, w=1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one prompt row per image"):
        clip_t2i(img, img[:2])


def test_dc_accuracy_uses_argmin_of_errors():
    errors = np.array([[0.1, 0.5], [0.3, 0.2], [0.4, 0.9]])
    assert dc_accuracy(errors, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert dc_accuracy(errors, np.array([0, 1, 0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="labels must"):
        dc_accuracy(errors, np.array([0, 2, 1]))
    with pytest.raises(ValueError, match="shape"):
        dc_accuracy(errors, np.array([0, 1]))


def test_eval_modules_do_not_import_torch():
    code = "import sys, edgecp.eval.metrics, edgecp.eval.sequences; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
