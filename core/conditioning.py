"""Mixing prompt embeddings: c_λ = λ·c1 + (1 − λ)·c0 (Wu et al. 2023, eq. 3).

Token lengths are matched the way ComfyUI's ``ConditioningAverage`` matches them: the styled
embedding c1 sets the length, the neutral c0 is truncated or padded with zeros.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def match_token_length(c: Tensor, n_tokens: int) -> Tensor:
    """Truncate ``c`` [B, L, D] to ``n_tokens``, or pad it with zero tokens."""
    if c.shape[1] >= n_tokens:
        return c[:, :n_tokens]
    pad = torch.zeros((c.shape[0], n_tokens - c.shape[1], c.shape[2]), dtype=c.dtype, device=c.device)
    return torch.cat([c, pad], dim=1)


def check_embedding_pair(c0: Tensor, c1: Tensor) -> None:
    if c0.ndim != 3 or c1.ndim != 3:
        raise ValueError(f"conditioning tensors must be [batch, tokens, channels], got {tuple(c0.shape)} and {tuple(c1.shape)}")
    if c0.shape[2] != c1.shape[2]:
        raise ValueError(
            f"neutral and styled conditioning come from different text encoders "
            f"({c0.shape[2]} vs {c1.shape[2]} channels)"
        )


def mix_embeddings(c0: Tensor, c1: Tensor, lam: float) -> Tensor:
    """λ·c1 + (1 − λ)·c0, with c0 brought to c1's token length."""
    check_embedding_pair(c0, c1)
    c0 = match_token_length(c0, c1.shape[1]).to(c1)
    return c1 * lam + c0 * (1.0 - lam)


def mix_pooled(p0: Optional[Tensor], p1: Optional[Tensor], lam: float) -> Optional[Tensor]:
    """Pooled embeddings (SDXL): λ·p1 + (1 − λ)·p0 when both exist, else whichever exists."""
    if p0 is None or p1 is None:
        return p1 if p1 is not None else p0
    return p1 * lam + p0.to(p1) * (1.0 - lam)
