"""DisDiff (Yang et al. 2023): factor codes and per-factor gradient fields on top of a frozen DPM.

Pieces, each named after the paper's equation:

* :class:`FactorEncoder` ``E_φ``: a clean latent x0 → N factor codes ``z^c`` (``[B, N, D]``).
* :class:`GradientDecoder` ``G_ψ``: ``G^c(x_t, z^c, t)``, one sub-gradient field per factor. It reuses
  the frozen UNet's encoder (input-block) feature maps and time embedding (the reference's
  ``seprate_decoder``), has its own middle and output blocks, and injects ``z^c`` and the factor's
  position with AdaGN (eq. 18) and learnable orthogonal positional embeddings (``orth_emb``:
  ``p^c`` = row c of ``exp(A − Aᵀ)``).
* Losses: reconstruction (eq. 8), invariant (eq. 9–10) and variant (eq. 11–12) losses, weight γ_d
  (eq. 13) with stop-gradient, total (eq. 14). The disentangling loss reaches G only: the code
  encoder inside it is a detached copy of E (the paper's "detach"; without it the method collapses).
* :func:`partial_condition_eps` / :func:`partial_condition_denoised`: eq. 6 for a factor subset S.
* :func:`train_disdiff`: one training loop (callback, cancel, safetensors checkpoints, resume).

The frozen DPM enters as one callable ``frozen(x_t, t) → FrozenOutput(eps, features, emb)`` in the
VP parametrisation (``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``, integer timesteps ``t`` indexing
``alphas_cumprod``): ε_θ, the list of input-block feature maps and the time embedding, all from
one UNet pass (the reference runs the frozen UNet once per step for both). Nothing here imports
ComfyUI; ``nodes/disdiff.py`` builds ``frozen`` from a MODEL.

Deviations from the reference implementation (ThomasMrY/DisDiff), all documented where they occur:
the encoder reads the diffusion model's latent x0 instead of the decoded image (so the
disentangling loss needs no VAE decode per step; γ_d is then the reference's "Z" weighting, the one
its Shapes3D config uses) and uses GroupNorm instead of BatchNorm (a code does not depend on the
other images of a batch).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FORMAT = "comfyui-disentangle/disdiff"
VERSION = 1


class FrozenOutput(NamedTuple):
    eps: Tensor               # ε_θ(x_t, t)  [B, C, H, W]
    features: list            # input-block feature maps, shallow → deep  [B, C_i, H_i, W_i]
    emb: Tensor               # the UNet's time embedding [B, E]


Frozen = Callable[[Tensor, Tensor], FrozenOutput]
"""``frozen(x_t, t)``: one pass of the frozen UNet at VP state ``x_t`` and integer timesteps ``t``."""


class CheckpointError(ValueError):
    """A DisDiff checkpoint cannot be read or does not fit (the message says why)."""


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DisDiffConfig:
    """Everything needed to rebuild the networks; stored as JSON in the checkpoint's metadata."""
    latent_channels: int
    latent_size: tuple                  # (H, W) of the latents the encoder reads
    feature_channels: tuple             # channels of each frozen input-block output
    feature_sizes: tuple                # (H, W) of each frozen input-block output
    emb_dim: int                        # width of the frozen time embedding
    num_factors: int = 6                # N, the reference's latent_unit
    code_dim: int = 32                  # D, the reference's repre_emb_channels
    encoder_width: int = 128            # the reference's Encoder4 width d
    decoder_width: float = 1.0          # G's channels relative to the frozen features
    attention_max_tokens: int = 256     # self-attention in G where H·W ≤ this
    extra: dict = field(default_factory=dict)  # free-form (e.g. the frozen model's description)

    def __post_init__(self):
        object.__setattr__(self, "latent_size", tuple(int(s) for s in self.latent_size))
        object.__setattr__(self, "feature_channels", tuple(int(c) for c in self.feature_channels))
        object.__setattr__(self, "feature_sizes", tuple(tuple(int(s) for s in hw) for hw in self.feature_sizes))
        if self.num_factors < 1 or self.code_dim < 1:
            raise ValueError(f"num_factors and code_dim must be ≥ 1, got {self.num_factors}, {self.code_dim}")
        if len(self.feature_channels) != len(self.feature_sizes) or not self.feature_channels:
            raise ValueError("feature_channels and feature_sizes must be non-empty and of equal length")
        if self.emb_dim < 2 or self.emb_dim % 2:
            raise ValueError(f"emb_dim must be even, got {self.emb_dim}")
        if self.num_factors > self.emb_dim // 2:
            raise ValueError(f"at most emb_dim/2 = {self.emb_dim // 2} factors (orthogonal embeddings)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DisDiffConfig":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**data)

    def feature_signature(self) -> list:
        return [[c, *hw] for c, hw in zip(self.feature_channels, self.feature_sizes)]


