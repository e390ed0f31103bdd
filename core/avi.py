"""Attribute Vector Integration (AVI; Wang et al. 2024, "Exploring the latent space of diffusion
models directly through singular value decomposition", Sec. 3.2 and Algorithm 1).

An original prompt gives the latent ``x`` at diffusion time T_x (paper: 0.8T); the target prompt,
same seed, gives ``z`` at T_x + Δτ (paper: Δτ = −0.3T). Each latent channel is an H×W matrix and
is decomposed on its own (channel-wise SVD, r = min(H, W))::

    U_x, S_x, V_x = SVD(x)            U_z, S_z, V_z = SVD(z)
    U'_z = U_z[:, ::-1]               V'_z = V_z[::-1, :]                      (Alg. 1, l. 6–7)
    Û = [U_x[:, :k], (1−ρ)·U_x[:, k:] + ρ·U'_z[:, :r−k]]                      (l. 8)
    V̂ = [V_x[:k, :]; (1−ρ)·V_x[k:, :] + ρ·V'_z[:r−k, :]]                      (l. 9)
    ŷ = Û·diag(S)·V̂                   ỹ = Ũ·diag(S + Δs)·Ṽ,  Ũ = Û[:, ::-1], Ṽ = V̂[::-1, :]   (l. 10–13)

(V is the matrix of right singular vectors as rows, ``Vh`` of ``torch.linalg.svd``.) The paper
uses k = r/2, where r − k = k: the second block is then exactly ``U'_z[:, :k]``. For another k the
second block takes the first r − k columns of ``U'_z`` (z's r − k weakest directions, weakest
first), so Û stays H×r.

Φ (:class:`AVINet`) predicts ``S, Δs`` from x, per channel: x's channel flattened to H·W → three
Linear+ReLU layers of width ``hidden`` (paper: 4096 = H·W at 64×64) → two linear heads with r
outputs. Training loss (Sec. 3.2.2)::

    L = λ1‖ŷ − z‖²_F + λ2‖ỹ − x‖²_F + λ3‖S − S_z‖²_F + λ4‖S + Δs − S_x‖²_F,   λ = (3, 10, 10, 10)

squared Frobenius norms of each channel matrix, averaged over the channels of a batch. Adam,
lr 1e-3, batch 256, ρ = 1 during training. At inference ρ is the user's strength and the output
latent ``ŷ = Û·diag(S)·V̂`` (with S = Φ(x)) replaces x.

*Signs.* SVD fixes each singular pair (u_i, v_i) only up to a common sign. With ρ = 1 the result
does not depend on it, but the blend (1−ρ)·u_x + ρ·u'_z does. We fix the sign so that the entry of
largest magnitude of every left singular vector is positive (scikit-learn's ``svd_flip``), which
makes the result independent of the SVD backend (LAPACK, cuSOLVER, NumPy).

*Precision.* All SVD maths runs in float32 (float64 stays float64) whatever the latents' dtype.

*The paper's "N samples".* Sec. 5: "the sampling number N is set to 5000 when provided only one
pair of latent codes, and 500 when provided over 5 pairs". We read N as the number of training
samples drawn from each latent pair per epoch: Φ's data set is the list of pairs, each repeated N
times and shuffled, so with a single pair one epoch is 5000 draws of that pair (⌈5000/256⌉ = 20
Adam steps of batch 256) and 5 epochs ≈ 100 steps. More pairs come from more seeds with the same
prompt pair. ``samples_per_pair=None`` uses 5000 for one pair, 500 from 10 pairs up and
⌈5000/P⌉ in between (our interpolation; the paper states only the two ends). A "sample" is one
latent, i.e. all its channels; a batch of 256 samples is 256·C channel matrices for Φ. Φ and the
loss run once per distinct pair of a batch, weighted by how often it was drawn (the same loss and
gradient as the batch with its repeats; with one pair, one row per channel).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

FORMAT_NAME = "comfyui-disentangle/avi-phi"
PAPER_LAMBDAS = (3.0, 10.0, 10.0, 10.0)
PAPER_SAMPLES_ONE_PAIR = 5000
PAPER_SAMPLES_MANY_PAIRS = 500

TrainCallback = Callable[[int, float], None]
"""``callback(step, loss)`` after every Adam step (progress; raise to cancel)."""


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def _check_latent(t: Tensor, name: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.ndim < 2:
        raise ValueError(f"{name} must have at least two dimensions [..., H, W], got shape {tuple(t.shape)}")
    if min(t.shape[-2:]) < 2:
        raise ValueError(f"{name}: the latent must be at least 2×2, got {tuple(t.shape[-2:])}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def rank_of(height: int, width: int) -> int:
    return min(int(height), int(width))


def default_k(height: int, width: int) -> int:
    """The paper's k = r/2 (r = min(H, W); rounded down for odd r)."""
    return rank_of(height, width) // 2


