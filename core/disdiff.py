"""DisDiff (Yang et al. 2023): factor codes and per-factor gradient fields on top of a frozen DPM.

Pieces, each named after the paper's equation:

* :class:`FactorEncoder` ``E_φ``: a clean latent x0 → N factor codes ``z^c`` (``[B, N, D]``); with
  ``encoder_input="image"`` it reads x0 decoded by the frozen first-stage decoder instead
  (:meth:`DisDiff.encoder_view`, the reference's setting).
* :class:`GradientDecoder` ``G_ψ``: ``G^c(x_t, z^c, t)``, one sub-gradient field per factor. It reuses
  the frozen UNet's encoder (input-block) feature maps and time embedding (the reference's
  ``seprate_decoder``), has its own middle and output blocks, and injects ``z^c`` and the factor's
  position with AdaGN (eq. 18) and learnable orthogonal positional embeddings (``orth_emb``:
  ``p^c`` = row c of ``exp(A − Aᵀ)``).
* Losses: reconstruction (eq. 8), invariant (eq. 9–10) and variant (eq. 11–12) losses, weight γ_d
  (eq. 13) with stop-gradient, total (eq. 14). The disentangling loss reaches G only: the code
  encoder inside it is a detached copy of E (the paper's "detach"; without it the method collapses).
* :func:`partial_condition_eps` / :func:`partial_condition_denoised`: eq. 6 for a factor subset S.
* Checkpoints (safetensors); the training loop is ``core/disdiff_train.py``.

The frozen DPM enters as one callable ``frozen(x_t, t) → FrozenOutput(eps, features, emb)`` in the
VP parametrisation (``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``, integer timesteps ``t`` indexing
``alphas_cumprod``): ε_θ, the list of input-block feature maps and the time embedding, all from
one UNet pass (the reference runs the frozen UNet once per step for both). Nothing here imports
ComfyUI; ``nodes/disdiff.py`` builds ``frozen`` from a MODEL.

Deviations from the reference implementation (ThomasMrY/DisDiff), all documented where they occur:
by default (``encoder_input="latent"``) the encoder reads the diffusion model's latent x0 instead of
the decoded image (so the disentangling loss needs no VAE decode per step; γ_d is then the
reference's "Z" weighting, the one its Shapes3D config uses); ``encoder_input="image"`` is the
reference's way, an option measured in issue 11: x0, x̂0 and x̂0^c are decoded differentiably by a
frozen decoder the caller supplies (its weights are not part of a DisDiff checkpoint) and resized to
``image_side`` px before E reads them. E uses GroupNorm instead of BatchNorm (a code does not depend on
the other images of a batch).
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

ImageDecoder = Callable[[Tensor], Tensor]
"""``decoder(x0)``: the frozen first-stage decoder, a model-space latent [B, C, H, W] (as the UNet reads
it) → an RGB image [B, 3, H', W'] in [-1, 1] (unclamped: the reference's ``decode_first_stage``; a
ComfyUI VAEDecode image is ``clamp((y + 1)/2, 0, 1)`` of it). Its parameters must not require
gradients; gradients flow to its input."""

ENCODER_INPUTS = ("latent", "image")


class CheckpointError(ValueError):
    """A DisDiff checkpoint cannot be read or does not fit (the message says why)."""


class FeatureMismatchError(ValueError):
    """A frozen model's UNet features do not fit the decoder of a DisDiff model (the message says why)."""


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
    encoder_input: str = "latent"       # what E reads: the latent x0, or its decoded image ("image")
    image_side: int = 64                # "image": the decoded image is resized to this many px (the reference's 64)

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
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"encoder_input must be one of {ENCODER_INPUTS}, got {self.encoder_input!r}")
        if not 4 <= int(self.image_side) <= 1024:
            raise ValueError(f"image_side must lie in [4, 1024], got {self.image_side}")
        object.__setattr__(self, "image_side", int(self.image_side))

    def encoder_shape(self) -> tuple:
        """(channels, (H, W)) of what E reads: the latent, or the resized RGB image."""
        if self.encoder_input == "image":
            return 3, (self.image_side, self.image_side)
        return self.latent_channels, self.latent_size

    def to_json(self) -> str:
        """JSON of the fields; a latent-input config leaves out ``encoder_input`` / ``image_side`` (its
        JSON is that of the configs before the option, which older readers of the format accept)."""
        data = asdict(self)
        if data["encoder_input"] == "latent":
            data.pop("encoder_input")
            data.pop("image_side")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DisDiffConfig":
        data = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**data)


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
    """E_φ: latent x0 [B, C, H, W] (or, ``encoder_input="image"``, an RGB image [B, 3, S, S]) → codes
    [B, N, D]: the reference's Encoder4 (stride-2 convolutions down to 4×4, two residual blocks, a
    linear head), with GroupNorm."""

    def __init__(self, config: DisDiffConfig):
        super().__init__()
        w = config.encoder_width
        channels, (h, wd) = config.encoder_shape()
        layers = [nn.Conv2d(channels, w, 3, padding=1), _norm(w), nn.SiLU()]
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
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
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


