"""Optimize λ Schedule: learn the per-step mixing weights of a neutral and a styled prompt
(Wu et al. 2023, Sec. 3.3) on a ComfyUI MODEL / VAE / CLIP, with core.lambda_optim doing the maths:
its objective L(λ) and its edit (the step runner, sampling, the real-image corrections) get the host's
models from :class:`LambdaObjective` and :class:`LambdaEdit` here, which add only the ComfyUI side.

ComfyUI runs nodes under inference mode and loads weights as inference tensors, which autograd
cannot save. The node therefore optimises against differentiable views of the UNet, the VAE decoder
and the loss models (nodes/comfy_boundary.py: ordinary tensors on the loaded weights' memory, patches
included, nothing duplicated); the MODEL itself is never patched, so Cancel leaves nothing behind.
Memory: the loaded weights, one sampler step's activations (the adjoint pass), and the decoder's and
loss models' activations, which are recomputed block by block in backward.
"""
from __future__ import annotations

import copy
import functools
import gc
import logging
import math

import comfy.model_base
import comfy.model_management as mm
import torch

from ..core import lambda_optim as lo
from ..core.lambda_schedule import LambdaSchedule
from ..core.trajectory import InversionTrajectory
from .comfy_boundary import (UNET_BLOCKS, VAE_DECODER_BLOCKS, StepProgress, check_vp_model, differentiable_view,
                             encode_text, initial_noise, latent_channels, recompute_in_backward, sampling_sigmas,
                             step_progress_for_model, unet_denoiser)
from .common import (CATEGORY, INVERSION_TRAJECTORY, LAMBDA_SCHEDULE, InputError, check_finite, check_int,
                     core_input_errors)
from .plot import draw_loss_curve, image_tensor
from .perceptual import PerceptualModel
from .clip_loss import ClipLossModel


OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

# Peak activation memory of the optimisation in units of ComfyUI's own inference estimates, measured by
# bench/lambda_memory.py on the H200 (fp16 UNet, cfg 7.5): the CUDA graphs' pool, one sampler step's VJP,
# per ``model.memory_required`` of that step's UNet batch is 10.2 (SD1.5 512²) and 19.9 (SDXL 1024²) with
# the activations stored, 2.7 and 3.1 with the UNet's blocks recomputed; the decoder + CLIP + LPIPS
# backward (blocks recomputed) is 1.36 × ``vae.memory_used_decode``. Rounded up to the larger family.
STEP_VJP_PER_FORWARD_ESTIMATE = 20.0
RECOMPUTED_STEP_VJP_PER_FORWARD_ESTIMATE = 3.5
DECODE_BACKWARD_PER_DECODE_ESTIMATE = 1.4


def weight_bytes(module: torch.nn.Module | None, device) -> int:
    """Bytes of the parameters and buffers that the optimisation must put on ``device`` (0 if already there)."""
    if module is None:
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors if t.device != torch.device(device))


def optimisation_memory(model, vae, latent_shape, cfg: float, clip_loss_model, perceptual_model,
                        recompute_unet: bool = False) -> int:
    """Bytes beyond the UNet's and VAE's weights that one optimisation needs at its peak, what the node
    asks ComfyUI to make room for: the loss models' weights, the CUDA graphs' pool (one sampler step's
    VJP: UNet batch 2 with cfg, 1 without; smaller with the UNet's blocks recomputed) and, beside it,
    the decoder + loss backward."""
    device = mm.get_torch_device()
    batch = latent_shape[0] * (1 if cfg == 1.0 else 2)
    factor = RECOMPUTED_STEP_VJP_PER_FORWARD_ESTIMATE if recompute_unet else STEP_VJP_PER_FORWARD_ESTIMATE
    step = factor * model.memory_required((batch, *latent_shape[1:]))
    decode = DECODE_BACKWARD_PER_DECODE_ESTIMATE * vae.memory_used_decode(latent_shape, vae.vae_dtype)
    losses = weight_bytes(clip_loss_model.model, device)
    losses += weight_bytes(getattr(perceptual_model, "net", None), device)
    return int(losses + step + decode)


