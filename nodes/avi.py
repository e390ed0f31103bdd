"""Attribute Vector Integration (Wang et al. 2024) as ComfyUI nodes: capture x and z with ComfyUI's own
sampling, train Φ, integrate with a strength ρ, and resume with stock KSamplerAdvanced.

Latent spaces. A LATENT that KSamplerAdvanced returns with leftover noise at step s holds
``process_latent_out(inverse_noise_scaling(σ_s, state))`` of the sampler state; fed back with
add_noise disabled and start_at_step s, KSamplerAdvanced rebuilds exactly that state
(``noise_scaling(σ_s, 0, process_latent_in(LATENT))``, ``comfy/samplers.py``). The paper works on
the latent code x_t of the diffusers pipeline: the model's input, ``calculate_input(σ, state)``
(VP-normalised for ε/v models, x_t itself for flow models), in the scaled latent units. Both maps
are affine per channel, so AVI Capture stores ``paper = a·LATENT + b`` (per-channel a, b) and σ in
each LATENT it returns (key ``avi_capture``); AVI Integrate runs Algorithm 1 in paper space and
maps ŷ back with x's a and b, so the LATENT it returns is what KSamplerAdvanced(add_noise disable,
start_at_step = resume_step) expects in place of x.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import torch

from ..core import avi as core_avi
from .comfy_boundary import check_latent, latent_samples, sampling_sigmas
from .common import (CATEGORY, InputError, check_conditioning, check_finite, check_int, core_input_errors, short,
                     check_tensors_match, free_save_path, json_metadata, meta_shapes, read_safetensors_header, writing)
from .plot import draw_loss_curve, image_tensor

AVI_MODEL = "AVI_MODEL"
AVI_FOLDER = "avi"
META_KEY = "avi_capture"
AVI_CATEGORY = f"{CATEGORY}/avi"
# Combo labels (saved workflows store them: never rename one) → internal keys.
Z_SOURCE_KEYS = {"seed (paper)": "seed", "continue from x": "continue", "one step from x (fast)": "one_step",
                 "target's x̂0 at x (fast)": "repredict",
                 "target's x̂0 at x and at t_early (fast)": "repredict_early"}
Z_SOURCES = tuple(Z_SOURCE_KEYS)
DEFAULT_Z_SOURCE = "target's x̂0 at x and at t_early (fast)"
REPREDICTED = ("repredict", "repredict_early")
SINGULAR_VALUE_KEYS = {"Φ: S (paper)": ("phi", "S"), "Φ: S + Δs": ("phi", "S+ds"), "x's own (no Φ)": ("own", "x"),
                       "z's own (no Φ)": ("own", "z")}
SINGULAR_VALUES = tuple(SINGULAR_VALUE_KEYS)
INTEGRATION_KEYS = {"x + top-k directions of z − x": "difference",
                    "Algorithm 1 (paper): x's top k + z's weakest k, reversed": "paper",
                    "z's strongest k in place of x's": "strongest"}
INTEGRATIONS = tuple(INTEGRATION_KEYS)
DEFAULT_INTEGRATION = "x + top-k directions of z − x"
DIFFERENCE_K = 1      # k = 0 with the difference integration (measured: bench/avi_quality.py)
DEFAULT_GAIN = 2.25   # γ (measured: bench/avi_quality.py; chosen on seed 3: the smallest reaching 70% object hue)
MAX_GAIN = 10.0
# AVI Integrate's support (core_avi.support_weights): the difference integration's change is taken only where z − x
# itself changes the latent (0 = everywhere, the plain rank-k approximation; measured: bench/avi_quality.py)
DEFAULT_SUPPORT = 0.5
DEFAULT_T_X = 0.2     # T_x (measured: bench/avi_premises.py, bench/avi_quality.py; the paper: 0.8)
# 'target's x̂0 at x and at t_early' (core_avi.committed_change): the early probe's time, the gate threshold on
# r = ‖Δ_late‖/‖Δ_early/cfg‖ (toy world, seed 3: r ≈ 1.2 for object hue, ≈ 0.05 for floor/wall hue) and the weight of
# the unguided early change (measured: bench/avi_quality.py --groups sweep, README)
DEFAULT_T_EARLY = 0.9
EARLY_THRESHOLD = 0.5
# the default of AVI Capture's early_weight: floor/wall edits get strength γ·0.8 = 1.8 at ρ 1 (seed 3: the smallest of
# the grid reaching 60% for both; 3 overshoots), while γ alone (2.25) serves the object's colour
DEFAULT_EARLY_WEIGHT = 0.8


@dataclass
class AVIModel:
    """Φ with its size and training notes; ``net`` lives on the CPU, ``device_net`` caches a device copy."""
    net: core_avi.AVINet
    info: dict = field(default_factory=dict)
    _device_net: dict = field(default_factory=dict, repr=False)

    def on(self, device) -> core_avi.AVINet:
        key = str(device)
        if key not in self._device_net:
            self._device_net.clear()
            with torch.inference_mode(False):
                self._device_net[key] = core_avi.AVINet(self.net.height, self.net.width, self.net.k, self.net.hidden)
                self._device_net[key].load_state_dict(self.net.state_dict())
            self._device_net[key].to(device).eval().requires_grad_(False)
        return self._device_net[key]


# --------------------------------------------------------------------------------------------
# Steps and latent spaces
# --------------------------------------------------------------------------------------------

def step_at_time(model, sigmas: torch.Tensor, t_fraction: float, lo: int, hi: int) -> int:
    """The step index in [lo, hi] whose σ is nearest (in log σ) to σ at diffusion time t = t_fraction·T."""
    sampling = model.get_model_object("model_sampling")
    target = float(sampling.percent_to_sigma(1.0 - float(t_fraction)))
    target = min(max(target, 1e-6), float(sigmas[0]) * 10)
    idx = torch.arange(lo, hi + 1)
    s = sigmas[idx].clamp_min(1e-6)
    return int(idx[(s.log() - math.log(target)).abs().argmin()])


def paper_space_map(model, sigma: float, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (a, b) with paper-space latent = a·LATENT + b at noise level σ (see module docstring)."""
    sampling = model.get_model_object("model_sampling")
    sig = torch.tensor(float(sigma))

    def forward(latent):
        state = sampling.noise_scaling(sig, torch.zeros_like(latent), model.model.process_latent_in(latent), False)
        return sampling.calculate_input(sig, state)

    zero = torch.zeros(1, channels, 1, 1)
    b = forward(zero.clone()).float()
    a = forward(zero + 1).float() - b
    if not torch.allclose(forward(zero + 2).float(), 2 * a + b, rtol=1e-4, atol=1e-5) or (a.abs() < 1e-8).any():
        raise InputError("model: this model's latent format or noise scaling is not an invertible per-channel affine map; AVI cannot use it")
    return a.reshape(1, channels, 1, 1), b.reshape(1, channels, 1, 1)