def expm_skew(m: Tensor, squarings: int = 10, degree: int = 14) -> Tensor:
    """exp(M) by scaling and squaring with a fixed Taylor degree: exp(M) = (Σ_{k≤degree} (M/2^s)^k/k!)^(2^s).

    The same operations for every M (no norm-dependent branch, so no host synchronisation: it can be
    captured in a CUDA graph, unlike ``torch.linalg.matrix_exp``). For ‖M‖₂ ≤ 2^s = 1024 the
    truncation error is below (‖M‖/2^s)^(degree+1)/(degree+1)! ≈ 8e-13; run it in float64 so that the
    s squarings keep the rounding error near 2^s·1e-16."""
    x = m / (2 ** squarings)
    eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
    result, term = eye + x, x
    for k in range(2, degree + 1):
        term = term @ x / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result


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
        self.channels_last = False   # set by DisDiff.use_channels_last (a run-time layout, not part of the model)

    def positional_embeddings(self) -> Tensor:
        """The orthogonal matrix exp(A − Aᵀ) (computed in fp64, returned in the weights' dtype); row c is p^c."""
        a = self.part_latents
        with torch.autocast(device_type=a.device.type, enabled=False):
            return expm_skew(a.double() - a.double().t()).to(a.dtype)

    def forward(self, features: Sequence[Tensor], emb: Tensor, codes: Tensor, factor_index: Tensor,
                positional: Optional[Tensor] = None) -> Tensor:
        """features: per-row frozen features; emb [B, E]; codes [B, D] (z^c of each row);
        factor_index [B] (c of each row) → G^c [B, C, H, W]. ``positional``: exp(A − Aᵀ) computed once
        beforehand (sampling: the weights do not change between model calls), else computed here."""
        if not torch.is_autocast_enabled(emb.device.type):  # frozen outputs may be fp16/bf16
            dtype = self.repre_embed.weight.dtype
            features, emb, codes = [f.to(dtype) for f in features], emb.to(dtype), codes.to(dtype)
        if self.channels_last:
            features = [f.contiguous(memory_format=torch.channels_last) for f in features]
        p = (self.positional_embeddings() if positional is None else positional)[factor_index]
        t_emb = emb + self.part_emb(p)
        z_emb = self.repre_embed(codes)
        h = self.mid_in(features[-1], t_emb, z_emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_out(h, t_emb, z_emb)
        for stage, skip in zip(self.stages, reversed(features)):
            h = stage(torch.cat([h, skip.to(h.dtype)], dim=1), t_emb, z_emb)
        return self.out(h)


def check_image_decoder(decoder) -> None:
    """Raise ValueError unless ``decoder`` is callable and none of its parameters requires gradients."""
    if not callable(decoder):
        raise ValueError(f"image_decoder must be a callable latent → image, got {type(decoder).__name__}")
    params = decoder.parameters() if isinstance(decoder, nn.Module) else ()
    if any(p.requires_grad for p in params):
        raise ValueError("image_decoder must be frozen: call decoder.requires_grad_(False) (gradients still reach "
                         "its input; its weights are not trained and not saved with DisDiff)")


def resize_image(image: Tensor, side: int) -> Tensor:
    """An image batch [B, 3, H, W] resized to side × side by area averaging (an antialiased box filter;
    exact 2×2 means for 128 → 64 px), differentiable and free of host synchronisation."""
    if tuple(image.shape[-2:]) == (side, side):
        return image
    return F.interpolate(image, size=(side, side), mode="area")


class DisDiff(nn.Module):
    """Encoder E_φ and decoder G_ψ with their config. With ``encoder_input="image"`` it also holds a
    reference to the frozen first-stage decoder (``image_decoder``, see :data:`ImageDecoder`): not a
    submodule, so never in ``parameters()``, ``state_dict()`` or a checkpoint, and not moved by
    ``.to()`` (the caller puts it on the device)."""

    def __init__(self, config: DisDiffConfig, image_decoder: Optional[ImageDecoder] = None):
        super().__init__()
        self.config = config
        self.encoder = FactorEncoder(config)
        self.decoder = GradientDecoder(config)
        self._image_decoder = None
        if image_decoder is not None:
            self.set_image_decoder(image_decoder)

    @property
    def image_decoder(self) -> Optional[ImageDecoder]:
        return self._image_decoder

    def set_image_decoder(self, decoder: Optional[ImageDecoder]) -> "DisDiff":
        """Attach the frozen first-stage decoder an ``encoder_input="image"`` model encodes through."""
        if decoder is not None:
            check_image_decoder(decoder)
        object.__setattr__(self, "_image_decoder", decoder)   # a plain attribute, not a submodule
        return self

    def encoder_view(self, x0: Tensor, image_decoder: Optional[ImageDecoder] = None) -> Tensor:
        """What E reads for model-space latents ``x0``: x0 itself (``"latent"``), or the decoded image
        resized to ``image_side`` px (``"image"``, the reference's ``decode_first_stage`` before its
        encoder), with gradients flowing through the decoder to x0. ``image_decoder`` overrides the
        attached one."""
        if self.config.encoder_input == "latent":
            return x0
        decoder = image_decoder if image_decoder is not None else self._image_decoder
        if decoder is None:
            raise ValueError("this DisDiff model's encoder reads images (encoder_input 'image'): supply the frozen "
                             "first-stage decoder (latent → image in [-1, 1]), e.g. DisDiff(config, image_decoder=...), "
                             "set_image_decoder(...) or load_checkpoint(..., image_decoder=...)")
        return resize_image(decoder(x0), self.config.image_side)

    def encode(self, x0: Tensor, image_decoder: Optional[ImageDecoder] = None) -> Tensor:
        """z = E(x0) [B, N, D] for model-space latents x0 (through :meth:`encoder_view`)."""
        return self.encoder(self.encoder_view(x0, image_decoder))

    def use_channels_last(self, enabled: bool = True) -> "DisDiff":
        """Run G's convolutions in the NHWC layout (weights and feature maps), which cuDNN's reduced-
        precision kernels prefer on recent GPUs; the same function either way."""
        self.decoder.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self.decoder.channels_last = enabled
        return self

    def gradients(self, frozen_out: FrozenOutput, codes: Tensor, factors: Sequence[int],
                  positional: Optional[Tensor] = None) -> Tensor:
        """G^c for every c in ``factors`` (a list, or a LongTensor on the device): [B, |S|, C, H, W], one
        batched decoder pass of B·|S| rows. ``codes`` is [B, N, D] (or [1, N, D], broadcast);
        ``positional``: ``decoder.positional_embeddings()`` computed once (see GradientDecoder.forward)."""
        b = frozen_out.emb.shape[0]
        if isinstance(factors, Tensor):   # already on the device (no host-to-device copy: graph-safe)
            idx = factors.to(device=frozen_out.emb.device, dtype=torch.long)
        else:
            idx = torch.as_tensor(list(factors), device=frozen_out.emb.device, dtype=torch.long)
        s = idx.numel()
        if s == 0:
            raise ValueError("factors is empty")
        if codes.shape[0] == 1 and b > 1:
            codes = codes.expand(b, -1, -1)
        if codes.shape[0] != b:
            raise ValueError(f"{codes.shape[0]} codes for a batch of {b}: give one code or one per image")
        rows = codes[:, idx].reshape(b * s, -1)

        def rep(t):
            return t.unsqueeze(1).expand(b, s, *t.shape[1:]).reshape(b * s, *t.shape[1:])

        feats = [rep(f) for f in frozen_out.features]
        g = self.decoder(feats, rep(frozen_out.emb), rows, idx.repeat(b), positional)
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


RECON_WEIGHTINGS = ("eps", "x0")


def reconstruction_weights(alphas_cumprod: Tensor, loss_type: str = "l1", recon_weighting: str = "eps") -> Tensor:
    """Per-timestep weights w_t of eq. 8's error [T]. ``"eps"``: 1 (the paper: the error in ε-space).
    ``"x0"``: the same error measured on x̂0, ‖Δx̂0‖ = √((1−ᾱ_t)/ᾱ_t)·‖Δε‖ (squared for "l2"), divided
    by its mean over t so that the loss keeps the scale of the paper's. In ε-space a missing scene
    detail at large t costs √(ᾱ_t/(1−ᾱ_t)) ≪ 1, so the codes, which carry what x_t no longer shows,
    are hardly asked for; in x̂0-space that detail costs the same at every t."""
    if recon_weighting == "eps":
        return torch.ones_like(alphas_cumprod, dtype=torch.float32)
    if recon_weighting != "x0":
        raise ValueError(f"recon_weighting must be one of {RECON_WEIGHTINGS}, got {recon_weighting!r}")
    ab = alphas_cumprod.double()
    w = ((1 - ab) / ab).sqrt()
    if loss_type == "l2":
        w = w * w
    return (w / w.mean()).float()


def reconstruction_loss(noise: Tensor, eps_frozen: Tensor, g_sum: Tensor, coef: Tensor, loss_type: str = "l1",
                        weight: Optional[Tensor] = None) -> Tensor:
    """Eq. 8 per sample: w_t·‖ε − (ε_θ − k_t·Σ_c G^c)‖ with k_t = :func:`reconstruction_coefficient` and
    w_t = :func:`reconstruction_weights` (1 when ``weight`` is None, the paper).
    ``loss_type`` "l1" (the reference's Shapes3D config) or "l2"."""
    pred = eps_frozen - coef.view(-1, *([1] * (noise.ndim - 1))) * g_sum
    diff = noise.float() - pred.float()
    err = diff.abs() if loss_type == "l1" else diff.pow(2)
    if loss_type not in ("l1", "l2"):
        raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
    per_sample = err.flatten(1).mean(1)
    return per_sample if weight is None else per_sample * weight.float()


WEIGHTINGS = ("paper", "normalized", "constant")
LOGITS = ("distance", "scale_free")


def code_logits(distances: Tensor, z_true: Tensor, logits: str = "distance") -> Tensor:
    """Logits of eq. 10 / 12 from per-factor code distances [B, N]. ``"distance"``: the distances
    themselves (the paper). ``"scale_free"``: divided by the mean code norm ‖z^k‖ of each row and
    multiplied by 10, so that the softmax does not depend on the scale the encoder happens to use
    (an option tested in issue 11; the distances are otherwise 0.3–3 % of the code norms)."""
    if logits == "distance":
        return distances
    if logits == "scale_free":
        scale = z_true.detach().float().norm(dim=-1).mean(-1, keepdim=True).clamp_min(1e-6)
        return 10.0 * distances / scale
    raise ValueError(f"logits must be one of {LOGITS}, got {logits!r}")


def invariant_loss(z_uncond: Tensor, z_cond: Tensor, c: Tensor, z_true: Optional[Tensor] = None,
                   logits: str = "distance") -> Tensor:
    """Eq. 9–10 per sample: d_k = ‖E^k(x̂0) − E^k(x̂0^c)‖ over the N factors, CrossEntropy(d, c):
    imposing G^c may move code c of the prediction, the others stay. (The paper's eq. 9 writes
    E^k(x0) for the first term; the reference implementation compares with the unconditioned
    prediction x̂0, which this follows.)"""
    d = (z_uncond.float() - z_cond.float()).norm(dim=-1)
    return F.cross_entropy(code_logits(d, z_true if z_true is not None else z_uncond, logits), c, reduction="none")


def variant_loss(z_uncond: Tensor, z_cond: Tensor, z_true: Tensor, c: Tensor, logits: str = "distance") -> Tensor:
    """Eq. 11–12 per sample: d^n_k = ‖E^k(x̂0) − z_k‖, d^p_k = ‖E^k(x̂0^c) − z_k‖ (z = E(x0),
    detached), CrossEntropy(d^n − d^p, c): G^c brings code c closer to the truth, and only it."""
    z_true = z_true.detach().float()
    d_n = (z_uncond.float() - z_true).norm(dim=-1)
    d_p = (z_cond.float() - z_true).norm(dim=-1)
    return F.cross_entropy(code_logits(d_n - d_p, z_true, logits), c, reduction="none")


def disentangle_weight(x0_uncond: Tensor, x0_cond: Tensor, lam: float, weighting: str = "paper") -> Tensor:
    """Eq. 13 per sample: γ_d = λ·‖x̂0 − x̂0^c‖² (mean over elements), with stop-gradient (``"paper"``).
    Options measured in issue 11: ``"normalized"``, the same divided by its batch mean (so the mean γ_d
    is λ whatever the scale of G's fields; the time-step profile of eq. 13 stays); ``"constant"``,
    γ_d = λ (the paper's "constant weighting" ablation)."""
    mse = (x0_uncond.detach().float() - x0_cond.detach().float()).pow(2).flatten(1).mean(1)
    if weighting == "paper":
        return lam * mse
    if weighting == "normalized":
        return lam * mse / mse.mean().clamp_min(1e-12)
    if weighting == "constant":
        return torch.full_like(mse, lam)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


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
    weighted_invariant: Optional[Tensor] = None   # scalar mean of γ_d·L_in (for gradient shares)
    weighted_variant: Optional[Tensor] = None     # scalar mean of γ_d·L_va

    def scalars(self) -> Tensor:
        return torch.stack([v.detach().float() for v in self[:5]])


def disdiff_losses(model: DisDiff, frozen: Frozen, x0: Tensor, t: Tensor, noise: Tensor, c: Tensor,
                   alphas_cumprod: Tensor, dis_weight: float = 0.05, loss_type: str = "l1",
                   disentangle: bool = True, detach_codes: bool = False, weighting: str = "paper",
                   logits: str = "distance", recon_weighting: str = "eps") -> LossTerms:
    """Eq. 14: L = L_r + mean(γ_d·(L_in + L_va)) for one batch. ``t`` integer timesteps, ``c`` the
    sampled factor of each row. The frozen pass runs without gradient. ``alphas_cumprod`` should live
    on the batch's device (then nothing here copies from the host: a step can be a CUDA graph).

    Detach (the paper's ablation "wo detach"): the encoder that reads the predictions x̂0, x̂0^c in
    the disentangling loss is a copy of E whose weights get no gradient (the reference's
    ``eval_encoder``), and the target codes are detached. As in the reference, the codes z^c that
    condition G^c keep their gradient, so E still learns which information each code must carry
    for its field; ``detach_codes=True`` cuts that path too (the disentangling loss then reaches G
    only, in every path). With ``encoder_input="image"`` every encoding (of x0, x̂0, x̂0^c) goes through
    the model's frozen image decoder (:meth:`DisDiff.encoder_view`), and G's gradient from x̂0^c
    through it. ``weighting`` and ``logits``: see :func:`disentangle_weight`, :func:`code_logits`; ``recon_weighting``:
    :func:`reconstruction_weights`."""
    ab = _gather(alphas_cumprod, t, x0.ndim)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        out = frozen(x_t, t)
    out = FrozenOutput(out.eps.detach(), [f.detach() for f in out.features], out.emb.detach())
    z = model.encode(x0)                                     # [B, N, D], trained by L_r only
    n = model.config.num_factors
    g = model.gradients(out, z, torch.arange(n, device=x0.device))   # [B, N, C, H, W]
    w_t = None if recon_weighting == "eps" else reconstruction_weights(alphas_cumprod, loss_type, recon_weighting)[t]
    recon = reconstruction_loss(noise, out.eps, g.sum(1), reconstruction_coefficient(alphas_cumprod, t), loss_type, w_t)
    zero = recon.new_zeros(())
    if not disentangle:
        return LossTerms(recon.mean(), recon.mean(), zero, zero, zero, z, zero, zero)
    rows = torch.arange(g.shape[0], device=g.device)
    if detach_codes:   # G^c evaluated again on detached codes (one more single-factor pass)
        g_c = model.decoder(out.features, out.emb, z.detach()[rows, c], c)
    else:
        g_c = g[rows, c]                                     # G^c of each row's sampled factor
    eps_c = out.eps.float() - sampling_coefficient(ab) * g_c.float()   # eq. 6, S = {c}
    with torch.no_grad():
        x0_hat = predicted_x0(x_t, out.eps.float(), ab)                 # eq. 7, unconditioned
        z_hat = _detached_encode(model.encoder, model.encoder_view(x0_hat))
    x0_hat_c = predicted_x0(x_t, eps_c, ab)                             # eq. 7, S = {c}
    z_hat_c = _detached_encode(model.encoder, model.encoder_view(x0_hat_c))   # "image": through the frozen decoder
    l_in = invariant_loss(z_hat, z_hat_c, c, z, logits)
    l_va = variant_loss(z_hat, z_hat_c, z, c, logits)
    gamma = disentangle_weight(x0_hat, x0_hat_c, dis_weight, weighting)
    w_in, w_va = (gamma * l_in).mean(), (gamma * l_va).mean()
    total = recon.mean() + w_in + w_va
    return LossTerms(total, recon.mean(), l_in.mean(), l_va.mean(), gamma.mean(), z, w_in, w_va)


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
# Diagnosis: what G does at all
# --------------------------------------------------------------------------------------------

def _mean_norm(v: Tensor) -> float:
    return v.flatten(1).norm(dim=1).mean().item()


@torch.no_grad()
def field_diagnosis(model: DisDiff, frozen: Frozen, x0: Tensor, t: int, alphas_cumprod: Tensor,
                    noise: Tensor) -> dict:
    """What the trained fields do at timestep ``t`` on scenes ``x0`` [B, C, H, W] (B ≥ 2):

    * ``error_frozen`` ‖x0 − x̂0_θ‖ and ``error_all`` ‖x0 − x̂0_ψ‖ with every field (eq. 6, S = all, eq. 7);
      ``error_removed`` = 1 − error_all/error_frozen: how far imposing all codes reconstructs the scene;
    * ``bias_removed``: the same for one constant correction, the mean residual over the scenes (the
      frozen model's bias; a G that learned only that removes about this much);
    * ``field_cosine``: mean cosine between different factors' fields G^c, G^c' of one scene (1: all
      factors steer alike, so none can be singled out);
    * ``code_use`` ‖ΣG(another scene's codes) − ΣG‖ / ‖ΣG‖ (0: G ignores the codes);
    * ``field_shares``: ‖G^c‖ / ‖ΣG‖ per factor (1/N each when the fields are one field split N ways)."""
    device = x0.device
    n = model.config.num_factors
    t_batch = torch.full((x0.shape[0],), int(t), device=device, dtype=torch.long)
    ab = _gather(alphas_cumprod, t_batch, x0.ndim)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    out = frozen(x_t, t_batch)
    eps = out.eps.float()
    z = model.encode(x0)
    every = torch.arange(n, device=device)
    g = model.gradients(out, z, every).float()                          # [B, N, C, H, W]
    x0_theta = predicted_x0(x_t, eps, ab)
    x0_all = predicted_x0(x_t, partial_condition_eps(eps, g, ab, [1.0] * n), ab)
    residual = x0 - x0_theta
    error_frozen, error_all = _mean_norm(residual), _mean_norm(x0 - x0_all)
    total = max(_mean_norm(g.sum(1)), 1e-12)
    other = torch.roll(torch.arange(x0.shape[0], device=device), 1)
    g_other = model.gradients(out, z[other], every).float()
    flat = g.flatten(2)
    cos = F.cosine_similarity(flat[:, :, None], flat[:, None, :], dim=-1)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=device)
    return {"t": int(t), "error_frozen": error_frozen, "error_all": error_all,
            "error_removed": 1 - error_all / max(error_frozen, 1e-12),
            "bias_removed": 1 - _mean_norm(residual - residual.mean(0, keepdim=True)) / max(error_frozen, 1e-12),
            "field_cosine": cos[:, off_diagonal].mean().item() if n > 1 else 1.0,
            "code_use": _mean_norm((g_other - g).sum(1)) / total,
            "field_shares": [_mean_norm(g[:, c]) / total for c in range(n)]}


