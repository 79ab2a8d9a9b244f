"""Every method end to end on the tiny model over three concepts, and what each must keep between tasks."""

import json

import numpy as np
import pytest
import torch
from cli_util import assert_one_line_error, run_cli
from conftest import make_photos, new_store
from PIL import Image
from safetensors.torch import load_file

from edgecp.adapters import lora
from edgecp.errors import EdgecpError
from edgecp.methods import method_class, method_names
from edgecp.train import add_concept

EXPECTED_FILES = {
    "lora-sequential": set(), "lora-merge": set(), "c-lora": set(), "vera-sequential": set(),
    "lora-ewc": {"fisher"}, "ewc-dc": {"fisher"}, "vera-ewc": {"fisher"}, "vera-ewc-dc": {"fisher"},
    "dsc": {"teachers"}, "dsc-ewc": {"teachers", "fisher"}, "dsc-ewc-dc": {"teachers", "fisher"},
    "custom-diffusion": {"base_delta", "cd_merge"}, "custom-diffusion-sequential": {"base_delta"}, "cd-ewc": {"base_delta", "fisher"}, "cns": {"base_delta"},
    "textual-inversion": set(), "merge-reinit": {"base_delta"}, "merge-orthogonal": {"base_delta", "accumulated_a"},
    "magmax": set(),
}
EXPORT_CHECKED = {"vera-ewc-dc", "c-lora", "merge-orthogonal"}
NO_ADAPTER = {"custom-diffusion", "custom-diffusion-sequential", "cd-ewc", "cns", "textual-inversion", "merge-reinit", "merge-orthogonal"}


# The every-method stores learn their third concept on the 8-bit plan, as a person whose budget shrank would: int8
# Linears (torchao), fp32 compute (a pinned plan: bf16 autocast is emulated on CPUs without native bf16), checkpointing,
# the DC / DSC phases over the two earlier concepts in chunks of 2. One bf16-autocast 8-bit case:
# tests/test_memory_plans.py::test_the_8bit_plan_with_autocast_trains_fp32_kv_beside_a_16bit_base.
EIGHT_BIT = {"weights": "int8", "compute": "fp32", "gradient_checkpointing": True, "dc_chunk": 2}


def _three_concepts(tmp_path, method, last_plan=None, **params):
    root = tmp_path / method
    new_store(root, method=method, method_params=params, train={"steps": 2})
    for i, name in enumerate(["aa", "bb", "cc"]):
        add_concept(root, name, make_photos(tmp_path / "photos" / name, seed=i), class_word="dog",
                    plan_force=last_plan if name == "cc" else None)
    return root


@pytest.fixture(scope="module")
def three_concepts(tmp_path_factory):
    """_three_concepts(method), the third concept on the 8-bit plan, trained once per module: c-lora's and
    lora-merge's stores serve both the every-method test and the test of what the method keeps, which only read them
    (custom-diffusion's check removes a concept: no other test reads that store)."""
    stores = {}

    def get(method):
        if method not in stores:
            stores[method] = _three_concepts(tmp_path_factory.mktemp("three"), method, last_plan=EIGHT_BIT)
        return stores[method]

    return get


@pytest.mark.parametrize("method", method_names())
def test_every_method_learns_three_concepts_and_generates(tmp_path, method, three_concepts):
    from edgecp.generate import GenerateConfig, generate_from_store

    root = three_concepts(method)
    v = root / "versions" / "v0003"
    stems = {p.name.removesuffix(".safetensors") for p in v.glob("*.safetensors")}
    assert stems == {"tokens"} | ({"adapter"} if method not in NO_ADAPTER else set()) | EXPECTED_FILES[method]
    manifest = json.loads((v / "manifest.json").read_text())
    assert [c["name"] for c in manifest["concepts"]] == ["aa", "bb", "cc"]
    plans = [c["memory"]["plan"] for c in manifest["concepts"]]
    assert [(p["weights"], p["backend"], p["compute"]) for p in plans] == [("fp32", None, "fp32")] * 2 + [
        ("int8", "torchao", "fp32")]  # the third on the 8-bit base
    n = manifest["n_param"]
    assert (0 < n["train_pct"] < 100 and n["store_pct"] > 100) or (method == "textual-inversion" and n["store_pct"] == 100)
    for fname in v.glob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(str(fname)).values()), fname.name
    if "fisher" in stems:
        fisher = load_file(str(v / "fisher.safetensors"))
        assert sum(f.sum() for f in fisher.values()) > 0 and all((f >= 0).all() for f in fisher.values())
    if "teachers" in stems:  # one consolidated adapter per task: the DSC teacher pool
        tasks = {k.split("/")[0] for k in load_file(str(v / "teachers.safetensors"))}
        assert tasks == {"t0001", "t0002", "t0003"}
    files = generate_from_store(root, "a photo of <aa> dog. Posing with <cc> dog", GenerateConfig(n=1, steps=2), tmp_path / "o")
    assert np.asarray(Image.open(files[0])).std() > 0
    if method == "cns":
        check_cns(root)
    if method == "custom-diffusion":
        check_paper_cd(root)
    if method in EXPORT_CHECKED:  # one per way of storing the model: VeRA, concatenated LoRAs, weight deltas
        from edgecp.export.onnx_export import export_onnx

        report = export_onnx(root, "cpu-fp32", tmp_path / "onnx")
        assert all(r["max_abs_diff"] < 1e-4 for r in report["models"].values())


