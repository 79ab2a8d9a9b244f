"""A numpy DDIM scheduler (eta = 0) for the on-device ONNX runtime.

Written by hand because onnxruntime ships no scheduler and the device side must import neither torch nor
diffusers. It reads the ``scheduler/scheduler_config.json`` of a diffusers / optimum Stable Diffusion folder
(whatever its ``_class_name``: the noise schedule keys are shared) and reproduces
``diffusers.DDIMScheduler`` (timesteps and ``step``) to float32 precision, defaults included.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgecp.sampling import ddim_config  # noqa: F401 (the one rule, read here by the runner)

# diffusers.DDIMScheduler's defaults: a config that omits a key behaves as it does there.
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


BETA_SCHEDULES = ("linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"scheduler config {key}={value!r} is not supported by the numpy DDIM scheduler; "
            f"use one of {', '.join(map(repr, choices))}"
        )


def linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """(n,) float32 ``torch.linspace(start, end, n)``: float32 step, two halves, one rounding per value.

    Plain ``np.linspace`` is an ulp off on some entries; this keeps the betas equal to diffusers' bit for bit.
    """
    a, b = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([a], dtype=np.float32)
    step = np.float64(np.float32((b - a) / np.float32(n - 1)))
    i = np.arange(n)
    low = (np.float64(a) + step * i).astype(np.float32)
    high = (np.float64(b) - step * (n - 1 - i)).astype(np.float32)
    return np.where(i < n // 2, low, high)


def make_betas(cfg: dict[str, Any]) -> np.ndarray:
    """The (num_train_timesteps,) float32 betas of a scheduler config, as diffusers computes them."""
    n = int(cfg["num_train_timesteps"])
    if cfg.get("trained_betas") is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    _check_choice("beta_schedule", cfg["beta_schedule"], BETA_SCHEDULES)
    start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
    if cfg["beta_schedule"] == "linear":
        return linspace_f32(start, end, n)
    return linspace_f32(start**0.5, end**0.5, n) ** 2  # scaled_linear (SD 1.x / 2.x)


def make_timesteps(cfg: dict[str, Any], num_inference_steps: int) -> np.ndarray:
    """(num_inference_steps,) int64 timesteps, descending, for the config's ``timestep_spacing``."""
    n_train = int(cfg["num_train_timesteps"])
    n = num_inference_steps
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = n_train // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + int(cfg["steps_offset"])
    _check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    ratio = n_train / n  # trailing
    return np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1


class NumpyDDIMScheduler:
    """Deterministic DDIM (eta = 0) in numpy; same results as ``diffusers.DDIMScheduler``."""

    init_noise_sigma: float = 1.0

    def __init__(self, config: dict[str, Any]):
        cfg = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
        _check_choice("prediction_type", cfg["prediction_type"], PREDICTION_TYPES)
        _check_choice("timestep_spacing", cfg["timestep_spacing"], TIMESTEP_SPACINGS)
        for flag, what in (
            ("rescale_betas_zero_snr", "zero-SNR rescaling"),
            ("thresholding", "dynamic thresholding"),
        ):
            if cfg[flag]:
                raise ValueError(
                    f"scheduler config {flag}={cfg[flag]!r}: {what} is not implemented by the numpy DDIM "
                    f"scheduler; set {flag} to false"
                )
        self.config = cfg
        self.betas = make_betas(cfg)  # (T,) float32
        alphas = 1.0 - self.betas
        # torch's float32 cumprod accumulates in double on CPU: do the same to match diffusers bit for bit
        self.alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # (T,)
        self.final_alpha_cumprod = np.float32(1.0) if cfg["set_alpha_to_one"] else self.alphas_cumprod[0]
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(0, int(cfg["num_train_timesteps"]))[::-1].copy().astype(np.int64)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> NumpyDDIMScheduler:
        """Build from a diffusers ``scheduler_config.json`` dict; unknown keys are ignored."""
        return cls(config)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Choose the inference timesteps (``self.timesteps``, int64, descending)."""
        n_train = int(self.config["num_train_timesteps"])
        if not 1 <= num_inference_steps <= n_train:
            raise ValueError(f"steps={num_inference_steps} is out of range; use 1 to {n_train} steps")
        self.num_inference_steps = int(num_inference_steps)
        self.timesteps = make_timesteps(self.config, self.num_inference_steps)

    def _alphas(self, t: int, caller: str) -> tuple[np.float32, np.float32]:
        """(alpha_cumprod at t, at the previous timestep): as diffusers, the previous timestep is t - T // steps,
        whatever the spacing."""
        if self.num_inference_steps is None:
            raise ValueError(f"{caller}() called before set_timesteps(); call set_timesteps(steps) first")
        prev_t = int(t) - int(self.config["num_train_timesteps"]) // self.num_inference_steps
        return self.alphas_cumprod[int(t)], (self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod)

    def step_coefficients(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The DDIM step from ``t`` as coefficients, for the on-device step graph (``step_graph.py``).

        Returns ((6,) float32 [p, q, r, s, sqrt(a_prev), sqrt(1 - a_prev)], (2,) float32 clip range of x0), where
        x0 = p x + q e and eps = r x + s e for sample x and model output e (per prediction type); the step is then
        sqrt(a_prev) clip(x0) + sqrt(1 - a_prev) eps. Equal to ``step`` up to float32 rounding.
        """
        a_t, a_prev = map(np.float64, self._alphas(t, "step_coefficients"))
        sa, sb = a_t**0.5, (1.0 - a_t) ** 0.5
        pq_rs = {"epsilon": (1 / sa, -sb / sa, 0.0, 1.0), "sample": (0.0, 1.0, 1 / sb, -sa / sb),
                 "v_prediction": (sa, -sb, sb, sa)}[self.config["prediction_type"]]
        coef = np.array([*pq_rs, a_prev**0.5, (1.0 - a_prev) ** 0.5], dtype=np.float32)
        r = float(self.config["clip_sample_range"]) if self.config["clip_sample"] else float(np.finfo(np.float32).max)
        return coef, np.array([-r, r], dtype=np.float32)

    def step(self, model_output: np.ndarray, t: int, sample: np.ndarray) -> np.ndarray:
        """One DDIM step from timestep ``t``: the previous sample (shape and dtype of ``sample``)."""
        a_t, a_prev = self._alphas(t, "step")
        b_t = np.float32(1.0) - a_t
        pred = self.config["prediction_type"]
        if pred == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif pred == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        prev = a_prev**0.5 * x0 + (np.float32(1.0) - a_prev) ** 0.5 * eps
        return prev.astype(sample.dtype, copy=False)