def to_paper_space(latent: dict, name: str, role: str) -> tuple[torch.Tensor, dict]:
    """paper = a·LATENT + b of AVI Capture's ``role`` output (finiteness and shapes: core.avi.check_pair)."""
    samples = latent_samples(latent, name)
    meta = latent.get(META_KEY)
    if meta is None:
        raise InputError(f"{name}: this LATENT does not come from AVI Capture (it carries no noise level); "
                         "connect AVI Capture's x and z outputs")
    if meta["role"] != role:
        raise InputError(f"{name}: this is AVI Capture's {meta['role']} output; connect its {role} output here")
    return samples.float() * meta["a"] + meta["b"], meta


def paired(x: dict, z: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """x and z in paper space (a single z broadcast over x's batch), and x's capture information."""
    xp, mx = to_paper_space(x, "x", "x")
    zp, _ = to_paper_space(z, "z", "z")
    if zp.shape[0] != xp.shape[0] and zp.shape[1:] == xp.shape[1:]:
        if zp.shape[0] != 1:
            raise InputError(f"x has {xp.shape[0]} latents and z {zp.shape[0]}: give one z per x (or a single z)")
        zp = zp.expand_as(xp)
    return xp, zp, mx


def resolve_k(k: int, rank: int, net: core_avi.AVINet | None) -> int:
    """k, 0 for the default: Φ's k, or the paper's r/2 without Φ (core.avi.check_k checks 1 ≤ k ≤ r − 1)."""
    return int(k) if k else (net.k if net is not None else rank // 2)


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------

CAPTURE_COST = (
    "Cost in UNet evaluations (one evaluation = one sampler step with cfg), for s_x = resume step, s_z = z's step: "
    "'seed (paper)': x takes s_x steps, z takes s_z steps from the seed's noise with the target prompt, the resume "
    "steps − s_x, so the whole edit costs steps + s_z (50 ddim_uniform steps, T_x 0.8, Δτ −0.3: s_x = 9, s_z = 24, "
    "74 evaluations = 1.48× one sampling). 'continue from x': z continues x with the target prompt from s_x to s_z, "
    "so the edit costs steps + (s_z − s_x) (65 = 1.3×; not the paper's definition of z). 'one step from x (fast)': "
    "z is one sampler step from x at σ(s_x) straight to σ(s_z) with the target prompt (for ddim/euler: the DDIM "
    "update x̂0 of the target prompt re-noised to σ(s_z)), so the edit costs steps + 1 evaluations (51 = 1.02×); "
    "a coarser z than the paper's, for speed. 'target's x̂0 at x (fast)': z is x with its clean-image "
    "estimate x̂0 moved from the original prompt's to the target prompt's, both predicted at x's last sampler state "
    "(the original's is the sampler's own, the target's costs half an evaluation), so z has x's noise, layout and step "
    "(Δτ unused) and differs from x only where the target prompt would change the image "
    "(measured on the toy world: it keeps x's layout, where the paper's z from the seed brings its own; "
    "bench/avi_quality.py). 'target's x̂0 at x and at t_early (fast)' (the default): the same, plus a second "
    "prediction of the target prompt at the original trajectory's state nearest t_early (0.9T): where the late "
    "prediction no longer shows the change (an attribute the model committed before T_x, e.g. a floor or wall "
    "colour on the toy world) the early, unguided change Δx̂0/cfg is added to z (core/avi.committed_change); where "
    "it still shows it (an object's colour) z is the one-probe z. Both re-predicted z_sources predict the target "
    "prompt within x's own sampling, at the probe steps, as one UNet call of that prompt alone on the sampler's "
    "input (half a cfg step; the sampler's own evaluation stays exactly stock), so the edit costs steps + 1 "
    "evaluations (51 = 1.02×) with two probes; with a noise mask on the latent the probes run as sampler steps of "
    "their own (steps + 2). Capture once per seed: "
    "every further ρ or Φ costs the resume alone (steps − s_x). Multistep samplers (dpmpp_2m, ...) restart their "
    "history at the resume step, as at any KSamplerAdvanced split; one-step samplers (ddim, euler) resume exactly."
)


T_EARLY_TOOLTIP = (
    "Only for z_source 'target's x̂0 at x and at t_early': the diffusion time (1 = pure noise, 0 = clean; at least "
    "t_x) of the early probe, where the target prompt's x̂0 is predicted a second time along the original trajectory "
    "(one more UNet evaluation). It must come before the model commits the coarse attributes you may edit (on the toy "
    "world the floor and wall colours are committed by 0.6T: bench/avi_premises.py); the change seen there is added "
    "to z at x's step, where the model no longer pulls it back."
)
EARLY_WEIGHT_TOOLTIP = (
    "Only for z_source 'target's x̂0 at x and at t_early': the weight of the early probe's (unguided) change in z, "
    "applied where the gate finds the attribute committed before T_x (a floor or wall colour on the toy world; an "
    "object's colour gets the one-probe z whatever the weight). With AVI Integrate's γ it sets how strong such an edit "
    "is at ρ 1 (γ·weight), while γ alone sets it for attributes still open at T_x: lower it if floor/wall-like edits "
    "overshoot or disturb the rest, raise it if they do not reach the target (measured: bench/avi_quality.py, README)."
)
MAX_EARLY_WEIGHT = 4.0


def one_step(model, x: torch.Tensor, target, negative, cfg: float, sampler_name: str, sigmas: torch.Tensor,
             seed: int, noise_mask=None, callback=None) -> torch.Tensor:
    """z in one sampler step from x's state at sigmas[0] to sigmas[1] with the target prompt (no noise added:
    x's LATENT holds its leftover noise, as KSamplerAdvanced's add_noise disable expects)."""
    sampler = comfy.samplers.sampler_object(sampler_name)
    return comfy.sample.sample_custom(model, torch.zeros_like(x), cfg, sampler, sigmas.to(x.device), target, negative,
                                      x, noise_mask=noise_mask, callback=callback, disable_pbar=True, seed=seed)


def target_x0_change(model, probe: dict, step: int, target, negative, cfg: float, sampler_name: str,
                     sigmas: torch.Tensor, seed: int, dtype, noise_mask=None) -> torch.Tensor:
    """x̂0_T − x̂0_O at the original trajectory's sampler state of ``step`` (``probe``: that state and the sampler's
    own x̂0_O there, recorded by the sampling callback), in the sampler's state space, the probe run as a sampler
    step of its own (AVI Capture's path with a noise mask; without one ProbingGuider predicts it within x's steps): x̂0_T costs one
    UNet evaluation (one sampler step with the target prompt from that state, of which only the prediction is kept)."""
    sampling = model.get_model_object("model_sampling")
    sig = float(sigmas[step])
    channels = probe["state"].shape[1]
    a, b = paper_space_map(model, sig, channels)
    latent = (sampling.calculate_input(torch.tensor(sig), probe["state"].float()) - b) / a
    got = {}

    def keep(i, x0, state, total):
        got.setdefault("x0", x0.detach().float().cpu())

    one_step(model, latent.to(dtype), target, negative, cfg, sampler_name, sigmas[[step, step + 1]], seed, noise_mask,
             callback=keep)
    return got["x0"] - probe["x0"]


PROBE_KEY = "avi_target"   # the target prompt's key among ProbingGuider's conds


class ProbingGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFG guidance with the original prompt that, at the σs of ``probe_sigmas``, also predicts the target
    prompt's x̂0_T on the same sampler input: the sampler's own evaluation runs exactly as stock (so x is
    the stock sampling's), the target prompt as one UNet call of its own, and x̂0_T is formed from it and that
    evaluation's negative prediction as sampling_function forms the sampler's x̂0 (pre-CFG functions, then
    cfg_function). A probe thus costs one prompt's evaluation instead of a sampler run of its own. ``latest`` holds
    the last probe: (σ, x̂0_O, x̂0_T), before any inpainting blend."""

    def __init__(self, model_patcher, probe_sigmas):
        super().__init__(model_patcher)
        self.probe_sigmas = [float(s) for s in probe_sigmas]
        self.latest = None

    def set_conds(self, positive, negative, target):
        self.inner_set_conds({"positive": positive, "negative": negative, PROBE_KEY: target})

    def probe_sigma(self, timestep) -> float | None:
        """The probe σ equal to this evaluation's σ (the sampler passes its σs unchanged), or None."""
        s = float(timestep.flatten()[0])
        return next((p for p in self.probe_sigmas if abs(s - p) <= 1e-6 * max(p, 1e-12)), None)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        sigma = self.probe_sigma(timestep)
        if sigma is None:
            return super().predict_noise(x, timestep, model_options, seed)
        target = self.conds[PROBE_KEY]
        previous = model_options.get("sampler_calc_cond_batch_function")
        seen = {}

        def batch(args):   # the sampler's own [cond, uncond] batch, unchanged; its uncond prediction kept
            out = (previous(args) if previous is not None else
                   comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                  args["model_options"]))
            seen.update(uncond=args["conds"][1], uncond_out=out[1])
            return out

        options = dict(model_options, sampler_calc_cond_batch_function=batch)
        denoised = comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), self.cfg, model_options=options,
                                                    seed=seed)
        if previous is not None:   # someone else's batching: theirs, with the target in the cond's place
            target_out = previous({"conds": [target, seen["uncond"]], "input": x, "sigma": timestep,
                                   "model": self.inner_model, "model_options": model_options})[0]
        else:
            target_out = comfy.samplers.calc_cond_batch(self.inner_model, [target], x, timestep, model_options)[0]
        out = [target_out, seen["uncond_out"]]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [target, seen["uncond"]], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        target_x0 = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                                model_options=model_options, cond=target, uncond=seen["uncond"])
        self.latest = (sigma, denoised.detach().float(), target_x0.detach().float())
        return denoised