def check_k(k: int, r: int) -> int:
    """Algorithm 1 keeps x's top k of r directions: 1 ≤ k ≤ r − 1."""
    k = int(k)
    if not 1 <= k <= r - 1:
        raise ValueError(f"k must be between 1 and r − 1 = {r - 1} for latents of rank r = min(H, W) = {r} "
                         f"(the paper: k = r/2 = {r // 2}), got {k}")
    return k


def check_rho(rho: float) -> float:
    """The strength ρ ∈ [0, 1] (0: x, 1: the full integration)."""
    rho = float(rho)
    if not (0.0 <= rho <= 1.0) or math.isnan(rho):
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    return rho


def check_pair(x: Tensor, z: Tensor) -> None:
    _check_latent(x, "x")
    _check_latent(z, "z")
    if x.shape != z.shape:
        raise ValueError(f"x and z must have the same shape, got {tuple(x.shape)} and {tuple(z.shape)}")


# --------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------

def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def channel_svd(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of every H×W matrix of ``x`` [..., H, W] in fp32: (U [..., H, r], S [..., r], Vh [..., r, W]),
    S descending, signs fixed so that each column of U has its largest-magnitude entry positive."""
    u, s, vh = torch.linalg.svd(x.to(_work_dtype(x)), full_matrices=False)
    idx = u.abs().argmax(dim=-2, keepdim=True)                       # [..., 1, r]
    sign = torch.sign(torch.gather(u, -2, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return u * sign, s, vh * sign.transpose(-1, -2)


def compose(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """U·diag(S)·V for batched factors."""
    return (u * s.unsqueeze(-2)) @ vh


def integrate_vectors(ux: Tensor, vhx: Tensor, uz: Tensor, vhz: Tensor, k: int, rho: float) -> tuple[Tensor, Tensor]:
    """Û and V̂ of Algorithm 1, lines 6–9 (see the module docstring for k ≠ r/2)."""
    r = ux.shape[-1]
    k = check_k(k, r)
    rho = check_rho(rho)
    uz_rev, vhz_rev = uz.flip(-1), vhz.flip(-2)
    u_hat = torch.cat([ux[..., :k], (1 - rho) * ux[..., k:] + rho * uz_rev[..., : r - k]], dim=-1)
    vh_hat = torch.cat([vhx[..., :k, :], (1 - rho) * vhx[..., k:, :] + rho * vhz_rev[..., : r - k, :]], dim=-2)
    return u_hat, vh_hat


@dataclass
class AVIOutputs:
    """What Algorithm 1 returns (training stage) plus Û, V̂ (inference stage)."""
    y_hat: Tensor
    y_tilde: Tensor
    s_x: Tensor
    s_z: Tensor
    s: Tensor
    delta_s: Tensor
    u_hat: Tensor
    vh_hat: Tensor


def attribute_vector_integration(x: Tensor, z: Tensor, s: Tensor, delta_s: Tensor, k: int, rho: float) -> AVIOutputs:
    """Algorithm 1 for given singular values S and Δs ([..., r] each, e.g. from Φ(x))."""
    check_pair(x, z)
    ux, sx, vhx = channel_svd(x)
    uz, sz, vhz = channel_svd(z)
    u_hat, vh_hat = integrate_vectors(ux, vhx, uz, vhz, k, rho)
    s, delta_s = s.to(u_hat.dtype), delta_s.to(u_hat.dtype)
    y_hat = compose(u_hat, s, vh_hat)
    y_tilde = compose(u_hat.flip(-1), s + delta_s, vh_hat.flip(-2))
    return AVIOutputs(y_hat, y_tilde, sx, sz, s, delta_s, u_hat, vh_hat)


def integrate_strongest_vectors(ux: Tensor, vhx: Tensor, uz: Tensor, vhz: Tensor, k: int, rho: float) -> tuple[Tensor, Tensor]:
    """Û and V̂ with z's k *strongest* directions in place of x's, not reversed (our option, not the paper's):
    Û = [(1−ρ)·U_x[:, :k] + ρ·U_z[:, :k], U_x[:, k:]],  V̂ = [(1−ρ)·V_x[:k, :] + ρ·V_z[:k, :]; V_x[k:, :]]."""
    r = ux.shape[-1]
    k = check_k(k, r)
    rho = check_rho(rho)
    u_hat = torch.cat([(1 - rho) * ux[..., :k] + rho * uz[..., :k], ux[..., k:]], dim=-1)
    vh_hat = torch.cat([(1 - rho) * vhx[..., :k, :] + rho * vhz[..., :k, :], vhx[..., k:, :]], dim=-2)
    return u_hat, vh_hat


def difference_directions(x: Tensor, z: Tensor, k: int) -> Tensor:
    """The best rank-k approximation (Eckart–Young) of each channel's change D = z − x:
    Σ_{j<k} d_j·a_j·b_jᵀ with (A, d, B) = SVD(D), i.e. the k directions in which x and z differ most."""
    check_pair(x, z)
    r = rank_of(*x.shape[-2:])
    if not 1 <= int(k) <= r:
        raise ValueError(f"k must be between 1 and r = min(H, W) = {r} for the difference integration, got {k}")
    a, d, bh = torch.linalg.svd((z.to(_work_dtype(x)) - x.to(_work_dtype(x))), full_matrices=False)
    k = int(k)
    return compose(a[..., :k], d[..., :k], bh[..., :k, :])


def support_weights(d: Tensor, threshold: float) -> Tensor:
    """Where a change d [..., C, H, W] lives, per item: m = clamp(‖d_{:,i,j}‖ / (threshold·max_{i,j} ‖d_{:,i,j}‖), 0, 1),
    the norm over channels at each position (shape [..., 1, H, W]; 0 where d is zero). m = 1 where the change is at
    least ``threshold`` of its largest, falling linearly to 0 where there is none: multiplying a low-rank
    approximation of d by m takes back what the approximation spreads to positions that d does not change."""
    if not isinstance(d, Tensor) or d.ndim < 3:
        raise ValueError(f"d must be a tensor [..., C, H, W], got {tuple(getattr(d, 'shape', ()))}")
    threshold = float(threshold)
    if not (math.isfinite(threshold) and 0 < threshold <= 1):
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    n = d.to(_work_dtype(d)).norm(dim=-3, keepdim=True)
    peak = n.amax(dim=(-2, -1), keepdim=True)
    return (n / (threshold * peak).clamp_min(torch.finfo(n.dtype).tiny)).clamp(0, 1)


def committed_change(late: Tensor, early: Tensor, guidance: float, threshold: float = 0.5, scale: float = 1.0) -> Tensor:
    """The change of the clean-image estimate for the two-probe z ("target's x̂0 at x and at t_early"; our
    option, not the paper's), per batch item (dimension 0)::

        Δ = Δ_late + scale·w·Δ_early/g,   w = clamp(1 − r/threshold, 0, 1),   r = ‖Δ_late‖_F / ‖Δ_early/g‖_F

    ``late``, ``early`` [B, ...]: x̂0_T − x̂0_O, the target minus the original prompt's clean-image estimate, both
    predicted at the same sampler state of the original trajectory, at x's step (late) and at an early step.
    With classifier-free guidance g and the same negative prompt the unconditional prediction cancels, so
    Δ_early/g is the prompts' own (unguided) difference there. r says whether the target prompt still changes the
    image at x: r ≳ threshold (on the toy world an object's colour, r ≈ 1.2) gives Δ_late alone (the one-probe z);
    r ≈ 0 (a floor or wall colour, r ≈ 0.05: committed before x, so the late prediction no longer shows it) adds the
    early change. An item whose early change is zero (or g ≤ 0, where guidance has no prompt left) keeps Δ_late."""
    if not isinstance(late, Tensor) or not isinstance(early, Tensor) or late.shape != early.shape or late.ndim < 1:
        raise ValueError(f"late and early must be tensors of one shape [batch, ...], got "
                         f"{tuple(getattr(late, 'shape', ()))} and {tuple(getattr(early, 'shape', ()))}")
    for name, t in (("late", late), ("early", early)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    guidance, threshold, scale = float(guidance), float(threshold), float(scale)
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be finite, got {guidance}")
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"scale must be a finite number ≥ 0, got {scale}")
    dtype = _work_dtype(late)
    late_w = late.to(dtype)
    if guidance <= 0:
        return late_w.to(late.dtype)
    early_u = early.to(dtype) / guidance
    n_early = early_u.flatten(1).norm(dim=1) if late.ndim > 1 else early_u.abs()
    n_late = late_w.flatten(1).norm(dim=1) if late.ndim > 1 else late_w.abs()
    w = torch.where(n_early > 0, (1 - n_late / (threshold * n_early.clamp_min(torch.finfo(dtype).tiny))).clamp(0, 1),
                    torch.zeros_like(n_early))
    w = w.reshape(-1, *([1] * (late.ndim - 1)))
    return (late_w + scale * w * early_u).to(late.dtype)


INTEGRATIONS = ("paper", "strongest", "difference")
"""How Û, V̂ (or ŷ) are built: Algorithm 1 as written; z's strongest k directions in place of x's; or
x plus the top-k singular directions of z − x (:func:`difference_directions`)."""


def check_gain(gain: float) -> float:
    gain = float(gain)
    if not math.isfinite(gain) or gain < 0:
        raise ValueError(f"gain γ must be a finite number ≥ 0, got {gain}")
    return gain


def check_support(support: float) -> float:
    support = float(support)
    if not (math.isfinite(support) and 0 <= support <= 1):
        raise ValueError(f"support must be a number in [0, 1] (0: everywhere), got {support}")
    return support


def integrate(x: Tensor, z: Tensor, k: int, rho: float, singular_values: Tensor | str = "x",
              integration: str = "paper", gain: float = 1.0, support: float = 0.0) -> Tensor:
    """The edited latent in x's dtype: ŷ_γ = x + γ·(ŷ − x) with

    * ``"paper"``: ŷ = Û·diag(S)·V̂ of Algorithm 1 (z's weakest directions, reversed);
    * ``"strongest"``: ŷ = Û·diag(S)·V̂ with :func:`integrate_strongest_vectors`;
    * ``"difference"``: ŷ = x + ρ·m ⊙ Σ_{j<k} d_j a_j b_jᵀ, the top k directions of z − x (S unused), with
      m = :func:`support_weights` (z − x, ``support``) for ``support`` > 0 and m = 1 for 0.

    ``singular_values`` (paper, strongest): a tensor [..., r] (e.g. Φ's S), or ``"x"`` / ``"z"`` for the
    latents' own singular values (no Φ). γ = 1 is the integration itself (the paper has no γ)."""
    check_pair(x, z)
    if integration not in INTEGRATIONS:
        raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
    gain, support = check_gain(gain), check_support(support)
    if integration == "difference":
        rho, xw = check_rho(rho), x.to(_work_dtype(x))
        change = difference_directions(x, z, k)
        if support > 0:
            change = change * support_weights(z.to(xw.dtype) - xw, support)
        y = xw + rho * change
    else:
        ux, sx, vhx = channel_svd(x)
        uz, sz, vhz = channel_svd(z)
        build = integrate_vectors if integration == "paper" else integrate_strongest_vectors
        u_hat, vh_hat = build(ux, vhx, uz, vhz, k, rho)
        if isinstance(singular_values, str):
            if singular_values not in ("x", "z"):
                raise ValueError(f"singular_values must be a tensor, 'x' or 'z', got {singular_values!r}")
            s = sx if singular_values == "x" else sz
        else:
            s = singular_values.to(u_hat.dtype)
            if s.shape != sx.shape:
                raise ValueError(f"singular values of shape {tuple(s.shape)} do not fit latents with SVD shape {tuple(sx.shape)}")
            if not torch.isfinite(s).all():
                raise ValueError("the predicted singular values contain NaN or infinite values")
        y = compose(u_hat, s, vh_hat)
    if gain != 1.0:
        y = x.to(y.dtype) + gain * (y - x.to(y.dtype))
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------
# The paper's premises, measured (Sec. 4): subspace distances, alignments, difference spectra
# --------------------------------------------------------------------------------------------

def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """Principal angles θ_1 ≤ … ≤ θ_p between the column spaces of ``a`` [..., n, p] and ``b`` [..., n, q]
    (orthonormal columns): θ_i = arccos σ_i(aᵀb), p' = min(p, q) angles."""
    cos = torch.linalg.svdvals(a.transpose(-1, -2) @ b).clamp(-1.0, 1.0)
    return torch.arccos(cos)            # σ descending → θ ascending


def grassmann_distance(a: Tensor, b: Tensor) -> Tensor:
    """Geodesic distance on the Grassmannian (Sec. 4.3): d(A, B) = sqrt(Σ_k θ_k²) over the principal angles."""
    return principal_angles(a, b).pow(2).sum(-1).sqrt()


def spectrum_coefficients(d: Tensor, u: Tensor, vh: Tensor) -> Tensor:
    """c_i = u_iᵀ·d·v_i: the coordinates of ``d`` [..., H, W] on the rank-one components u_i v_iᵀ of an SVD
    (U [..., H, r], Vh [..., r, W]); for d = the decomposed matrix itself, c = S."""
    return ((u.transpose(-1, -2) @ d.to(u.dtype)) * vh).sum(-1)


def component_alignment(u1: Tensor, vh1: Tensor, u2: Tensor, vh2: Tensor) -> Tensor:
    """A_ij = ⟨u1_i v1_iᵀ, u2_j v2_jᵀ⟩_F = (u1_iᵀ u2_j)(v1_iᵀ v2_j), [..., r, r]: how far component i of one SVD
    lies along component j of another (|A_ij| = 1 for the same rank-one component)."""
    return (u1.transpose(-1, -2) @ u2) * (vh1 @ vh2.transpose(-1, -2))


# --------------------------------------------------------------------------------------------
# Φ: the singular-value predictor
# --------------------------------------------------------------------------------------------

def default_hidden(height: int, width: int) -> int:
    """The paper's width is H·W (4096 at 64×64); capped at 4096 so that SDXL's 128×128 latents do
    not make a 0.8-billion-parameter MLP."""
    return min(int(height) * int(width), 4096)


class AVINet(nn.Module):
    """Φ: x's channel (H·W values) → (S, Δs), r values each; three Linear+ReLU layers and two linear heads."""

    def __init__(self, height: int, width: int, k: Optional[int] = None, hidden: Optional[int] = None):
        super().__init__()
        self.height, self.width = int(height), int(width)
        if self.height < 2 or self.width < 2:
            raise ValueError(f"latent size must be at least 2×2, got {height}×{width}")
        self.rank = rank_of(height, width)
        self.k = check_k(default_k(height, width) if k is None else k, self.rank)
        self.hidden = int(hidden) if hidden else default_hidden(height, width)
        n = self.height * self.width
        self.body = nn.Sequential(nn.Linear(n, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                                  nn.Linear(self.hidden, self.hidden), nn.ReLU())
        self.head_s = nn.Linear(self.hidden, self.rank)
        self.head_ds = nn.Linear(self.hidden, self.rank)

    def check_size(self, height: int, width: int) -> None:
        if (int(height), int(width)) != (self.height, self.width):
            raise ValueError(f"this AVI model (Φ) was trained for {self.height}×{self.width} latents "
                             f"({self.height * 8}×{self.width * 8} pixels for an 8× VAE), "
                             f"the latents are {height}×{width}: train Φ for this size")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., H, W] → (S, Δs), each [..., r]."""
        self.check_size(*x.shape[-2:])
        h = self.body(x.flatten(-2).to(self.head_s.weight.dtype))
        return self.head_s(h), self.head_ds(h)

    def config(self) -> dict:
        return {"height": self.height, "width": self.width, "k": self.k, "hidden": self.hidden, "rank": self.rank}


def save_avi_net(net: AVINet, path: str, extra: Optional[dict] = None) -> None:
    """safetensors with the size (H, W, k, hidden) and training notes in the metadata."""
    import safetensors.torch
    metadata = {"format": FORMAT_NAME, "config": json.dumps(net.config()), "info": json.dumps(extra or {})}
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in net.state_dict().items()}
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def load_avi_net(path: str) -> tuple[AVINet, dict]:
    """(Φ on the CPU in eval mode, the info dict saved with it)."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT_NAME or "config" not in metadata:
            raise ValueError(f"{path} is not an AVI model file (no '{FORMAT_NAME}' metadata)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    cfg = json.loads(metadata["config"])
    net = AVINet(cfg["height"], cfg["width"], cfg["k"], cfg["hidden"])
    net.load_state_dict(tensors)
    return net.eval(), json.loads(metadata.get("info", "{}"))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

def samples_per_pair_for(pairs: int) -> int:
    """The paper's N: 5000 for one pair, 500 for many (⌈5000/P⌉ in between, at least 500)."""
    return max(PAPER_SAMPLES_MANY_PAIRS, math.ceil(PAPER_SAMPLES_ONE_PAIR / max(1, int(pairs))))


def avi_loss(out: AVIOutputs, x: Tensor, z: Tensor, lambdas: Sequence[float] = PAPER_LAMBDAS,
             weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(total loss, the four terms), each a squared Frobenius norm averaged over channel matrices and
    samples; ``weights`` [B] (summing to 1) weight the samples of a batch that holds each sample once
    with its multiplicity (the same value as the plain mean over the batch with repeats)."""
    per = torch.stack([((out.y_hat - z) ** 2).sum((-2, -1)),
                       ((out.y_tilde - x) ** 2).sum((-2, -1)),
                       ((out.s - out.s_z) ** 2).sum(-1),
                       ((out.s + out.delta_s - out.s_x) ** 2).sum(-1)])          # [4, B, C...]
    per = per.flatten(2).mean(-1) if per.ndim > 2 else per                       # [4, B]
    terms = per.mean(-1) if weights is None else (per * weights.to(per.dtype)).sum(-1)
    return (terms * torch.as_tensor(tuple(lambdas), dtype=terms.dtype, device=terms.device)).sum(), terms


def train_avi(x: Tensor, z: Tensor, *, k: Optional[int] = None, hidden: Optional[int] = None,
              samples_per_pair: Optional[int] = None, epochs: int = 5, batch_size: int = 256, lr: float = 1e-3,
              lambdas: Sequence[float] = PAPER_LAMBDAS, rho: float = 1.0, seed: int = 0,
              device: torch.device | str | None = None, net: Optional[AVINet] = None,
              callback: Optional[TrainCallback] = None) -> tuple[AVINet, list[float]]:
    """Train Φ on latent pairs x[i], z[i] ([P, C, H, W] each, paper space) with Adam.

    The SVDs of the pairs and Û, V̂ (fixed during training: ρ is constant) are computed once; each
    step runs Φ on a batch and the loss of Algorithm 1's training stage. Returns (Φ on the CPU in
    eval mode, the loss of every step)."""
    check_pair(x, z)
    if x.ndim != 4:
        raise ValueError(f"x and z must be latent batches [pairs, channels, H, W], got shape {tuple(x.shape)}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    if len(lambdas) != 4 or any(not math.isfinite(v) or v < 0 for v in lambdas):
        raise ValueError(f"lambdas must be four non-negative numbers, got {tuple(lambdas)}")
    rho = check_rho(rho)
    height, width = x.shape[-2:]
    device = torch.device(device) if device is not None else x.device
    if net is None:
        torch.manual_seed(seed)
        net = AVINet(height, width, k, hidden)
    net.check_size(height, width)
    k = net.k
    net = net.to(device).train()
    pairs = x.shape[0]
    n_per_pair = samples_per_pair_for(pairs) if not samples_per_pair else int(samples_per_pair)

    with torch.no_grad():
        xd, zd = x.to(device, torch.float32), z.to(device, torch.float32)
        ux, sx, vhx = channel_svd(xd)
        uz, sz, vhz = channel_svd(zd)
        u_hat, vh_hat = integrate_vectors(ux, vhx, uz, vhz, k, rho)
        u_til, vh_til = u_hat.flip(-1), vh_hat.flip(-2)

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    step = 0
    for _ in range(int(epochs)):
        order = torch.randperm(pairs * n_per_pair, generator=g) % pairs
        for start in range(0, len(order), batch_size):
            # A batch draws pairs with repeats (always, with one pair); Φ and the loss run once per distinct
            # pair, weighted by its count: the same loss and gradient as the batch with its repeats.
            idx, counts = torch.unique(order[start:start + batch_size], return_counts=True)
            idx, w = idx.to(device), (counts.float() / counts.sum()).to(device)
            s, ds = net(xd[idx])
            out = AVIOutputs(compose(u_hat[idx], s, vh_hat[idx]), compose(u_til[idx], s + ds, vh_til[idx]),
                             sx[idx], sz[idx], s, ds, u_hat[idx], vh_hat[idx])
            loss, _ = avi_loss(out, xd[idx], zd[idx], lambdas, w)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if callback is not None:
                callback(step, losses[-1])
            step += 1
    return net.cpu().eval(), losses


@torch.no_grad()
def integrate_with_net(net: AVINet, x: Tensor, z: Tensor, rho: float, k: Optional[int] = None,
                       use: str = "S", integration: str = "paper", gain: float = 1.0, support: float = 0.0) -> Tensor:
    """ŷ with Φ's singular values: ``use="S"`` (the paper's ŷ = Û·S·V̂) or ``"S+ds"`` (Û·(S+Δs)·V̂);
    ``integration``, ``gain`` and ``support`` as in :func:`integrate`."""
    check_pair(x, z)
    net.check_size(*x.shape[-2:])
    param = next(net.parameters())
    s, ds = net(x.to(param.device, torch.float32))
    if use not in ("S", "S+ds"):
        raise ValueError(f"use must be 'S' or 'S+ds', got {use!r}")
    values = s if use == "S" else s + ds
    return integrate(x, z, net.k if k is None else k, rho, values.to(x.device), integration, gain, support)