def test_clora_keeps_earlier_task_loras_frozen_and_stacked(three_concepts):
    root = three_concepts("c-lora")
    v1 = load_file(str(root / "versions" / "v0001" / "adapter.safetensors"))
    v3 = load_file(str(root / "versions" / "v0003" / "adapter.safetensors"))
    tasks = lora.split_lora(v3, 16)
    assert len(tasks) == 3
    for k in v1:
        assert torch.equal(tasks[0][k], v1[k])  # task 1's LoRA is untouched by tasks 2 and 3
    assert json.loads((root / "versions" / "v0003" / "manifest.json").read_text())["adapter_rank"] == 48


def test_lora_merge_is_the_mean_of_the_task_deltas(three_concepts):
    root = three_concepts("lora-merge")
    v2 = load_file(str(root / "versions" / "v0002" / "adapter.safetensors"))
    v3 = load_file(str(root / "versions" / "v0003" / "adapter.safetensors"))
    t2 = lora.split_lora(v2, 16, [0.5, 0.5])
    t3 = lora.split_lora(v3, 16, [1 / 3] * 3)
    for k in t2[0]:  # re-weighting 1/2 -> 1/3 recovers the same task LoRAs
        torch.testing.assert_close(t3[0][k], t2[0][k])
    mean = sum(lora.lora_delta(t, 1.0)[m] for t in t3 for m in [lora.lora_modules(t3[0])[0]]) / 3
    torch.testing.assert_close(lora.lora_delta(v3, 1.0)[lora.lora_modules(v3)[0]], mean, rtol=1e-4, atol=1e-6)


def test_dsc_changes_the_adapter_after_training_and_ewc_penalises_from_task_two(tmp_path, monkeypatch):
    import edgecp.methods.phases as phases

    seen = {}
    real = phases.dsc_phase

    def spy(ctx, pool, iterations, **kw):
        before = lora.adapter_state(ctx.comps.unet)
        real(ctx, pool, iterations, **kw)
        after = lora.adapter_state(ctx.comps.unet)
        seen.setdefault("moved", []).append(any(not torch.equal(before[k], after[k]) for k in before))
        seen.setdefault("pool", []).append(len(pool))

    import edgecp.methods.dsc as dsc

    monkeypatch.setattr(dsc, "dsc_phase", spy)
    real_penalty = dsc.DscEwcDc.penalty

    def penalty_spy(self, ctx):
        pen = real_penalty(self, ctx)
        seen.setdefault("penalty", {}).setdefault(ctx.index, []).append(None if pen is None else pen.item())
        return pen

    monkeypatch.setattr(dsc.DscEwcDc, "penalty", penalty_spy)
    _three_concepts(tmp_path, "dsc-ewc-dc")
    assert seen["pool"] == [1, 2]  # task 1 has no teacher; then 1, 2 earlier tasks
    assert all(seen["moved"])
    assert set(seen["penalty"][1]) == {None}  # no Fisher before the first task
    assert seen["penalty"][2][0] == 0.0  # at the anchor on the first step ...
    assert seen["penalty"][2][-1] > 0.0  # ... and pulling back once the adapter moves


