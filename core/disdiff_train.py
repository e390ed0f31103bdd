"""DisDiff training loop: the one function behind the Train DisDiff node and ``scripts/train_disdiff.py``.

One step is eq. 14 on a batch (``core/disdiff.py``: :func:`~.disdiff.disdiff_losses`), its backward,
the gradient average over the data-parallel processes, and one AdamW step. On CUDA the whole step
(forward, backward, all-reduce, optimizer) is captured once as a CUDA graph and replayed: the toy
world's step is ~2,000 small kernels, so launching them from Python costs more than running them.
Nothing in a step synchronises with the host: the batch is drawn on the device from a seeded
generator, the learning rate lives in a device tensor, and the losses are summed on the device
and read only at log points.

Data parallel (``torchrun``, one process per GPU, NCCL; gloo on CPUs): every process draws the same
global batch from the same generator and trains on its own slice of it; gradients are averaged by
one all-reduce of a flat buffer (what ``DistributedDataParallel`` does, written out so that it is
part of the captured graph). So N processes of batch B/N compute the step of one process of batch
B, and checkpoints (written by rank 0) resume with any number of processes.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from . import disdiff as dd

log = logging.getLogger(__name__)

LOSS_OPTIONS = ("dis_weight", "loss_type", "detach_codes", "weighting", "logits", "recon_weighting")


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

class Ranks(NamedTuple):
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_ranks() -> Ranks:
    """This process's rank and the world size when torch.distributed is initialised (torchrun), else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def allreduce_mean_(tensors: list, world: int) -> None:
    """Average ``tensors`` over the processes in place, through one flat buffer (one collective)."""
    if world == 1:
        return
    import torch.distributed as dist
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _broadcast_parameters(model: torch.nn.Module, ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist
        for p in model.state_dict().values():
            dist.broadcast(p, 0)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

class Batch(NamedTuple):
    index: Tensor   # rows of the latent table [b]
    t: Tensor       # integer timesteps [b]
    noise: Tensor   # ε [b, C, H, W]
    c: Tensor       # sampled factor of each row [b]


def draw_batch(gen: torch.Generator, num_latents: int, batch_size: int, timesteps: int, num_factors: int,
               shape: tuple, device, ranks: Ranks = Ranks()) -> Batch:
    """The global batch of one step (uniform rows, timesteps, factors; Gaussian ε), this rank's slice."""
    index = torch.randint(num_latents, (batch_size,), generator=gen, device=device)
    t = torch.randint(timesteps, (batch_size,), generator=gen, device=device)
    noise = torch.randn((batch_size, *shape), generator=gen, device=device)
    c = torch.randint(num_factors, (batch_size,), generator=gen, device=device)
    per = batch_size // ranks.world
    part = slice(ranks.rank * per, (ranks.rank + 1) * per)
    return Batch(index[part], t[part], noise[part], c[part])


# --------------------------------------------------------------------------------------------
# One step, eager or as a CUDA graph
# --------------------------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, graphed: bool) -> torch.optim.Optimizer:
    """AdamW; for a graphed step the fused, capturable kernel with the learning rate in a device tensor."""
    params = list(model.parameters())
    if graphed:
        # float32 whatever the default dtype (the fused kernel reads the learning rate as a float)
        lr_tensor = torch.tensor(float(lr), device=params[0].device, dtype=torch.float32)
        try:
            return torch.optim.AdamW(params, lr=lr_tensor, weight_decay=weight_decay, capturable=True, fused=True)
        except (RuntimeError, ValueError) as e:   # a torch without the fused kernel for these parameters
            log.info("fused AdamW unavailable (%s): foreach, capturable", e)
            return torch.optim.AdamW(params, lr=lr_tensor, weight_decay=weight_decay, capturable=True, foreach=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, graphed: bool) -> None:
    """Load a checkpoint's optimizer state (of a graphed or eager run) into ``optimizer``."""
    settings = [{k: g[k] for k in ("capturable", "fused", "foreach", "lr") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, settings):
        lr = keep.pop("lr")
        group.update(keep)
        if torch.is_tensor(lr):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        device = group["params"][0].device
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if "step" in st:
                step = st["step"]
                st["step"] = (torch.as_tensor(step, dtype=torch.float32, device=device) if graphed
                              else torch.as_tensor(float(step), dtype=torch.float32))


def set_learning_rate(optimizer: torch.optim.Optimizer, value: float) -> None:
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(value)   # a kernel with a scalar argument: no synchronisation
        else:
            group["lr"] = value


class StepRunner:
    """One optimisation step on static batch buffers: eq. 14, backward, gradient average, AdamW, and
    the running sums of the logged losses. ``graphed``: the first ``warmup`` calls run eagerly on a
    side stream (CUDA's requirement before capture), the next captures the step and every later
    call replays it; a capture that fails logs its reason and leaves the runner eager."""

    def __init__(self, model: dd.DisDiff, frozen: dd.Frozen, latents: Tensor, alphas_cumprod: Tensor,
                 optimizer: torch.optim.Optimizer, batch: Batch, loss_kw: dict, autocast_dtype=None,
                 ranks: Ranks = Ranks(), graphed: bool = False, warmup: int = 3):
        self.model, self.frozen, self.latents, self.ab = model, frozen, latents, alphas_cumprod
        self.optimizer, self.loss_kw, self.ranks = optimizer, loss_kw, ranks
        self.device = latents.device
        self.autocast_dtype = autocast_dtype
        self.static = Batch(*(b.clone() for b in batch))
        self.sums = torch.zeros(5, device=self.device)
        self.graphed, self.warmup, self.calls = graphed and self.device.type == "cuda", warmup, 0
        self.graph: Optional["torch.cuda.CUDAGraph"] = None
        self.fallback_reason = ""

    def _compute(self) -> None:
        x0 = self.latents[self.static.index]
        use = self.autocast_dtype is not None
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=use,
                            cache_enabled=False):
            terms = dd.disdiff_losses(self.model, self.frozen, x0, self.static.t, self.static.noise, self.static.c,
                                      self.ab, **self.loss_kw)
        terms.total.backward()
        allreduce_mean_([p.grad for p in self.model.parameters() if p.grad is not None], self.ranks.world)
        self.optimizer.step()
        self.sums += terms.scalars()

    def _eager(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._compute()

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            self._compute()
        self.graph = graph

    def __call__(self, batch: Batch) -> None:
        for dst, src in zip(self.static, batch):
            dst.copy_(src)
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.graphed:
            self._eager()
            return
        if self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._eager()
            torch.cuda.current_stream().wait_stream(side)
            return
        try:
            self._capture()
        except Exception as e:  # an op that cannot be captured: stay eager, say why
            self.graph, self.graphed = None, False
            self.fallback_reason = f"{type(e).__name__}: {e}"
            log.warning("DisDiff training step not captured as a CUDA graph (%s); running eagerly", self.fallback_reason)
            torch.cuda.synchronize()
            self._eager()
            return
        self.graph.replay()

    def take_sums(self) -> Tensor:
        """The summed [loss, recon, L_in, L_va, γ] since the last call, averaged over processes; resets."""
        sums = self.sums.clone()
        allreduce_mean_([sums], self.ranks.world)
        self.sums.zero_()
        return sums


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def _agree_on_stop(stop: bool, ranks: Ranks, device) -> bool:
    if ranks.world == 1:
        return stop
    import torch.distributed as dist
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def _with_image_decoder(model: dd.DisDiff, image_decoder) -> dd.DisDiff:
    """Attach ``image_decoder`` when given; refuse an ``encoder_input="image"`` model that has none."""
    if image_decoder is not None:
        model.set_image_decoder(image_decoder)
    if model.config.encoder_input == "image" and model.image_decoder is None:
        raise ValueError("encoder_input 'image': train_disdiff needs image_decoder, the frozen first-stage decoder "
                         "(model-space latent → image in [-1, 1])")
    return model


def train_disdiff(latents: Tensor, frozen: dd.Frozen, alphas_cumprod: Tensor, *,
                  config: Optional[dd.DisDiffConfig] = None, model: Optional[dd.DisDiff] = None, steps: int = 1000,
                  batch_size: int = 128, lr: float = 1e-3, warmup: int = 100, weight_decay: float = 0.0,
                  dis_weight: float = 0.05, loss_type: str = "l1", detach_codes: bool = False,
                  weighting: str = "paper", logits: str = "distance", recon_weighting: str = "eps",
                  seed: int = 0, device=None,
                  autocast_dtype: Optional[torch.dtype] = None, log_every: int = 50,
                  checkpoint_path: Optional[str] = None, checkpoint_every: int = 0, resume: bool = False,
                  callback: Optional[Callable[[int, int, dict], object]] = None,
                  on_step: Optional[Callable[[int, int], None]] = None, info: Optional[dict] = None,
                  cuda_graph: Optional[bool] = None, channels_last: bool = False,
                  image_decoder: Optional[dd.ImageDecoder] = None):
    """Train E_φ and G_ψ on ``latents`` [M, C, H, W] (the model's latent space, already scaled as its
    UNet expects) on top of ``frozen``. Returns ``(model, history)``; history holds one dict per log
    point (step, losses, images/s over all processes).

    * ``batch_size`` is the global batch; under torchrun each process takes its share (it must divide).
    * ``on_step(step, steps)`` runs on the host after every step and must not read device values
      (progress bars, cancel: raise from it; the last periodic checkpoint stays).
    * ``callback(step, steps, logs)`` runs every ``log_every`` steps and at the end; return True to
      stop there (with a checkpoint), raise to cancel.
    * ``checkpoint_every`` > 0 writes ``checkpoint_path`` every that many steps (always at the end when
      given); ``resume`` continues from it (model, optimizer, step, data order).
    * ``cuda_graph``: None = on for a single CUDA process (a capture failure falls back to eager, with
      the reason in the log); multi-process runs default to eager.
    * ``channels_last``: G's convolutions in the NHWC layout (see :meth:`~.disdiff.DisDiff.use_channels_last`).
    * ``autocast_dtype`` (e.g. torch.bfloat16 on CUDA): the forward passes under autocast; weights and
      optimizer stay fp32. Only E and G are trained; the frozen model's weights never enter the optimizer.
    * ``dis_weight``, ``loss_type``, ``detach_codes``, ``weighting``, ``logits``, ``recon_weighting``: the loss (eq. 8–14), see
      :func:`~.disdiff.disdiff_losses`.
    * ``image_decoder``: the frozen first-stage decoder (:data:`~.disdiff.ImageDecoder`, on ``device``), required
      when the config's ``encoder_input`` is ``"image"`` (new or resumed); attached to the returned model.
    """
    ranks = current_ranks()
    if batch_size % ranks.world:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the number of processes ({ranks.world})")
    device = torch.device(device) if device is not None else latents.device
    latents = latents.to(device)
    alphas_cumprod = alphas_cumprod.to(device).float()
    start, opt_state, rng_state = 0, None, None
    if resume and checkpoint_path and os.path.exists(checkpoint_path):
        loaded = dd.load_checkpoint(checkpoint_path, device, image_decoder=image_decoder)
        model, start, opt_state, rng_state = loaded.model, loaded.step, loaded.optimizer_state, loaded.rng_state
        if config is not None and config.to_json() != model.config.to_json():
            raise dd.CheckpointError(f"{os.path.basename(checkpoint_path)} was trained with another configuration "
                                     f"({model.config.to_json()}); cannot resume with {config.to_json()}")
    if model is None:
        torch.manual_seed(seed)
        model = dd.DisDiff(config if config is not None else dd.make_config(latents, frozen))
    model = _with_image_decoder(model.to(device).train(), image_decoder)
    if channels_last:
        model.use_channels_last()
    _broadcast_parameters(model, ranks)
    with torch.no_grad():
        dd.check_features(model.config, frozen(latents[:1], torch.zeros(1, dtype=torch.long, device=device)))
    graphed = (device.type == "cuda" and ranks.world == 1) if cuda_graph is None else (cuda_graph and device.type == "cuda")
    optimizer = make_optimizer(model, lr, weight_decay, graphed)
    if opt_state is not None:
        restore_optimizer(optimizer, opt_state, graphed)
    gen = torch.Generator(device=device).manual_seed(seed)
    if rng_state is not None:
        try:
            gen.set_state(rng_state)
        except RuntimeError:  # saved on another device type: continue with a step-derived seed
            gen.manual_seed(seed * 1_000_003 + start)
    n, timesteps, shape = model.config.num_factors, alphas_cumprod.shape[0], tuple(latents.shape[1:])
    loss_kw = dict(dis_weight=dis_weight, loss_type=loss_type, detach_codes=detach_codes, weighting=weighting,
                   logits=logits, recon_weighting=recon_weighting)

    def next_batch():
        return draw_batch(gen, latents.shape[0], batch_size, timesteps, n, shape, device, ranks)

    runner: Optional[StepRunner] = None
    history, count, seen = [], 0, 0
    t0 = time.perf_counter()

    def log_point(step) -> dict:
        nonlocal count, seen, t0
        values = (runner.take_sums() / max(1, count)).tolist()
        elapsed = time.perf_counter() - t0
        entry = {"step": step, "loss": values[0], "recon": values[1], "invariant": values[2], "variant": values[3],
                 "weight": values[4], "images_per_s": seen / elapsed if elapsed > 0 else float("nan")}
        history.append(entry)
        count, seen, t0 = 0, 0, time.perf_counter()
        return entry

    def save(step):
        if checkpoint_path and ranks.main:
            dd.save_checkpoint(checkpoint_path, model, optimizer, step, info, gen.get_state())
        if ranks.world > 1:
            import torch.distributed as dist
            dist.barrier()

    for step in range(start + 1, steps + 1):
        set_learning_rate(optimizer, lr * min(1.0, step / max(1, warmup)))
        batch = next_batch()
        if runner is None:
            runner = StepRunner(model, frozen, latents, alphas_cumprod, optimizer, batch, loss_kw, autocast_dtype,
                                ranks, graphed)
        runner(batch)
        count += 1
        seen += batch_size
        if on_step is not None:
            on_step(step, steps)
        stop = False
        if step % log_every == 0 or step == steps:
            entry = log_point(step)
            entry["cuda_graph"] = runner.graph is not None
            if callback is not None:
                stop = callback(step, steps, entry) is True   # True: stop here (e.g. a time budget)
            stop = _agree_on_stop(stop, ranks, device)
        if (checkpoint_every > 0 and step % checkpoint_every == 0) or step == steps or stop:
            save(step)
        if stop:
            break
    if runner is not None and runner.fallback_reason:
        history.append({"note": f"eager steps: {runner.fallback_reason}"})
    if channels_last:
        model.use_channels_last(False)
    return model.eval(), history


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------

def gradient_shares(model: dd.DisDiff, frozen: dd.Frozen, latents: Tensor, alphas_cumprod: Tensor, *,
                    batch_size: int = 128, seed: int = 0, autocast_dtype=None, **loss_kw) -> dict:
    """How much each term of eq. 14 pulls on G and on E, for one fresh batch: the gradient norms
    ‖∇L_r‖, ‖∇ mean(γ_d·L_in)‖, ‖∇ mean(γ_d·L_va)‖ over G's and E's parameters, the ratios of the
    disentangling terms to L_r, and the unweighted losses. Leaves ``.grad`` untouched."""
    device = latents.device
    gen = torch.Generator(device=device).manual_seed(seed)
    b = draw_batch(gen, latents.shape[0], batch_size, alphas_cumprod.shape[0], model.config.num_factors,
                   tuple(latents.shape[1:]), device)
    with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        terms = dd.disdiff_losses(model, frozen, latents[b.index], b.t, b.noise, b.c, alphas_cumprod.to(device), **loss_kw)
    groups = {"G": [p for p in model.decoder.parameters()], "E": [p for p in model.encoder.parameters()]}
    out = {k: float(getattr(terms, k).detach()) for k in ("recon", "invariant", "variant", "weight")}
    parts = {"recon": terms.recon, "invariant": terms.weighted_invariant, "variant": terms.weighted_variant}
    for gname, params in groups.items():
        for pname, value in parts.items():
            if not value.requires_grad:
                out[f"grad_{gname}_{pname}"] = 0.0
                continue
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            out[f"grad_{gname}_{pname}"] = float(sum((g.float() ** 2).sum() for g in grads if g is not None) ** 0.5)
        r = out[f"grad_{gname}_recon"]
        out[f"share_{gname}"] = (out[f"grad_{gname}_invariant"] + out[f"grad_{gname}_variant"]) / max(r, 1e-30)
    return out
