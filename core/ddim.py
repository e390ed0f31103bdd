"""DDIM sampling and DDIM inversion (Song et al. 2021; inversion as in Mokady et al. 2023).

Two coordinate systems describe the same process:

* VP form (diffusers): ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``.
* σ form (k-diffusion, ComfyUI's sampler state): ``x = x0 + σ·ε`` with ``σ = √((1−ᾱ)/ᾱ)``,
  so ``x_σ = x_VP / √ᾱ = x_VP·√(1+σ²)``.

The loops work in σ form on a *denoiser* ``D(x, σ) → x̂0`` (the k-diffusion convention, which is
what ComfyUI's model wrapper returns for ε-, v- and x0-prediction models alike). In σ form the
η = 0 DDIM step is exactly an Euler step of the probability-flow ODE::

    ε̂ = (x − D(x, σ)) / σ,     x_next = D(x, σ) + σ_next·ε̂ = x + (σ_next − σ)·ε̂

The VP-form functions below (:func:`ddim_step`, :func:`ddim_inverse_step`) are the textbook
equations for ε and v models; the tests check that both forms agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoise(x, sigma) → x̂0``; ``sigma`` has one entry per batch item."""

StepCallback = Callable[[int, Tensor, Tensor], None]
"""``callback(step_index, x, denoised)``, called once per completed step (progress, cancel)."""

PREDICTION_TYPES = ("epsilon", "v_prediction")


# --------------------------------------------------------------------------------------------
# Noise-level conversions
# --------------------------------------------------------------------------------------------

def sigma_from_alpha_bar(alpha_bar: Tensor) -> Tensor:
    """σ = √((1 − ᾱ) / ᾱ)."""
    return ((1.0 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: Tensor) -> Tensor:
    """ᾱ = 1 / (1 + σ²)."""
    return 1.0 / (1.0 + sigma**2)


def vp_to_sigma_space(x_vp: Tensor, sigma: Tensor | float) -> Tensor:
    """x_σ = x_VP · √(1 + σ²); ``sigma`` a number, or a tensor that broadcasts against ``x_vp`` (one σ
    per batch item: [B, 1, 1, 1]), computed in its dtype."""
    if isinstance(sigma, Tensor):
        return x_vp * (1.0 + sigma * sigma).sqrt()
    return x_vp * math.sqrt(1.0 + float(sigma) ** 2)


def sigma_space_to_vp(x: Tensor, sigma: Tensor | float) -> Tensor:
    """x_VP = x_σ / √(1 + σ²); ``sigma`` as in :func:`vp_to_sigma_space`."""
    if isinstance(sigma, Tensor):
        return x / (1.0 + sigma * sigma).sqrt()
    return x / math.sqrt(1.0 + float(sigma) ** 2)


# --------------------------------------------------------------------------------------------
# VP form, ε and v models (reference equations)
# --------------------------------------------------------------------------------------------

def x0_and_eps(x_t: Tensor, model_output: Tensor, alpha_bar_t: float, prediction: str) -> tuple[Tensor, Tensor]:
    """Split a model output into (x̂0, ε̂).

    ε model: x̂0 = (x_t − √(1−ᾱ)·ε) / √ᾱ.
    v model (v = √ᾱ·ε − √(1−ᾱ)·x0): x̂0 = √ᾱ·x_t − √(1−ᾱ)·v,  ε̂ = √(1−ᾱ)·x_t + √ᾱ·v.
    """
    a, b = math.sqrt(alpha_bar_t), math.sqrt(1.0 - alpha_bar_t)
    if prediction == "epsilon":
        return (x_t - b * model_output) / a, model_output
    if prediction == "v_prediction":
        return a * x_t - b * model_output, b * x_t + a * model_output
    raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")


def ddim_step(
    x_t: Tensor,
    model_output: Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    prediction: str = "epsilon",
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
) -> Tensor:
    """One DDIM step t → t_prev (VP form), Song et al. eq. 12.

    σ_η = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)
    x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_η²)·ε̂ + σ_η·z
    """
    x0, eps = x0_and_eps(x_t, model_output, alpha_bar_t, prediction)
    sigma_eta = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev))
    out = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - sigma_eta**2, 0.0)) * eps
    if sigma_eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        out = out + sigma_eta * noise
    return out


