"""DSC's loss and EWC DC's scores against slow references written from paper 000's equations as printed (issue 24):

- Eq. 3: p(c_i | x) = exp(-||eps - eps_theta(x_t, c_i, t)||^2 / tau) / sum_j exp(-||eps - eps_theta(x_t, c_j, t)||^2 / tau),
  one Monte-Carlo trial (t, eps) shared by the concepts, as 000 Sec. 3.1 ("single trial per class per minibatch");
- Eq. 5: L_ewc = L_denoise + delta * E_x[ sum_i (2 I{i=n} - 1) H(p_theta, c_i) ], H(a, b) = -a log b against the
  one-hot label c_i, i.e. -log p_i;
- Eq. 6: L_DSC = gamma (H(p_n, p_s) + H(p_j, p_s)) + lambda (L_MSE(eps_n, eps_s) + L_MSE(eps_j, eps_s)),
  L_MSE(a, b) = ||a - b||_2^2.

The references loop over images and concepts with Python floats and math.exp / math.log; nothing is shared with
edgecp's vectorised code but the toy noise predictor's outputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from edgecp.consolidation.dc_scores import dc_forward, dc_log_scores, dc_scores
from edgecp.consolidation.distill import dsc_loss
from edgecp.consolidation.ewc import dc_ewc_loss

B, K, C, H, W = 2, 3, 4, 3, 3


def toy_predictor(weight: float):
    """eps_hat(x_t, t, c): a fixed smooth function of all three, different per concept embedding."""
    def predict(x, t, c):
        return weight * torch.tanh(x * c.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000.0)
    return predict


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    sched = DDPMScheduler(num_train_timesteps=1000)
    x0 = torch.randn(B, C, H, W, generator=g)
    text = torch.randn(K, 5, 8, generator=g)
    t = torch.tensor([100, 700])
    noise = torch.randn(B, C, H, W, generator=g)
    return sched, x0, text, t, noise


def ref_errors(predict, sched, x0, text, t, noise):
    """||eps - eps_theta(x_t, c_i, t)||^2 for every image b and concept i, one by one."""
    abar = sched.alphas_cumprod
    out = []
    for b in range(B):
        a = float(abar[int(t[b])])
        xt = math.sqrt(a) * x0[b] + math.sqrt(1 - a) * noise[b]
        row = []
        for i in range(K):
            eps_hat = predict(xt[None], t[b:b + 1], text[i:i + 1])[0]
            row.append(sum(float(v) ** 2 for v in (noise[b] - eps_hat).flatten()))
        out.append(row)
    return out


def flat(rows):
    return [v for row in rows for v in row]


def ref_scores(errors, tau):
    """Eq. 3 as printed: exp(-e_i / tau) / sum_j exp(-e_j / tau) (shifted by the row's minimum: the same ratio)."""
    out = []
    for row in errors:
        m = min(row)
        ex = [math.exp(-(e - m) / tau) for e in row]
        out.append([v / sum(ex) for v in ex])
    return out


@pytest.mark.parametrize("tau", [1.0, 0.05])
def test_dc_scores_are_eq3_with_the_squared_norm(setup, tau):
    sched, x0, text, t, noise = setup
    predict = toy_predictor(1.0)
    err, _ = dc_forward(predict, sched, x0, text, t, noise, reduction="sum")
    expected = ref_errors(predict, sched, x0, text, t, noise)
    assert flat(err.tolist()) == pytest.approx(flat(expected), rel=1e-5)
    assert flat(dc_scores(err, tau).tolist()) == pytest.approx(flat(ref_scores(expected, tau)), rel=1e-4, abs=1e-9)
    # the per-element mean is Eq. 3 at tau * D: not the paper's reading at tau = 1
    mean_err, _ = dc_forward(predict, sched, x0, text, t, noise, reduction="mean")
    d = C * H * W
    assert flat(dc_scores(mean_err, tau).tolist()) == pytest.approx(flat(ref_scores(expected, tau * d)), rel=1e-4)


def test_ewc_dc_loss_is_eq5(setup):
    sched, x0, text, t, noise = setup
    predict = toy_predictor(1.0)
    current, delta, tau = 1, 0.5, 1.0
    err, _ = dc_forward(predict, sched, x0, text, t, noise, reduction="sum")
    got = float(dc_ewc_loss(err, dc_log_scores(err, tau), current=current, delta=delta))
    errors = ref_errors(predict, sched, x0, text, t, noise)
    p = ref_scores(errors, tau)
    total = 0.0
    for b in range(B):
        denoise = errors[b][current]  # L_denoise: Eq. 1's ||eps - eps_theta(x_t, c_n, t)||^2
        ce = sum((2 * (i == current) - 1) * -math.log(p[b][i]) for i in range(K))
        total += denoise + delta * ce
    assert got == pytest.approx(total / B, rel=1e-5)


def test_dsc_loss_is_eq6_with_squared_norms(setup):
    sched, x0, text, t, noise = setup
    teacher_n, teacher_j, student = toy_predictor(1.0), toy_predictor(0.7), toy_predictor(0.9)
    gamma, lam, tau_t, tau_s = 0.1, 1.5, 0.05, 1.0
    err_n, eps_n = dc_forward(teacher_n, sched, x0, text, t, noise, reduction="sum")
    err_j, eps_j = dc_forward(teacher_j, sched, x0, text, t, noise, reduction="sum")
    err_s, eps_s = dc_forward(student, sched, x0, text, t, noise, reduction="sum")
    got = float(dsc_loss(dc_scores(err_n, tau_t), dc_scores(err_j, tau_t), dc_log_scores(err_s, tau_s),
                         eps_n[:, 1], eps_j[:, 2], eps_s[:, 1], eps_s[:, 2], gamma, lam, mse_reduction="sum"))
    pn = ref_scores(ref_errors(teacher_n, sched, x0, text, t, noise), tau_t)
    pj = ref_scores(ref_errors(teacher_j, sched, x0, text, t, noise), tau_t)
    ps = ref_scores(ref_errors(student, sched, x0, text, t, noise), tau_s)
    total = 0.0
    for b in range(B):
        h = -sum(pn[b][i] * math.log(ps[b][i]) for i in range(K)) - sum(pj[b][i] * math.log(ps[b][i]) for i in range(K))
        mse_n = sum(float(v) ** 2 for v in (eps_n[b, 1] - eps_s[b, 1]).flatten())  # ||a - b||_2^2
        mse_j = sum(float(v) ** 2 for v in (eps_j[b, 2] - eps_s[b, 2]).flatten())
        total += gamma * h + lam * (mse_n + mse_j)
    assert got == pytest.approx(total / B, rel=1e-4)
    # the per-element mean (the tiny world's calibrated reading) is the same MSE divided by D
    mean = float(dsc_loss(dc_scores(err_n, tau_t), dc_scores(err_j, tau_t), dc_log_scores(err_s, tau_s),
                          eps_n[:, 1], eps_j[:, 2], eps_s[:, 1], eps_s[:, 2], 0.0, lam, mse_reduction="mean"))
    d = C * H * W
    expected_mean = sum(lam * (sum(float(v) ** 2 for v in (eps_n[b, 1] - eps_s[b, 1]).flatten())
                               + sum(float(v) ** 2 for v in (eps_j[b, 2] - eps_s[b, 2]).flatten())) / d
                        for b in range(B)) / B
    assert mean == pytest.approx(expected_mean, rel=1e-4)
