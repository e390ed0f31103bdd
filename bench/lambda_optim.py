"""λ-optimisation benchmark (issue 4): time and GPU memory of Optimize λ Schedule vs stock sampling.

SD1.5 architecture with random weights (costs do not depend on the values), 512², 50 steps
ddim_uniform, cfg 7.5, fp16 UNet; random SD VAE, random SD1 text encoder, random open_clip ViT-B-32
(the paper's loss model) and LPIPS-VGG with a random backbone. Prints one table:

- one stock 50-step sampling (comfy.sample.sample, what KSampler runs);
- one optimisation iteration (sample X0(λ), decode, CLIP + LPIPS loss, adjoint pass back to λ with
  each step recomputed), with the steps replayed from CUDA graphs and eager, timed in interleaved
  rounds with the stock run: ratio = median of per-round ratios; and the two gradients' difference;
- the naive variant (no checkpointing, the whole graph kept, as the reference does), at the full
  step count and at fewer steps, to show how its memory grows;
- a full 10-iteration edit through the node (text encoding, model copies, reference sampling,
  10 iterations, final sampling) with the peak GPU memory of the whole optimisation;
- with --sdxl: SDXL architecture at 1024² (stock vs one checkpointed iteration, peak).

    COMFYUI_PATH=/path/to/ComfyUI python bench/lambda_optim.py [--sdxl]
    COMFYUI_PATH=/path/to/ComfyUI python bench/lambda_optim.py --cpu --size 64 --steps 4 --iterations 2   # smoke run
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle.harness import (conditioning, device_name, random_sd1_clip, random_sd15,  # noqa: E402
                                         random_sd_vae, random_sdxl, start_comfy)


def loss_models(pack):
    """Random open_clip ViT-B-32 (the paper's loss model) and LPIPS-VGG with a random backbone."""
    import lpips
    clip_loss = pack.nodes.clip_loss
    loss_model = clip_loss.wrap_open_clip(clip_loss.open_clip_architecture("ViT-B-32"), "ViT-B-32")
    perceptual = pack.nodes.perceptual.PerceptualModel(lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True,
                                                                   verbose=False).eval())
    return loss_model, perceptual


def peak_gib(fn):
    """(result, seconds, peak GPU memory in GiB while fn ran); result None on out-of-memory."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.OutOfMemoryError:
        out = None
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, seconds, peak


class Case:
    """One model family at one size: a stock sampler run and λ-edits on the same noise and prompts."""

    def __init__(self, pack, model, vae, loss_model, perceptual, size, steps, cfg, pooled=0, ctx=768):
        import torch
        import comfy.model_management as mm
        self.node = pack.nodes.lambda_optim
        self.model, self.vae, self.loss_model, self.perceptual = model, vae, loss_model, perceptual
        self.steps, self.cfg, self.size = steps, cfg, size
        self.pos = conditioning(dim=ctx, seed=1, pooled=pooled)
        self.styled = conditioning(dim=ctx, seed=2, pooled=pooled)
        self.neg = conditioning(dim=ctx, seed=3, pooled=pooled)
        side = size // 8
        self.latent = torch.zeros(1, 4, side, side)
        self.noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
        mm.load_models_gpu([model])
        self.sigmas = pack.nodes.comfy_boundary.sampling_sigmas(model, steps, "ddim", "ddim_uniform").tolist()
        pooled_of = [c[0][1].get("pooled_output") for c in (self.pos, self.styled, self.neg)]
        self.adms = self.node.adm_inputs(model, pooled_of, size, size) if pooled else [None] * 3
        self.objective = self.objective_with()

    def stock(self):
        import comfy.sample
        import torch
        with torch.inference_mode():
            return comfy.sample.sample(self.model, self.noise, self.steps, self.cfg, "ddim", "ddim_uniform", self.pos,
                                       self.neg, self.latent, disable_pbar=True, seed=0)

    def objective_with(self, **options):
        """A LambdaObjective on these models: the node's memory options, or ``options`` instead."""
        import torch
        with torch.inference_mode(False):
            return self.node.LambdaObjective(self.model, self.vae, self.loss_model, 0.05, self.perceptual, **options)

    def edit(self, steps=None, use_checkpoint=True, cuda_graphs=True, objective=None, **options):
        import torch
        sigmas = self.sigmas if steps is None else self.sigmas[: steps + 1]
        with torch.inference_mode(False):
            x_T = self.node.initial_noise(self.model, self.latent, 0, sigmas[0])
            conds = (self.pos[0][0], self.styled[0][0], self.neg[0][0])
            edit = self.node.LambdaEdit(objective or self.objective, sigmas, self.cfg, conds, self.adms, x_T,
                                        use_checkpoint=use_checkpoint, cuda_graphs=cuda_graphs, **options)
            edit.set_reference(["a photo"], ["a painting"])
        return edit

    def iteration(self, edit):
        """One Adam iteration's work: L(λ) and its gradient."""
        import torch
        with torch.inference_mode(False), torch.enable_grad():
            lam = torch.linspace(0, 1, edit.steps).requires_grad_(True)
            edit.loss(lam).backward()
            return lam.grad