def recompute_unet_needed(need: int, device: torch.device, free: int, reserved: int) -> bool:
    """Whether the UNet's blocks must be recomputed in each step's VJP (~25% slower) because the GPU's
    free memory, less ComfyUI's reserve, cannot hold ``need``, the optimisation with them stored."""
    return device.type == "cuda" and free - reserved < need


def out_of_memory_advice(width: int, height: int, cfg: float, need: int, detail: str) -> str:
    return (f"Optimize λ Schedule ran out of GPU memory at {width}×{height} (it needs about {need / 2**30:.1f} GiB "
            f"beyond the model's weights; {detail}). Lower width and height"
            + (", or use cfg 1 (one UNet pass per step instead of two)" if cfg != 1.0 else "")
            + ", or close other programs on the GPU; starting ComfyUI with --lowvram keeps part of the weights in "
              "CPU memory (slower). ComfyUI unloads its models after this error, so the next run starts clean.")


def differentiable_copy(module: torch.nn.Module, device=None) -> torch.nn.Module:
    """A frozen deep copy whose weights are ordinary tensors: twice the weights' memory (the benchmarks
    compare it with :func:`differentiable_view`, which shares them)."""
    with torch.inference_mode(False):
        clone = copy.deepcopy(module)
        if device is not None:
            clone.to(device)
    clone.requires_grad_(False)
    return clone.eval()


def is_lpips_slice(name: str, module: torch.nn.Module) -> bool:
    """lpips' VGG / AlexNet / SqueezeNet feature slices (``net.slice1`` ...): recomputed in backward."""
    return name.rsplit(".", 1)[-1].startswith("slice") and isinstance(module, torch.nn.Sequential)


def adm_inputs(model, pooled: list, width: int, height: int) -> list:
    """SDXL's ADM vector (pooled embedding + size embedding) of each prompt; Nones for models without one."""
    if isinstance(model.model, comfy.model_base.SDXL):
        if any(p is None for p in pooled):
            raise InputError("clip: an SDXL model needs a CLIP with pooled outputs (SDXL's text encoders)")
        return [model.model.encode_adm(pooled_output=p, width=width, height=height) for p in pooled]
    if getattr(model.model, "adm_channels", 0):
        raise InputError("model: λ optimisation supports SD1.x, SD2.x and SDXL models; this one needs other ADM inputs")
    return [None] * len(pooled)


