"""`edgecp bench` end to end on a short sequence, with the evaluation encoder shipped beside the tiny base."""

import math

import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import SMALL_BENCH

from edgecp.eval.bench import BenchConfig, parse_methods
from edgecp.eval.executor import run_bench


def _cfg(**kw):  # features: BenchConfig's default, "tiny" (the shipped evaluator)
    return BenchConfig(**{**SMALL_BENCH, **kw})


@pytest.fixture(scope="module")
def bench_run(small_bench):
    return small_bench  # conftest.SMALL_BENCH == _cfg()


def test_bench_fills_the_matrices_and_writes_every_output(bench_run):
    result, out = bench_run
    for f in ("results.json", "results.csv", "table.md", "curves.png"):
        assert (out / f).is_file(), f
    assert len(result["runs"]) == 2
    for r in result["runs"]:
        m = r["matrices"]["M"]
        assert m[0][1] is None and all(v is not None for v in (m[0][0], m[1][0], m[1][1]))  # lower triangle
        assert (out / "runs" / f"{r['method']}-s0" / "samples.png").is_file()
        assert (out / "runs" / f"{r['method']}-s0" / "heatmaps.png").is_file()
        for k in ("KID", "A_MMD", "BwT_MMD", "CLIP_I2I", "F_MMD", "avg_score", "avg_forgetting", "DC_accuracy"):
            assert math.isfinite(r["metrics"][k]), k
        assert 0.0 <= r["metrics"]["DC_accuracy"] <= 1.0
    table = (out / "table.md").read_text()
    assert "lora-sequential" in table and "A_MMD (x1000)" in table
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("method,seed,N_param_Train")


def test_bench_is_reproducible_from_its_seed(bench_run, tmp_path):
    a = bench_run[0]["runs"][0]
    b = run_bench(_cfg(methods=("lora-sequential",)), tmp_path / "again")["runs"][0]
    assert a["method"] == b["method"] == "lora-sequential"
    assert a["matrices"] == b["matrices"] and a["metrics"] == b["metrics"]


def test_bench_errors_name_the_fix(tmp_path, capsys):
    code, _, err = run_cli(capsys, "bench", "--methods", "nope", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "unknown method 'nope'")
    code, _, err = run_cli(capsys, "bench", "--features", str(tmp_path / "missing"), "--out", tmp_path / "y",
                           "--tasks", "1")
    assert_one_line_error(code, err, "--features tiny")


def test_methods_all_names_every_registered_method():
    from edgecp.methods import method_names

    assert parse_methods("all") == tuple(method_names()) and len(parse_methods("all")) >= 18
    assert parse_methods(" lora-sequential, c-lora ,") == ("lora-sequential", "c-lora")
