"""Issue 10: the paper's method as the default, and the paper-faithful pieces it rests on.

Math is checked against independent references (a KKT system solved directly, hand-computed cases); behaviour on
tiny stores (two concepts, a few steps).
"""

import json

import pytest
import torch
from cli_util import run_cli
from conftest import make_photos, new_store
from safetensors.torch import load_file

from edgecp.consolidation.clora import clora_penalty, occupied_norm, relative_penalty
from edgecp.consolidation.dc_scores import dc_errors, dc_scores, entropy
from edgecp.consolidation.merge import constrained_merge, merge_targets, regulariser_covariance
from edgecp.errors import EdgecpError
from edgecp.train import add_concept


# -- the math -------------------------------------------------------------------------------------------------
def test_dc_sum_reduction_is_eq3_squared_norm_and_mean_is_it_over_d():
    target = torch.randn(2, 4, 3, 3)
    eps_hat = torch.randn(2, 5, 4, 3, 3)
    loop = torch.tensor([[float(((target[b] - eps_hat[b, i]) ** 2).sum()) for i in range(5)] for b in range(2)])
    torch.testing.assert_close(dc_errors(target, eps_hat, "sum"), loop)
    torch.testing.assert_close(dc_errors(target, eps_hat, "mean"), loop / 36)
    with pytest.raises(ValueError, match="DC reduction"):
        dc_errors(target, eps_hat, "max")


def test_entropy_of_dc_scores_by_hand():
    p = torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    torch.testing.assert_close(entropy(p), torch.tensor([1.0986123, 0.0, 0.6931472]))
    # the same errors, sharper under the sum reading: mean errors 0.40/0.41/0.42 over D = 1024 elements
    err_mean = torch.tensor([[0.40, 0.41, 0.42]])
    assert entropy(dc_scores(err_mean, 0.05)) > 1.0  # near uniform (000's teachers must be low-entropy)
    assert entropy(dc_scores(err_mean * 1024, 0.05)) < 1e-3


def _kkt_merge(targets, feats, reg):
    """Reference: the equality-constrained least squares solved as one KKT linear system, row by row of W.

    min_w w^T R w  s.t.  C w = t  (w: one row of W - W0)  <=>  [[2R, C^T], [C, 0]] [w; mu] = [0; t]."""
    c = torch.cat(feats).double()
    t = torch.cat(targets, dim=1).double()
    s, d = c.shape
    kkt = torch.zeros(d + s, d + s, dtype=torch.float64)
    kkt[:d, :d] = 2 * reg.double()
    kkt[:d, d:] = c.T
    kkt[d:, :d] = c
    rhs = torch.cat([torch.zeros(t.shape[0], d, dtype=torch.float64), t], dim=1).T
    return torch.linalg.solve(kkt, rhs)[:d].T


def test_constrained_merge_equals_the_kkt_solution_and_keeps_each_concept_s_values():
    g = torch.Generator().manual_seed(0)
    d_in, d_out = 12, 7
    feats = [torch.randn(3, d_in, generator=g), torch.randn(2, d_in, generator=g)]
    deltas = [torch.randn(d_out, d_in, generator=g) for _ in feats]
    x_reg = torch.randn(40, d_in, generator=g)
    reg = regulariser_covariance(x_reg)
    targets = [merge_targets(dw, f) for dw, f in zip(deltas, feats)]
    merged = constrained_merge(targets, feats, reg)
    torch.testing.assert_close(merged.double(), _kkt_merge(targets, feats, reg), atol=1e-5, rtol=1e-5)
    for dw, f in zip(deltas, feats):  # W C_i^T = W_i C_i^T: each concept's K/V values are those it trained
        torch.testing.assert_close(merged @ f.T, dw @ f.T, atol=1e-4, rtol=1e-4)


def test_constrained_merge_of_one_concept_with_identity_regulariser_is_the_row_space_projection():
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, 6, generator=g)
    dw = torch.randn(3, 6, generator=g)
    projection = c.T @ torch.linalg.inv(c @ c.T) @ c  # by hand: the closest W (Frobenius) with W c^T = dW c^T
    merged = constrained_merge([merge_targets(dw, c)], [c], torch.eye(6))
    torch.testing.assert_close(merged, dw @ projection, atol=1e-5, rtol=1e-5)