def ddim_inverse_step(x_prev: Tensor, eps: Tensor, alpha_bar_prev: float, alpha_bar_t: float) -> Tensor:
    """One deterministic DDIM inversion step t_prev → t (VP form).

    x̂0 = (x_prev − √(1−ᾱ_prev)·ε̂)/√ᾱ_prev,   x_t = √ᾱ_t·x̂0 + √(1−ᾱ_t)·ε̂,
    with ε̂ the model's noise estimate (for a v model: ``x0_and_eps(...)[1]``), which Mokady et al.
    evaluate as ε(x_prev, t).
    """
    x0 = (x_prev - math.sqrt(1 - alpha_bar_prev) * eps) / math.sqrt(alpha_bar_prev)
    return math.sqrt(alpha_bar_t) * x0 + math.sqrt(1 - alpha_bar_t) * eps


# --------------------------------------------------------------------------------------------
# σ form: single steps
# --------------------------------------------------------------------------------------------

def eps_from_denoised(x: Tensor, denoised: Tensor, sigma: Tensor | float) -> Tensor:
    """ε̂ = (x − D(x, σ)) / σ."""
    return (x - denoised) / sigma


def ddim_noise_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(σ_down, σ_up) of a DDIM step in σ form.

    DDIM's σ_η divided by √ᾱ_next gives σ_up = η·σ_next·√(σ² − σ_next²)/σ (k-diffusion's ancestral
    split), and σ_down = √(σ_next² − σ_up²).
    """
    if eta == 0.0 or sigma_next == 0.0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma**2 - sigma_next**2, 0.0)) / sigma)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def ddim_step_sigma(
    x: Tensor,
    denoised: Tensor,
    sigma: float,
    sigma_next: float,
    eta: float = 0.0,
    noise: Optional[Tensor] = None,
) -> Tensor:
    """One DDIM step σ → σ_next in σ form: x_next = D + σ_down·ε̂ + σ_up·z."""
    sigma_down, sigma_up = ddim_noise_split(sigma, sigma_next, eta)
    out = denoised + sigma_down * eps_from_denoised(x, denoised, sigma)
    if sigma_up > 0:
        if noise is None:
            raise ValueError("ddim_step_sigma with eta > 0 needs a noise tensor")
        out = out + sigma_up * noise
    return out


def ddim_inverse_step_sigma(y: Tensor, eps: Tensor, sigma_lo: float, sigma_hi: float) -> Tensor:
    """Inverse DDIM step σ_lo → σ_hi: x = y + (σ_hi − σ_lo)·ε̂."""
    return y + (sigma_hi - sigma_lo) * eps


# --------------------------------------------------------------------------------------------
# σ form: loops
# --------------------------------------------------------------------------------------------

def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    return torch.full((x.shape[0],), float(sigma), device=x.device, dtype=x.dtype)


def check_sigmas(sigmas: Tensor | Sequence[float], ascending: bool) -> Tensor:
    """Validate a σ schedule (≥ 2 finite, non-negative values, strictly monotone)."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if s.numel() < 2:
        raise ValueError(f"sigmas: need at least 2 values (1 step), got {s.numel()}")
    if not torch.isfinite(s).all() or (s < 0).any():
        raise ValueError("sigmas: values must be finite and non-negative")
    diffs = s[1:] - s[:-1]
    if ascending and not (diffs > 0).all():
        raise ValueError("sigmas: an inversion schedule must be strictly increasing")
    if not ascending and not (diffs < 0).all():
        raise ValueError("sigmas: a sampling schedule must be strictly decreasing")
    return s


def sample_ddim(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    eta: float = 0.0,
    noise_fn: Optional[Callable[[int], Tensor]] = None,
    callback: Optional[StepCallback] = None,
) -> Tensor:
    """DDIM sampling along a decreasing σ schedule, starting from ``x`` at ``sigmas[0]``.

    With η > 0, ``noise_fn(i)`` gives the fixed noise z_i of step i (default: ``randn_like``).
    """
    s = check_sigmas(sigmas, ascending=False).tolist()
    for i in range(len(s) - 1):
        denoised = denoise(x, _sigma_batch(x, s[i]))
        noise = None
        if eta > 0 and s[i + 1] > 0:
            noise = noise_fn(i) if noise_fn is not None else torch.randn_like(x)
        x = ddim_step_sigma(x, denoised, s[i], s[i + 1], eta, noise)
        if callback is not None:
            callback(i, x, denoised)
    return x


@dataclass
class InversionResult:
    """Output of :func:`invert_ddim`.

    ``trajectory[k]`` is the latent at ``sigmas_sampling[k]`` in *sampling* order: index 0 is x_T
    (the most noisy point, where sampling starts), index N the input latent.
    """

    latent: Tensor
    trajectory: list[Tensor]
    sigmas_sampling: Tensor
    fixed_point_residuals: list[float]
    """Relative change ‖x⁽ᴿ⁾ − x⁽ᴿ⁻¹⁾‖/‖x⁽ᴿ⁾‖ of the last refinement iteration of each step (0 without refinement)."""


