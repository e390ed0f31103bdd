"""The pack's boundary with ComfyUI's objects, in one place for every node module:

* σ schedules: :func:`sampling_sigmas`, the σs ComfyUI's KSampler samples for (steps, sampler,
  scheduler), for every call site (AVI's capture, DDIM inversion, λ optimisation, the λ-schedule
  nodes); :func:`step_progress_for_model`, a σ's place on the model's 0→1 axis; x_T as KSampler makes
  it (:func:`initial_noise`); the model's discrete ᾱ (:func:`alphas_cumprod`, through core/ddim.py's
  VP↔σ conversion);
* step progress: :class:`StepProgress`, ComfyUI's progress bar with Cancel;
* the model's denoiser as core calls it (:func:`unet_denoiser`) and text encoding as CLIPTextEncode
  does it (:func:`encode_text`);
* model and LATENT checks (:func:`check_vp_model`, :func:`check_unet_model`, :func:`latent_samples`,
  :func:`check_latent`);
* differentiable views of the host's models and activation recomputation (below).

Differentiable views of the host's models, and activation recomputation, for gradients through them.

ComfyUI runs nodes under inference mode and loads weights as inference tensors, which autograd
cannot save for backward. A deep copy made outside inference mode works but doubles the weights'
memory (SD1.5's UNet: 1.6 GiB, SDXL's: 4.8 GiB). :func:`differentiable_view` makes the copy share
the weights' memory instead: each weight becomes an ordinary tensor on the same storage. The
host's module is left as it is.

:func:`recompute_in_backward` trades compute for memory: chosen blocks keep only their inputs for
backward and run their forward again there (``torch.utils.checkpoint``, non-reentrant), so at most one
block's activations are alive during backward. Plain torch; the block names below are ComfyUI's.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable, Optional

import comfy.model_management as mm
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from torch.utils.checkpoint import checkpoint

from ..core.ddim import alpha_bar_from_sigma
from .common import InputError


# --------------------------------------------------------------------------------------------
# σ schedules
# --------------------------------------------------------------------------------------------

def sampling_sigmas(model, steps: int, sampler_name: str | None, scheduler: str) -> torch.Tensor:
    """The σ schedule (float32, CPU, decreasing to 0) that ComfyUI's KSampler, and so
    comfy.sample.sample and KSamplerAdvanced, samples for ``steps`` of ``scheduler`` with
    ``sampler_name`` at full denoise: the scheduler's σs, except that for the samplers of
    ``KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS`` (dpm_2, uni_pc, ...) KSampler computes one step
    more and drops the penultimate σ. ``sampler_name`` None: the scheduler's own σs (what
    BasicScheduler gives, what any other sampler gets)."""
    sampling = model.get_model_object("model_sampling")
    discard_penultimate = sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps + 1 if discard_penultimate else steps)
    if discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas.float().cpu()


def step_progress_for_model(model, sigmas) -> list[float]:
    """Progress p ∈ [0, 1] of each σ on the model's own axis: p = 1 − t(σ)/(T−1) for discrete models."""
    sampling = model.get_model_object("model_sampling")
    if hasattr(sampling, "sigmas"):
        last = len(sampling.sigmas) - 1
        return [1.0 - float(sampling.timestep(torch.as_tensor(s))) / last for s in sigmas]
    return [k / max(len(sigmas) - 1, 1) for k in range(len(sigmas))]


def initial_noise(model, latent: torch.Tensor, seed: int, sigma0: float) -> torch.Tensor:
    """x_T exactly as KSampler makes it: prepare_noise(seed), then the model's noise scaling at σ_0."""
    sampling = model.get_model_object("model_sampling")
    noise = comfy.sample.prepare_noise(latent, seed)
    start = model.model.process_latent_in(latent)
    max_denoise = math.isclose(float(sampling.sigma_max), sigma0, rel_tol=1e-5) or sigma0 > float(sampling.sigma_max)
    return sampling.noise_scaling(torch.tensor(sigma0), noise, start, max_denoise)


def alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t = 1/(1+σ_t²) of the model's own discrete schedule (float32, CPU)."""
    return alpha_bar_from_sigma(model.get_model_object("model_sampling").sigmas.float().cpu())


# --------------------------------------------------------------------------------------------
# Step progress
# --------------------------------------------------------------------------------------------

class StepProgress:
    """One progress tick per sampler step of a whole node run (e.g. the λ optimisation's forward and
    backward passes), with Cancel; ``show(preview)`` puts the current result in the progress bar's
    live preview (kept between ticks)."""

    def __init__(self, total: int):
        self.total, self.done = int(total), 0
        self.bar = comfy.utils.ProgressBar(self.total)

    def __call__(self, done=None, total=None) -> None:   # core's StepHook: on_step(done, total) of one pass
        mm.throw_exception_if_processing_interrupted()
        self.done = min(self.done + 1, self.total)
        self.bar.update_absolute(self.done, self.total)

    def show(self, preview) -> None:
        self.bar.update_absolute(self.done, self.total, preview)


# --------------------------------------------------------------------------------------------
# The denoiser and text encoding
# --------------------------------------------------------------------------------------------

def unet_denoiser(model, unet):
    """D(x, σ, context, y) = x̂0, the computation of BaseModel.apply_model (y: SDXL's ADM vector)."""
    sampling = model.get_model_object("model_sampling")
    dtype = model.model.manual_cast_dtype or model.model.get_dtype()  # as BaseModel._apply_model picks it

    def denoise(x, sigma, context, y=None):
        xc = sampling.calculate_input(sigma, x)
        t = sampling.timestep(sigma).float()
        extra = {} if y is None else {"y": y.to(dtype)}
        eps = unet(xc.to(dtype), t, context=context.to(dtype), **extra).float()
        return sampling.calculate_denoised(sigma, eps, x)

    return denoise