def test_unknown_method_hyperparameter_lists_the_valid_ones(tmp_path, capsys):
    code, _, err = run_cli(capsys, "init", tmp_path / "s", "--method", "ewc-dc", "-p", "kappa=3")
    assert_one_line_error(code, err, "unknown ewc-dc hyperparameter setting 'kappa'", "delta", "ewc_weight")
    code, _, err = run_cli(capsys, "init", tmp_path / "s", "--method", "vera-ewc", "--adapter", "lora")
    assert_one_line_error(code, err, "vera-ewc uses a vera adapter")
    assert not (tmp_path / "s").exists()


def test_vera_methods_default_to_rank_256_vera(tmp_path):
    s = new_store(tmp_path / "v", method="vera-ewc-dc")
    assert s.info["adapter"]["kind"] == "vera" and s.info["adapter"]["rank"] == 256
    assert method_class("vera-ewc-dc").adapter_kind == "vera"


def test_method_change_is_refused_once_the_store_holds_concepts(store_copy, tmp_path, capsys):
    code, _, err = run_cli(capsys, "set-method", "dsc-ewc-dc", "--store", store_copy)
    assert_one_line_error(code, err, "already holds 2 concept(s) learned with lora-sequential", "new store")
    assert json.loads((store_copy / "store.json").read_text())["method"]["name"] == "lora-sequential"
    empty = tmp_path / "empty"
    new_store(empty)
    code, out, err = run_cli(capsys, "set-method", "dsc-ewc-dc", "--store", empty, "-p", "k=4")
    assert code == 0, err
    info = json.loads((empty / "store.json").read_text())
    assert info["method"]["name"] == "dsc-ewc-dc" and info["method"]["params"]["k"] == 4
    with pytest.raises(EdgecpError, match="valid methods are"):
        method_class("magmax-x")


def test_concepts_shows_nparam(trained_store, capsys):
    code, out, _ = run_cli(capsys, "concepts", "--store", trained_store)
    assert code == 0 and "N_param Train" in out and "N_param Store" in out


def check_cns(root):
    """CNS (issue 10): the UNet moves, on at most the top 30% of each row; task 2 moves it too."""
    d1 = load_file(str(root / "versions" / "v0001" / "base_delta.safetensors"))
    d2 = load_file(str(root / "versions" / "v0002" / "base_delta.safetensors"))
    moved = [(d != 0).float().mean().item() for d in d1.values()]
    assert all(0 < m <= 0.3 + 1e-6 for m in moved), moved  # the UNet moves, on at most the top 30% per row
    assert any(not torch.equal(d1[k], d2[k]) for k in d1)  # task 2 moved it too (under L_reg on task 1's spots)
    m2 = json.loads((root / "versions" / "v0002" / "manifest.json").read_text())
    assert m2["n_param"]["train"] > 0


def check_paper_cd(root):
    """The paper's CD (issue 10): base_delta is Kumari et al.'s merge of the stored (T_i, C_i); remove-concept
    re-merges the others exactly."""
    from edgecp.lifecycle import remove_concept
    from edgecp.methods.custom_diffusion import CD_FILE, merge_all, split_cd_tasks

    v = root / "versions" / "v0003"
    tasks, reg = split_cd_tasks(load_file(str(v / CD_FILE)))
    assert len(tasks) == 3 and reg.shape == (64, 64)
    merged = load_file(str(v / "base_delta.safetensors"))
    again = merge_all(tasks, reg)
    assert merged.keys() == again.keys() and all(torch.allclose(merged[k], again[k], atol=1e-6) for k in merged)
    # each concept's K/V values on its own prompt features are (in least squares) the ones it trained
    t1 = load_file(str(root / "versions" / "v0001" / "base_delta.safetensors"))
    k = next(iter(t1))
    f1 = tasks[0]["features"]
    assert torch.allclose(tasks[0][k], t1[k].double().matmul(f1.double().T).float(), atol=1e-5)
    remove_concept(root, "bb")
    head = sorted((root / "versions").iterdir())[-1]
    left, _ = split_cd_tasks(load_file(str(head / CD_FILE)))
    assert len(left) == 2 and torch.equal(left[1]["features"], tasks[2]["features"])
    after = load_file(str(head / "base_delta.safetensors"))
    expect = merge_all([tasks[0], tasks[2]], reg)
    assert all(torch.allclose(after[k], expect[k], atol=1e-6) for k in expect)