FIRST_GUESSES = ("current", "target")


def check_refine_iterations(refine_iterations: int) -> int:
    """Fixed-point updates per inverse step: R ≥ 0 (R = 0: the plain inverse step)."""
    if refine_iterations < 0:
        raise ValueError(f"refine_iterations must be ≥ 0, got {refine_iterations}")
    return refine_iterations


def invert_ddim(
    denoise: Denoiser,
    x0: Tensor,
    sigmas: Tensor | Sequence[float],
    refine_iterations: int = 0,
    callback: Optional[StepCallback] = None,
    keep_trajectory: bool = True,
    first_guess: str = "current",
) -> InversionResult:
    """DDIM inversion along an *increasing* σ schedule (the sampling schedule flipped).

    Each step solves the implicit equation that makes the η = 0 DDIM step exactly reversible::

        x = y + (σ_hi − σ_lo)·ε̂(x, σ_hi)          (y: latent at σ_lo, x: unknown latent at σ_hi)

    The first guess is x⁽⁰⁾ = y + (σ_hi − σ_lo)·ε̂(y, σ_g), with the model evaluated on the known
    latent at σ_g = σ_lo (``"current"``: Song et al. / diffusers, and the stock FlipSigmas route)
    or σ_g = σ_hi (``"target"``: Mokady et al.'s ε(x_{t−1}, t)); the first step, from σ = 0, always
    uses σ_hi, so the model is never evaluated at σ = 0. Each refinement iteration is one
    fixed-point update x⁽ᵏ⁺¹⁾ = y + (σ_hi − σ_lo)·ε̂(x⁽ᵏ⁾, σ_hi), which converges to the same
    exact inverse from either guess. Cost: (1 + refine_iterations) model calls per step.
    """
    if first_guess not in FIRST_GUESSES:
        raise ValueError(f"first_guess must be one of {FIRST_GUESSES}, got {first_guess!r}")
    check_refine_iterations(refine_iterations)
    s = check_sigmas(sigmas, ascending=True).tolist()
    y = x0
    trajectory = [y] if keep_trajectory else []
    residuals = []  # kept on the device: a host sync per step would stall the GPU queue
    for i in range(len(s) - 1):
        lo, hi = s[i], s[i + 1]
        sig = _sigma_batch(y, hi)
        at = hi if (first_guess == "target" or lo == 0.0) else lo
        denoised = denoise(y, _sigma_batch(y, at))
        x = ddim_inverse_step_sigma(y, eps_from_denoised(y, denoised, at), lo, hi)
        residual = torch.zeros((), device=x.device)
        for _ in range(refine_iterations):
            denoised = denoise(x, sig)
            x_new = ddim_inverse_step_sigma(y, eps_from_denoised(x, denoised, hi), lo, hi)
            residual = (x_new - x).norm() / x_new.norm().clamp_min(1e-12)
            x = x_new
        residuals.append(residual)
        y = x
        if keep_trajectory:
            trajectory.append(y)
        if callback is not None:
            callback(i, y, denoised)
    trajectory.reverse()
    return InversionResult(
        latent=y,
        trajectory=trajectory,
        sigmas_sampling=torch.tensor(s[::-1], dtype=torch.float64),
        fixed_point_residuals=[float(r) for r in residuals],
    )


# --------------------------------------------------------------------------------------------
# Timestep spacing
# --------------------------------------------------------------------------------------------

def ddim_uniform_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Discrete timesteps of DDIM "uniform" spacing, most noisy first.

    t = 1, 1+c, 1+2c, … < T with c = ⌊T/steps⌋ (the rule of ComfyUI's ``ddim_uniform`` and of the
    original DDIM code). When ``steps`` does not divide T this yields more than ``steps`` values,
    exactly as the host does.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    c = max(num_train_timesteps // steps, 1)
    return list(range(1, num_train_timesteps, c))[::-1]


def ddim_uniform_sigmas(sigma_table: Tensor, steps: int) -> Tensor:
    """σ schedule of DDIM uniform spacing from a model's σ table (σ_t for t = 0…T−1), ending at 0."""
    ts = ddim_uniform_timesteps(steps, len(sigma_table))
    return torch.cat([sigma_table[ts].double(), torch.zeros(1, dtype=torch.float64)])
