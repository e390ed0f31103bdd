"""Learning the λ schedule (Wu et al. 2023, Sec. 3.3-3.4), host-agnostic.

Sampling with a per-step mixed context c_t = λ_t·c1 + (1 − λ_t)·c0 is differentiable in λ. The
optimisation minimises, over λ_1:T,

    L(λ) = L_dir(X0(λ), X0(0); c1 − c0) + β·L_perc(X0(λ), X0(0))

with the directional CLIP loss L_dir = 1 − cos(E_I(X0(λ)) − E_I(X0(0)), E_T(c1) − E_T(c0)).
Gradients go through every sampler step; each step is checkpointed (its denoiser is recomputed in
the backward pass), so at most one step's activations are alive at a time.

Real images (Sec. 3.4): an inversion trajectory x*_0..N (most noisy first) and per-step corrections
δ_i = x*_{i+1} − step(x*_i; λ = 0) make the λ = 0 path pass exactly through the image's
trajectory; the edit reuses δ_i for the first N − r steps and leaves the last r steps free
("re-diffusion").
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .conditioning import match_token_length
from .ddim import ddim_step_sigma

ContextDenoiser = Callable[..., Tensor]
"""``denoise(x, sigma, context, y=None) → x̂0`` for a batch of contexts (one per batch item); ``y`` is
an optional per-prompt vector such as SDXL's ADM input (pooled text embedding + size embedding),
which is mixed with the same λ: it is linear in the pooled embedding, so λ·y1 + (1 − λ)·y0 is the
ADM input of the mixed pooled embedding."""


def _lerp(a: Optional[Tensor], b: Optional[Tensor], lam: Tensor) -> Optional[Tensor]:
    """λ·b + (1 − λ)·a with a scalar λ, or one λ per batch item (λ of shape [B])."""
    if a is None:
        return None
    if lam.ndim == 1:
        lam = lam.view(-1, *([1] * (a.ndim - 1)))
    return lam * b + (1 - lam) * a


def guided_denoise(denoise: ContextDenoiser, x: Tensor, sigma: Tensor, context: Tensor,
                   uncond: Optional[Tensor], cfg: float, y: Optional[Tensor] = None,
                   y_uncond: Optional[Tensor] = None) -> Tensor:
    """Classifier-free guidance in x̂0 space (equivalent to ε space): D_u + cfg·(D_c − D_u)."""
    if uncond is None or cfg == 1.0:
        return denoise(x, sigma, context) if y is None else denoise(x, sigma, context, y=y)
    uncond = match_token_length(uncond.expand(x.shape[0], -1, -1), context.shape[1]).to(context)
    args = (torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([context, uncond]))
    if y is None:
        both = denoise(*args)
    else:
        both = denoise(*args, y=torch.cat([y.expand(x.shape[0], -1), y_uncond.expand(x.shape[0], -1).to(y)]))
    cond, unc = both.chunk(2)
    return unc + cfg * (cond - unc)


def mixed_step(denoise: ContextDenoiser, x: Tensor, sigma: float, sigma_next: float, c0: Tensor, c1: Tensor,
               lam: Tensor, uncond: Optional[Tensor], cfg: float, y0: Optional[Tensor] = None,
               y1: Optional[Tensor] = None, y_uncond: Optional[Tensor] = None) -> Tensor:
    """One η = 0 DDIM step with context λ·c1 + (1 − λ)·c0 (c0 already at c1's token length)
    and, if given, the per-prompt vector λ·y1 + (1 − λ)·y0. ``lam``: a scalar, or [B] (one per item)."""
    context = _lerp(c0, c1, lam)
    s = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    denoised = guided_denoise(denoise, x, s, context.expand(x.shape[0], -1, -1), uncond, cfg,
                              _lerp(y0, y1, lam), y_uncond)
    return ddim_step_sigma(x, denoised, sigma, sigma_next)


def sample_mixed(denoise: ContextDenoiser, x_T: Tensor, sigmas: Sequence[float], c0: Tensor, c1: Tensor,
                 lambdas: Tensor, uncond: Optional[Tensor] = None, cfg: float = 1.0,
                 corrections: Optional[Sequence[Optional[Tensor]]] = None, use_checkpoint: bool = True,
                 callback: Optional[Callable[[int, Tensor], None]] = None, y0: Optional[Tensor] = None,
                 y1: Optional[Tensor] = None, y_uncond: Optional[Tensor] = None) -> Tensor:
    """X0(λ): DDIM sampling along decreasing ``sigmas`` with λ_i at step i, differentiable in λ.

    ``lambdas``: [N] (one schedule for the batch) or [N, B] (one schedule per batch item, i.e. B
    independent edits in one batch).

    ``corrections[i]`` (if given and not None) is added after step i. With ``use_checkpoint`` and
    gradients on, each step is recomputed in the backward pass instead of being stored.
    """
    s = [float(v) for v in sigmas]
    if lambdas.shape[0] != len(s) - 1 or lambdas.ndim > 2 or (lambdas.ndim == 2 and lambdas.shape[1] != x_T.shape[0]):
        raise ValueError(f"lambdas: need shape [{len(s) - 1}] or [{len(s) - 1}, {x_T.shape[0]}] (steps, batch), "
                         f"got {list(lambdas.shape)}")
    c0 = match_token_length(c0, c1.shape[1]).to(c1)
    x = x_T
    for i in range(len(s) - 1):
        def step(x_, lam_, i=i):
            return mixed_step(denoise, x_, s[i], s[i + 1], c0, c1, lam_, uncond, cfg, y0, y1, y_uncond)
        if use_checkpoint and torch.is_grad_enabled():
            x = checkpoint(step, x, lambdas[i], use_reentrant=False)
        else:
            x = step(x, lambdas[i])
        if corrections is not None and corrections[i] is not None:
            x = x + corrections[i]
        if callback is not None:
            callback(i, x)
    return x


@torch.no_grad()
def trajectory_corrections(denoise: ContextDenoiser, trajectory: Sequence[Tensor], sigmas: Sequence[float],
                           c0: Tensor, uncond: Optional[Tensor] = None, cfg: float = 1.0,
                           rediffusion_steps: int = 0, y0: Optional[Tensor] = None,
                           y_uncond: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """δ_i = x*_{i+1} − step(x*_i; c0) for the first N − r steps, None for the last r (re-diffusion).

    With these, sampling from x*_0 with λ = 0 passes through every x*_i of the first N − r steps.
    """
    n = len(sigmas) - 1
    if len(trajectory) != n + 1:
        raise ValueError(f"trajectory has {len(trajectory)} latents but the schedule has {n} steps")
    if not 0 <= rediffusion_steps <= n:
        raise ValueError(f"rediffusion_steps must lie in [0, {n}], got {rediffusion_steps}")
    zero = torch.zeros((), dtype=c0.dtype, device=c0.device)
    out: list[Optional[Tensor]] = []
    for i in range(n):
        if i >= n - rediffusion_steps:
            out.append(None)
            continue
        predicted = mixed_step(denoise, trajectory[i], float(sigmas[i]), float(sigmas[i + 1]), c0, c0, zero, uncond, cfg,
                               y0, y0, y_uncond)
        out.append(trajectory[i + 1] - predicted)
    return out


def directional_loss(image_emb: Tensor, neutral_image_emb: Tensor, text_direction: Tensor,
                     per_item: bool = False) -> Tensor:
    """1 − cos(E_I(edit) − E_I(neutral), E_T(styled) − E_T(neutral)), averaged over the batch
    (``per_item``: one value per batch item)."""
    delta = image_emb - neutral_image_emb
    loss = 1 - F.cosine_similarity(delta, text_direction.expand_as(delta), dim=-1, eps=1e-8)
    return loss if per_item else loss.mean()


def optimize_lambdas(loss_of: Callable[[Tensor], Tensor], init: Tensor, iterations: int = 10, lr: float = 0.03,
                     callback: Optional[Callable[[int, float, Tensor], None]] = None) -> tuple[Tensor, list[float]]:
    """Adam on λ (Wu et al.: 10 iterations, lr 0.03 in the paper, 0.05 in the code).

    ``loss_of(λ)`` samples, decodes and scores; returns (the λ with the lowest loss seen, the loss of
    every iteration). ``callback(i, loss, λ)`` after each iteration (progress, cancel).

    Independent edits in one batch: ``init`` of shape [N, B] and ``loss_of`` returning one loss per
    item [B]. The sum is minimised; Adam's per-parameter steps make that B separate optimisations,
    and the best λ is kept per item. The history then holds the mean loss.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    lam = init.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=lr)
    history: list[float] = []
    best = lam.detach().clone()
    best_loss = torch.full(init.shape[1:], float("inf"), dtype=torch.float64)
    for i in range(iterations):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(lam)
        if loss.ndim > 1 or (loss.ndim == 1 and (init.ndim != 2 or loss.shape[0] != init.shape[1])):
            raise ValueError(f"loss_of must return a scalar or one loss per column of λ, got shape {list(loss.shape)}")
        loss.sum().backward()
        value = loss.detach().double().cpu()
        history.append(float(value.mean()))
        better = value < best_loss
        best = torch.where(better.to(best.device), lam.detach(), best)
        best_loss = torch.where(better, value, best_loss)
        opt.step()
        if callback is not None:
            callback(i, history[-1], lam.detach())
    return best, history


def paper_init(steps: int, neutral_steps: int, styled_weight: float = 1.0) -> Tensor:
    """The reference implementation's start: λ = 0 for the first ``neutral_steps`` steps, then
    ``styled_weight`` (t* = 20 and 1.0 when generating, t* = 10 and 1.1 for real images)."""
    if not 0 <= neutral_steps <= steps:
        raise ValueError(f"neutral_steps must lie in [0, {steps}], got {neutral_steps}")
    return torch.tensor([0.0] * neutral_steps + [styled_weight] * (steps - neutral_steps))
