"""Learning the λ schedule (Wu et al. 2023, Sec. 3.3-3.4), host-agnostic.

Sampling with a per-step mixed context c_t = λ_t·c1 + (1 − λ_t)·c0 is differentiable in λ. The
optimisation minimises, over λ_1:T,

    L(λ) = L_dir(X0(λ), X0(0); c1 − c0) + β·L_perc(X0(λ), X0(0))

with the directional CLIP loss L_dir = 1 − cos(E_I(X0(λ)) − E_I(X0(0)), E_T(c1) − E_T(c0))
(:class:`LambdaObjective`, on callables: the decoder, the image and text encoders, the perceptual
distance) and X0(λ) sampled by :class:`LambdaEdit`, which owns the step runner.
Gradients go through every sampler step by an adjoint pass: the forward pass keeps only the
latents x_0..x_N, the backward pass recomputes each step from its x_i and back-propagates through it
alone, so at most one step's activations are alive at a time (what checkpointing every step gives).

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

from .conditioning import match_token_length
from .ddim import eps_from_denoised

StepHook = Callable[[int, int], None]
"""``on_step(done, total)``, called on the host after every sampler step of :func:`sample_mixed` (and of
:func:`trajectory_corrections`): ``done`` steps of ``total`` have run. Sampling with gradients through the
adjoint pass (``use_checkpoint``, gradients on) counts its backward steps after the forward ones: done =
1..N during sampling and N+1..2N during ``loss.backward()``, total = 2N; any other pass has total = N.
It costs no device synchronisation; raising from it (ComfyUI's Cancel) stops the pass after that step,
forward or backward. For progress bars and cancellation."""

ContextDenoiser = Callable[..., Tensor]
"""``denoise(x, sigma, context, y=None) → x̂0`` for a batch of contexts (one per batch item); ``y`` is
an optional per-prompt vector such as SDXL's ADM input (pooled text embedding + size embedding),
which is mixed with the same λ: it is linear in the pooled embedding, so λ·y1 + (1 − λ)·y0 is the
ADM input of the mixed pooled embedding."""

ImageDecoder = Callable[[Tensor], Tensor]
"""``decode(x0) → images``: sampler-space latents X0 [B, C, h, w] → images [B, H, W, 3] in [0, 1],
differentiably (the VAE's decoder)."""

ImageEncoder = Callable[[Tensor], Tensor]
"""``encode_images(images) → E_I``: images [B, H, W, 3] → unit-norm embeddings [B, D] (CLIP's image tower)."""

TextEncoder = Callable[[list], Tensor]
"""``encode_texts(texts) → E_T``: prompts → unit-norm embeddings [len(texts), D] (CLIP's text tower)."""

PerceptualDistance = Callable[[Tensor, Tensor], Tensor]
"""``perceptual(images, reference) → d``: one distance per batch item [B] (the paper: LPIPS-VGG)."""


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


class MixedStepRunner:
    """Step i of λ-mixed DDIM sampling, x_{i+1} = Φ_i(x_i, λ_i) (η = 0), and its vector-Jacobian
    product (g·∂Φ_i/∂x_i, g·∂Φ_i/∂λ_i), recomputed from x_i: what the adjoint pass of
    ``sample_mixed`` needs. σ's are tensors, so a step has no host synchronisation (CUDA-graphable).
    """

    def __init__(self, denoise: ContextDenoiser, sigmas: Sequence[float], c0: Tensor, c1: Tensor,
                 uncond: Optional[Tensor] = None, cfg: float = 1.0, y0: Optional[Tensor] = None,
                 y1: Optional[Tensor] = None, y_uncond: Optional[Tensor] = None):
        self.denoise, self.sigmas, self.uncond, self.cfg = denoise, [float(v) for v in sigmas], uncond, cfg
        self.c1, self.c0 = c1, match_token_length(c0, c1.shape[1]).to(c1)
        self.y0, self.y1, self.y_uncond = y0, y1, y_uncond
        self._sigma_table: Optional[Tensor] = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def sigma_pair(self, i: int, like: Tensor) -> tuple[Tensor, Tensor]:
        table = self._sigma_table
        if table is None or table.device != like.device or table.dtype != like.dtype:
            table = self._sigma_table = torch.tensor(self.sigmas, dtype=like.dtype, device=like.device)
        return table[i], table[i + 1]

    def step(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, lam: Tensor) -> Tensor:
        """x_next = D + σ_next·(x − D)/σ with D the guided x̂0 under context λ·c1 + (1 − λ)·c0."""
        context = _lerp(self.c0, self.c1, lam)
        denoised = guided_denoise(self.denoise, x, sigma.expand(x.shape[0]), context.expand(x.shape[0], -1, -1),
                                  self.uncond, self.cfg, _lerp(self.y0, self.y1, lam), self.y_uncond)
        return denoised + sigma_next * eps_from_denoised(x, denoised, sigma)   # core.ddim.ddim_step_sigma, η = 0

    def forward(self, i: int, x: Tensor, lam: Tensor) -> Tensor:
        with torch.no_grad():
            return self.step(x, *self.sigma_pair(i, x), lam)

    def vjp(self, i: int, x: Tensor, lam: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_, lam_ = x.detach().requires_grad_(True), lam.detach().requires_grad_(True)
            out = self.step(x_, *self.sigma_pair(i, x), lam_)
            return torch.autograd.grad(out, (x_, lam_), grad)

    def sample(self, x_T: Tensor, lambdas: Tensor, corrections: Optional[Sequence[Optional[Tensor]]] = None,
               use_checkpoint: bool = True, callback: Optional[Callable[[int, Tensor], None]] = None,
               on_step: Optional[StepHook] = None) -> Tensor:
        """X0(λ): x_{i+1} = Φ_i(x_i, λ_i) (+ δ_i) from x_T along this runner's σ's, differentiable in λ.

        ``lambdas``: [N] (one schedule for the batch) or [N, B] (one schedule per batch item, i.e. B
        independent edits in one batch). ``corrections[i]`` (if given and not None) is added after step i.
        With ``use_checkpoint`` and gradients on, each step is recomputed in the backward pass instead of
        being stored (the adjoint pass of ``_AdjointSampling``); without it autograd keeps the whole graph.
        ``on_step(done, total)`` after every step, forward and (adjoint) backward: see :data:`StepHook`.
        """
        n = self.steps
        if lambdas.shape[0] != n or lambdas.ndim > 2 or (lambdas.ndim == 2 and lambdas.shape[1] != x_T.shape[0]):
            raise ValueError(f"lambdas: need shape [{n}] or [{n}, {x_T.shape[0]}] (steps, batch), "
                             f"got {list(lambdas.shape)}")
        if torch.is_grad_enabled() and use_checkpoint:
            return _AdjointSampling.apply(lambdas, x_T, self, corrections, callback, on_step)
        x = x_T
        for i in range(n):
            if torch.is_grad_enabled():  # plain autograd: the whole graph is kept
                x = self.step(x, *self.sigma_pair(i, x), lambdas[i])
            else:
                x = self.forward(i, x, lambdas[i])
            if corrections is not None and corrections[i] is not None:
                x = x + corrections[i]
            if callback is not None:
                callback(i, x)
            if on_step is not None:
                on_step(i + 1, n)
        return x


class GraphedStepRunner(MixedStepRunner):
    """The same steps replayed from two CUDA graphs, one step's forward and one step's VJP, captured
    on first use for the shapes at hand. Sampling and its gradient then cost GPU time only, not
    Python's per-kernel launch time (which otherwise dominates a 50-step backward). Falls back to
    the eager steps, with ``fallback_reason`` set, on the CPU or if capture fails. The two graphs share
    one memory pool unless ``share_pool`` is off (the memory benchmark compares both).
    """

    def __init__(self, *args, share_pool: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._key = None
        self.share_pool = share_pool
        self.fallback_reason: Optional[str] = None

    def _capture(self, x: Tensor, lam: Tensor) -> bool:
        key = (tuple(x.shape), x.dtype, x.device, tuple(lam.shape))
        if self._key == key:
            return True
        if self.fallback_reason is not None or x.device.type != "cuda":
            self.fallback_reason = self.fallback_reason or f"tensors on {x.device.type}, not CUDA"
            return False
        sig, sig_next = (t.clone() for t in self.sigma_pair(0, x))
        st = {"x": x.detach().clone(), "lam": lam.detach().clone().to(x.device), "sig": sig, "sig_next": sig_next,
              "grad": torch.zeros_like(x)}

        def vjp_static():
            x_, lam_ = st["x"].detach().requires_grad_(True), st["lam"].detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.step(x_, st["sig"], st["sig_next"], lam_)
                return torch.autograd.grad(out, (x_, lam_), st["grad"])

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture (cuDNN/cuBLAS choices, allocator)
                for _ in range(2):
                    vjp_static()
                    with torch.no_grad():
                        self.step(st["x"], st["sig"], st["sig_next"], st["lam"])
            torch.cuda.current_stream().wait_stream(side)
            forward_graph, vjp_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(forward_graph), torch.no_grad():
                st["out"] = self.step(st["x"], st["sig"], st["sig_next"], st["lam"])
            # One memory pool for both graphs (the larger of the two instead of their sum): they never
            # run concurrently and each one's outputs are copied out right after its replay.
            with torch.cuda.graph(vjp_graph, pool=forward_graph.pool() if self.share_pool else None):
                st["grad_x"], st["grad_lam"] = vjp_static()
        except Exception as e:  # a host sync or an op that cannot be captured: stay eager
            self.fallback_reason = f"CUDA graph capture failed ({type(e).__name__}: {e})"
            return False
        self._static, self._graphs, self._key = st, (forward_graph, vjp_graph), key
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graphs' pool now holds what they need
        return True

    def _load(self, i: int, x: Tensor, lam: Tensor) -> None:
        sig, sig_next = self.sigma_pair(i, x)
        st = self._static
        st["x"].copy_(x)
        st["lam"].copy_(lam)
        st["sig"].copy_(sig)
        st["sig_next"].copy_(sig_next)

    def forward(self, i: int, x: Tensor, lam: Tensor) -> Tensor:
        if not self._capture(x, lam):
            return super().forward(i, x, lam)
        self._load(i, x, lam)
        self._graphs[0].replay()
        return self._static["out"].clone()

    def vjp(self, i: int, x: Tensor, lam: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        if not self._capture(x, lam):
            return super().vjp(i, x, lam, grad)
        self._load(i, x, lam)
        self._static["grad"].copy_(grad)
        self._graphs[1].replay()
        return self._static["grad_x"].clone(), self._static["grad_lam"].clone()


class _AdjointSampling(torch.autograd.Function):
    """X0(λ) with a hand-written backward: the forward pass keeps only x_0..x_N; the backward pass
    walks the steps in reverse, g_i = g_{i+1}·∂Φ_i/∂x_i and dL/dλ_i = g_{i+1}·∂Φ_i/∂λ_i, each step
    recomputed from its stored x_i (one step's activations alive at a time; corrections are constants)."""

    @staticmethod
    def forward(ctx, lambdas, x_T, runner, corrections, callback, on_step):
        xs, x, n = [x_T], x_T, runner.steps
        for i in range(n):
            x = runner.forward(i, x, lambdas[i])
            if corrections is not None and corrections[i] is not None:
                x = x + corrections[i]
            if callback is not None:
                callback(i, x)
            xs.append(x)
            if on_step is not None:
                on_step(i + 1, 2 * n)
        ctx.runner, ctx.xs, ctx.on_step = runner, xs, on_step
        ctx.save_for_backward(lambdas)
        return x

    @staticmethod
    def backward(ctx, grad):
        lambdas, = ctx.saved_tensors
        grad_lambdas = torch.zeros_like(lambdas)
        n = ctx.runner.steps
        for k, i in enumerate(reversed(range(n)), 1):
            grad, grad_lambdas[i] = ctx.runner.vjp(i, ctx.xs[i], lambdas[i], grad)
            if ctx.on_step is not None:
                ctx.on_step(n + k, 2 * n)
        return grad_lambdas, grad, None, None, None, None


def sample_mixed(denoise: ContextDenoiser, x_T: Tensor, sigmas: Sequence[float], c0: Tensor, c1: Tensor,
                 lambdas: Tensor, uncond: Optional[Tensor] = None, cfg: float = 1.0,
                 corrections: Optional[Sequence[Optional[Tensor]]] = None, use_checkpoint: bool = True,
                 callback: Optional[Callable[[int, Tensor], None]] = None, y0: Optional[Tensor] = None,
                 y1: Optional[Tensor] = None, y_uncond: Optional[Tensor] = None,
                 on_step: Optional[StepHook] = None) -> Tensor:
    """X0(λ): DDIM sampling along decreasing ``sigmas`` with λ_i at step i, differentiable in λ
    (:meth:`MixedStepRunner.sample` of the runner these arguments make; a runner samples with its own
    σ's, contexts and cfg, e.g. replayed from CUDA graphs)."""
    runner = MixedStepRunner(denoise, sigmas, c0, c1, uncond, cfg, y0, y1, y_uncond)
    return runner.sample(x_T, lambdas, corrections, use_checkpoint, callback, on_step)


@torch.no_grad()
def trajectory_corrections(denoise: ContextDenoiser, trajectory: Sequence[Tensor], sigmas: Sequence[float],
                           c0: Tensor, uncond: Optional[Tensor] = None, cfg: float = 1.0,
                           rediffusion_steps: int = 0, y0: Optional[Tensor] = None,
                           y_uncond: Optional[Tensor] = None, on_step: Optional[StepHook] = None) -> list[Optional[Tensor]]:
    """δ_i = x*_{i+1} − step(x*_i; c0) for the first N − r steps, None for the last r (re-diffusion).

    With these, sampling from x*_0 with λ = 0 passes through every x*_i of the first N − r steps.
    ``on_step(done, N − r)`` after each corrected step (:data:`StepHook`).
    """
    n = len(sigmas) - 1
    if len(trajectory) != n + 1:
        raise ValueError(f"trajectory has {len(trajectory)} latents but the schedule has {n} steps")
    check_rediffusion_steps(n, rediffusion_steps)
    # the very step sample_mixed takes (λ = 0), so that λ = 0 sampling passes through x*_i to the last bit
    runner = MixedStepRunner(denoise, sigmas, c0, c0, uncond, cfg, y0, y0, y_uncond)
    zero = torch.zeros((), dtype=c0.dtype, device=c0.device)
    out: list[Optional[Tensor]] = []
    for i in range(n):
        if i >= n - rediffusion_steps:
            out.append(None)
            continue
        out.append(trajectory[i + 1] - runner.forward(i, trajectory[i], zero))
        if on_step is not None:
            on_step(i + 1, n - rediffusion_steps)
    return out


def check_rediffusion_steps(steps: int, rediffusion_steps: int) -> int:
    """Re-diffusion frees the last r of the N steps: 0 ≤ r ≤ N."""
    if not 0 <= rediffusion_steps <= steps:
        raise ValueError(f"rediffusion_steps must lie in [0, {steps}], got {rediffusion_steps}")
    return rediffusion_steps


def directional_loss(image_emb: Tensor, neutral_image_emb: Tensor, text_direction: Tensor,
                     per_item: bool = False) -> Tensor:
    """1 − cos(E_I(edit) − E_I(neutral), E_T(styled) − E_T(neutral)), averaged over the batch
    (``per_item``: one value per batch item)."""
    delta = image_emb - neutral_image_emb
    loss = 1 - F.cosine_similarity(delta, text_direction.expand_as(delta), dim=-1, eps=1e-8)
    return loss if per_item else loss.mean()


def image_feature_distance(image_emb: Tensor, neutral_image_emb: Tensor) -> Tensor:
    """1 − cos(E_I(edit), E_I(neutral)) per item: the content term without a perceptual model."""
    return 1 - F.cosine_similarity(image_emb, neutral_image_emb, dim=-1)


class LambdaObjective:
    """Wu et al.'s objective (Sec. 3.3) for one edit, or a batch of independent edits, on decoded images::

        L(λ) = L_dir(E_I(X0(λ)) − E_I(X0(0)), E_T(c1) − E_T(c0)) + β·L_perc(X0(λ), X0(0))

    L_dir is :func:`directional_loss`; L_perc the ``perceptual`` distance (the paper: LPIPS-VGG) or,
    without one, :func:`image_feature_distance`. :meth:`set_reference` fixes X0(0) and the prompts;
    ``last_image`` holds the latest decoded X0(λ) (for a live preview)."""

    def __init__(self, decode: ImageDecoder, encode_images: ImageEncoder, encode_texts: TextEncoder, beta: float,
                 perceptual: Optional[PerceptualDistance] = None):
        self.decode, self.encode_images, self.encode_texts = decode, encode_images, encode_texts
        self.beta, self.perceptual_distance = beta, perceptual
        self.neutral_image = self.neutral_emb = self.direction = self.last_image = None

    @torch.no_grad()
    def set_reference(self, neutral_x0: Tensor, neutral_texts: list, styled_texts: list) -> None:
        """The reference X0(0) (its image and E_I) and the text direction E_T(c1) − E_T(c0)."""
        self.neutral_image = self.decode(neutral_x0)
        self.neutral_emb = self.encode_images(self.neutral_image)
        direction = self.encode_texts(styled_texts) - self.encode_texts(neutral_texts)
        self.direction = direction.to(self.neutral_emb.device)

    def loss(self, x0: Tensor, per_item: bool = False) -> Tensor:
        """L(λ) at X0(λ) = ``x0``: the batch mean, or one value per item (independent edits)."""
        image = self.decode(x0)
        self.last_image = image.detach()
        emb = self.encode_images(image)
        if self.perceptual_distance is not None:
            content = self.perceptual_distance(image, self.neutral_image)
        else:
            content = image_feature_distance(emb, self.neutral_emb)
        loss = directional_loss(emb, self.neutral_emb, self.direction, per_item=True) + self.beta * content
        return loss if per_item else loss.mean()


def _copied(t: Optional[Tensor], device) -> Optional[Tensor]:
    """An ordinary tensor on ``device`` (a host's inference tensors included), or None."""
    return None if t is None else t.clone().to(device)


class LambdaEdit:
    """X0(λ) and L(λ) of an edit, or a batch of independent edits, ready for Adam (Sec. 3.3–3.4).

    ``start``: x_T in the sampler's space (generating), or a real image's inversion trajectory
    x*_0..N (a list of latents in the sampler's space, most noisy first): the first N − r steps are then
    corrected to pass through it (δ_i of :func:`trajectory_corrections`), the last r re-diffuse. The
    step runner gets ``denoise``, the σ's, ``conds`` (c0, c1, the unconditional context), cfg and
    ``adms`` (y0, y1, y_uncond: SDXL's ADM vectors, or Nones) once, here, and samples with them
    (:meth:`MixedStepRunner.sample`); ``cuda_graphs``: replayed from CUDA graphs (one memory pool for
    both unless ``share_graph_pool`` is off). Tensors are copied to ``device`` (default: ``start``'s).
    Build and use it outside inference mode with gradients on; ``on_step(done, total)`` runs after every
    sampler step (forward, adjoint backward, trajectory corrections: :data:`StepHook`).
    """

    def __init__(self, objective: LambdaObjective, denoise: ContextDenoiser, sigmas: Sequence[float], cfg: float,
                 conds: Sequence[Tensor], adms: Sequence[Optional[Tensor]], start, rediffusion_steps: int = 20,
                 per_item: bool = False, use_checkpoint: bool = True, cuda_graphs: bool = True,
                 on_step: Optional[StepHook] = None, share_graph_pool: bool = True, device=None):
        path = None if isinstance(start, Tensor) else list(start)
        device = device if device is not None else (start if path is None else path[0]).device
        c0, c1, uncond = (_copied(t, device) for t in conds)
        y0, y1, yu = (_copied(y, device) for y in adms)
        self.objective, self.per_item, self.use_checkpoint, self.on_step = objective, per_item, use_checkpoint, on_step
        self.path = self.corrections = None
        if path is not None:
            self.path = [_copied(x, device) for x in path]
            self.corrections = trajectory_corrections(denoise, self.path, sigmas, c0, uncond, cfg, rediffusion_steps,
                                                      y0=y0, y_uncond=yu, on_step=on_step)
        self.x_T = self.path[0] if path is not None else _copied(start, device)
        args = (denoise, sigmas, c0, c1, uncond, cfg, y0, y1, yu)
        self.runner = (GraphedStepRunner(*args, share_pool=share_graph_pool) if cuda_graphs
                       else MixedStepRunner(*args))

    @property
    def sigmas(self) -> list[float]:
        return self.runner.sigmas

    @property
    def steps(self) -> int:
        return self.runner.steps

    def sample(self, lam: Tensor) -> Tensor:
        """X0(λ); differentiable in λ when gradients are on (each step recomputed in backward)."""
        return self.runner.sample(self.x_T, lam.to(self.x_T.device), self.corrections, self.use_checkpoint,
                                  on_step=self.on_step)

    @torch.no_grad()
    def set_reference(self, neutral_texts: list, styled_texts: list) -> Tensor:
        """Sample (or, for a real image, take) the neutral X0(0) and set the objective's references; returns it."""
        neutral = self.sample(torch.zeros(self.steps)) if self.path is None else self.path[-1]
        self.objective.set_reference(neutral, neutral_texts, styled_texts)
        return neutral

    def loss(self, lam: Tensor) -> Tensor:
        """L(λ) = objective(X0(λ)): the batch mean, or one value per item with ``per_item``."""
        return self.objective.loss(self.sample(lam), per_item=self.per_item)


def check_iterations(iterations: int) -> int:
    """Adam takes at least one step."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    return iterations


def optimize_lambdas(loss_of: Callable[[Tensor], Tensor], init: Tensor, iterations: int = 10, lr: float = 0.03,
                     callback: Optional[Callable[[int, float, Tensor], None]] = None) -> tuple[Tensor, list[float]]:
    """Adam on λ (Wu et al.: 10 iterations, lr 0.03 in the paper, 0.05 in the code).

    ``loss_of(λ)`` samples, decodes and scores; returns (the λ with the lowest loss seen, the loss of
    every iteration). ``callback(i, loss, λ)`` after each iteration (progress, cancel).

    Independent edits in one batch: ``init`` of shape [N, B] and ``loss_of`` returning one loss per
    item [B]. The sum is minimised; Adam's per-parameter steps make that B separate optimisations,
    and the best λ is kept per item. The history then holds the mean loss.
    """
    check_iterations(iterations)
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
