"""Shared helpers for the core tests: an SD1-style noise schedule and small denoisers."""
import math

import torch

from comfyui_disentangle.core import ddim
from comfyui_disentangle.core import disdiff as dd


def sd_sigma_table(T=1000):
    """σ_t of the SD1.x scaled-linear β schedule."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    return ddim.sigma_from_alpha_bar(alpha_bar)


SIGMAS = sd_sigma_table()


def denoiser_from_eps(eps_fn):
    """D(x, σ) = x − σ·ε(x, σ): the σ-form denoiser of an ε function."""
    def denoise(x, sigma):
        s = sigma.view(-1, *([1] * (x.ndim - 1)))
        return x - s * eps_fn(x, s)
    return denoise


class TinyEpsNet(torch.nn.Module):
    """A small random conv net ε(x_VP, σ) with a σ embedding: smooth, nonlinear, deterministic."""

    def __init__(self, c=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.c1 = torch.nn.Conv2d(c, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, c, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1
        self.double()

    def forward(self, x, s):
        x_vp = x / (1 + s**2).sqrt()
        h = torch.tanh(self.c1(x_vp) + torch.log(s))
        return 0.5 * self.c2(h) + 0.3 * x_vp


def percent_to_sigma(p):
    """ComfyUI's ModelSamplingDiscrete.percent_to_sigma, re-derived: σ((1−p)·999), log-σ interpolation."""
    if p <= 0:
        return 999999999.9
    if p >= 1:
        return 0.0
    t = (1.0 - p) * 999.0
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    return math.exp((1 - w) * math.log(SIGMAS[lo]) + w * math.log(SIGMAS[hi]))


# DisDiff: a pure-torch stand-in for the frozen UNet

C, H = 4, 8


def timestep_features(t, dim=16):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], 1)


class TinyFrozen(torch.nn.Module):
    """A two-level conv 'UNet': input-block features at 8×8 and 4×4, a time embedding, an ε head."""

    def __init__(self, emb=32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.time = torch.nn.Sequential(torch.nn.Linear(16, emb), torch.nn.SiLU(), torch.nn.Linear(emb, emb))
        self.conv_in = torch.nn.Conv2d(C, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.tproj = torch.nn.Linear(emb, 32)
        self.head = torch.nn.Conv2d(32 + 16, C, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.requires_grad_(False)

    def forward(self, x, t):
        emb = self.time(timestep_features(t))
        h1 = self.conv_in(x)
        h2 = torch.nn.functional.silu(self.down(h1)) + self.tproj(emb)[..., None, None]
        eps = self.head(torch.cat([torch.nn.functional.interpolate(h2, scale_factor=2), h1], 1))
        return dd.FrozenOutput(eps, [h1, h2], emb)


def disdiff_schedule(T=1000):
    """ᾱ_t and β_t of the SD1.x scaled-linear schedule (for the DisDiff tests)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float(), betas