def test_relative_clora_penalty_costs_strength_times_loss_for_an_update_as_large_as_the_earlier_ones():
    occ = {"a": torch.rand(4, 5) + 0.1, "b": torch.rand(3, 2) + 0.1}
    norm = occupied_norm(occ)
    same = relative_penalty(occ, occ, 2.0, 0.25, norm)
    torch.testing.assert_close(same, torch.tensor(0.5, dtype=same.dtype))
    half = {k: 0.5 * v for k, v in occ.items()}  # quadratic in the update
    torch.testing.assert_close(relative_penalty(occ, half, 2.0, 0.25, norm), torch.tensor(0.125, dtype=same.dtype))
    scaled = {k: 10 * v for k, v in occ.items()}  # scale-free: earlier updates 10x larger, the same relative cost
    torch.testing.assert_close(relative_penalty(scaled, scaled, 2.0, 0.25, occupied_norm(scaled)), same)
    assert clora_penalty(scaled, scaled, 1.0) > 1000 * clora_penalty(occ, occ, 1.0)  # the absolute form is not


# -- the methods on tiny stores ------------------------------------------------------------------------------
def _two(tmp_path, method, name, **params):
    root = tmp_path / name
    new_store(root, method=method, method_params=params, train={"steps": 1})
    for i, c in enumerate(["aa", "bb"]):
        add_concept(root, c, make_photos(tmp_path / "photos" / c, seed=i), class_word="dog")
    return root


def test_online_ewc_default_averages_where_the_sum_reading_adds(tmp_path):
    """Task 2 trains against F_1 in both readings (identical runs), so after it sum = F_1 + F_2 = 2 x mean."""
    mean = _two(tmp_path, "lora-ewc", "mean")
    summed = _two(tmp_path, "lora-ewc", "sum", fisher_update="sum")
    fm = load_file(str(mean / "versions" / "v0002" / "fisher.safetensors"))
    fs = load_file(str(summed / "versions" / "v0002" / "fisher.safetensors"))
    for k in fm:
        torch.testing.assert_close(fs[k], 2 * fm[k], rtol=1e-4, atol=1e-12)
    info = json.loads((mean / "versions" / "v0002" / "manifest.json").read_text())["ewc"]
    assert info["tasks"] == 2 and info["update"] == "mean" and info["fisher"] == "normalised"
    # the normalisation: F~ = F * b * D / L, with the loss L measured in the same Fisher phase
    assert info["scale"] == pytest.approx(4 * 4 * 16 * 16 / info["loss"], rel=1e-4)  # loss rounded to 6 digits


def test_absolute_ewc_weight_keeps_the_raw_fisher(tmp_path):
    root = tmp_path / "abs"
    new_store(root, method="lora-ewc", method_params={"ewc_weight": 1e6}, train={"steps": 2})
    add_concept(root, "aa", make_photos(tmp_path / "p", seed=0), class_word="dog")
    info = json.loads((root / "versions" / "v0001" / "manifest.json").read_text())["ewc"]
    assert info["fisher"] == "raw" and info["scale"] == 1.0


def test_bench_names_the_class_only_for_cd_ti_and_cns_by_default():
    from edgecp.eval.bench import BenchConfig, uses_class_word

    paper = BenchConfig(methods=("lora-sequential",))
    # 000 Sec. 4: "For CD and TI, we additionally include the concept name"; 003's prompts: "A <new3> dog"
    assert [uses_class_word(paper, m) for m in ("custom-diffusion", "cd-ewc", "textual-inversion", "cns")] == [True] * 4
    assert [uses_class_word(paper, m) for m in ("lora-sequential", "dsc-ewc-dc", "c-lora")] == [False] * 3
    assert uses_class_word(BenchConfig(methods=("lora-sequential",), class_word="always"), "lora-sequential")
    with pytest.raises(EdgecpError, match="--class-word 'sometimes'"):
        BenchConfig(class_word="sometimes")
    with pytest.raises(EdgecpError, match="not among the bench's methods"):
        BenchConfig(methods=("c-lora",), method_params={"ewc-dc": {"ewc_strength": 2}})


def test_a_concept_without_class_word_starts_from_its_init_word(tmp_path):
    root = tmp_path / "s"
    new_store(root, train={"steps": 1})
    m = add_concept(root, "aa", make_photos(tmp_path / "p"), init_word="dog")
    entry = m["concepts"][0]
    assert entry["class_word"] is None and entry["init_word"] == "dog" and entry["prompt"] == "a photo of a <aa>"


def test_init_defaults_to_the_paper_method_and_says_so(tmp_path, capsys):
    code, out, err = run_cli(capsys, "init", tmp_path / "s", "--base", "tiny")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "store.json").read_text())["method"]["name"] == "dsc-ewc-dc"
    assert "method dsc-ewc-dc (the default" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "init", tmp_path / "t", "--base", "tiny", "--method", "c-lora")
    assert code == 0 and "(the default" not in out


