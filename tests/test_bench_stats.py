"""Issue 24: what the bench can tell apart (intervals, paired tests), and the bench on the paper's terms."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from edgecp.errors import EdgecpError
from edgecp.eval import metrics, stats
from edgecp.eval.bench import EVAL_PROMPT, BenchConfig, preset, view_size


def toy_run(seed: int, n: int = 4, drift: float = 0.1) -> stats.RunEmbeddings:
    rng = np.random.default_rng(seed)
    real = [rng.normal(size=(6, 8)) + j for j in range(n)]
    gen = [[rng.normal(size=(5, 8)) + j + drift * (i - j) for j in range(i + 1)] for i in range(n)]
    return stats.RunEmbeddings(real, gen)


def test_column_terms_average_to_the_metrics_of_metrics_py():
    r = toy_run(0)
    m, d = metrics.mmd_matrices(r.real, r.gen)
    s = np.full(m.shape, np.nan)
    for i in range(len(r.real)):
        for j in range(i + 1):
            s[i, j] = metrics.clip_i2i(r.gen[i][j], r.real[j])
    t = stats.column_terms(r.real, r.gen)
    n = len(r.real)
    assert t["A_MMD"].mean() == pytest.approx(metrics.a_mmd(m))
    assert t["BwT_MMD"].mean() == pytest.approx(metrics.bwt_mmd(m))
    assert t["F_MMD"].mean() == pytest.approx(metrics.f_mmd(d))
    assert t["CLIP_I2I"].mean() == pytest.approx(np.nanmean(s[n - 1]))
    assert t["avg_score"].mean() == pytest.approx(metrics.average_score(s))
    assert t["avg_forgetting"].mean() == pytest.approx(metrics.average_forgetting(s))
    # KID as the run computes it (50 subsets from the run's seed)
    kid = np.mean([metrics.kid(r.gen[n - 1][j], r.real[j], subsets=50, seed=0)[0] for j in range(n)])
    assert t["KID"].mean() == pytest.approx(kid)


def test_paired_test_is_the_exact_sign_flip_distribution():
    a = np.array([0.3, -0.1, 0.5, 0.2, 0.4, 0.1, -0.2])
    b = np.zeros_like(a)
    d = a - b
    flips = [abs(np.mean(d * np.array(sg))) >= abs(d.mean()) - 1e-12 for sg in itertools.product([1, -1], repeat=len(d))]
    assert stats.paired_test(a, b) == pytest.approx(np.mean(flips))
    assert stats.paired_test(a, a) == 1.0
    with pytest.raises(ValueError, match="paired units differ"):
        stats.paired_test(a, a[:3])


def test_intervals_hold_the_estimate_and_narrow_with_more_seeds():
    one = stats.intervals([toy_run(0)], replicates=200)
    three = stats.intervals([toy_run(0), toy_run(1), toy_run(2)], replicates=200)
    point = stats.column_terms(toy_run(0).real, toy_run(0).gen)["A_MMD"].mean()
    lo, hi = one["A_MMD"]
    assert lo <= point <= hi
    assert three["A_MMD"][1] - three["A_MMD"][0] < hi - lo
    assert stats.intervals([toy_run(0)], replicates=200) == one  # a fixed generator: the same interval again


def test_a_clear_difference_is_significant_and_noise_is_not():
    runs = [toy_run(s) for s in range(3)]
    worse = [stats.RunEmbeddings(r.real, [[g + 1.5 for g in row] for row in r.gen]) for r in runs]
    row = stats.compare_terms(stats.paired_terms(worse), stats.paired_terms(runs))
    assert row["A_MMD"]["significant"] and not row["A_MMD"]["better"] and row["A_MMD"]["diff"] > 0
    same = stats.compare_terms(stats.paired_terms(runs), stats.paired_terms(runs))
    assert not same["A_MMD"]["significant"]


def test_the_bench_writes_intervals_and_marks(small_bench):
    result, out = small_bench
    st = result["statistics"]
    assert set(st["intervals"]) == {"lora-sequential", "ewc-dc"}
    for m, iv in st["intervals"].items():
        lo, hi = iv["A_MMD"]
        assert lo <= result["summary"][m]["A_MMD"]["mean"] <= hi
    assert "ewc-dc" in st["tests"]["lora-sequential"] and 0 <= st["tests"]["lora-sequential"]["ewc-dc"]["A_MMD"]["p"] <= 1
    table = (out / "table.md").read_text()
    assert "bootstrap interval" in table and "paired sign-flip test" in table and " [" in table
    assert json.loads((out / "results.json").read_text())["statistics"]["confidence"] == 0.95


def test_the_paper_preset_is_000s_evaluation():
    p = preset("paper")
    assert (p.sampler, p.gen_steps, p.n_gen) == ("ddpm", 50, 400)  # 000 Sec. 4: "DDPM ... 50 ... 400 images"
    assert p.steps is None  # each method its paper's iterations (000: 1000, 001: 850)
    assert EVAL_PROMPT.format("cat") == "a photo of a <cat>"  # 000 Sec. 4: "a photo of a V*"
    assert view_size(BenchConfig()) == 64  # the tiny base's training resolution
    with pytest.raises(EdgecpError, match="--sampler 'euler' is unknown"):
        BenchConfig(sampler="euler")
    with pytest.raises(EdgecpError, match="threads 0 is out of range"):
        BenchConfig(threads=0)


def test_torch_threads_are_restored_after_a_run():
    import torch

    from edgecp.eval.executor import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_bench_train_overrides_travel_in_the_config(tmp_path, capsys):
    from dataclasses import asdict

    from cli_util import run_cli

    from edgecp.eval.executor import config_from_dict

    cfg = BenchConfig(train={"lr": 3e-4})
    assert config_from_dict(json.loads(json.dumps(asdict(cfg)))).train == {"lr": 3e-4}  # saved and resumed as given
    code, out, err = run_cli(capsys, "bench", "--preset", "paper", "--sequence", str(tmp_path / "none"),
                             "--features", "tiny", "--train", "lr", "--estimate")
    assert code != 0 and "--train" in err and "lr" in err  # not key=value: one line naming it
