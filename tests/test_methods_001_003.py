"""Papers 001 and 003 and the non-LoRA baselines: what each must (and must not) change."""

import pytest
import torch
from conftest import make_photos, new_store
from safetensors.torch import load_file

from edgecp.adapters import lora
from edgecp.consolidation.merge import magmax, max_abs_cosine, orthogonal_rows
from edgecp.model.base import load_components, resolve_base
from edgecp.personal import PersonalModel
from edgecp.store import Store
from edgecp.train import add_concept


def _run(tmp_path, method, n=3, monkeypatch=None, **params):
    root = tmp_path / method
    new_store(root, method=method, method_params=params, train={"steps": 3})
    for i in range(n):
        add_concept(root, f"c{i}", make_photos(tmp_path / "p" / str(i), seed=i), class_word="dog")
    return root


def test_orthogonal_rows_are_orthogonal_to_the_accumulated_a():
    g = torch.Generator().manual_seed(0)
    acc = torch.randn(16, 64, generator=g) + torch.randn(16, 64, generator=g)  # A_1 + A_2
    init = torch.randn(16, 64, generator=g)
    new = orthogonal_rows(acc, init)
    assert max_abs_cosine(new, acc) < 1e-4  # 001's check
    torch.testing.assert_close(new.norm(dim=1), init.norm(dim=1))  # the usual initial scale
    with pytest.raises(ValueError, match="orthogonal"):
        orthogonal_rows(torch.randn(16, 20), torch.randn(16, 20))


def test_magmax_picks_the_larger_magnitude_element_by_element():
    a = torch.tensor([[1.0, -3.0], [0.5, 0.0]])
    b = torch.tensor([[-2.0, 2.0], [0.4, -0.1]])
    assert torch.equal(magmax(a, b), torch.tensor([[-2.0, -3.0], [0.5, -0.1]]))


def test_merge_orthogonal_trains_in_directions_orthogonal_to_earlier_tasks(tmp_path, monkeypatch):
    import edgecp.methods.merging as merging

    starts = []
    real = merging.MergeOrthogonal.prepare

    def spy(self, ctx):
        real(self, ctx)
        starts.append((ctx.extra["accumulated_a"], {k: v.detach().clone() for k, v in lora.adapter_parameters(ctx.comps.unet).items()}))

    monkeypatch.setattr(merging.MergeOrthogonal, "prepare", spy)
    root = _run(tmp_path, "merge-orthogonal")
    for acc, a in starts[1:]:  # tasks 2 and 3 start orthogonal to A_1 (+ A_2)
        for m, a_acc in acc.items():
            assert max_abs_cosine(a[f"{m}.lora_A.weight"], a_acc) < 1e-4
    acc3 = load_file(str(root / "versions" / "v0003" / "accumulated_a.safetensors"))
    assert len(acc3) == len(starts[0][1]) // 2


def test_merge_reinit_weights_are_base_plus_the_sum_of_task_deltas(tmp_path, monkeypatch):
    import edgecp.methods.merging as merging

    task_deltas = []
    real = merging.MergeReinit.files

    def spy(self, ctx):
        task_deltas.append(merging.lora_weight_deltas(ctx.comps.unet, self.adapter.alpha / self.adapter.rank))
        return real(self, ctx)

    monkeypatch.setattr(merging.MergeReinit, "files", spy)
    root = _run(tmp_path, "merge-reinit")
    base = load_components(resolve_base("tiny")).unet.state_dict()
    model = PersonalModel.load(Store.open(root), device=torch.device("cpu"))
    assert not lora.has_adapter(model.comps.unet)  # nothing live: all merged
    eff = model.comps.unet.state_dict()
    for key, w in eff.items():
        expected = base[key] + sum(d[key] for d in task_deltas if key in d) if key in task_deltas[0] else base[key]
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["custom-diffusion", "cns"])
def test_custom_diffusion_and_cns_move_only_what_they_select(tmp_path, method, monkeypatch):
    masks = []
    if method == "cns":
        import edgecp.methods.cns as cns

        real = cns.Cns.consolidate

        def spy(self, ctx, progress=None):
            masks.append({k: m.clone() for k, m in ctx.extra["masks"].items()})
            return real(self, ctx, progress)

        monkeypatch.setattr(cns.Cns, "consolidate", spy)
    root = _run(tmp_path, method, n=1)
    base = load_components(resolve_base("tiny")).unet.state_dict()
    eff = PersonalModel.load(Store.open(root), device=torch.device("cpu")).comps.unet.state_dict()
    changed = {k for k in base if not torch.equal(base[k], eff[k])}
    assert changed and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in changed)
    if method == "cns":
        for k, m in masks[0].items():
            moved = base[k] != eff[k]
            assert not (moved & ~m).any()  # nothing outside the concept neurons moved
            assert m.float().mean() <= 0.3 + 1e-6  # at most the top 30% per row, minus the general neurons


@pytest.mark.parametrize("method", ["custom-diffusion", "custom-diffusion-sequential"])
def test_where_each_custom_diffusion_task_starts(tmp_path, method, monkeypatch):
    """The paper's CD trains every concept's K/V from the base's W0 and merges afterwards (Kumari et al.); the
    sequential variant continues from the weights the previous task left, W0 + version 1's base_delta. Part 3's
    loader folded the merge into CD's second task as well (its `base_changes` was the default)."""
    import edgecp.methods.custom_diffusion as cd

    starts = []
    real = cd.CustomDiffusionSequential._start_training

    def spy(self, ctx):
        real(self, ctx)
        starts.append({k: v.clone() for k, v in ctx.extra["start"].items()})

    monkeypatch.setattr(cd.CustomDiffusionSequential, "_start_training", spy)
    root = _run(tmp_path, method, n=2)
    base = load_components(resolve_base("tiny")).unet.state_dict()
    first = load_file(str(root / "versions" / "v0001" / "base_delta.safetensors"))
    assert len(starts) == 2 and starts[1].keys() == first.keys() and any(v.abs().sum() > 0 for v in first.values())
    for k, w in starts[1].items():
        expected = base[k] if method == "custom-diffusion" else base[k] + first[k]
        torch.testing.assert_close(w, expected, rtol=0, atol=1e-7)
    assert all(torch.equal(starts[0][k], base[k]) for k in starts[0])


def test_textual_inversion_leaves_the_unet_untouched(tmp_path):
    root = _run(tmp_path, "textual-inversion", n=2)
    base = load_components(resolve_base("tiny")).unet.state_dict()
    eff = PersonalModel.load(Store.open(root), device=torch.device("cpu")).comps.unet.state_dict()
    assert all(torch.equal(base[k], eff[k]) for k in base)


def test_magmax_store_holds_the_selected_adapter(tmp_path):
    root = _run(tmp_path, "magmax", n=2)
    v1 = load_file(str(root / "versions" / "v0001" / "adapter.safetensors"))
    v2 = load_file(str(root / "versions" / "v0002" / "adapter.safetensors"))
    for k in v1:  # every selected entry has at least the magnitude task 1 left there
        assert (v2[k].abs() >= v1[k].abs()).all()
