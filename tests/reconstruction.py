"""Invert → reconstruct experiments through stock ComfyUI nodes (shared by tests and bench).

Needs a started host (tests/comfy_host.start_host or bench/common.start_comfy + ComfyUI's
``nodes`` with the comfy_extras nodes loaded).
"""
from __future__ import annotations

import math

import torch


def call(name, **inputs):
    """Run a registered node (stock or ours) as the executor does: inside inference mode."""
    import nodes
    n = nodes.NODE_CLASS_MAPPINGS[name]()
    with torch.inference_mode():
        out = getattr(n, n.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def latent_psnr(x: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB with the reference latent's value range as peak: 10·log10(range² / MSE)."""
    reference = reference.double()
    mse = float(((x.double() - reference) ** 2).mean())
    peak = float(reference.max() - reference.min())
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def reconstruct(model, positive, negative, noised_latent, steps, cfg, start_at_step=0):
    """Stock KSamplerAdvanced: add_noise disabled, sampler ddim, scheduler ddim_uniform."""
    return call("KSamplerAdvanced", model=model, add_noise="disable", noise_seed=0, steps=steps, cfg=cfg,
                 sampler_name="ddim", scheduler="ddim_uniform", positive=positive, negative=negative,
                 latent_image=noised_latent, start_at_step=start_at_step, end_at_step=10000,
                 return_with_leftover_noise="disable")[0]


def stock_flip_sigmas_inversion(model, positive, negative, latent, steps, cfg, scheduler="ddim_uniform"):
    """ComfyUI's own inversion route: BasicScheduler → FlipSigmas → SamplerCustom(euler, no noise)."""
    sigmas = call("BasicScheduler", model=model, scheduler=scheduler, steps=steps, denoise=1.0)[0]
    flipped = call("FlipSigmas", sigmas=sigmas)[0]
    sampler = call("KSamplerSelect", sampler_name="euler")[0]
    return call("SamplerCustom", model=model, add_noise=False, noise_seed=0, cfg=cfg, positive=positive,
                 negative=negative, sampler=sampler, sigmas=flipped, latent_image=latent)[0]


def ours_inversion(model, positive, negative, latent, steps, cfg, refine_iterations=0):
    return call("DisentangleDDIMInversion", model=model, positive=positive, latent=latent, steps=steps, cfg=cfg,
                 scheduler="ddim_uniform", refine_iterations=refine_iterations,
                 negative=None if cfg == 1.0 else negative)[0]


def reconstruction_routes(model, positive, negative, latent, steps, cfg=1.0, refine=(0, 2)):
    """(method, UNet calls per step, reconstructed LATENT) for the FlipSigmas route and ours (each refine)."""
    routes = [("FlipSigmas + euler (stock)", 1, stock_flip_sigmas_inversion(model, positive, negative, latent, steps, cfg))]
    routes += [(f"DDIM Inversion, refine {r}", 1 + r, ours_inversion(model, positive, negative, latent, steps, cfg, r))
               for r in refine]
    return [(name, calls, reconstruct(model, positive, negative, noised, steps, cfg)) for name, calls, noised in routes]


def psnr_table(model, positive, negative, latent, steps_list=(10, 25, 50), cfg=1.0, refine=(0, 2)):
    """Rows [steps, method, UNet calls/step, latent PSNR] for ours (each refine count) and FlipSigmas."""
    return [[steps, name, calls, latent_psnr(rec["samples"], latent["samples"])]
            for steps in steps_list
            for name, calls, rec in reconstruction_routes(model, positive, negative, latent, steps, cfg, refine)]