def repredicted_z(model, x: torch.Tensor, probes: dict, target, negative, cfg: float, sampler_name: str,
                  sigmas: torch.Tensor, s_x: int, seed: int, noise_mask=None,
                  early_weight: float = DEFAULT_EARLY_WEIGHT) -> torch.Tensor:
    """z for 'target's x̂0 at x' (``probes`` = {s_x − 1: …}) and 'target's x̂0 at x and at t_early' (also
    {s_early: …}): x with its clean estimate moved by Σ_probes (x̂0_T − x̂0_O), each predicted at a sampler state of
    the original trajectory (x̂0_O is the sampler's own prediction there; x̂0_T is predicted within that sampler step,
    ProbingGuider, and the probe carries the change as ``change``, or by a sampler step of its own, target_x0_change).
    In the sampler's state space z = x + noise_scaling(σ_x, 0, Σ Δx̂0), i.e. for ε/v models
    z_t = x_t + √ᾱ_t·Σ(x̂0_T − x̂0_O) in the paper's latent: x's noise, the target's content. The late probe
    (s_x − 1) sees what the target prompt still changes at x (an object's colour on the toy world); an early probe
    sees what it changes before the model commits coarse attributes (a floor or wall colour), which a late x̂0 no
    longer shows although the change, once added, is no longer pulled back (bench/avi_quality.py). ``early_weight``
    scales the early change."""
    sampling = model.get_model_object("model_sampling")
    changes = [probe["change"] if "change" in probe else   # predicted within the sampler's step (ProbingGuider)
               target_x0_change(model, probe, step, target, negative, cfg, sampler_name, sigmas, seed, x.dtype, noise_mask)
               for step, probe in sorted(probes.items(), reverse=True)]     # the late probe (s_x − 1) first
    if len(changes) == 1:
        delta = changes[0]
    else:
        delta = core_avi.committed_change(changes[0], changes[1], cfg, EARLY_THRESHOLD, early_weight)
    sig = torch.tensor(float(sigmas[s_x]))
    shift = sampling.calculate_input(sig, sampling.noise_scaling(sig, torch.zeros_like(delta), delta, False))
    a_x, _ = paper_space_map(model, float(sig), x.shape[1])
    return (x.float() + shift / a_x).to(x.dtype)


