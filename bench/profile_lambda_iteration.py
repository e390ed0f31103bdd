"""Where one λ-optimisation iteration spends its time (random weights, GPU).

Times, in interleaved rounds against stock sampling (comfy.sample.sample, what KSampler runs):
- our sampling path without gradients (the iteration's forward pass, replayed from CUDA graphs);
- the loss head alone: VAE decode + CLIP + LPIPS, forward and backward to the latent;
- one sampler step's forward and one step's VJP, replayed from their CUDA graphs;
- one iteration with the node's settings, and with each memory option of issue 15 turned back off
  (deep copies instead of shared views, the decoder's and LPIPS' activations stored, two graph pools),
  and with all of them off (the settings before the memory work);
then a torch.profiler table of the top CUDA kernels of one iteration (``--top 0``: none).

    COMFYUI_PATH=/path/to/ComfyUI python bench/profile_lambda_iteration.py [--sdxl] [--steps 50] [--top 25]
"""
from __future__ import annotations

import argparse
import statistics

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle.harness import device_name, random_sd15, random_sd_vae, random_sdxl, start_comfy  # noqa: E402
from lambda_optim import Case, loss_models  # noqa: E402

# Each memory option of issue 15 turned back off (objective options, LambdaEdit options).
VARIANTS = {
    "iteration (node settings)": ({}, {}),
    "iteration, deep copies of the weights": ({"share_weights": False}, {}),
    "iteration, decoder and LPIPS activations stored": ({"recompute_decoder": False, "recompute_loss": False}, {}),
    "iteration, two CUDA-graph pools": ({}, {"share_graph_pool": False}),
    "iteration, all four off (before issue 15)": ({"share_weights": False, "recompute_decoder": False,
                                                   "recompute_loss": False}, {"share_graph_pool": False}),
    "iteration, UNet blocks recomputed (small cards)": ({"recompute_unet": True}, {}),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=None, help="image side (512; SDXL 1024)")
    parser.add_argument("--sdxl", action="store_true", help="SDXL architecture instead of SD1.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--variants", default="all", help="'all', 'none' or comma-separated indices into VARIANTS")
    parser.add_argument("--cpu", action="store_true", help="smoke-run on the CPU (with e.g. --size 64 --steps 3; no profiler table)")
    args = parser.parse_args()
    pack = start_comfy(cpu=args.cpu)
    import torch
    import comfyui_disentangle.nodes.clip_loss  # noqa: F401
    loss_model, perceptual = loss_models(pack)
    size = args.size or (1024 if args.sdxl else 512)
    if args.sdxl:
        case = Case(pack, random_sdxl(), random_sd_vae(), loss_model, perceptual, size, args.steps, 7.5,
                    pooled=1280, ctx=2048)
    else:
        case = Case(pack, random_sd15("fp32" if args.cpu else "fp16"), random_sd_vae(), loss_model, perceptual, size, args.steps, 7.5)
    names = list(VARIANTS)
    chosen = (names if args.variants == "all" else [] if args.variants == "none"
              else [names[int(k)] for k in args.variants.split(",")])
    edits = {}
    for name in [names[0]] + [n for n in chosen if n != names[0]]:   # the node's settings are always built
        objective_options, edit_options = VARIANTS[name]
        objective = case.objective_with(**objective_options) if objective_options else None
        edits[name] = case.edit(objective=objective, **edit_options)
    edit = edits[names[0]]
    lam = torch.linspace(0, 1, edit.steps)
    with torch.inference_mode(False), torch.no_grad():
        x0 = edit.sample(lam)
    x_T = edit.x_T

    def forward_only():
        with torch.inference_mode(False), torch.no_grad():
            return edit.sample(lam)

    def loss_head():
        with torch.inference_mode(False), torch.enable_grad():
            x = x0.detach().clone().requires_grad_(True)
            edit.objective.loss(x).backward()
            return x.grad

    runner = edit.runner
    lam_dev = lam.to(x0.device)

    def one_step_forward():
        with torch.inference_mode(False), torch.no_grad():
            return runner.forward(0, x_T, lam_dev[0])

    def one_step_vjp():
        with torch.inference_mode(False):
            return runner.vjp(0, x_T, lam_dev[0], torch.ones_like(x_T))

    fns = {"stock sampling": case.stock, "our sampling, no gradients": forward_only,
           "loss head: decode + CLIP + LPIPS, forward and backward": loss_head,
           "one step forward (graph replay)": one_step_forward, "one step VJP (graph replay)": one_step_vjp}
    fns.update({name: (lambda e=e: case.iteration(e)) for name, e in edits.items() if name in chosen})
    t = timed_rounds(fns, args.repeats)
    rows = [[name, statistics.median(v), median_ratio(v, t["stock sampling"])] for name, v in t.items()]
    graphs = "CUDA graphs" if runner.fallback_reason is None else f"eager: {runner.fallback_reason}"
    title = f"{'SDXL' if args.sdxl else 'SD1.5'} {size}²"
    print_table(f"One λ-optimisation iteration, {title}, {args.steps} steps, cfg 7.5, {graphs}, {device_name()}, "
                f"torch {torch.__version__}", ["run", "seconds", "× stock"], rows)
    fwd, vjp = statistics.median(t["one step forward (graph replay)"]), statistics.median(t["one step VJP (graph replay)"])
    print(f"per step: VJP / forward = {vjp / fwd:.2f}; {args.steps} × (forward + VJP) = "
          f"{args.steps * (fwd + vjp):.3f} s; {args.steps} forwards = {args.steps * fwd / statistics.median(t['stock sampling']):.2f}× stock")

    if args.top and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile
        for name, fn in (("stock sampling", case.stock), ("iteration (node settings)", lambda: case.iteration(edit))):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            events = prof.key_averages()
            total = sum(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) for e in events)
            print(f"\n{name}: {total / 1e6:.3f} s of CUDA kernel time")
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
