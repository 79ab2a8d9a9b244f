"""The consolidation math on hand-built tensors and a tiny UNet: no store, no training."""

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from edgecp.adapters import lora
from edgecp.consolidation.clora import clora_penalty
from edgecp.consolidation.dc_scores import dc_forward, dc_scores, sample_subset, trial
from edgecp.consolidation.distill import cross_entropy, dsc_loss
from edgecp.consolidation.ewc import FisherAccumulator, dc_ewc_loss, ewc_penalty, online_fisher


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    ).eval()


def test_batched_dc_scores_equal_a_per_concept_loop_of_eq3(unet):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    text = torch.randn(5, 6, 8, generator=g)  # k = 5 concepts
    t, noise = trial(x0, 1000, g)
    calls = []

    def predict(x, tt, c):
        calls.append(x.shape[0])
        return unet(x, tt, c).sample

    with torch.no_grad():
        err, eps = dc_forward(predict, sched, x0, text, t, noise)
        assert calls == [15]  # ONE UNet call on B*k rows
        xt = sched.add_noise(x0, noise, t)
        for i in range(5):  # Eq. 3 concept by concept, same (t, eps) per image
            eps_i = unet(xt, t, text[i].expand(3, -1, -1)).sample
            e_i = ((noise - eps_i) ** 2).mean(dim=(1, 2, 3))
            torch.testing.assert_close(err[:, i], e_i, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(eps[:, i], eps_i, rtol=1e-5, atol=1e-5)
    p = dc_scores(err, tau=1.0)
    torch.testing.assert_close(p.sum(-1), torch.ones(3))
    assert torch.equal(p.argmax(-1), err.argmin(-1))  # the lowest error is the most likely concept


def test_subset_is_drawn_without_replacement():
    g = torch.Generator().manual_seed(0)
    for n_prev in (0, 1, 3, 50):
        s = sample_subset(n_prev, k=5, generator=g)
        assert len(s) == min(3, n_prev) and len(set(s)) == len(s) and all(0 <= i < n_prev for i in s)


def _lora_linear():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("attn2", torch.nn.Module())
    model.attn2.add_module("to_k", torch.nn.Linear(4, 3))
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["attn2.to_k"], init_lora_weights=False), model)
    return model


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_reaches_only_adapter_parameters():
    model = _lora_linear()
    params = lora.adapter_parameters(model)
    assert set(params) == {"attn2.to_k.lora_A.weight", "attn2.to_k.lora_B.weight"}
    anchor = {k: v.detach().clone() for k, v in params.items()}
    fisher = {k: torch.rand_like(v) for k, v in params.items()}
    assert ewc_penalty(params, anchor, fisher, 1e6).item() == 0.0
    with torch.no_grad():
        params["attn2.to_k.lora_A.weight"] += 0.1
    pen = ewc_penalty(params, anchor, fisher, 1e6)
    expected = 1e6 * (fisher["attn2.to_k.lora_A.weight"] * 0.01).sum()
    torch.testing.assert_close(pen, expected)
    pen.backward()
    assert params["attn2.to_k.lora_A.weight"].grad.abs().sum() > 0
    assert model.attn2.to_k.base_layer.weight.grad is None
    assert ewc_penalty(params, anchor, fisher, 0.0).item() == 0.0  # a zero weight gives the plain loss


def test_dc_ewc_loss_is_eq5_and_reduces_to_the_denoising_loss_at_delta_zero():
    err = torch.tensor([[0.5, 0.2, 0.9], [0.4, 0.3, 0.1]])
    log_p = torch.log_softmax(-err, dim=-1)
    assert dc_ewc_loss(err, log_p, current=1, delta=0.0) == err[:, 1].mean()
    sign = torch.tensor([-1.0, 1.0, -1.0])
    expected = err[:, 1].mean() + 0.5 * ((-log_p) * sign).sum(1).mean()
    torch.testing.assert_close(dc_ewc_loss(err, log_p, current=1, delta=0.5), expected)


def test_online_fisher_sum_update():
    f1 = {"a": torch.tensor([1.0, 2.0])}
    f2 = {"a": torch.tensor([3.0, 5.0])}
    assert torch.equal(online_fisher(None, f1, 0.9, "sum")["a"], f1["a"])
    torch.testing.assert_close(online_fisher(f1, f2, 0.5, "sum")["a"], torch.tensor([3.5, 6.0]))


