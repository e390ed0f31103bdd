"""Foundation benchmark (issue 2): cost of λ-mixed sampling and of DDIM inversion vs stock sampling.

SD1.5 UNet architecture, random weights, 512×512 (64×64 latent), 50 steps, sampler ddim /
scheduler ddim_uniform, on the GPU ComfyUI picks. Prints one table.

    COMFYUI_PATH=/path/to/ComfyUI python bench/foundation.py [--dtype fp16] [--repeats 3]
"""
from __future__ import annotations

import argparse

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
import statistics  # noqa: E402

from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle.harness import conditioning, device_name, random_sd15, start_comfy  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
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

    def one_step(cond):
        return comfy.sample.sample(model, noise, 1, cfg, "ddim", "ddim_uniform", cond, neg,
                                   torch.zeros_like(latent), disable_pbar=True, seed=0)

    with torch.inference_mode():
        t = timed_rounds({
            "stock": lambda: stock(c1),
            "switch": lambda: stock(switch),
            "learned": lambda: stock(learned),
            "stock1": lambda: stock(c0, 1.0, []),
            "inv0": lambda: invert(0),
            "inv2": lambda: invert(2),
        }, args.repeats)
        # once-per-sampling set-up of many entries: ComfyUI prepares every entry before step 1
        setup = timed_rounds({"1 entry": lambda: one_step(c1), "50 entries": lambda: one_step(learned)}, args.repeats)
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")

    med = {k: statistics.median(v) for k, v in t.items()}
    rows = [
        [f"stock KSampler, cfg {cfg}", 1, med["stock"], med["stock"] / steps * 1000, 1.0, ""],
        [f"λ-mixed, switch schedule, cfg {cfg}", len(switch), med["switch"], med["switch"] / steps * 1000,
         median_ratio(t["switch"], t["stock"]), "≤ 1.02"],
        [f"λ-mixed, 50 distinct λ, cfg {cfg}", len(learned), med["learned"], med["learned"] / steps * 1000,
         median_ratio(t["learned"], t["stock"]), "≤ 1.02"],
        ["stock KSampler, cfg 1", 1, med["stock1"], med["stock1"] / steps * 1000, 1.0, ""],
        ["DDIM inversion, cfg 1", 1, med["inv0"], med["inv0"] / steps * 1000, median_ratio(t["inv0"], t["stock1"]), "≤ 1.10"],
        ["DDIM inversion, cfg 1, refine 2", 1, med["inv2"], med["inv2"] / steps * 1000,
         median_ratio(t["inv2"], t["stock1"]), "3 calls/step"],
    ]
    spread = max((max(v) - min(v)) / statistics.median(v) for v in t.values())
    rows.append(["1-step sampling, 1 entry → 50 entries (set-up)", "", statistics.median(setup["50 entries"]),
                 "", median_ratio(setup["50 entries"], setup["1 entry"]), ""])

    print_table(
        f"Foundation benchmark: SD1.5 architecture (random weights), {args.size}², {args.dtype}, {steps} steps, "
        f"ddim/ddim_uniform, {device_name()}, torch {torch.__version__}, peak {peak:.2f} GiB",
        ["run", "cond entries", "seconds", "ms/step", "ratio", "target"], rows)
    print(f"{args.repeats} interleaved rounds; ratios are medians of per-round ratios; largest spread "
          f"(max−min)/median of any row: {spread:.1%}")


if __name__ == "__main__":
    main()
