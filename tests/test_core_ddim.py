"""CPU tests of core/ddim.py: the DDIM equations, both coordinate systems, and inversion."""
import math

import pytest
import torch

from comfyui_disentangle.core import ddim
from comfyui_disentangle.tests.core_helpers import SIGMAS, TinyEpsNet, denoiser_from_eps


def test_sigma_alpha_bar_round_trip():
    ab = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    assert torch.allclose(ddim.alpha_bar_from_sigma(ddim.sigma_from_alpha_bar(ab)), ab)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_vp_step_equals_sigma_step(prediction, eta):
    """The VP-form DDIM step and the σ-form step are the same map: x_σ = x_VP·√(1+σ²)."""
    g = torch.Generator().manual_seed(1)
    x_vp = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    out = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    z = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t, t_prev = 801, 601
    s, s_prev = float(SIGMAS[t]), float(SIGMAS[t_prev])
    ab, ab_prev = 1 / (1 + s**2), 1 / (1 + s_prev**2)

    x_prev_vp = ddim.ddim_step(x_vp, out, ab, ab_prev, prediction, eta, z)

    x0, _ = ddim.x0_and_eps(x_vp, out, ab, prediction)
    x_sigma = ddim.vp_to_sigma_space(x_vp, s)
    x_prev_sigma = ddim.ddim_step_sigma(x_sigma, x0, s, s_prev, eta, z)
    assert torch.allclose(ddim.sigma_space_to_vp(x_prev_sigma, s_prev), x_prev_vp, atol=1e-12)