def preview_of(images: torch.Tensor | None):
    """The first image of an IMAGE batch as a progress-bar preview, (format, PIL image, max size)."""
    if images is None:
        return None
    from PIL import Image
    import latent_preview
    pixels = (images[0].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return ("JPEG", Image.fromarray(pixels), latent_preview.MAX_PREVIEW_RESOLUTION)


def optimisation_ticks(steps: int, iterations: int, real_image: bool) -> int:
    """Sampler steps of a whole run: the neutral reference (none for a real image: it is the trajectory's
    end), a forward and a backward pass per iteration, and the final sampling of the best λ."""
    return (0 if real_image else steps) + 2 * steps * iterations + steps


class LambdaObjective(lo.LambdaObjective):
    """core.lambda_optim's L(λ) = L_dir + β·L_perc on differentiable views of the host's models: the VAE's
    decoder, the CLIP loss model's towers and, if given, LPIPS (else the CLIP-image-feature distance);
    ``denoise`` is the UNet's, for the edit.

    Memory options (the defaults are what the node uses; ``bench/lambda_memory.py`` measures each):
    ``share_weights``: differentiable views on the loaded weights instead of deep copies;
    ``recompute_decoder`` / ``recompute_loss``: the VAE decoder's blocks and LPIPS' feature slices keep
    only their inputs for backward; ``recompute_unet``: the same for the UNet's blocks inside each
    sampler step's VJP (one more UNet forward per step; for large images on small cards).
    """

    def __init__(self, model, vae, clip_loss_model: ClipLossModel, beta: float,
                 perceptual_model: PerceptualModel | None = None, share_weights: bool = True,
                 recompute_decoder: bool = True, recompute_loss: bool = True, recompute_unet: bool = False):
        self.model, self.vae = model, vae
        self.device = mm.get_torch_device()
        frozen = differentiable_view if share_weights else differentiable_copy
        self.unet = frozen(model.model.diffusion_model)  # where ComfyUI loaded it (partly on the CPU with --lowvram)
        if recompute_unet:
            recompute_in_backward(self.unet, UNET_BLOCKS)
        self.denoise = unet_denoiser(model, self.unet)
        self.decoder = frozen(vae.first_stage_model, vae.device)
        if recompute_decoder:
            recompute_in_backward(self.decoder, VAE_DECODER_BLOCKS)
        self.scorer = ClipLossModel(frozen(clip_loss_model.model, self.device), clip_loss_model.tokenizer,
                                    clip_loss_model.image_size, clip_loss_model.mean, clip_loss_model.std)
        self.perceptual = None
        if perceptual_model is not None:
            self.perceptual = PerceptualModel(frozen(perceptual_model.net, self.device))
            if recompute_loss:
                recompute_in_backward(self.perceptual.net, where=is_lpips_slice)
        distance = None if self.perceptual is None else functools.partial(self.perceptual.distance, per_item=True)
        super().__init__(self.decode_latents, self.scorer.encode_images, self.scorer.encode_texts, beta, distance)

    def decode_latents(self, x0: torch.Tensor) -> torch.Tensor:
        """Sampler-space latents → IMAGE-layout pixels in [0, 1] on the torch device, differentiably."""
        z = self.model.model.process_latent_out(x0).to(self.vae.vae_dtype).to(self.vae.device)
        return ((self.decoder.decode(z).float() + 1) / 2).clamp(0, 1).movedim(1, -1).to(self.device)


class LambdaEdit(lo.LambdaEdit):
    """core.lambda_optim's edit on the host's models: the objective's UNet denoiser, on its device.
    ``start``: x_T in the sampler's space, or an InversionTrajectory (its LATENTs, taken into the
    sampler's space: the real-image path). Options as core's (``per_item``, ``cuda_graphs``, ``on_step``, ...)."""

    def __init__(self, objective: LambdaObjective, sigmas: list[float], cfg: float, conds, adms, start,
                 rediffusion_steps: int = 20, **options):
        if isinstance(start, InversionTrajectory):
            start = [objective.model.model.process_latent_in(x.clone()) for x in start.latents]
        super().__init__(objective, objective.denoise, sigmas, cfg, conds, adms, start, rediffusion_steps,
                         device=objective.device, **options)


class OptimizeLambdaSchedule:
    DESCRIPTION = (
        "Learns λ_t, the per-step weight of the styled prompt in c_t = λ_t·styled + (1−λ_t)·neutral, so that "
        "the image changes only in the named attribute (Wu et al. 2023): directional CLIP loss between the "
        "neutral and the edited image plus β × a perceptual term, Adam over the ~50 weights, gradients "
        "through every sampler step (checkpointed) and the VAE decoder."
    )
    CATEGORY = f"{CATEGORY}/lambda"
    RETURN_TYPES = (LAMBDA_SCHEDULE, "LATENT", "LATENT", "IMAGE")
    RETURN_NAMES = ("schedule", "edited_latent", "neutral_latent", "loss_plot")
    OUTPUT_TOOLTIPS = (
        "The learned λ_1..λ_N (the lowest-loss iteration), for Mix Conditioning by λ Schedule or Save λ Schedule; "
        "with a stock KSampler (ddim, ddim_uniform, same steps) it reproduces the edit.",
        "X0(λ): the edited image's latent (VAE Decode it).",
        "X0(0): the neutral prompt's latent (or, with a trajectory, the inverted image), the loss's reference.",
        "L(λ) over the iterations (directional CLIP loss + β × perceptual term), the best one marked.",
    )
    OUTPUT_NODE = True
    FUNCTION = "optimize"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (SD1.x, SD2.x or SDXL; ε or v prediction). It is never patched."}),
                "vae": ("VAE", {"tooltip": "The model's VAE: the loss looks at decoded images, gradients go through its decoder."}),
                "clip": ("CLIP", {"tooltip": "The model's text encoder, for the neutral, styled and negative prompts."}),
                "clip_loss_model": ("CLIP_LOSS_MODEL", {"tooltip": "E_I / E_T, the image/text model of the directional CLIP loss (the paper: OpenAI's ViT-B/32)."}),
                "neutral_text": ("STRING", {"multiline": True, "default": "a photo of a person", "tooltip": "c0, the neutral prompt."}),
                "styled_text": ("STRING", {"multiline": True, "default": "a photo of a smiling person", "tooltip": "c1, the styled prompt: the neutral one plus the attribute."}),
                "negative_text": ("STRING", {"multiline": True, "default": "", "tooltip": "The unconditional prompt of classifier-free guidance (may be empty)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed, as KSampler's: the same seed gives the same x_T."}),
                "steps": ("INT", {"default": 50, "min": 2, "max": 1000, "tooltip": "N, the DDIM steps (ddim_uniform); one λ is learned per step (the paper: 50)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1, "tooltip": "Classifier-free guidance scale (the paper: 7.5)."}),
                "iterations": ("INT", {"default": 10, "min": 1, "max": 500, "tooltip": "Adam iterations; each samples, decodes, scores and back-propagates through all steps (the paper: 10)."}),
                "learning_rate": ("FLOAT", {"default": 0.05, "min": 0.0001, "max": 1.0, "step": 0.001, "tooltip": "Adam's learning rate on λ (the paper's code: 0.05)."}),
                "beta": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 10.0, "step": 0.005,
                                   "tooltip": "β, the weight of the perceptual (content) term (the paper: 0.05 for people, 0.03 for scenes)."}),
                "neutral_steps": ("INT", {"default": 20, "min": 0, "max": 1000,
                                          "tooltip": "t*: the initial schedule has λ = 0 for the first t* steps, styled_weight after (the paper: 20 generating, 10 for real images)."}),
                "styled_weight": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01, "tooltip": "The initial λ after t* (the paper: 1.0 generating, 1.1 for real images)."}),
                "width": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8,
                                  "tooltip": "Image width in pixels (also SDXL's size conditioning)."}),
                "height": ("INT", {"default": 512, "min": 16, "max": 8192, "step": 8, "tooltip": "Image height in pixels (also SDXL's size conditioning)."}),
            },
            "optional": {
                "trajectory": (INVERSION_TRAJECTORY, {"tooltip": "Edit a real image: the trajectory of DDIM Inversion (neutral prompt, same steps, scheduler ddim_uniform). Seed, width and height are then ignored; use neutral_steps 10 and styled_weight 1.1 as the paper does."}),
                "rediffusion_steps": ("INT", {"default": 20, "min": 0, "max": 1000, "tooltip": "With a trajectory: the last r steps run free (re-diffusion; the paper: 20 of 50); the others are corrected to pass through the image's trajectory."}),
                "perceptual_model": ("PERCEPTUAL_MODEL", {"tooltip": "LPIPS for the content term (the paper's choice); without it, the CLIP-image-feature distance."}),
            },
        }

    def optimize(self, model, vae, clip, clip_loss_model, neutral_text, styled_text, negative_text, seed, steps, cfg,
                 iterations, learning_rate, beta, neutral_steps, styled_weight, width, height, trajectory=None,
                 rediffusion_steps=20, perceptual_model=None):
        steps, iterations = check_int("steps", steps, 2, 1000), check_int("iterations", iterations, high=500)
        cfg, beta = check_finite("cfg", cfg, 0.0, 100.0), check_finite("beta", beta, 0.0, 100.0)
        learning_rate = check_finite("learning_rate", learning_rate, 0.0, 10.0)
        styled_weight = check_finite("styled_weight", styled_weight, -10.0, 10.0)
        width, height = check_int("width", width, 16, 8192), check_int("height", height, 16, 8192)
        neutral_steps = check_int("neutral_steps", neutral_steps)
        rediffusion_steps = check_int("rediffusion_steps", rediffusion_steps)
        check_int("seed", seed, 0)
        check_vp_model(model, "λ optimisation")
        if not isinstance(clip_loss_model, ClipLossModel):
            raise InputError("clip_loss_model: not a CLIP_LOSS_MODEL (use a CLIP loss loader node)")
        if perceptual_model is not None and not isinstance(perceptual_model, PerceptualModel):
            raise InputError("perceptual_model: not a PERCEPTUAL_MODEL (use Load Perceptual Loss)")
        channels = latent_channels(model)
        vae_channels = getattr(vae, "latent_channels", channels)
        if vae_channels != channels:
            raise InputError(f"vae: it makes {vae_channels}-channel latents but the model expects {channels}")

        (c0, p0), (c1, p1) = encode_text(clip, neutral_text, "neutral_text"), encode_text(clip, styled_text, "styled_text")
        uncond, pu = encode_text(clip, negative_text, "negative_text")
        y0, y1, yu = adm_inputs(model, [p0, p1, pu], width, height)
        sigmas = sampling_sigmas(model, steps, "ddim", "ddim_uniform").tolist()
        n = len(sigmas) - 1
        with core_input_errors("neutral_steps", "iterations"):   # core's checks, before any work
            init = lo.paper_init(n, neutral_steps, styled_weight)
            lo.check_iterations(iterations)
        if trajectory is not None:
            if not isinstance(trajectory, InversionTrajectory):
                raise InputError("trajectory: not an INVERSION_TRAJECTORY")
            with core_input_errors("trajectory", "rediffusion_steps"):
                trajectory.check_steps(steps, "ddim_uniform")
                lo.check_rediffusion_steps(n, rediffusion_steps)
            if not torch.allclose(trajectory.sigmas.double(), torch.tensor(sigmas, dtype=torch.float64), rtol=1e-5):
                raise InputError("trajectory was made with another model's noise schedule: invert with this model")
            if trajectory.latents.shape[2] != channels:
                raise InputError(f"trajectory has {trajectory.latents.shape[2]}-channel latents but the model expects {channels}")

        downscale = vae.spacial_compression_encode()
        latent_shape = (1, channels, height // downscale, width // downscale)
        need = optimisation_memory(model, vae, latent_shape, cfg, clip_loss_model, perceptual_model)
        lean = optimisation_memory(model, vae, latent_shape, cfg, clip_loss_model, perceptual_model, recompute_unet=True)
        # ComfyUI unloads other models to make room for the fast path, and offloads part of the UNet only
        # if not even the lean path (the UNet's blocks recomputed) fits beside it.
        mm.load_models_gpu([model, vae.patcher], memory_required=need, minimum_memory_required=lean)
        device = mm.get_torch_device()
        free, reserved = mm.get_free_memory(device), mm.extra_reserved_memory()
        recompute_unet = recompute_unet_needed(need, device, free, reserved)
        partial = bool(getattr(model.model, "model_lowvram", False))  # --lowvram / small card: weights cast per step
        progress = StepProgress(optimisation_ticks(n, iterations, trajectory is not None))
        history = []
        failure = None
        try:
            runner, best, neutral_x0, edited_x0 = self.learn(
                model, vae, clip_loss_model, perceptual_model, beta, sigmas, cfg, (c0, c1, uncond), (y0, y1, yu),
                trajectory if trajectory is not None else torch.zeros(latent_shape), seed, rediffusion_steps,
                (neutral_text, styled_text), init, iterations,
                learning_rate, progress, history, cuda_graphs=not partial, recompute_unet=recompute_unet)
        except OUT_OF_MEMORY as e:  # leave the except block first, so that its frames (and tensors) are freed
            failure = str(e).splitlines()[0] if str(e) else type(e).__name__
        if failure is not None:
            gc.collect()
            mm.soft_empty_cache()
            raise OUT_OF_MEMORY(out_of_memory_advice(width, height, cfg, lean if recompute_unet else need, failure))
        fallback = getattr(runner, "fallback_reason", None)
        if recompute_unet:
            logging.info("Optimize λ Schedule: %.1f GiB usable (free, less ComfyUI's reserve) for a %.1f GiB "
                         "optimisation, so the UNet's blocks are recomputed in backward (slower, %.1f GiB)",
                         (free - reserved) / 2**30, need / 2**30, lean / 2**30)
        if partial:
            logging.info("Optimize λ Schedule: the model is partly offloaded (low VRAM), so it runs without CUDA graphs")
        elif fallback and mm.get_torch_device().type == "cuda":
            logging.warning("Optimize λ Schedule ran without CUDA graphs (slower): %s", fallback)

        schedule = LambdaSchedule(tuple(step_progress_for_model(model, sigmas[:-1])), tuple(best.tolist()))
        out = mm.intermediate_device()
        edited = {"samples": model.model.process_latent_out(edited_x0.detach()).to(out)}
        neutral = {"samples": model.model.process_latent_out(neutral_x0.detach()).to(out)}
        summary = "loss per iteration: " + ", ".join(f"{v:.4f}" for v in history)
        plot = image_tensor(draw_loss_curve(history, "Optimize λ: L(λ) per iteration", "iteration"))
        return {"ui": {"text": [summary]}, "result": (schedule, edited, neutral, plot)}

    @staticmethod
    def learn(model, vae, clip_loss_model, perceptual_model, beta, sigmas, cfg, conds, adms, start, seed,
              rediffusion_steps, texts, init, iterations, learning_rate, progress, history, cuda_graphs=True,
              recompute_unet=False):
        """Adam on λ against differentiable views of the models; returns (the step runner, the best λ,
        X0(0), X0(best λ)). ``start``: an InversionTrajectory, or the empty latent whose x_T ``seed`` makes.
        Everything it allocates on the GPU dies with its frame (the out-of-memory path relies on it)."""
        with torch.inference_mode(False), torch.enable_grad():
            objective = LambdaObjective(model, vae, clip_loss_model, beta, perceptual_model,
                                        recompute_unet=recompute_unet)
            if not isinstance(start, InversionTrajectory):
                start = initial_noise(model, start, seed, sigmas[0])
            edit = LambdaEdit(objective, sigmas, cfg, conds, adms, start, rediffusion_steps, on_step=progress,
                              cuda_graphs=cuda_graphs)
            neutral_x0 = edit.set_reference([texts[0]], [texts[1]])

            def on_iteration(i, loss, lam):
                history.append(loss)
                mm.throw_exception_if_processing_interrupted()
                progress.show(preview_of(objective.last_image))

            best, _ = lo.optimize_lambdas(edit.loss, init, iterations, learning_rate, on_iteration)
            if not any(math.isfinite(v) for v in history):
                raise InputError("the loss was NaN or infinite at every iteration, so nothing was learned: check the "
                                 "models (a NaN-producing model or VAE) and the float inputs")
            with torch.no_grad():
                edited_x0 = edit.sample(best)
        return edit.runner, best, neutral_x0.detach(), edited_x0.detach()


NODE_CLASS_MAPPINGS = {"DisentangleOptimizeLambda": OptimizeLambdaSchedule}
NODE_DISPLAY_NAME_MAPPINGS = {"DisentangleOptimizeLambda": "Optimize λ Schedule"}
