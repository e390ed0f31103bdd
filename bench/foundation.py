"""Foundation benchmark (issue 2): cost of λ-mixed sampling and of DDIM inversion vs stock sampling.

SD1.5 UNet architecture, random weights, 512×512 (64×64 latent), 50 steps, sampler ddim /
scheduler ddim_uniform, on the GPU ComfyUI picks. Prints one table.

    COMFYUI_PATH=/path/to/ComfyUI python bench/foundation.py [--dtype fp16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import conditioning, device_name, print_table, random_sd15, start_comfy, timed  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="smoke-run on the CPU")
    args = parser.parse_args()

    start_comfy(cpu=args.cpu)
    import torch
    import comfy.model_management as mm
    import comfy.sample
    import latent_preview

    from comfyui_disentangle.core import lambda_schedule as ls
    from comfyui_disentangle.nodes.inversion import DDIMInversion
    from comfyui_disentangle.nodes.schedules import mix_conditioning

    steps, cfg = args.steps, 7.5
    model = random_sd15(args.dtype)
    c0, c1, neg = conditioning(seed=1), conditioning(seed=2), conditioning(seed=3)
    side = args.size // 8
    latent = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(1))

    def stock(positive, cfg_=cfg, negative=neg):
        cb = latent_preview.prepare_callback(model, steps)
        return comfy.sample.sample(model, noise, steps, cfg_, "ddim", "ddim_uniform", positive, negative,
                                   torch.zeros_like(latent), callback=cb, disable_pbar=True, seed=0)

    switch = mix_conditioning(c0, c1, ls.switch_at_step(steps, int(0.4 * steps)))
    learned = mix_conditioning(c0, c1, ls.from_step_values([0.5 + 0.01 * k for k in range(steps)]))
    inverter = DDIMInversion()

    def invert(refine=0, cfg_=1.0):
        return inverter.invert(model, c0, {"samples": latent}, steps, cfg_, "ddim_uniform", refine,
                               negative=None if cfg_ == 1.0 else neg)

    with torch.inference_mode():
        rows = []
        t_stock = timed(lambda: stock(c1), args.repeats)
        rows.append([f"stock KSampler, cfg {cfg}", 1, t_stock, t_stock / steps * 1000, 1.0, ""])
        for name, cond in (("λ-mixed, switch schedule", switch), ("λ-mixed, 50 distinct λ", learned)):
            t = timed(lambda: stock(cond), args.repeats)
            rows.append([f"{name}, cfg {cfg}", len(cond), t, t / steps * 1000, t / t_stock, "≤ 1.02"])
        t_stock1 = timed(lambda: stock(c0, 1.0, []), args.repeats)
        rows.append(["stock KSampler, cfg 1", 1, t_stock1, t_stock1 / steps * 1000, 1.0, ""])
        t_inv = timed(lambda: invert(0), args.repeats)
        rows.append(["DDIM inversion, cfg 1", 1, t_inv, t_inv / steps * 1000, t_inv / t_stock1, "≤ 1.10"])
        t_inv2 = timed(lambda: invert(2), args.repeats)
        rows.append(["DDIM inversion, cfg 1, refine 2", 1, t_inv2, t_inv2 / steps * 1000, t_inv2 / t_stock1, "(3 evals/step)"])
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")

    print_table(
        f"Foundation benchmark: SD1.5 architecture (random weights), {args.size}², {args.dtype}, {steps} steps, "
        f"ddim/ddim_uniform, {device_name()}, torch {torch.__version__}, peak {peak:.2f} GiB",
        ["run", "cond entries", "seconds", "ms/step", "ratio", "target"], rows)


if __name__ == "__main__":
    main()