def test_v_prediction_split_is_consistent():
    """v = √ᾱ·ε − √(1−ᾱ)·x0 is inverted exactly by x0_and_eps."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 3, generator=g, dtype=torch.float64), torch.randn(2, 3, generator=g, dtype=torch.float64)
    ab = 0.3
    x_t = math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps
    v = math.sqrt(ab) * eps - math.sqrt(1 - ab) * x0
    x0_hat, eps_hat = ddim.x0_and_eps(x_t, v, ab, "v_prediction")
    assert torch.allclose(x0_hat, x0) and torch.allclose(eps_hat, eps)


def test_vp_inverse_step_matches_sigma_inverse_step():
    g = torch.Generator().manual_seed(3)
    y_vp, eps = torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64)
    s_lo, s_hi = float(SIGMAS[201]), float(SIGMAS[401])
    x_vp = ddim.ddim_inverse_step(y_vp, eps, 1 / (1 + s_lo**2), 1 / (1 + s_hi**2))
    x_sigma = ddim.ddim_inverse_step_sigma(ddim.vp_to_sigma_space(y_vp, s_lo), eps, s_lo, s_hi)
    assert torch.allclose(ddim.vp_to_sigma_space(x_vp, s_hi), x_sigma, atol=1e-12)


def test_sigma_step_reduces_to_euler_and_ancestral_split():
    x, d = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    s, s_next = 3.0, 1.5
    assert torch.allclose(ddim.ddim_step_sigma(x, d, s, s_next), x + (s_next - s) * (x - d) / s)
    down, up = ddim.ddim_noise_split(s, s_next, 1.0)
    assert math.isclose(down**2 + up**2, s_next**2)
    assert math.isclose(up, s_next * math.sqrt(s**2 - s_next**2) / s)  # k-diffusion's ancestral σ_up at η = 1
    assert ddim.ddim_noise_split(s, 0.0, 1.0) == (0.0, 0.0)


def _schedule(steps):
    return ddim.ddim_uniform_sigmas(SIGMAS, steps)


@pytest.mark.parametrize("first_guess, refine", [("target", 0), ("current", 1)])
def test_invert_then_sample_is_exact_for_eps_constant_in_x(first_guess, refine):
    """ε̂ independent of x (it may depend on σ): the guess at the target level solves the implicit
    step equation at once; from the current level, one refinement iteration does."""
    c = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    denoise = denoiser_from_eps(lambda x, s: c.expand_as(x) * (1 + s))
    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    sig = _schedule(10)
    inv = ddim.invert_ddim(denoise, x0, sig.flip(0), refine_iterations=refine, first_guess=first_guess)
    rec = ddim.sample_ddim(denoise, inv.latent, sig)
    assert torch.allclose(rec, x0, atol=1e-10, rtol=0)
    assert torch.allclose(inv.trajectory[-1], x0) and len(inv.trajectory) == 11
    assert torch.equal(inv.sigmas_sampling, sig)


def test_current_level_guess_without_refinement_is_not_exact_for_sigma_dependent_eps():
    c = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    denoise = denoiser_from_eps(lambda x, s: c.expand_as(x) * (1 + s))
    x0 = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    sig = _schedule(10)
    rec = ddim.sample_ddim(denoise, ddim.invert_ddim(denoise, x0, sig.flip(0)).latent, sig)
    assert float((rec - x0).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="first_guess"):
        ddim.invert_ddim(denoise, x0, sig.flip(0), first_guess="middle")


def test_invert_then_sample_is_exact_for_linear_eps_with_refinement():
    """ε̂ = a(σ)·x + b(σ): the fixed point is the exact inverse; refinement converges to it."""
    b = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    denoise = denoiser_from_eps(lambda x, s: 0.2 * x / (1 + s**2).sqrt() + b)
    x0 = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    sig = _schedule(10)
    errors = {}
    for r in (0, 2, 40):
        inv = ddim.invert_ddim(denoise, x0, sig.flip(0), refine_iterations=r)
        rec = ddim.sample_ddim(denoise, inv.latent, sig)
        errors[r] = float((rec - x0).abs().max())
    assert errors[40] < 1e-9
    assert errors[2] < errors[0]
    assert errors[0] > 1e-4  # without refinement the approximation error is visible


def test_inversion_round_trip_small_random_network():
    """A nonlinear, strongly σ-dependent network. Stated tolerances (max abs error, latent std 1):
    plain inversion ≤ 0.3 at 50 steps and better than at 10 steps; 8 fixed-point iterations
    ≤ 1e-9 at 50 steps and ≤ 1e-6 at 10 steps (the iteration converges geometrically)."""
    net = TinyEpsNet()
    denoise = denoiser_from_eps(net)
    x0 = torch.randn(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        def round_trip(steps, r):
            sig = _schedule(steps)
            inv = ddim.invert_ddim(denoise, x0, sig.flip(0), refine_iterations=r)
            return float((ddim.sample_ddim(denoise, inv.latent, sig) - x0).abs().max())
        e50, e50r, e10, e10r = round_trip(50, 0), round_trip(50, 8), round_trip(10, 0), round_trip(10, 8)
    assert e50 < 0.3 and e50 < e10, (e50, e10)
    assert e50r < 1e-9, e50r
    assert e10r < 1e-6, e10r


def test_eta_sampling_with_fixed_noise_is_deterministic_and_uses_noise():
    net = TinyEpsNet()
    denoise = denoiser_from_eps(net)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * float(SIGMAS[981])
    noises = [torch.randn(1, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + i)) for i in range(10)]
    sig = _schedule(10)
    with torch.no_grad():
        a = ddim.sample_ddim(denoise, x, sig, eta=1.0, noise_fn=lambda i: noises[i])
        b = ddim.sample_ddim(denoise, x, sig, eta=1.0, noise_fn=lambda i: noises[i])
        c = ddim.sample_ddim(denoise, x, sig, eta=0.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_callback_sees_every_step():
    seen = []
    denoise = denoiser_from_eps(lambda x, s: torch.zeros_like(x))
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    ddim.invert_ddim(denoise, x, _schedule(5).flip(0), callback=lambda i, x, d: seen.append(i))
    assert seen == list(range(5))


def test_ddim_uniform_timesteps_rule():
    assert ddim.ddim_uniform_timesteps(50) == list(range(981, 0, -20))
    assert len(ddim.ddim_uniform_timesteps(30)) == 31  # ⌊1000/30⌋ = 33 → 1, 34, …, 991: one more than asked
    with pytest.raises(ValueError, match="steps must be"):
        ddim.ddim_uniform_timesteps(0)


@pytest.mark.parametrize("bad, match", [
    ([1.0], "at least 2"),
    ([0.0, float("nan")], "finite"),
    ([0.0, 2.0, 1.0], "strictly increasing"),
])
def test_invert_rejects_bad_sigmas(bad, match):
    with pytest.raises(ValueError, match=match):
        ddim.invert_ddim(lambda x, s: x, torch.zeros(1, 1), bad)


def test_invert_rejects_negative_refinement():
    with pytest.raises(ValueError, match="refine_iterations"):
        ddim.invert_ddim(lambda x, s: x, torch.zeros(1, 1), [0.0, 1.0], refine_iterations=-1)