def test_real_bases_get_the_paper_prior_set_and_old_stores_keep_their_sampler():
    from edgecp.config import PriorConfig, stored_prior
    from edgecp.priors import prior_key

    p = PriorConfig()
    assert (p.num_images, p.sampler, p.steps, p.prompt) == (200, "ddpm", 50, "a photo of a person")
    old = {"prompt": "a photo", "num_images": 8, "steps": 10, "guidance": 7.5}  # a store.json from before
    assert stored_prior(old).sampler == "base"
    assert prior_key("x", stored_prior(old), 64) != prior_key("x", stored_prior({**old, "sampler": "ddpm"}), 64)
    with pytest.raises(EdgecpError, match="prior sampler 'euler'"):
        PriorConfig(sampler="euler")


def _phase_context(accum: int):
    import dataclasses
    import importlib.util
    from pathlib import Path

    from edgecp.adapters import lora

    spec = importlib.util.spec_from_file_location("bi", Path(__file__).parent.parent / "tools" / "bench_iterations.py")
    bi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bi)
    ctx, adapter = bi.build_context(3, 1, torch.device("cpu"))
    ctx.train = dataclasses.replace(ctx.train, grad_accum=accum)
    lora.attach(ctx.comps.unet, adapter)
    lora.set_trainable(ctx.comps.unet, True)
    return ctx, lora.adapter_parameters(ctx.comps.unet)


def test_fisher_iteration_squares_the_gradient_of_training_s_effective_batch(monkeypatch):
    """Slow-loop reference: record every batch's gradient; F = mean over iterations of (mean of the iteration's
    `grad_accum` batch gradients)^2, not the mean of the per-batch squares."""
    from edgecp.methods import phases

    ctx, params = _phase_context(accum=3)
    seen = []
    real = phases.dc_grad

    def recording(*a, **kw):
        loss, grads = real(*a, **kw)
        seen.append([g.clone() for g in grads])
        return loss, grads

    monkeypatch.setattr(phases, "dc_grad", recording)
    fisher = phases.fisher_phase(ctx, params, iterations=2, use_dc=True, k=5)
    assert len(seen) == 6  # 2 iterations x 3 batches
    differs = []
    for i, key in enumerate(params):
        per_iter = [sum(seen[b][i] for b in range(it * 3, it * 3 + 3)) / 3 for it in range(2)]
        expected = sum(g ** 2 for g in per_iter) / 2
        torch.testing.assert_close(fisher[key], expected, rtol=1e-5, atol=1e-12)
        wrong = sum(g[i] ** 2 for g in seen) / 6  # the per-batch reading
        differs.append(not torch.allclose(fisher[key], wrong))
    assert any(differs)  # (lora_A's gradient is 0 while B = 0; B's tells the readings apart)
    assert ctx.extra["fisher_loss"] > 0


def test_dsc_iteration_is_one_optimizer_step_over_the_effective_batch(monkeypatch):
    from edgecp.methods import phases

    ctx, params = _phase_context(accum=2)
    calls, steps = [], []
    real = phases.dc_grad
    monkeypatch.setattr(phases, "dc_grad", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: steps.append(1) or step(self, *a, **kw))
    pool = [{k: 0.01 * torch.randn_like(p) for k, p in params.items()} for _ in range(2)]
    phases.dsc_phase(ctx, pool, iterations=3, teacher_reduction="sum")
    assert len(calls) == 6 and len(steps) == 3
    assert 0 <= ctx.extra["dsc_teacher_entropy"] < 1.0987


def test_paper_cd_refuses_a_store_the_sequential_variant_filled(tmp_path):
    root = tmp_path / "old"
    new_store(root, method="custom-diffusion-sequential", train={"steps": 1})
    add_concept(root, "aa", make_photos(tmp_path / "p", seed=0), class_word="dog")
    info = json.loads((root / "store.json").read_text())
    info["method"]["name"] = "custom-diffusion"  # as a store made before issue 10 reads now
    (root / "store.json").write_text(json.dumps(info))
    heads = sorted(p.name for p in (root / "versions").iterdir())
    with pytest.raises(EdgecpError, match="now called custom-diffusion-sequential"):
        add_concept(root, "bb", make_photos(tmp_path / "q", seed=1), class_word="dog")
    assert sorted(p.name for p in (root / "versions").iterdir()) == heads