class AVICapture:
    DESCRIPTION = (
        "AVI step 1 (Wang et al. 2024): samples the original prompt down to diffusion time T_x (x) and the target "
        "prompt, same seed, down to T_x + Δτ (z), with ComfyUI's own sampling (as KSamplerAdvanced with start/end "
        "steps), so any sampler and scheduler works. Outputs x, z and the step at which stock KSamplerAdvanced "
        "(add_noise disable) resumes from AVI Integrate's latent with the original prompt. " + CAPTURE_COST
    )
    CATEGORY = AVI_CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT", "INT")
    RETURN_NAMES = ("x", "z", "resume_step")
    OUTPUT_TOOLTIPS = (
        "The original prompt's latent at T_x, with its leftover noise: what KSamplerAdvanced (return_with_leftover_noise "
        "enable, end_at_step = resume_step) would return. Carries its noise level for AVI Train/Integrate.",
        "The target prompt's latent at T_x + Δτ (same seed).",
        "start_at_step for the stock KSamplerAdvanced that resumes (add_noise disable, same steps/sampler/scheduler).",
    )
    FUNCTION = "capture"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model; the same one resumes the sampling."}),
                "positive": ("CONDITIONING", {"tooltip": "The original prompt (x, and the resumed sampling)."}),
                "target": ("CONDITIONING", {"tooltip": "The target prompt: the original plus or minus the attribute (z)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt of classifier-free guidance, for x and z."}),
                "latent_image": ("LATENT", {"tooltip": "Empty Latent Image: size and batch. A batch gives one x/z pair per item "
                                                       "(different noise from the one seed), more pairs for AVI Train."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                                 "tooltip": "Noise seed, shared by x and z (as KSampler's)."}),
                "steps": ("INT", {"default": 50, "min": 2, "max": 10000, "tooltip": "Steps of the whole sampling; use the same in the resuming KSamplerAdvanced."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "Classifier-free guidance scale."}),
                "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "ddim", "tooltip": "Sampler (the same in the resuming KSamplerAdvanced)."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "ddim_uniform", "tooltip": "Scheduler (the same in the resuming KSamplerAdvanced)."}),
                "t_x": ("FLOAT", {"default": DEFAULT_T_X, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "T_x as a fraction of diffusion time (1 = pure noise, 0 = clean; the paper: 0.8). "
                                             "x is taken at the step whose σ is nearest to σ(T_x). Take x after the "
                                             "model has laid out the image and before it commits the attribute you "
                                             "edit: measured on the toy world (bench/avi_premises.py, README), an "
                                             "object's colour at 0.2T (the default), a floor or wall colour at 0.76T "
                                             "with z_source 'seed (paper)', Δτ 0 and AVI Integrate's γ 1.5; the "
                                             "default z_source also reaches attributes committed before T_x through "
                                             "its early probe (t_early), so T_x 0.2 serves all three hues."}),
                "delta_tau": ("FLOAT", {"default": -0.3, "min": -1.0, "max": 0.0, "step": 0.01,
                                        "tooltip": "Δτ: z is taken at diffusion time T_x + Δτ (the paper: −0.3, i.e. 0.5T, less noisy than x). "
                                                   "Unused by z_source 'target's x̂0 at x' (and 'and at t_early'), whose z is at T_x; 0 puts "
                                                   "the paper's z from the seed at T_x too, as the difference "
                                                   "integration wants."}),
                "z_source": (list(Z_SOURCES), {"default": DEFAULT_Z_SOURCE, "tooltip": CAPTURE_COST}),
            },
            "optional": {
                "t_early": ("FLOAT", {"default": DEFAULT_T_EARLY, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": T_EARLY_TOOLTIP}),
                "early_weight": ("FLOAT", {"default": DEFAULT_EARLY_WEIGHT, "min": 0.0, "max": MAX_EARLY_WEIGHT, "step": 0.05,
                                           "tooltip": EARLY_WEIGHT_TOOLTIP}),
            },
        }

    def capture(self, model, positive, target, negative, latent_image, seed, steps, cfg, sampler_name, scheduler,
                t_x, delta_tau, z_source, t_early=DEFAULT_T_EARLY, early_weight=DEFAULT_EARLY_WEIGHT):
        steps = check_int("steps", steps, 2, 10000)  # x needs a step strictly between the first and the last
        cfg = check_finite("cfg", cfg, 0.0, 100.0)
        t_x, delta_tau = check_finite("t_x", t_x, 0.0, 1.0), check_finite("delta_tau", delta_tau, -1.0, 0.0)
        t_early = check_finite("t_early", t_early, 0.0, 1.0)
        early_weight = check_finite("early_weight", early_weight, 0.0, MAX_EARLY_WEIGHT)
        for cond, name in ((positive, "positive"), (target, "target"), (negative, "negative")):
            check_conditioning(cond, name)
        if z_source not in Z_SOURCES:
            raise InputError(f"z_source must be one of {Z_SOURCES}, got {z_source!r}")
        source = Z_SOURCE_KEYS[z_source]
        if source == "repredict_early" and t_early < t_x:
            raise InputError(f"t_early must be at least t_x (the early probe comes before x: 1 = pure noise, 0 = clean), "
                             f"got t_early {t_early} and t_x {t_x}")
        if source not in REPREDICTED and not 0.0 <= t_x + delta_tau <= 1.0:
            raise InputError(f"t_x + delta_tau must lie in [0, 1], got {t_x} + {delta_tau}")
        samples = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        check_latent(model, {"samples": samples}, "latent_image")
        sigmas = sampling_sigmas(model, steps, sampler_name, scheduler)
        s_x = step_at_time(model, sigmas, t_x, 1, steps - 1)
        # the re-predicted z sits at x's own step (Δτ unused)
        s_z = s_x if source in REPREDICTED else step_at_time(model, sigmas, t_x + delta_tau, s_x, steps)
        # the sampler states (and x̂0_O) where the target prompt's x̂0 is predicted: x's last one, and for
        # 'at t_early' the step nearest T_early too (the same step once T_early is that close to T_x)
        probe_steps = {s_x - 1}
        if source == "repredict_early":
            probe_steps.add(step_at_time(model, sigmas, t_early, 0, s_x - 1))
        probes = {}
        noise = comfy.sample.prepare_noise(samples, seed, latent_image.get("batch_index"))

        # the target prompt's x̂0 predicted within the sampler's own steps (ProbingGuider); with a noise mask the
        # probes run as sampler steps of their own (target_x0_change), which blend x̂0 as the sampler does
        within = source in REPREDICTED and latent_image.get("noise_mask") is None

        def run(cond, latent, start, last, add_noise, record=False):
            assert not record or (start == 0 and add_noise)   # only x's run records the probes
            preview = latent_preview.prepare_callback(model, steps)
            guider = ProbingGuider(model, [sigmas[s] for s in probe_steps]) if record and within else None

            def callback(step, x0, state, total):
                if record and step in probe_steps:
                    # the step's own evaluation is the last one before its callback (k-diffusion samplers)
                    if guider is not None and guider.latest is not None and guider.latest[0] == float(sigmas[step]):
                        _, own, predicted = guider.latest
                        probes[step] = dict(change=(predicted - own).cpu())
                    else:   # for target_x0_change: the original trajectory's sampler state and x̂0_O there
                        probes[step] = dict(state=state.detach().clone().cpu(), x0=x0.detach().float().cpu())
                if guider is not None:
                    guider.latest = None
                preview(step, x0, state, total)

            if guider is not None:   # comfy.sample.sample from step 0 to `last` (KSampler.sample), with the probes
                guider.set_conds(cond, negative, target)
                guider.set_cfg(cfg)
                out = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas[:last + 1],
                                    callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
                return out.to(mm.intermediate_device())
            out = comfy.sample.sample(model, noise if add_noise else torch.zeros_like(noise), steps, cfg, sampler_name,
                                      scheduler, cond, negative, latent, denoise=1.0, disable_noise=not add_noise,
                                      start_step=start, last_step=last, force_full_denoise=False,
                                      noise_mask=latent_image.get("noise_mask"), callback=callback,
                                      disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
            return out

        x = run(positive, samples, 0, s_x, True, record=True)
        if source in REPREDICTED:
            z = repredicted_z(model, x, probes, target, negative, cfg, sampler_name, sigmas, s_x, seed,
                              latent_image.get("noise_mask"), early_weight)
        elif source == "seed":
            z = run(target, samples, 0, s_z, True)
        elif s_z == s_x:
            z = x
        elif source == "continue":
            z = run(target, x, s_x, s_z, False)
        else:
            z = one_step(model, x, target, negative, cfg, sampler_name, sigmas[[s_x, s_z]], seed,
                         latent_image.get("noise_mask"))
        channels = samples.shape[1]
        out = []
        for role, lat, step in (("x", x, s_x), ("z", z, s_z)):
            a, b = paper_space_map(model, float(sigmas[step]), channels)
            meta = {"role": role, "a": a, "b": b, "sigma": float(sigmas[step]), "step": step, "steps": steps,
                    "sampler": sampler_name, "scheduler": scheduler, "z_source": z_source}
            d = {"samples": lat, META_KEY: meta}
            if "batch_index" in latent_image:
                d["batch_index"] = latent_image["batch_index"]
            out.append(d)
        within_steps = sum("change" in probe for probe in probes.values())   # probes within the sampler's own steps
        # such a probe costs the target prompt's evaluation alone (half a cfg step), one of its own a whole step
        evaluations = steps + {"seed": s_z, "continue": s_z - s_x,
                               "one_step": int(s_z > s_x)}.get(source, len(probes) - 0.5 * within_steps)
        probed = (f" (target's x̂0 at step{'s' if len(probes) > 1 else ''} {', '.join(map(str, sorted(probes)))})"
                  if source in REPREDICTED else "")
        batch_note = (f"; {within_steps} of the sampler's steps also predict the target prompt, alone: half an "
                      f"evaluation each" if within_steps else "")
        text = (f"x at step {s_x}/{steps} (σ {float(sigmas[s_x]):.3f}), z at step {s_z} (σ {float(sigmas[s_z]):.3f})"
                f"{probed}; "
                f"resume at {s_x}; the edit costs {evaluations:g} UNet evaluations ({evaluations / steps:.2f}× one sampling"
                f"{batch_note})")
        return {"ui": {"text": [text]}, "result": (out[0], out[1], s_x)}


class AVITrain:
    DESCRIPTION = (
        "AVI step 2: trains Φ, the MLP that predicts singular values S and Δs from x (Wang et al. 2024, Sec. 3.2.2), "
        "on AVI Capture's x/z pairs with λ1‖ŷ−z‖² + λ2‖ỹ−x‖² + λ3‖S−S_z‖² + λ4‖S+Δs−S_x‖², Adam, ρ = 1. "
        "One pair or many (a batch of latents in AVI Capture: several seeds, same prompt pair). "
        "N samples per pair: each pair is drawn N times per epoch (the paper: N = 5000 for one pair, 500 for many). "
        "A Φ works for the latent size it was trained on."
    )
    CATEGORY = AVI_CATEGORY
    RETURN_TYPES = (AVI_MODEL, "IMAGE")
    RETURN_NAMES = ("avi_model", "loss_plot")
    OUTPUT_TOOLTIPS = ("Φ, for AVI Integrate (ρ) or Save AVI Model.",
                       "The training loss λ1‖ŷ−z‖² + λ2‖ỹ−x‖² + λ3‖S−S_z‖² + λ4‖S+Δs−S_x‖² per Adam step.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "x": ("LATENT", {"tooltip": "AVI Capture's x (one latent per pair)."}),
                "z": ("LATENT", {"tooltip": "AVI Capture's z."}),
                "k": ("INT", {"default": 0, "min": 0, "max": 1024,
                              "tooltip": "k: top-k singular vectors of x kept (0 = r/2, the paper's 32 at 64×64; r = min(H, W))."}),
                "hidden": ("INT", {"default": 0, "min": 0, "max": 16384,
                                   "tooltip": "Width of Φ's three layers (0 = H·W as in the paper, at most 4096)."}),
                "samples_per_pair": ("INT", {"default": 0, "min": 0, "max": 100000,
                                             "tooltip": "N: draws of each pair per epoch (0 = the paper: 5000 for one pair, 500 from 10 pairs up, 5000/P between)."}),
                "epochs": ("INT", {"default": 5, "min": 1, "max": 1000, "tooltip": "Passes over the pairs (the paper converges within 5 epochs)."}),
                "batch_size": ("INT", {"default": 256, "min": 1, "max": 65536, "tooltip": "Samples per Adam step (the paper: 256)."}),
                "learning_rate": ("FLOAT", {"default": 1e-3, "min": 1e-6, "max": 1.0, "step": 1e-4, "round": 1e-6, "tooltip": "Adam's learning rate (the paper: 1e-3)."}),
                "lambda_1": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": "λ1, the weight of ‖ŷ − z‖² (target; the paper: 3)."}),
                "lambda_2": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": "λ2, the weight of ‖ỹ − x‖² (original; the paper: 10)."}),
                "lambda_3": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": "λ3, the weight of ‖S − S_z‖² (the paper: 10)."}),
                "lambda_4": ("FLOAT", {"default": 10.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip": "λ4, the weight of ‖S + Δs − S_x‖² (the paper: 10)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "tooltip": "Φ's initial weights and the shuffling."}),
            }
        }

    def train(self, x, z, k, hidden, samples_per_pair, epochs, batch_size, learning_rate, lambda_1, lambda_2,
              lambda_3, lambda_4, seed):
        k, hidden = check_int("k", k, 0, 1024), check_int("hidden", hidden, 0, 16384)
        samples_per_pair = check_int("samples_per_pair", samples_per_pair, 0, 100000)
        epochs, batch_size = check_int("epochs", epochs, 1, 1000), check_int("batch_size", batch_size, 1, 65536)
        learning_rate = check_finite("learning_rate", learning_rate, 0.0, 1.0)
        lambda_1, lambda_2, lambda_3, lambda_4 = (check_finite(f"lambda_{i}", v, 0.0, 1000.0)
                                                  for i, v in enumerate((lambda_1, lambda_2, lambda_3, lambda_4), 1))
        xp, zp, meta = paired(x, z)
        height, width = xp.shape[-2:]
        k = resolve_k(k, core_avi.rank_of(height, width), None)
        pairs = xp.shape[0]
        n = int(samples_per_pair) or core_avi.samples_per_pair_for(pairs)
        total = int(epochs) * math.ceil(pairs * n / int(batch_size))
        bar = comfy.utils.ProgressBar(total)

        def callback(step, loss):
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(step + 1, total)

        device = mm.get_torch_device()
        t0 = time.perf_counter()
        with torch.inference_mode(False), torch.enable_grad(), core_input_errors("x", "z", "k"):
            net, losses = core_avi.train_avi(
                xp.contiguous().clone(), zp.contiguous().clone(), k=k, hidden=hidden or None, samples_per_pair=n, epochs=epochs,
                batch_size=batch_size, lr=learning_rate, lambdas=(lambda_1, lambda_2, lambda_3, lambda_4), seed=seed,
                device=device, callback=callback)
        seconds = time.perf_counter() - t0
        info = {"pairs": pairs, "samples_per_pair": n, "epochs": int(epochs), "batch_size": int(batch_size),
                "learning_rate": learning_rate, "lambdas": [lambda_1, lambda_2, lambda_3, lambda_4],
                "steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1], "seconds": seconds,
                "x_step": meta["step"], "sampling_steps": meta["steps"], "sampler": meta["sampler"],
                "scheduler": meta["scheduler"]}
        text = (f"Φ ({height}×{width}, k {net.k}, hidden {net.hidden}): {pairs} pair(s) × {n} samples × {epochs} epochs = "
                f"{len(losses)} Adam steps, loss {losses[0]:.4g} → {losses[-1]:.4g}, {seconds:.1f} s")
        plot = image_tensor(draw_loss_curve(losses, "AVI Train Φ: loss per Adam step", "Adam step"))
        return {"ui": {"text": [text]}, "result": (AVIModel(net, info), plot)}


INTEGRATION_TOOLTIP = (
    "How ŷ is built from x and z, per latent channel. 'x + top-k directions of z − x' (default): ŷ = x + ρ·Σ_{j<k} "
    "d_j a_j b_jᵀ, the best rank-k approximation of the change z − x (on the toy world ≥ 90% of the difference between "
    "two prompts' latents lies in its top 2 singular directions, and only ≈ 1% in z's 8 weakest; bench/avi_premises.py); "
    "S and Φ are not used. 'Algorithm 1 (paper)': Û = [U_x[:, :k], (1−ρ)·U_x[:, k:] + ρ·U'_z[:, :r−k]] (U'_z: z's "
    "vectors reversed), ŷ = Û·S·V̂ (Wang et al. 2024, Alg. 1). 'z's strongest k in place of x's': Û = [(1−ρ)·U_x[:, :k] "
    "+ ρ·U_z[:, :k], U_x[:, k:]], ŷ = Û·S·V̂ (a premise check: z's strongest, not reversed weakest, directions)."
)
GAIN_TOOLTIP = (
    "γ (not in the paper, where γ = 1): ŷ_γ = x + γ·(ŷ − x) extrapolates the integrated change. The resumed sampling "
    "with the original prompt pulls a handed-over attribute back; on the toy world the target's own latent survives "
    "only after the model commits the attribute, and γ = 2 carries it from earlier (bench/avi_quality.py). "
    "Use γ = 1 for the paper's Algorithm 1."
)


SUPPORT_TOOLTIP = (
    "Difference integration only: where the change is applied. The rank-k approximation of z − x spreads it over whole "
    "rows and columns of the latent, also onto positions z − x leaves alone (an object in front of a recoloured wall). "
    "support s > 0 weights it by m = clamp(‖z − x‖ / (s·max ‖z − x‖), 0, 1) per position (norm over channels): the full "
    "change where z − x is at least s of its largest, none where z − x is zero. 0 = everywhere. The default 0.5 kept the "
    "other factors of wall-colour edits more often on the toy world at the same target rate (bench/avi_quality.py "
    "--groups support; README, AVI finding 7)."
)


class AVIIntegrate:
    DESCRIPTION = (
        "AVI step 3: builds ŷ from AVI Capture's x and z per latent channel (integration: by default x plus the top-k "
        "singular directions of z − x, or the paper's Algorithm 1: Û = [U_x[:, :k], (1−ρ)·U_x[:, k:] + ρ·U'_z[:, :r−k]], "
        "ŷ = Û·S·V̂ with S = Φ(x), Wang et al. 2024), extrapolated by γ. Feed the LATENT to stock KSamplerAdvanced with "
        "the ORIGINAL prompt, add_noise disable, start_at_step = AVI Capture's resume_step, same steps/sampler/scheduler. "
        "ρ = 0 returns x (the original image), ρ = 1 the full edit."
    )
    CATEGORY = AVI_CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("ŷ in place of x: resume it with KSamplerAdvanced (add_noise disable, start_at_step = resume_step).",)
    FUNCTION = "integrate"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "x": ("LATENT", {"tooltip": "AVI Capture's x."}),
                "z": ("LATENT", {"tooltip": "AVI Capture's z (one, or one per x)."}),
                "rho": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05, "display": "slider",
                                  "tooltip": "ρ: strength of the edit (0 = x, the original image; 1 = the full edit, the "
                                             "paper's training setting)."}),
                "k": ("INT", {"default": 0, "min": 0, "max": 1024,
                              "tooltip": "k: for Algorithm 1, the top-k vectors of x kept (0 = Φ's k, or r/2 without Φ); "
                                         f"for 'x + top-k directions of z − x', how many directions of z − x "
                                         f"(0 = {DIFFERENCE_K}, measured)."}),
                "singular_values": (list(SINGULAR_VALUES), {"default": SINGULAR_VALUES[0],
                                    "tooltip": "S in ŷ = Û·S·V̂ (Algorithm 1 and 'z's strongest'): Φ's S (the paper), Φ's "
                                               "S + Δs, or, without Φ, x's or z's own singular values. Unused by the "
                                               "difference integration."}),
            },
            "optional": {
                "avi_model": (AVI_MODEL, {"tooltip": "Φ from AVI Train or Load AVI Model (needed for the Φ choices of "
                                                     "Algorithm 1)."}),
                "integration": (list(INTEGRATIONS), {"default": DEFAULT_INTEGRATION, "tooltip": INTEGRATION_TOOLTIP}),
                "gain": ("FLOAT", {"default": DEFAULT_GAIN, "min": 0.0, "max": MAX_GAIN, "step": 0.05, "tooltip": GAIN_TOOLTIP}),
                "support": ("FLOAT", {"default": DEFAULT_SUPPORT, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": SUPPORT_TOOLTIP}),
            },
        }

    def integrate(self, x, z, rho, k, singular_values, avi_model=None, integration=DEFAULT_INTEGRATION,
                  gain=DEFAULT_GAIN, support=DEFAULT_SUPPORT):
        rho, k = check_finite("rho", rho), check_int("k", k, 0, 1024)   # ρ ∈ [0, 1], γ ≥ 0, k ≤ r: core.avi's checks
        gain, support = check_finite("gain", gain, high=MAX_GAIN), check_finite("support", support)
        if integration not in INTEGRATIONS:
            raise InputError(f"integration must be one of {INTEGRATIONS}, got {short(integration)}")
        if singular_values not in SINGULAR_VALUES:
            raise InputError(f"singular_values must be one of {SINGULAR_VALUES}, got {short(singular_values)}")
        mode = INTEGRATION_KEYS[integration]
        source, which = SINGULAR_VALUE_KEYS[singular_values]
        xp, zp, _ = paired(x, z)
        meta = x[META_KEY]
        uses_phi = mode != "difference" and source == "phi"
        if uses_phi and not isinstance(avi_model, AVIModel):
            raise InputError("avi_model: connect AVI Train or Load AVI Model, or choose x's / z's own singular values")
        if mode == "difference":
            k = int(k) or DIFFERENCE_K
        else:
            k = resolve_k(k, core_avi.rank_of(*xp.shape[-2:]), avi_model.net if uses_phi else None)
        device = mm.get_torch_device()
        xd, zd = xp.to(device), zp.to(device)
        with core_input_errors("avi_model", "x", "z", "k", "rho", "gain", "support"):   # Φ's size is checked there too
            if uses_phi:
                y = core_avi.integrate_with_net(avi_model.on(device), xd, zd, rho, k, which, mode, gain, support)
            else:
                y = core_avi.integrate(xd, zd, k, rho, which if mode != "difference" else "x", mode, gain, support)
        y = y.to(mm.intermediate_device(), torch.float32)
        out = {"samples": (y - meta["b"]) / meta["a"]}
        if "batch_index" in x:
            out["batch_index"] = x["batch_index"]
        return (out,)


AVI_CONFIG_LIMITS = {"height": (2, 1024), "width": (2, 1024), "k": (1, 1023), "hidden": (1, 65536)}


def check_avi_file(path: str, shown: str) -> None:
    """Refuse a foreign or crafted Φ file with a message naming it, before anything is allocated: the header,
    the metadata (config a JSON object of whole numbers in range, info a JSON object), and Φ's tensors as the
    config describes them (built on the meta device) against the tensors the file holds. A deliberate parallel
    of core.avi.load_avi_net's format check, which runs once the file is open: this runs on the header alone."""
    header = read_safetensors_header(path, shown, "avi_name")
    label = f"avi_name: {shown}"
    if header.metadata.get("format") != core_avi.FORMAT_NAME:
        raise InputError(f"{label} is not an AVI model file (no {core_avi.FORMAT_NAME!r} format in its metadata)")
    config = json_metadata(header, "config", label)
    json_metadata(header, "info", label, default={})
    for key, (low, high) in AVI_CONFIG_LIMITS.items():
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(f"{label}: its config's {key!r} must be a whole number in [{low}, {high}], "
                             f"got {str(value)[:20]}")
    expected = meta_shapes(lambda: core_avi.AVINet(config["height"], config["width"], config["k"], config["hidden"]),
                           label)
    check_tensors_match(expected, header, label)


def _avi_files():
    return folder_paths.get_filename_list(AVI_FOLDER)


class AVISave:
    DESCRIPTION = f"Saves Φ (AVI_MODEL) as safetensors in models/{AVI_FOLDER}, never overwriting; size and training settings go in the metadata."
    CATEGORY = AVI_CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"avi_model": (AVI_MODEL, {"tooltip": "Φ from AVI Train Φ."}),
                             "filename_prefix": ("STRING", {"default": "avi", "tooltip": f"File name start in models/{AVI_FOLDER}; a counter is appended."})}}

    def save(self, avi_model, filename_prefix):
        if not isinstance(avi_model, AVIModel):
            raise InputError("avi_model: not an AVI_MODEL (connect AVI Train or Load AVI Model)")
        path, saved = free_save_path(AVI_FOLDER, filename_prefix, "safetensors")
        with writing("filename_prefix", saved):
            core_avi.save_avi_net(avi_model.net, path, avi_model.info)
        return {"ui": {"text": [f"saved {saved}"]}, "result": ()}