def describe_features(out: FrozenOutput) -> dict:
    """Shapes of a frozen pass, as DisDiffConfig fields (feature channels/sizes, emb width)."""
    return {"feature_channels": tuple(f.shape[1] for f in out.features),
            "feature_sizes": tuple(tuple(f.shape[-2:]) for f in out.features),
            "emb_dim": int(out.emb.shape[-1])}


# --------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------

def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class _PlainResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class FactorEncoder(nn.Module):
    """E_φ: latent x0 [B, C, H, W] → codes [B, N, D] (the reference's Encoder4, on latents, GroupNorm)."""

    def __init__(self, config: DisDiffConfig):
        super().__init__()
        w = config.encoder_width
        layers = [nn.Conv2d(config.latent_channels, w, 3, padding=1), _norm(w), nn.SiLU()]
        h, wd = config.latent_size
        while max(h, wd) > 4:
            layers += [nn.Conv2d(w, w, 4, stride=2, padding=1), _norm(w), nn.SiLU()]
            h, wd = (h + 1) // 2, (wd + 1) // 2
        layers += [_PlainResBlock(w), _PlainResBlock(w), _norm(w), nn.SiLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(w * 16, config.num_factors * config.code_dim)
        self.num_factors, self.code_dim = config.num_factors, config.code_dim

    def forward(self, x0: Tensor) -> Tensor:
        return self.head(self.body(x0)).view(-1, self.num_factors, self.code_dim)


class AdaGNResBlock(nn.Module):
    """Residual block with AdaGN applied twice (eq. 18): ``z_s·(t_s·GN(h) + t_b) + z_b``, where
    ``[t_s, t_b]`` come from the time + position embedding and ``[z_s, z_b]`` from the code; written
    as in the reference, ``(GN(h)·(1+t_s) + t_b)·(1+z_s) + z_b`` (identity at zero projections)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))
        self.cond_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out))
        self.out_norm = _norm(c_out)
        self.out_layers = nn.Sequential(nn.SiLU(), _zero(nn.Conv2d(c_out, c_out, 3, padding=1)))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor, t_emb: Tensor, z_emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        t_s, t_b = self.emb_layers(t_emb)[..., None, None].chunk(2, dim=1)
        z_s, z_b = self.cond_layers(z_emb)[..., None, None].chunk(2, dim=1)
        h = self.out_norm(h) * (1 + t_s) + t_b
        h = h * (1 + z_s) + z_b
        return self.skip(x) + self.out_layers(h)


class _SelfAttention(nn.Module):
    def __init__(self, channels: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = _norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # [b, heads, hw, c/heads]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Upsample(nn.Module):
    def __init__(self, channels: int, size: tuple):
        super().__init__()
        self.size = tuple(size)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, size=self.size, mode="nearest"))


class _Stage(nn.Module):
    def __init__(self, c_in, c_out, emb_dim, attention, upsample_to):
        super().__init__()
        self.res = AdaGNResBlock(c_in, c_out, emb_dim)
        self.attn = _SelfAttention(c_out) if attention else None
        self.up = _Upsample(c_out, upsample_to) if upsample_to is not None else None

    def forward(self, h, t_emb, z_emb):
        h = self.res(h, t_emb, z_emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.up is not None:
            h = self.up(h)
        return h


class GradientDecoder(nn.Module):
    """G_ψ: ``G^c(x_t, z^c, t)`` from the frozen UNet's input-block features (skip connections, as
    the reference's ``seprate_decoder``), the frozen time embedding plus the factor's orthogonal
    positional embedding, and the code ``z^c`` (AdaGN, eq. 18). Rows of one batch may belong to
    different factors (``factor_index``), so all factors of a sample run as one batched pass."""

    def __init__(self, config: DisDiffConfig):
        super().__init__()
        e = config.emb_dim
        chans, sizes = config.feature_channels, config.feature_sizes

        def width(c):
            return max(8, int(round(c * config.decoder_width / 8)) * 8)

        def attend(hw):
            return hw[0] * hw[1] <= config.attention_max_tokens

        self.repre_embed = nn.Linear(config.code_dim, e)
        # orth_emb: p^c = row c of exp(A − Aᵀ), an orthogonal matrix at every training step.
        self.part_latents = nn.Parameter(torch.randn(e // 2, e // 2))
        self.part_emb = nn.Linear(e // 2, e)
        mid = width(chans[-1])
        self.mid_in = AdaGNResBlock(chans[-1], mid, e)
        self.mid_attn = _SelfAttention(mid) if attend(sizes[-1]) else None
        self.mid_out = AdaGNResBlock(mid, mid, e)
        stages, ch = [], mid
        for j in reversed(range(len(chans))):
            out = width(chans[j])
            up = sizes[j - 1] if j > 0 and tuple(sizes[j - 1]) != tuple(sizes[j]) else None
            stages.append(_Stage(ch + chans[j], out, e, attend(sizes[j]), up))
            ch = out
        self.stages = nn.ModuleList(stages)
        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(ch, config.latent_channels, 3, padding=1)))

    def positional_embeddings(self) -> Tensor:
        """The orthogonal matrix exp(A − Aᵀ) (fp32); row c is p^c."""
        a = self.part_latents.float()
        with torch.autocast(device_type=a.device.type, enabled=False):
            return torch.linalg.matrix_exp(a - a.t())

    def forward(self, features: Sequence[Tensor], emb: Tensor, codes: Tensor, factor_index: Tensor) -> Tensor:
        """features: per-row frozen features; emb [B, E]; codes [B, D] (z^c of each row);
        factor_index [B] (c of each row) → G^c [B, C, H, W]."""
        if not torch.is_autocast_enabled(emb.device.type):  # frozen outputs may be fp16/bf16
            dtype = self.repre_embed.weight.dtype
            features, emb, codes = [f.to(dtype) for f in features], emb.to(dtype), codes.to(dtype)
        p = self.positional_embeddings()[factor_index]
        t_emb = emb + self.part_emb(p)
        z_emb = self.repre_embed(codes)
        h = self.mid_in(features[-1], t_emb, z_emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_out(h, t_emb, z_emb)
        for stage, skip in zip(self.stages, reversed(features)):
            h = stage(torch.cat([h, skip.to(h.dtype)], dim=1), t_emb, z_emb)
        return self.out(h)


class DisDiff(nn.Module):
    """Encoder E_φ and decoder G_ψ with their config."""

    def __init__(self, config: DisDiffConfig):
        super().__init__()
        self.config = config
        self.encoder = FactorEncoder(config)
        self.decoder = GradientDecoder(config)

    def encode(self, x0: Tensor) -> Tensor:
        return self.encoder(x0)

    def gradients(self, frozen_out: FrozenOutput, codes: Tensor, factors: Sequence[int]) -> Tensor:
        """G^c for every c in ``factors``: [B, |S|, C, H, W], one batched decoder pass of B·|S| rows.
        ``codes`` is [B, N, D] (or [1, N, D], broadcast)."""
        b = frozen_out.emb.shape[0]
        s = len(factors)
        if s == 0:
            raise ValueError("factors is empty")
        idx = torch.as_tensor(list(factors), device=frozen_out.emb.device, dtype=torch.long)
        if codes.shape[0] == 1 and b > 1:
            codes = codes.expand(b, -1, -1)
        if codes.shape[0] != b:
            raise ValueError(f"codes have batch {codes.shape[0]}, the model pass has {b}")
        rows = codes[:, idx].reshape(b * s, -1)

        def rep(t):
            return t.unsqueeze(1).expand(b, s, *t.shape[1:]).reshape(b * s, *t.shape[1:])

        feats = [rep(f) for f in frozen_out.features]
        g = self.decoder(feats, rep(frozen_out.emb), rows, idx.repeat(b))
        return g.view(b, s, *g.shape[1:])


# --------------------------------------------------------------------------------------------
# Schedule coefficients and losses
# --------------------------------------------------------------------------------------------

def _gather(values: Tensor, t: Tensor, ndim: int) -> Tensor:
    return values.to(t.device)[t].float().view(-1, *([1] * (ndim - 1)))


def reconstruction_coefficient(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """Eq. 8's factor (√α_t·√(1−ᾱ_t)/β_t)·σ_t² with σ_t² = β̃_t, the DDPM posterior variance:
    = √α_t·(1−ᾱ_{t−1}) / √(1−ᾱ_t), ᾱ_{−1} = 1 (PDAE; the reference's ``shift_coef`` up to sign)."""
    ab = alphas_cumprod.double()
    prev = torch.cat([ab.new_ones(1), ab[:-1]])
    coef = (ab / prev).sqrt() * (1 - prev) / (1 - ab).sqrt()
    return coef.float().to(t.device)[t]


def sampling_coefficient(alpha_bar: Tensor) -> Tensor:
    """Eq. 6's factor √(1−ᾱ_t) (the reference's ``ddim_coef`` up to sign)."""
    return (1 - alpha_bar).sqrt()


def predicted_x0(x_t: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """Tweedie's formula, eq. 7: x̂0 = (x_t − √(1−ᾱ)·ε) / √ᾱ (``alpha_bar`` broadcastable)."""
    return (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()


def reconstruction_loss(noise: Tensor, eps_frozen: Tensor, g_sum: Tensor, coef: Tensor, loss_type: str = "l1") -> Tensor:
    """Eq. 8 per sample: ‖ε − (ε_θ − k_t·Σ_c G^c)‖ with k_t = :func:`reconstruction_coefficient`.
    ``loss_type`` "l1" (the reference's Shapes3D config) or "l2"."""
    pred = eps_frozen - coef.view(-1, *([1] * (noise.ndim - 1))) * g_sum
    diff = noise.float() - pred.float()
    err = diff.abs() if loss_type == "l1" else diff.pow(2)
    if loss_type not in ("l1", "l2"):
        raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
    return err.flatten(1).mean(1)


def invariant_loss(z_uncond: Tensor, z_cond: Tensor, c: Tensor) -> Tensor:
    """Eq. 9–10 per sample: d_k = ‖E^k(x̂0) − E^k(x̂0^c)‖ over the N factors, CrossEntropy(d, c):
    imposing G^c may move code c of the prediction, the others stay. (The paper's eq. 9 writes
    E^k(x0) for the first term; the reference implementation compares with the unconditioned
    prediction x̂0, which this follows.)"""
    d = (z_uncond.float() - z_cond.float()).norm(dim=-1)
    return F.cross_entropy(d, c, reduction="none")


def variant_loss(z_uncond: Tensor, z_cond: Tensor, z_true: Tensor, c: Tensor) -> Tensor:
    """Eq. 11–12 per sample: d^n_k = ‖E^k(x̂0) − z_k‖, d^p_k = ‖E^k(x̂0^c) − z_k‖ (z = E(x0),
    detached), CrossEntropy(d^n − d^p, c): G^c brings code c closer to the truth, and only it."""
    z_true = z_true.detach().float()
    d_n = (z_uncond.float() - z_true).norm(dim=-1)
    d_p = (z_cond.float() - z_true).norm(dim=-1)
    return F.cross_entropy(d_n - d_p, c, reduction="none")


def disentangle_weight(x0_uncond: Tensor, x0_cond: Tensor, lam: float) -> Tensor:
    """Eq. 13 per sample: γ_d = λ·‖x̂0 − x̂0^c‖² (mean over elements), with stop-gradient."""
    return lam * (x0_uncond.detach().float() - x0_cond.detach().float()).pow(2).flatten(1).mean(1)


def _detached_encode(encoder: nn.Module, x: Tensor) -> Tensor:
    """E(x) through a detached copy of E's weights: gradients reach x (hence G), never E."""
    params = {k: v.detach() for k, v in encoder.named_parameters()}
    buffers = dict(encoder.named_buffers())
    return torch.func.functional_call(encoder, {**params, **buffers}, (x,))


class LossTerms(NamedTuple):
    total: Tensor        # scalar, eq. 14
    recon: Tensor        # scalar, eq. 8
    invariant: Tensor    # scalar mean of L_in (unweighted)
    variant: Tensor      # scalar mean of L_va (unweighted)
    weight: Tensor       # scalar mean of γ_d
    codes: Tensor        # z = E(x0) [B, N, D] (not a loss: for inspection and tests)

    def scalars(self) -> Tensor:
        return torch.stack([v.detach().float() for v in self[:5]])


def disdiff_losses(model: DisDiff, frozen: Frozen, x0: Tensor, t: Tensor, noise: Tensor, c: Tensor,
                   alphas_cumprod: Tensor, dis_weight: float = 0.05, loss_type: str = "l1",
                   disentangle: bool = True, detach_codes: bool = False) -> LossTerms:
    """Eq. 14: L = L_r + mean(γ_d·(L_in + L_va)) for one batch. ``t`` integer timesteps, ``c`` the
    sampled factor of each row. The frozen pass runs without gradient.

    Detach (the paper's ablation "wo detach"): the encoder that reads the predictions x̂0, x̂0^c in
    the disentangling loss is a copy of E whose weights get no gradient (the reference's
    ``eval_encoder``), and the target codes are detached. As in the reference, the codes z^c that
    condition G^c keep their gradient, so E still learns which information each code must carry
    for its field; ``detach_codes=True`` cuts that path too (the disentangling loss then reaches G
    only, in every path)."""
    ab = _gather(alphas_cumprod, t, x0.ndim)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        out = frozen(x_t, t)
    out = FrozenOutput(out.eps.detach(), [f.detach() for f in out.features], out.emb.detach())
    z = model.encode(x0)                                     # [B, N, D], trained by L_r only
    n = model.config.num_factors
    g = model.gradients(out, z, range(n))                    # [B, N, C, H, W]
    recon = reconstruction_loss(noise, out.eps, g.sum(1), reconstruction_coefficient(alphas_cumprod, t), loss_type)
    zero = recon.new_zeros(())
    if not disentangle:
        return LossTerms(recon.mean(), recon.mean(), zero, zero, zero, z)
    rows = torch.arange(g.shape[0], device=g.device)
    if detach_codes:   # G^c evaluated again on detached codes (one more single-factor pass)
        g_c = model.decoder(out.features, out.emb, z.detach()[rows, c], c)
    else:
        g_c = g[rows, c]                                     # G^c of each row's sampled factor
    eps_c = out.eps.float() - sampling_coefficient(ab) * g_c.float()   # eq. 6, S = {c}
    with torch.no_grad():
        x0_hat = predicted_x0(x_t, out.eps.float(), ab)                 # eq. 7, unconditioned
        z_hat = _detached_encode(model.encoder, x0_hat)
    x0_hat_c = predicted_x0(x_t, eps_c, ab)                             # eq. 7, S = {c}
    z_hat_c = _detached_encode(model.encoder, x0_hat_c)
    l_in = invariant_loss(z_hat, z_hat_c, c)
    l_va = variant_loss(z_hat, z_hat_c, z, c)
    gamma = disentangle_weight(x0_hat, x0_hat_c, dis_weight)
    total = recon.mean() + (gamma * (l_in + l_va)).mean()
    return LossTerms(total, recon.mean(), l_in.mean(), l_va.mean(), gamma.mean(), z)


# --------------------------------------------------------------------------------------------
# Partial-condition sampling (eq. 5–6)
# --------------------------------------------------------------------------------------------

def _weighted_sum(g: Tensor, strengths) -> Tensor:
    w = torch.as_tensor(strengths, dtype=g.dtype, device=g.device).view(1, -1, *([1] * (g.ndim - 2)))
    return (g * w).sum(1)


def partial_condition_eps(eps: Tensor, g: Tensor, alpha_bar: Tensor, strengths) -> Tensor:
    """Eq. 6: ε_ψ = ε_θ − Σ_{c∈S} w_c·√(1−ᾱ_t)·G^c. ``g`` [B, |S|, C, H, W], ``strengths`` [|S|]
    (w_c = 1 is the paper), ``alpha_bar`` broadcastable to [B, 1, 1, 1]."""
    return eps - sampling_coefficient(alpha_bar) * _weighted_sum(g, strengths)


def partial_condition_denoised(denoised: Tensor, sigma: Tensor, g: Tensor, strengths) -> Tensor:
    """Eq. 6 in σ-space (x = x0 + σ·ε, ᾱ = 1/(1+σ²)), on a denoiser output x̂0, for any
    prediction type: ε = (x − x̂0)/σ, so ε_ψ = ε − √(1−ᾱ)ΣG gives
    x̂0_ψ = x̂0 + σ·√(1−ᾱ)·Σ w_c G^c = x̂0 + σ²/√(1+σ²)·Σ w_c G^c."""
    s = sigma.float().view(-1, *([1] * (denoised.ndim - 1)))
    return denoised + (s * s / (1 + s * s).sqrt()) * _weighted_sum(g, strengths).to(denoised.dtype)


# --------------------------------------------------------------------------------------------
# Checkpoints (safetensors; config and optimizer layout in the metadata)
# --------------------------------------------------------------------------------------------

def save_checkpoint(path: str, model: DisDiff, optimizer: Optional[torch.optim.Optimizer] = None,
                    step: int = 0, info: Optional[dict] = None, rng_state: Optional[Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write model (and optimizer, data-order RNG) tensors with the config in the metadata;
    atomic (tmp + rename). ``dtype`` float16 halves a release file (loading gives float32)."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items()}
    if rng_state is not None:
        tensors["rng_state"] = rng_state.contiguous().cpu()
    opt_meta = None
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars = {}
        for pid, state in sd["state"].items():
            for k, v in state.items():
                if torch.is_tensor(v):
                    tensors[f"optimizer.{pid}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{pid}.{k}"] = v
        opt_meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    metadata = {"format": json.dumps(FORMAT), "version": str(VERSION), "config": model.config.to_json(),
                "step": str(int(step)), "info": json.dumps(info or {})}
    if opt_meta is not None:
        metadata["optimizer"] = json.dumps(opt_meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


class LoadedCheckpoint(NamedTuple):
    model: DisDiff
    step: int
    info: dict
    optimizer_state: Optional[dict]
    rng_state: Optional[Tensor]


def load_checkpoint(path: str, device="cpu") -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; clear :class:`CheckpointError` for a
    truncated or foreign file, or tensors that do not fit the stored config."""
    from safetensors import safe_open
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # truncated, not safetensors, missing
        raise CheckpointError(f"{name} is not a readable safetensors file ({e})") from e
    try:
        fmt = json.loads(metadata.get("format", "null"))
    except json.JSONDecodeError:
        fmt = None
    if fmt != FORMAT or "config" not in metadata:
        raise CheckpointError(f"{name} is not a DisDiff checkpoint (format {fmt!r}, expected {FORMAT!r})")
    try:
        config = DisDiffConfig.from_json(metadata["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: unreadable DisDiff config ({e})") from e
    model = DisDiff(config)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{name}: tensors do not match its config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, wrong shape {wrong[:3]})")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    optimizer_state = None
    if "optimizer" in metadata:
        meta = json.loads(metadata["optimizer"])
        per_param: dict = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, pid, key = k.split(".", 2)
                per_param.setdefault(int(pid), {})[key] = v
        for k, v in meta["scalars"].items():
            pid, key = k.split(".", 1)
            per_param.setdefault(int(pid), {})[key] = v
        optimizer_state = {"state": per_param, "param_groups": meta["param_groups"]}
    return LoadedCheckpoint(model.to(device), int(metadata.get("step", 0)), json.loads(metadata.get("info", "{}")),
                            optimizer_state, tensors.get("rng_state"))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def make_config(latents: Tensor, frozen: Frozen, num_factors: int = 6, code_dim: int = 32, **kw) -> DisDiffConfig:
    """A config whose decoder fits ``frozen``'s features (one probe pass at t = 0)."""
    with torch.no_grad():
        probe = frozen(latents[:1], torch.zeros(1, dtype=torch.long, device=latents.device))
    return DisDiffConfig(latent_channels=int(latents.shape[1]), latent_size=tuple(latents.shape[-2:]),
                         num_factors=num_factors, code_dim=code_dim, **describe_features(probe), **kw)


def check_features(config: DisDiffConfig, out: FrozenOutput) -> None:
    """Raise ValueError when a frozen model's features do not fit the decoder built for ``config``."""
    got = describe_features(out)
    want = {"feature_channels": config.feature_channels, "feature_sizes": config.feature_sizes, "emb_dim": config.emb_dim}
    if got != want:
        raise ValueError(f"the model's UNet features {got} do not match the DisDiff model's {want}: "
                         "use the model (and latent size) it was trained on")


def train_disdiff(latents: Tensor, frozen: Frozen, alphas_cumprod: Tensor, *, config: Optional[DisDiffConfig] = None,
                  model: Optional[DisDiff] = None, steps: int = 1000, batch_size: int = 128, lr: float = 2e-4,
                  warmup: int = 100, dis_weight: float = 0.05, loss_type: str = "l1", seed: int = 0,
                  device=None, autocast_dtype: Optional[torch.dtype] = None, log_every: int = 50,
                  checkpoint_path: Optional[str] = None, checkpoint_every: int = 0, resume: bool = False,
                  callback: Optional[Callable[[int, int, dict], None]] = None, info: Optional[dict] = None,
                  detach_codes: bool = False):
    """Train E_φ and G_ψ on ``latents`` [M, C, H, W] (the model's latent space, already scaled as
    its UNet expects) on top of ``frozen``. Returns ``(model, history)``; history holds one dict
    per log point (step, losses, images/s).

    ``callback(step, steps, logs)`` runs every ``log_every`` steps and at the end (progress; raise
    from it to cancel: the last periodic checkpoint stays; return True to stop there, with a
    checkpoint). ``checkpoint_every`` > 0 writes
    ``checkpoint_path`` every that many steps (it is always written at the end when given);
    ``resume`` continues from it (model, optimizer, step and the data order). Per step there is no
    host synchronisation except at log points. ``autocast_dtype`` (e.g. torch.bfloat16 on CUDA)
    runs the forward passes under autocast; weights and optimizer stay fp32. Keep the frozen
    model's weights out of the optimizer: only E and G are trained.
    """
    import time
    device = torch.device(device) if device is not None else latents.device
    latents = latents.to(device)
    alphas_cumprod = alphas_cumprod.to(device).float()
    start = 0
    opt_state = rng_state = None
    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        loaded = load_checkpoint(checkpoint_path, device)
        model, start, opt_state, rng_state = loaded.model, loaded.step, loaded.optimizer_state, loaded.rng_state
        if config is not None and config.to_json() != model.config.to_json():
            raise CheckpointError(f"{os.path.basename(checkpoint_path)} was trained with another configuration "
                                  f"({model.config.to_json()}); cannot resume with {config.to_json()}")
    if model is None:
        torch.manual_seed(seed)
        model = DisDiff(config if config is not None else make_config(latents, frozen))
    model = model.to(device).train()
    with torch.no_grad():
        check_features(model.config, frozen(latents[:1], torch.zeros(1, dtype=torch.long, device=device)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
        for group in optimizer.param_groups:
            group["initial_lr"] = lr
    gen = torch.Generator(device=device).manual_seed(seed)
    if rng_state is not None:
        try:
            gen.set_state(rng_state)
        except RuntimeError:  # saved on another device type: continue with a step-derived seed
            gen.manual_seed(seed * 1_000_003 + start)
    n, T = model.config.num_factors, alphas_cumprod.shape[0]
    use_autocast = autocast_dtype is not None and device.type in ("cuda", "cpu")
    sums = torch.zeros(5, device=device)
    count, history = 0, []
    t0 = time.perf_counter()
    seen = 0

    def log(step):
        nonlocal count, t0, seen
        values = (sums / max(1, count)).tolist()
        elapsed = time.perf_counter() - t0
        entry = {"step": step, "loss": values[0], "recon": values[1], "invariant": values[2], "variant": values[3],
                 "weight": values[4], "images_per_s": seen / elapsed if elapsed > 0 else float("nan")}
        history.append(entry)
        sums.zero_()
        count, seen, t0 = 0, 0, time.perf_counter()
        return entry

    step = start
    for step in range(start + 1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / max(1, warmup))
        idx = torch.randint(latents.shape[0], (batch_size,), generator=gen, device=device)
        x0 = latents[idx]
        t = torch.randint(T, (batch_size,), generator=gen, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
        c = torch.randint(n, (batch_size,), generator=gen, device=device)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32, enabled=use_autocast):
            terms = disdiff_losses(model, frozen, x0, t, noise, c, alphas_cumprod, dis_weight, loss_type,
                                   detach_codes=detach_codes)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()
        sums += terms.scalars()
        count += 1
        seen += batch_size
        stop = False
        if step % log_every == 0 or step == steps:
            entry = log(step)
            if callback is not None:
                stop = callback(step, steps, entry) is True   # True: stop here (e.g. a time budget)
        if checkpoint_path and ((checkpoint_every > 0 and step % checkpoint_every == 0) or step == steps or stop):
            save_checkpoint(checkpoint_path, model, optimizer, step, info, gen.get_state())
        if stop:
            break
    return model.eval(), history
