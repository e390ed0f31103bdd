"""Ground-truth judges of the toy world: a small CNN with one classification head per factor.

Trained by scripts/train_toy_world.py on factor-world renders and their VAE reconstructions; used by
bench/quality.py and the tests to read the factors of generated images.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

JUDGE_SIZE = 64  # the classifiers read 64×64 RGB in [0, 1]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1, stride=2), nn.GroupNorm(8, c_out), nn.SiLU())


class FactorClassifier(nn.Module):
    """Four stride-2 conv blocks (64 → 4 px), 2×2 pooling, one linear head per factor."""

    def __init__(self, factor_sizes):
        super().__init__()
        self.body = nn.Sequential(_block(3, 32), _block(32, 64), _block(64, 96), _block(96, 128),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(512, k) for k in factor_sizes])

    def forward(self, images: Tensor) -> list[Tensor]:
        h = self.body(images * 2 - 1)
        return [head(h) for head in self.heads]

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Factor indices [B, num_factors] of images [B, 3, H, W] in [0, 1] (resized to 64×64)."""
        if images.shape[-1] != JUDGE_SIZE or images.shape[-2] != JUDGE_SIZE:
            images = F.interpolate(images, size=(JUDGE_SIZE, JUDGE_SIZE), mode="area")
        return torch.stack([logits.argmax(1) for logits in self(images)], dim=1)


def load_factor_classifier(path: str, device="cpu") -> tuple[FactorClassifier, list[str]]:
    """(classifier in eval mode, factor names) from a safetensors file written by the trainer."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if "factor_sizes" not in metadata:
        raise ValueError(f"{path} is not a factor-classifier file (no 'factor_sizes' metadata)")
    model = FactorClassifier(json.loads(metadata["factor_sizes"]))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().to(device), json.loads(metadata["factor_names"])


def per_factor_accuracy(predicted: Tensor, truth: Tensor) -> list[float]:
    """Fraction of rows whose prediction equals the truth, per factor column."""
    return (predicted == truth).float().mean(0).tolist()