def gradient_gaps(case, graphed, eager) -> tuple[float, float]:
    """Relative difference of the λ-gradients of the CUDA-graphed and the eager steps, and the noise
    floor: the same between two eager runs whose attention uses another (equally valid) SDPA kernel."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    a, b = case.iteration(graphed), case.iteration(eager)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        c = case.iteration(eager)
    return float((a - b).norm() / b.norm()), float((c - b).norm() / b.norm())


def sd15_rows(pack, args, loss_model, perceptual):
    import torch
    model, vae, clip = random_sd15("fp32" if args.cpu else "fp16"), random_sd_vae(), random_sd1_clip()
    case = Case(pack, model, vae, loss_model, perceptual, args.size, args.steps, 7.5)
    edit, eager = case.edit(), case.edit(cuda_graphs=False)
    gap, floor = gradient_gaps(case, edit, eager)
    t = timed_rounds({"stock": case.stock, "iteration": lambda: case.iteration(edit),
                      "eager": lambda: case.iteration(eager)}, args.repeats)
    _, _, peak_iter = peak_gib(lambda: case.iteration(edit))
    _, _, peak_eager = peak_gib(lambda: case.iteration(eager))
    med = {k: statistics.median(v) for k, v in t.items()}
    title = f"SD1.5 {args.size}²"
    graphs = "CUDA graphs" if edit.runner.fallback_reason is None else f"no CUDA graphs: {edit.runner.fallback_reason}"
    rows = [[f"{title}: stock sampling, {args.steps} steps, cfg 7.5", med["stock"], 1.0, "", ""],
            [f"{title}: one iteration, adjoint pass ({graphs})", med["iteration"],
             median_ratio(t["iteration"], t["stock"]), peak_iter, "≤ 3.0× stock"],
            [f"{title}: one iteration, adjoint pass, eager steps", med["eager"], median_ratio(t["eager"], t["stock"]),
             peak_eager, ""],
            [f"{title}: |dL/dλ graphed − eager| / |dL/dλ eager|", gap, "", "", ""],
            [f"{title}: same, eager with another SDPA kernel (fp16 noise floor)", floor, "", "", ""]]
    del edit, eager
    for steps in sorted({args.steps, args.naive_steps}, reverse=True):
        naive, seconds, peak = peak_gib(lambda: case.iteration(case.edit(steps, use_checkpoint=False)))
        label = f"{title}: one iteration, naive autograd (whole graph kept), {steps} steps"
        rows.append([label, "out of memory" if naive is None else seconds, "", peak, ""])
        if steps != args.steps:
            _, seconds, peak = peak_gib(lambda: case.iteration(case.edit(steps)))
            rows.append([f"{title}: one iteration, adjoint pass, {steps} steps", seconds, "", peak, ""])

    node = pack.nodes.lambda_optim.OptimizeLambdaSchedule()

    def full_edit():
        with torch.inference_mode():
            return node.optimize(model, vae, clip, loss_model, "a photo of a person", "a photo of a smiling person", "",
                                 0, args.steps, 7.5, args.iterations, 0.05, 0.05, 20 * args.steps // 50, 1.0,
                                 args.size, args.size, perceptual_model=perceptual)
    del case
    out, seconds, peak = peak_gib(full_edit)
    rows.append([f"{title}: full {args.iterations}-iteration edit (node)", seconds, seconds / med["stock"], peak,
                 "≤ 60 s, ≤ 12 GiB"])
    return rows


def sdxl_rows(pack, args, loss_model, perceptual):
    import comfy.model_management as mm
    mm.unload_all_models()
    model, vae = random_sdxl(), random_sd_vae()
    case = Case(pack, model, vae, loss_model, perceptual, args.sdxl_size, args.steps, 7.5, pooled=1280, ctx=2048)
    edit = case.edit()
    t = timed_rounds({"stock": case.stock, "iteration": lambda: case.iteration(edit)}, max(2, args.repeats - 1))
    _, _, peak = peak_gib(lambda: case.iteration(edit))
    med = {k: statistics.median(v) for k, v in t.items()}
    title = f"SDXL {args.sdxl_size}²"
    graphs = "CUDA graphs" if edit.runner.fallback_reason is None else f"no CUDA graphs: {edit.runner.fallback_reason}"
    return [[f"{title}: stock sampling, {args.steps} steps, cfg 7.5", med["stock"], 1.0, "", ""],
            [f"{title}: one iteration, adjoint pass ({graphs})", med["iteration"], median_ratio(t["iteration"], t["stock"]),
             peak, "report"]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--naive-steps", type=int, default=10, help="also run the naive variant at this step count")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdxl", action="store_true", help="add SDXL rows")
    parser.add_argument("--sdxl-size", type=int, default=1024)
    parser.add_argument("--cpu", action="store_true", help="smoke-run on the CPU")
    args = parser.parse_args()
    pack = start_comfy(cpu=args.cpu)
    import torch
    import comfyui_disentangle.nodes.clip_loss  # noqa: F401  (pack.nodes.* attributes)
    t0 = time.time()
    loss_model, perceptual = loss_models(pack)
    rows = sd15_rows(pack, args, loss_model, perceptual)
    if args.sdxl:
        rows += sdxl_rows(pack, args, loss_model, perceptual)
    print_table(f"λ optimisation: random-weight models, fp16 UNet, ddim_uniform, open_clip ViT-B-32 + LPIPS-VGG loss, "
                f"{device_name()}, torch {torch.__version__}",
                ["run", "seconds", "× stock", "peak GiB", "target"], rows)
    print(f"{args.repeats} interleaved rounds for the ratios (median of per-round ratios); {time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
