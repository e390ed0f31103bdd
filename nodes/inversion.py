"""DDIM Inversion: a real image's latent → the noise that stock KSamplerAdvanced turns back into it.

The inversion runs as a ComfyUI SAMPLER through ``comfy.sample.sample_custom``, so the host does
everything it does for its own samplers: model loading (``load_models_gpu``), conditioning
preparation (SDXL pooled/size conds, ControlNets, hooks), model patches, cfg, and
``process_latent_in/out``. Our code only supplies the step rule (``core.ddim.invert_ddim``).
"""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..core.ddim import check_refine_iterations, invert_ddim
from ..core.trajectory import InversionTrajectory
from .comfy_boundary import check_latent, check_vp_model, sampling_sigmas
from .common import (
    CATEGORY,
    INVERSION_TRAJECTORY,
    InputError,
    check_conditioning,
    check_finite,
    check_int,
    core_input_errors,
)


def inversion_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None,
                               refine_iterations=0, result_sink=None):
    """k-diffusion-style sampler function running :func:`invert_ddim` on increasing ``sigmas``."""
    extra_args = {} if extra_args is None else extra_args

    def denoise(x_, sigma):
        return model(x_, sigma, **extra_args)

    def on_step(i, x_i, denoised):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if callback is not None:
            callback({"x": x_i, "i": i, "sigma": sigmas[i + 1], "sigma_hat": sigmas[i + 1], "denoised": denoised})

    result = invert_ddim(denoise, x, sigmas, refine_iterations=refine_iterations, callback=on_step)
    if result_sink is not None:
        result_sink.append(result)
    return result.latent


def inversion_sigmas(model, scheduler: str, steps: int) -> torch.Tensor:
    """The σ schedule of the reconstructing KSamplerAdvanced (ddim, ``scheduler``, ``steps``), flipped
    for inversion (0 first)."""
    return sampling_sigmas(model, steps, "ddim", scheduler).flip(0)


class DDIMInversion:
    DESCRIPTION = (
        "Inverts a VAE-encoded image with DDIM: the output LATENT is the noise from which stock "
        "KSamplerAdvanced (add_noise disabled, sampler ddim, same scheduler, steps and "
        "conditioning, start_at_step 0) reconstructs the image. Also outputs the latent at every step."
    )
    CATEGORY = f"{CATEGORY}/inversion"
    RETURN_TYPES = ("LATENT", INVERSION_TRAJECTORY)
    RETURN_NAMES = ("noised_latent", "trajectory")
    OUTPUT_TOOLTIPS = (
        "The inverted latent x_T; feed it to KSamplerAdvanced with add_noise disabled.",
        "The latent at every step (index 0 = x_T, last = the input latent), for re-diffusion and AVI.",
    )
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model that will also do the reconstruction."}),
                "positive": ("CONDITIONING", {"tooltip": "The neutral prompt: the same conditioning the reconstruction samples with."}),
                "latent": ("LATENT", {"tooltip": "VAE Encode output of the real image."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 10000, "tooltip": "Steps of the sampling schedule to invert (use the same in KSamplerAdvanced)."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "Classifier-free guidance; 1.0 (no guidance) inverts most faithfully. Above 1, connect a negative and add refine iterations."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "ddim_uniform", "tooltip": "Scheduler of the reconstruction sampler."}),
                "refine_iterations": ("INT", {"default": 0, "min": 0, "max": 100,
                                              "tooltip": "Fixed-point iterations per step that make each inverse step the exact inverse of a DDIM step. Each costs one more model call per step; 2-5 keep inversion tight at cfg > 1 or few steps."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt, needed when cfg is not 1."}),
            },
        }

    def invert(self, model, positive, latent, steps, cfg, scheduler, refine_iterations, negative=None):
        steps, refine_iterations = check_int("steps", steps, 1, 10000), check_int("refine_iterations", refine_iterations, high=100)
        with core_input_errors("refine_iterations"):   # core's check, before the sampler runs
            check_refine_iterations(refine_iterations)
        cfg = check_finite("cfg", cfg, 0.0, 100.0)
        check_conditioning(positive, "positive")
        check_vp_model(model, "DDIM inversion")
        if negative is None:
            if abs(cfg - 1.0) > 1e-6:
                raise InputError(f"negative: cfg is {cfg}, so a negative conditioning is needed (or set cfg to 1.0)")
            negative = []
        else:
            check_conditioning(negative, "negative")
        samples = check_latent(model, latent, "latent")

        sigmas = inversion_sigmas(model, scheduler, steps)
        results = []
        sampler = comfy.samplers.KSAMPLER(
            inversion_sampler_function,
            extra_options={"refine_iterations": int(refine_iterations), "result_sink": results},
        )
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        noise = torch.zeros(samples.shape, dtype=samples.dtype, layout=samples.layout, device="cpu")
        out_samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, sigmas, positive, negative, samples,
            noise_mask=None, callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0,
        )
        result = results[-1]
        device = comfy.model_management.intermediate_device()
        process_out = model.model.process_latent_out
        # as comfy.samplers does for the sampler's output (process_latent_out on the sampling device, then the
        # move): latents[0] is then noised_latent bit for bit, on a GPU too
        latents = torch.stack([process_out(x.to(torch.float32)).to(device) for x in result.trajectory])
        trajectory = InversionTrajectory(
            latents=latents,
            sigmas=result.sigmas_sampling,
            steps=int(steps),
            scheduler=scheduler,
            cfg=float(cfg),
            refine_iterations=int(refine_iterations),
        )
        out = {k: v for k, v in latent.items() if k != "noise_mask"}
        out["samples"] = out_samples
        return (out, trajectory)


class TrajectoryLatent:
    DESCRIPTION = "The latent at one step of a DDIM inversion trajectory (step 0 = x_T, the last step = the image)."
    CATEGORY = f"{CATEGORY}/inversion"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent at that step: KSamplerAdvanced resumes from it with add_noise disabled and start_at_step = step.",)
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "trajectory": (INVERSION_TRAJECTORY, {"tooltip": "DDIM Inversion's trajectory output."}),
                "step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                 "tooltip": "Resume KSamplerAdvanced at start_at_step = this step (add_noise disabled)."}),
                "expected_steps": ("INT", {"default": 0, "min": 0, "max": 10000,
                                           "tooltip": "If not 0, fail unless the trajectory was made with this many steps (the steps of the sampler you feed)."}),
            }
        }

    def select(self, trajectory, step, expected_steps):
        step, expected_steps = check_int("step", step), check_int("expected_steps", expected_steps, 0)  # 0: any
        if not isinstance(trajectory, InversionTrajectory):
            raise InputError("trajectory: not an INVERSION_TRAJECTORY")
        with core_input_errors("trajectory", "step"):
            if expected_steps:
                trajectory.check_steps(expected_steps)
            samples = trajectory.latent_at(step)
        return ({"samples": samples.clone()},)


NODE_CLASS_MAPPINGS = {
    "DisentangleDDIMInversion": DDIMInversion,
    "DisentangleTrajectoryLatent": TrajectoryLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DisentangleDDIMInversion": "DDIM Inversion",
    "DisentangleTrajectoryLatent": "Inversion Trajectory Latent",
}