class AVILoad:
    DESCRIPTION = f"Loads Φ (AVI_MODEL) from models/{AVI_FOLDER}."
    CATEGORY = AVI_CATEGORY
    RETURN_TYPES = (AVI_MODEL,)
    RETURN_NAMES = ("avi_model",)
    OUTPUT_TOOLTIPS = ("Φ, for AVI Integrate (ρ); it works for the latent size it was trained on.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"avi_name": (_avi_files(), {"tooltip": f"safetensors files in models/{AVI_FOLDER}."})}}

    def load(self, avi_name):
        path = folder_paths.get_full_path_or_raise(AVI_FOLDER, avi_name)
        check_avi_file(path, avi_name)
        try:
            net, info = core_avi.load_avi_net(path)
        except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
            raise InputError(f"avi_name: {avi_name} is not a readable AVI model: {str(e).replace(path, avi_name)}") from None
        return (AVIModel(net, info),)


NODE_CLASS_MAPPINGS = {
    "DisentangleAVICapture": AVICapture,
    "DisentangleAVITrain": AVITrain,
    "DisentangleAVIIntegrate": AVIIntegrate,
    "DisentangleAVISave": AVISave,
    "DisentangleAVILoad": AVILoad,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DisentangleAVICapture": "AVI Capture (x, z)",
    "DisentangleAVITrain": "AVI Train Φ",
    "DisentangleAVIIntegrate": "AVI Integrate (ρ)",
    "DisentangleAVISave": "Save AVI Model",
    "DisentangleAVILoad": "Load AVI Model",
}