def test_online_fisher_default_is_the_running_average_over_tasks():
    """000 App. I: one set of FIM weights, updated by a running average over tasks: after n tasks, F is the plain
    mean of F_1..F_n (checked against the mean of the stacked per-task Fishers)."""
    per_task = [{"a": torch.rand(5) * 10 ** i} for i in range(4)]
    f = None
    for n, f_n in enumerate(per_task):
        f = online_fisher(f, f_n, tasks_before=n)
        torch.testing.assert_close(f["a"], torch.stack([p["a"] for p in per_task[: n + 1]]).mean(0))
    with pytest.raises(ValueError, match="fisher update"):
        online_fisher(f, per_task[0], update="max")


def test_fisher_is_the_mean_squared_gradient_and_keeps_no_graph():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    acc = FisherAccumulator({"w": w})
    xs = [torch.tensor([1.0, 3.0]), torch.tensor([2.0, -1.0])]
    for x in xs:  # the phases hand in each iteration's gradients (dc_scores.dc_grad); grad = 2 (w.x) x
        acc.add_grads(torch.autograd.grad((w * x).sum() ** 2, [w]))
    expected = sum((2 * (w.detach() @ x) * x) ** 2 for x in xs) / 2
    torch.testing.assert_close(acc.mean()["w"], expected)
    assert w.grad is None  # autograd.grad: nothing accumulated on the parameter


def test_clora_penalty_is_zero_on_disjoint_spots_and_positive_on_shared_ones():
    occupied = {"m": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    assert clora_penalty(occupied, {"m": torch.tensor([[0.0, 2.0], [3.0, 4.0]])}, 1e8).item() == 0.0
    pen = clora_penalty(occupied, {"m": torch.tensor([[0.5, 2.0], [3.0, 4.0]])}, 1e8)
    assert pen.item() == pytest.approx(1e8 * 0.25)
    assert clora_penalty(occupied, {"m": torch.ones(2, 2)}, 0.0).item() == 0.0


def test_dsc_loss_is_eq6():
    g = torch.Generator().manual_seed(0)
    p_n, p_j = torch.softmax(torch.randn(2, 3, generator=g), -1), torch.softmax(torch.randn(2, 3, generator=g), -1)
    log_p_s = torch.log_softmax(torch.randn(2, 3, generator=g), -1)
    e = [torch.randn(2, 4, 2, 2, generator=g) for _ in range(4)]
    got = dsc_loss(p_n, p_j, log_p_s, e[0], e[1], e[2], e[3], gamma=0.1, lam=1.5)
    h = lambda a, b: -(a * b).sum(-1).mean()  # noqa: E731
    expected = 0.1 * (h(p_n, log_p_s) + h(p_j, log_p_s)) + 1.5 * (((e[0] - e[2]) ** 2).mean() + ((e[1] - e[3]) ** 2).mean())
    torch.testing.assert_close(got, expected)
    # the cross-entropy is smallest when the student matches the teacher
    assert cross_entropy(p_n, p_n.log()) < cross_entropy(p_n, log_p_s)


def test_concatenated_task_loras_sum_their_deltas_and_split_back():
    g = torch.Generator().manual_seed(0)
    tasks = [{"m.lora_A.weight": torch.randn(2, 5, generator=g), "m.lora_B.weight": torch.randn(3, 2, generator=g)}
             for _ in range(3)]
    w = [1 / 3, 1 / 3, 1 / 3]
    merged = lora.concat_loras(tasks, w)
    assert merged["m.lora_A.weight"].shape == (6, 5) and merged["m.lora_B.weight"].shape == (3, 6)
    expected = sum(wi * lora.lora_delta(t, 2.0)["m"] for wi, t in zip(w, tasks))
    torch.testing.assert_close(lora.lora_delta(merged, 2.0)["m"], expected)
    back = lora.split_lora(merged, 2, w)
    for a, b in zip(back, tasks):
        torch.testing.assert_close(a["m.lora_B.weight"], b["m.lora_B.weight"])
        assert torch.equal(a["m.lora_A.weight"], b["m.lora_A.weight"])
