"""A plain autoencoder of DisDiff's code size, the baseline of the disentanglement table.

DisDiff (Yang et al. 2023) encodes an image into N factor codes z^c of C channels each (the toy
world: 6 × 32). This baseline has the same code shape, [B, groups, group_dim], but nothing asks its
groups to separate the factors: a conv encoder (four stride-2 blocks, 64 → 4 px, then a linear map
to groups × group_dim) and a mirrored decoder, trained with the pixel MSE on factor-world renders.
Scored like DisDiff (per-group PCA, then FactorVAE and DCI; ``evaluation/disentangle_metrics.py``), it
shows what an unstructured code of that size gets.

Weights are saved as safetensors with the config in the metadata (``save_autoencoder`` /
``load_autoencoder``).
"""
from __future__ import annotations

import json
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..toy_world import factor_world as fw

DEFAULT_CONFIG = {"image_size": fw.IMAGE_SIZE, "groups": fw.NUM_FACTORS, "group_dim": 32, "width": 32}
FILE_KIND = "disentangle_autoencoder_baseline"


def _down(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.SiLU(),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


def _up(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                         nn.GroupNorm(8, c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                         nn.GroupNorm(8, c_out), nn.SiLU())


class ConvAutoencoder(nn.Module):
    """Images [B, 3, S, S] in [0, 1] ↔ codes [B, groups, group_dim]; S = ``image_size`` (a multiple of 16)."""

    def __init__(self, image_size: int = 64, groups: int = 6, group_dim: int = 32, width: int = 32):
        super().__init__()
        if image_size % 16 or image_size < 16:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
        if groups < 1 or group_dim < 1 or width < 8 or width % 8:
            raise ValueError(f"need groups ≥ 1, group_dim ≥ 1 and width a multiple of 8, got {groups}, {group_dim}, {width}")
        self.config = {"image_size": image_size, "groups": groups, "group_dim": group_dim, "width": width}
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.bottom = image_size // 16
        flat = chans[-1] * self.bottom * self.bottom
        self.encoder = nn.Sequential(_down(3, chans[0]), _down(chans[0], chans[1]), _down(chans[1], chans[2]),
                                     _down(chans[2], chans[3]), nn.Flatten(), nn.Linear(flat, groups * group_dim))
        self.decoder_in = nn.Linear(groups * group_dim, flat)
        self.decoder = nn.Sequential(_up(chans[3], chans[2]), _up(chans[2], chans[1]), _up(chans[1], chans[0]),
                                     _up(chans[0], chans[0]), nn.Conv2d(chans[0], 3, 3, padding=1))

    @property
    def code_shape(self) -> tuple[int, int]:
        return self.config["groups"], self.config["group_dim"]

    def encode(self, images: Tensor) -> Tensor:
        """Codes [B, groups, group_dim] of images [B, 3, S, S] in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape [B, 3, H, W], got {tuple(images.shape)}")
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="area")
        return self.encoder(images * 2 - 1).view(images.shape[0], *self.code_shape)

    def decode(self, codes: Tensor) -> Tensor:
        """Images [B, 3, S, S] (unclamped, ~[0, 1]) of codes [B, groups, group_dim]."""
        h = self.decoder_in(codes.reshape(codes.shape[0], -1))
        h = h.view(codes.shape[0], -1, self.bottom, self.bottom)
        return (self.decoder(h) + 1) / 2

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


def build_autoencoder(seed: int = 0, **config) -> ConvAutoencoder:
    """A freshly initialised autoencoder; the weights depend only on ``seed`` (global RNG untouched)."""
    cfg = {**DEFAULT_CONFIG, **config}
    unknown = set(cfg) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown autoencoder config keys: {sorted(unknown)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return ConvAutoencoder(**cfg)


def _renders(factors: Tensor, size: int) -> Tensor:
    """Factor-world scenes at the model's size (area-downsampled, or nearest-upscaled by whole factors)."""
    if size == fw.IMAGE_SIZE:
        return fw.render(factors)
    if size % fw.IMAGE_SIZE == 0:
        return fw.render_at(factors, size)
    return F.interpolate(fw.render(factors), size=(size, size), mode="area")


def train_autoencoder(model: ConvAutoencoder, steps: int, batch_size: int = 256, learning_rate: float = 1e-3,
                      seed: int = 0, device=None, autocast: bool | None = None,
                      callback: Callable[[int, int, Tensor], None] | None = None,
                      render_chunk: int = 16) -> dict:
    """Train with the pixel MSE on freshly rendered factor-world scenes (uniform factors).

    Adam, cosine decay of the learning rate to 10 % over ``steps``. The data depend only on
    ``seed``; renders are made on the CPU, ``render_chunk`` batches at a time, and moved to the
    model's device. ``autocast`` (default: on for CUDA) runs the model in bf16. ``callback(step,
    steps, loss)`` is called after every step with the detached loss tensor (``float(loss)`` syncs
    a GPU; raise from it to stop). Returns {"steps", "final_loss", "losses" (one per step)}.
    """
    steps, batch_size = int(steps), int(batch_size)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"need steps ≥ 0 and batch_size ≥ 1, got {steps}, {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    use_autocast = (device.type == "cuda") if autocast is None else bool(autocast)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    generator = torch.Generator().manual_seed(int(seed))
    size = model.config["image_size"]
    losses = []
    buffer: list[Tensor] = []
    for step in range(steps):
        if not buffer:
            n = min(render_chunk, steps - step)
            factors = fw.sample_factors(n * batch_size, generator)
            images = _renders(factors, size)
            buffer = list(images.to(device, non_blocking=True).split(batch_size))[::-1]
        images = buffer.pop()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
            loss = F.mse_loss(model(images).float(), images)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.detach())
        if callback is not None:
            callback(step + 1, steps, losses[-1])
    model.eval()
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    return {"steps": steps, "final_loss": values[-1] if values else math.nan, "losses": values}


@torch.no_grad()
def reconstruction_mse(model: ConvAutoencoder, n: int = 1024, seed: int = 12345, batch_size: int = 256) -> float:
    """Pixel MSE of reconstructions of ``n`` uniformly drawn renders (at the model's image size)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        images = _renders(fw.sample_factors(min(batch_size, n - start), generator), model.config["image_size"]).to(device)
        total += float(F.mse_loss(model(images).float().clamp(0, 1), images, reduction="sum"))
        count += images.numel()
    return total / max(count, 1)


def save_autoencoder(model: ConvAutoencoder, path: str, extra_metadata: dict | None = None) -> None:
    """safetensors file with ``config`` (JSON) and ``kind`` in the metadata, plus ``extra_metadata``
    (values turned into strings; dicts/lists as JSON)."""
    from safetensors.torch import save_file
    metadata = {"kind": FILE_KIND, "config": json.dumps(model.config)}
    for key, value in (extra_metadata or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata=metadata)


def load_autoencoder(path: str, device="cpu") -> tuple[ConvAutoencoder, dict]:
    """(model in eval mode, metadata) from a file written by :func:`save_autoencoder`."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("kind") != FILE_KIND or "config" not in metadata:
        raise ValueError(f"{path} is not an autoencoder-baseline file (metadata kind {metadata.get('kind')!r})")
    model = ConvAutoencoder(**json.loads(metadata["config"]))
    model.load_state_dict(state)
    return model.eval().to(device), metadata


def score_baseline(seed: int, steps: int, *, device, load: str | None = None, save_dir: str | None = None,
                   width: int = 32, group_dim: int = 32, batch_size: int = 256, learning_rate: float = 1e-3,
                   eval_size: int | None = None, encode_batch: int = 2048, factor_vae: dict | None = None,
                   dci: dict | None = None, log: Callable[[str], None] = print) -> dict:
    """One row of the baseline table: train the autoencoder ``steps`` steps with ``seed`` (or load the
    file ``load``), optionally save it into ``save_dir``, then score it with
    :func:`evaluation.disentangle_metrics.evaluate_encoder`; the results carry the seed, the training
    log, the reconstruction MSE and the training time."""
    import os
    import time
    from .disentangle_metrics import evaluate_encoder
    t0 = time.perf_counter()
    if load is not None:
        model, _ = load_autoencoder(load, device=device)
        train_log = {"steps": 0, "final_loss": float("nan")}
    else:
        model = build_autoencoder(seed, width=width, group_dim=group_dim).to(device)
        every = max(1, steps // 10)

        def report(step, total, loss):
            if step % every == 0 or step == total:
                log(f"  seed {seed}: step {step}/{total}, loss {float(loss):.5f}")
        train_log = train_autoencoder(model, steps, batch_size=batch_size, learning_rate=learning_rate,
                                      seed=seed, device=device, callback=report)
        if save_dir:
            os.makedirs(save_dir, exist_ok=True)
            save_autoencoder(model, os.path.join(save_dir, f"autoencoder_baseline_seed{seed}.safetensors"),
                             {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": learning_rate})
    t_train = time.perf_counter() - t0
    model.eval()
    mse = reconstruction_mse(model)
    device = torch.device(device)

    def encode(images):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return model.encode(images).float()
    r = evaluate_encoder(encode, seed, eval_size=eval_size, batch_size=encode_batch, device=device,
                         metric_device=device, factor_vae=factor_vae, dci=dci)
    r.update(seed=seed, train_steps=train_log["steps"], final_train_loss=train_log["final_loss"],
             reconstruction_mse=mse, seconds_train=t_train)
    log(f"  seed {seed}: FactorVAE {r['factor_vae']:.3f}, DCI D {r['dci_disentanglement']:.3f} "
        f"C {r['dci_completeness']:.3f} I {r['dci_informativeness']:.3f}, recon MSE {mse:.5f}; "
        f"train {t_train:.1f} s, encode {r['seconds_encode']:.1f} s, metrics {r['seconds_metrics']:.1f} s")
    return r

