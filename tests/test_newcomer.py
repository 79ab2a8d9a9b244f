"""What a newcomer sees (issue 27): methods in plain words, `init`'s note that the method is fixed, output that is
not a terminal (paths and timestamps whole, progress as ordered lines), generate's plan only when asked, `--store`
from $EDGECP_STORE or the current folder, the planner's working advice, the diffusers export's loading code, and
`make demo` installing `[full]` only. The CLI runs in-process (tests/cli_util.py): its output is captured, not a
terminal."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cli_util import assert_one_line_error, run_cli
from conftest import new_store

ROOT = Path(__file__).resolve().parent.parent
STAMP = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d[+-]\d{4}")  # history shows "date time"


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """A tiny-base store with no concept, at a path longer than 80 columns; tests must not change it."""
    root = tmp_path_factory.mktemp("newcomer") / ("a-folder-name-long-enough-to-be-wrapped-" * 3) / "store"
    new_store(root)
    return root


# -- methods in plain words -----------------------------------------------------------------------------------
def test_methods_say_what_each_does_and_costs_and_which_to_pick(capsys):
    from edgecp.config import DEFAULT_METHOD
    from edgecp.methods import method_class, method_names

    code, out, _ = run_cli(capsys, "methods")
    assert code == 0
    shorthand = re.compile(r"\b(Algo|App\.|Eq\.|000|001|003)\b")
    for name in method_names():
        cls = method_class(name)
        assert cls.summary and not shorthand.search(cls.summary), (name, cls.summary)  # plain words first
        assert "paper" in vars(cls) and cls.paper, name  # its own, not its parent's
        row = next(line for line in out.splitlines() if cls.summary in line)  # whole, on one line: not a terminal
        assert name in row and ("exact" if cls.removal == "exact" else "token-only or rollback") in row
        assert f"({cls.paper})" in out  # the paper's name, secondary
    assert re.search(rf"{DEFAULT_METHOD} \(default\)", out)
    exact = [n for n in method_names() if method_class(n).removal == "exact"]
    assert f"Unsure? Keep the default, {DEFAULT_METHOD}." in out
    assert all(n in out.split("Unsure?")[1] for n in exact)


def test_init_help_names_the_default_and_the_exactly_removable_methods(capsys, monkeypatch):
    from edgecp.cli.store import EXACT_REMOVAL
    from edgecp.methods import method_class, method_names

    assert set(EXACT_REMOVAL) == {n for n in method_names() if method_class(n).removal == "exact"}
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = run_cli(capsys, "init", "--help")
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split())
    assert code == 0 and "Unsure: keep the default, dsc-ewc-dc" in text
    assert f"To remove a concept exactly later: {', '.join(EXACT_REMOVAL)}" in text
    assert "Algo" not in text and "000's" not in text


def test_init_notes_that_the_method_is_fixed_once_a_concept_is_in(tmp_path, capsys):
    code, out, err = run_cli(capsys, "init", tmp_path / "s", "--base", "tiny", "--method", "lora-sequential")
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert notes == ["note: the method cannot change once the store holds a concept: `edgecp set-method` works only "
                     "before the first add-concept"]
    code, _, err = run_cli(capsys, "set-method", "lora-ewc", "--store", tmp_path / "s")  # as the note says
    assert code == 0, err
    assert "created store" in out and "note:" not in out  # stdout stays the result; the note is on stderr


# -- output that is not a terminal ----------------------------------------------------------------------------
def test_history_piped_keeps_paths_and_timestamps_whole(empty_store, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # rich would wrap at 80 there; a pipe takes what a line needs
    code, out, _ = run_cli(capsys, "history", "--store", empty_store)
    assert code == 0
    assert str(empty_store) in out and len(str(empty_store)) > 100  # one line, not split
    assert STAMP.search(out) and "…" not in out and "..." not in out


def test_history_on_a_narrow_terminal_cuts_no_timestamp(empty_store, capsys, monkeypatch):
    import edgecp.cli.lifecycle as lifecycle_cli
    from edgecp.cli.common import _Console

    screen = io.StringIO()
    monkeypatch.setattr(lifecycle_cli, "out", _Console(file=screen, force_terminal=True, width=80, soft_wrap=True))
    code, _, _ = run_cli(capsys, "history", "--store", empty_store)
    assert code == 0
    text = re.sub(r"\x1b\[[0-9;]*m", "", screen.getvalue())
    assert re.search(r"\d{4}-\d\d-\d\d\s.*\d\d:\d\d:\d\d[+-]\d{4}", text, re.S) and "…" not in text, text
    rows = [line for line in text.splitlines() if line[:1] in "┏┃┡│└"]
    assert rows and max(len(line) for line in rows) <= 80  # the table fits; the title soft-wraps, path unbroken
    assert str(empty_store) in text


def test_progress_off_a_terminal_is_plain_lines_in_order(capsys):
    from edgecp.cli.common import err, progress_bars

    with progress_bars() as bar:
        err.print("before")
        for i in range(1, 101):
            bar("train", i, 100, 0.125, metric="denoising loss (one batch)")
        err.print("between")
        bar("fisher", 1, 2, -0.5)  # positional loss, no metric: "loss"
        bar("fisher", 2, 2, -0.25)
        bar("encode", 1, 1)
    lines = capsys.readouterr().err.splitlines()
    train = [ln for ln in lines if ln.startswith("train")]
    assert lines[0] == "before" and lines[len(train) + 1] == "between"  # each line when it happened
    assert 2 <= len(train) <= 11 and train[-1].startswith("train        100/100 (100%)")
    assert all("denoising loss (one batch) 0.1250" in ln for ln in train) and "ETA" in train[len(train) // 2]
    assert [ln for ln in lines if ln.startswith("fisher")][-1].startswith("fisher       2/2 (100%)  loss -0.2500")
    assert lines[-1].startswith("encode       1/1 (100%)")


def test_progress_on_a_terminal_shows_the_metric(monkeypatch):
    import edgecp.cli.common as common

    screen = io.StringIO()
    monkeypatch.setattr(common, "err", common._Console(file=screen, force_terminal=True, width=160))
    with common.progress_bars() as bar:
        bar("fisher", 3, 3, -0.5023, metric="DC-EWC loss")
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", screen.getvalue())
    assert "DC-EWC loss -0.5023" in text and "loss -0.5023" not in text.replace("DC-EWC loss -0.5023", "")


# -- generate's plan only when asked --------------------------------------------------------------------------
def test_generate_prints_its_plan_only_with_verbose_or_a_budget(empty_store, tmp_path, capsys, monkeypatch):
    import edgecp.generate as generate
    from edgecp.planner import Plan

    def fake(store, prompt, cfg, out_dir, memory_budget=None, on_plan=None, **kw):
        budget = 4_000_000_000 if memory_budget else None  # the flag's, or (not here) the store's from init
        on_plan(Plan("cpu", "fp32", None, "fp32", False, 1, 1, 1, budget=budget, predicted={"sample": 6e8},
                     purpose="generate"))
        return [tmp_path / "0.png", tmp_path / "grid.png"]

    monkeypatch.setattr(generate, "generate_from_store", fake)
    plan = re.compile(r"^plan on cpu:", re.M)
    base = ("generate", "a photo of a dog", "--store", empty_store)
    code, out, err = run_cli(capsys, *base)
    assert code == 0 and not plan.search(out + err), out
    code, out, err = run_cli(capsys, *base, "--verbose")
    assert code == 0 and plan.search(out), out
    code, out, err = run_cli(capsys, *base, "--memory-budget", "4GB")
    assert code == 0 and plan.search(out) and "4.00 GB budget" in out, out


# -- --store from $EDGECP_STORE or the current folder ---------------------------------------------------------
def test_store_comes_from_the_environment_or_the_current_folder(empty_store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDGECP_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "history")
    assert_one_line_error(code, err, "no store given: pass --store DIR, set EDGECP_STORE, or run in a store's folder")
    assert code == 2
    code, _, err = run_cli(capsys, "generate", "a photo")
    assert_one_line_error(code, err, "no store given", "--onnx-dir DIR")
    monkeypatch.setenv("EDGECP_STORE", str(empty_store))
    code, out, err = run_cli(capsys, "verify")
    assert code == 0 and str(empty_store) in out, err
    monkeypatch.delenv("EDGECP_STORE")
    monkeypatch.chdir(empty_store)
    code, out, err = run_cli(capsys, "history", "--json")
    assert code == 0 and '"head": "v0000"' in out, err
    code, _, err = run_cli(capsys, "history", "--store", tmp_path / "nothing")  # --store still wins
    assert code != 0 and "nothing" in err
    code, _, err = run_cli(capsys, "init")  # a new store is always named
    assert code == 2 and "Missing argument" in err


# -- the planner's advice works -------------------------------------------------------------------------------
def test_a_budget_below_the_smallest_plan_suggests_commands_that_exist(empty_store, capsys):
    code, _, err = run_cli(capsys, "plan", "--store", empty_store, "--memory-budget", "0.1GB")
    assert_one_line_error(code, err, "smallest plan", "pass --memory-budget", "`edgecp init DIR --train resolution=N`")
    assert "add-concept" not in err
    lower = re.search(r"`edgecp plan --resolution (\d+)`", err)
    assert lower, err
    code, _, err2 = run_cli(capsys, "plan", "--store", empty_store, "--memory-budget", "0.1GB", "--resolution",
                            lower.group(1))  # the command it names runs (the budget may still be too small)
    assert "No such option" not in err2 and "is not" not in err2 and f"for {lower.group(1)} px" in err2


# -- the diffusers export says how to load it -----------------------------------------------------------------
def test_diffusers_export_prints_tokens_and_code_that_loads_it(trained_store, tmp_path, capsys):
    code, out, err = run_cli(capsys, "export", "--store", trained_store, "--format", "diffusers", "--out", tmp_path / "d")
    assert code == 0, err
    assert "in a prompt, write: <alpha> dog for alpha; <beta> mug for beta" in out
    code_text = out.split("load it with diffusers (Python):\n", 1)[1]
    assert "load_lora_weights" in code_text and code_text.count("load_textual_inversion") == 2
    setup = "\n".join(ln for ln in code_text.splitlines() if not ln.startswith(("image", "wrote")))
    ns: dict = {}
    exec(setup, ns)  # the printed code, as a user would paste it (without drawing 50 steps)
    pipe = ns["pipe"]
    pipe.set_progress_bar_config(disable=True)
    assert {"<alpha>", "<beta>"} <= set(pipe.tokenizer.get_vocab())
    prompt = re.search(r"image = pipe\('([^']+)'\)", code_text).group(1)
    assert prompt == "a photo of <alpha> dog"
    assert pipe(prompt, num_inference_steps=1, output_type="np").images.shape[0] == 1


# -- make demo installs [full] only ---------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_demo_installs_full_and_make_test_the_test_extra(tmp_path):
    def dry(target):
        return subprocess.run(["make", "-n", "-f", str(ROOT / "Makefile"), "-C", str(ROOT), target,
                               f"VENV={tmp_path}/venv", f"OPTIMUM={tmp_path}/opt"],
                              capture_output=True, text=True, check=True).stdout

    demo, test = dry("demo"), dry("test")
    assert '-e ".[full]"' in demo and ".[test]" not in demo and "edgecp demo" in demo
    assert '-e ".[test]"' in test and "pytest" in test
    assert ".installed-full" in demo and ".installed-test" in test
    readme = (ROOT / "README.md").read_text()
    assert "make demo    #" in readme and "make test    #" in readme
