"""Invert → reconstruct experiments through stock ComfyUI nodes (shared by tests and bench), and
the inputs they use: a text CONDITIONING, a smooth test image's LATENT, a tamed (smooth) MODEL.

Needs a started host (harness/host.py: start_host or start_comfy).
"""
from __future__ import annotations

import math

import torch

from .runner import call


def encode(clip, text):
    """Stock CLIPTextEncode."""
    return call("CLIPTextEncode", clip=clip, text=text)[0]


def image_latent(vae, seed=0, size=64):
    """Stock VAEEncode of a smooth seeded test image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([xx, yy, (xx * yy) ** 0.5], -1)[None] * 0.8 + 0.1 * torch.rand(1, size, size, 3, generator=g)
    return call("VAEEncode", pixels=image, vae=vae)[0]


def tame(model, scale=0.1):
    """A clone whose UNet output is scaled by ``scale``: random weights give a very rough ODE
    (x_T std ≈ 30 instead of σ_max ≈ 15); real denoisers are smooth, and so is this one."""
    patched = model.clone()

    def wrapper(apply_model, args):  # apply_model returns x̂0; scale ε̂ = (x − x̂0)/σ
        x = args["input"]
        return x - scale * (x - apply_model(x, args["timestep"], **args["c"]))

    patched.set_model_unet_function_wrapper(wrapper)
    return patched


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