def encode_text(clip, text: str, name: str):
    """(cross-attention context, pooled output or None) of a prompt, as CLIPTextEncode computes them."""
    if not text.strip() and name != "negative_text":
        raise InputError(f"{name}: the text is empty")
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


# --------------------------------------------------------------------------------------------
# Model and LATENT checks
# --------------------------------------------------------------------------------------------

def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def latent_samples(latent: dict, name: str = "latent"):
    """The samples of an image LATENT [batch, channels, height, width]."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise InputError(f"{name}: not a LATENT (no 'samples')")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise InputError(f"{name}: expected an image latent [batch, channels, height, width], got shape {tuple(samples.shape)}")
    return samples


def check_latent(model, latent: dict, name: str = "latent"):
    """The latent's samples, after checking they fit the model and are finite; returns the tensor."""
    samples = latent_samples(latent, name)
    expected = latent_channels(model)
    if samples.shape[1] != expected:
        raise InputError(
            f"{name} has {samples.shape[1]} channels but the model expects {expected}: "
            "encode the image with this model's VAE"
        )
    if not torch.isfinite(samples).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return samples


def check_vp_model(model, what: str) -> None:
    """DDIM maths needs a variance-preserving (ε / v / EDM) model, not a flow-matching one."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        raise InputError(f"model: {what} needs an ε- or v-prediction diffusion model; this is a flow-matching model")


def check_unet_model(model) -> None:
    """DisDiff reads the UNet's input-block features: an ε- or v-prediction UNet model."""
    check_vp_model(model, "DisDiff")
    if not hasattr(model.model, "diffusion_model") or not hasattr(model.model.diffusion_model, "input_blocks"):
        raise InputError("model: DisDiff needs a UNet model (SD1.x / SD2.x / SDXL-type)")


# --------------------------------------------------------------------------------------------
# Differentiable views and recomputation
# --------------------------------------------------------------------------------------------

VAE_DECODER_BLOCKS = ("ResnetBlock", "AttnBlock", "Upsample")
"""Blocks of ComfyUI's KL-VAE decoder (comfy/ldm/modules/diffusionmodules/model.py)."""
UNET_BLOCKS = ("ResBlock", "SpatialTransformer")
"""Blocks of ComfyUI's SD1/SD2/SDXL UNet (comfy/ldm/modules/diffusionmodules/openaimodel.py)."""


def shared_tensor(t: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """``t`` as an ordinary (non-inference) tensor on the same memory; a copy only if it must move to
    ``device`` or is a tensor subclass (quantised weights), which cannot be aliased this way."""
    with torch.inference_mode(False):
        if device is not None and t.device != torch.device(device):
            return t.detach().to(device, copy=True)
        if not t.is_inference():
            return t.detach()
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            return t.detach().clone()
        alias = torch.empty(0, dtype=t.dtype, device=t.device)
        return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _host_callables(module: torch.nn.Module) -> Iterable[object]:
    """Per-weight functions that ComfyUI attaches to modules it loads partially (LoRA patches applied at
    cast time): shared with the view rather than deep-copied with the patch tensors they hold."""
    for m in module.modules():
        yield from getattr(m, "weight_function", ()) or ()
        yield from getattr(m, "bias_function", ()) or ()


def differentiable_view(module: torch.nn.Module, device: Optional[torch.device] = None) -> torch.nn.Module:
    """A frozen copy of ``module`` in eval mode whose parameters and buffers share the original's memory
    (moved to ``device`` if given and elsewhere); autograd can save them, and nothing is duplicated."""
    with torch.inference_mode(False):
        memo: dict[int, object] = {}
        for p in module.parameters():
            memo[id(p)] = torch.nn.Parameter(shared_tensor(p, device), requires_grad=False)
        for b in module.buffers():
            memo[id(b)] = shared_tensor(b, device)
        for fn in _host_callables(module):
            memo[id(fn)] = fn
        view = copy.deepcopy(module, memo)
    view.requires_grad_(False)
    return view.eval()


def _snapshot(value):
    """Dict arguments (ComfyUI's transformer_options) as they were at forward time: the host mutates
    them between blocks, and the recomputation in backward must see what the forward saw."""
    return dict(value) if isinstance(value, dict) else value


def _recomputed_forward(module: torch.nn.Module) -> Callable:
    forward = type(module).forward

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(module, *args, **kwargs)
        args = tuple(_snapshot(a) for a in args)
        kwargs = {k: _snapshot(v) for k, v in kwargs.items()}
        return checkpoint(forward, module, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

    return run


def recompute_in_backward(module: torch.nn.Module, block_names: Iterable[str] = (),
                          where: Optional[Callable[[str, torch.nn.Module], bool]] = None) -> int:
    """Make the blocks of ``module`` whose class name is in ``block_names`` (or for which
    ``where(name, block)`` holds) keep only their inputs for backward and recompute their forward
    there. Nested matches inside a chosen block are left alone. Returns how many blocks were wrapped."""
    names = set(block_names)
    chosen: list[tuple[str, torch.nn.Module]] = []
    for name, m in module.named_modules():
        if m is module or any(name.startswith(parent + ".") for parent, _ in chosen):
            continue
        if type(m).__name__ in names or (where is not None and where(name, m)):
            chosen.append((name, m))
    for _, m in chosen:
        m.forward = _recomputed_forward(m)
    return len(chosen)