# --------------------------------------------------------------------------------------------
# Checkpoints (safetensors; config and optimizer layout in the metadata)
# --------------------------------------------------------------------------------------------

def save_checkpoint(path: str, model: DisDiff, optimizer: Optional[torch.optim.Optimizer] = None,
                    step: int = 0, info: Optional[dict] = None, rng_state: Optional[Tensor] = None,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Write model (and optimizer, data-order RNG) tensors with the config in the metadata;
    atomic (tmp + rename). ``dtype`` float16 halves a release file (loading gives float32)."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in model.state_dict().items()}
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
        groups = [{k: (v.item() if torch.is_tensor(v) and v.numel() == 1 else v) for k, v in g.items()}
                  for g in sd["param_groups"]]   # a capturable optimizer keeps lr as a tensor
        opt_meta = {"param_groups": groups, "scalars": scalars}
    metadata = {"format": json.dumps(FORMAT), "version": str(VERSION), "config": model.config.to_json(),
                "step": str(int(step)), "info": json.dumps(info or {})}
    if opt_meta is not None:
        metadata["optimizer"] = json.dumps(opt_meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def check_decoder_supplied(config: DisDiffConfig, image_decoder, require_decoder: bool, name: str) -> None:
    """Refuse (CheckpointError) an ``encoder_input="image"`` checkpoint loaded without its image decoder."""
    if config.encoder_input == "image" and image_decoder is None and require_decoder:
        raise CheckpointError(f"{name}: its encoder reads images (encoder_input 'image', {config.image_side} px): "
                              "pass the frozen first-stage decoder of the model it was trained on "
                              "(load_checkpoint(..., image_decoder=decoder), latent → image in [-1, 1]); "
                              "its weights are not part of a DisDiff checkpoint")


class LoadedCheckpoint(NamedTuple):
    model: DisDiff
    step: int
    info: dict
    optimizer_state: Optional[dict]
    rng_state: Optional[Tensor]


def load_checkpoint(path: str, device="cpu", image_decoder: Optional[ImageDecoder] = None,
                    require_decoder: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; clear :class:`CheckpointError` for a
    truncated or foreign file, or tensors that do not fit the stored config.

    A model with ``encoder_input="image"`` encodes through a frozen first-stage decoder that is not
    part of the file: pass it as ``image_decoder`` (attached to the model; the caller puts it on
    ``device``). Without it the load is refused (CheckpointError, a ValueError, naming encoder_input)
    unless ``require_decoder=False``, which loads the model without one (then pass a decoder to
    :meth:`DisDiff.encode` or :meth:`DisDiff.set_image_decoder` before encoding; G alone needs none)."""
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
    check_decoder_supplied(config, image_decoder, require_decoder, name)
    model = DisDiff(config, image_decoder)
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(f"{name}: tensors do not match its config (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, wrong shape {wrong[:3]})")
    if state and all(v.dtype == torch.float64 for v in state.values()):
        model = model.double()   # a float64 run (tests) resumes in float64; float16 release files load as float32
    model.load_state_dict({k: (v if v.dtype == torch.float64 else v.float()) for k, v in state.items()})
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
# A model for a frozen DPM
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
        raise FeatureMismatchError(f"the model's UNet features {got} do not match the DisDiff model's {want}: "
                                   "use the model (and latent size) it was trained on")
