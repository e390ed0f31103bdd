"""AVI benchmark (issue 5): Φ training time, and the cost of capture → integrate → resume vs stock sampling.

SD1.5 UNet architecture, random weights, 512×512 (64×64 latent), 50 steps, sampler ddim / scheduler
ddim_uniform, cfg 7.5, on the GPU ComfyUI picks. Prints one table.

    COMFYUI_PATH=/path/to/ComfyUI python bench/avi.py                       # GPU, the paper's setting
    COMFYUI_PATH=/path/to/ComfyUI python bench/avi.py --cpu --dtype fp32 --size 64 --steps 10 --repeats 1 \
        --train-repeats 1 --samples 256 --hidden 256                        # CPU smoke run (fp16 is very slow on a CPU)

On the GPU no arguments are needed (fp16, 512², 50 steps, 7 interleaved rounds, Φ trained 3 times). Issue 14's
speed bar is the "**AVI defaults**" row (≤ 1.05× one stock sampling) and the "Φ training" row (≤ 60 s).

Φ is trained as the paper sets it: one latent pair (captured here), N = 5000 samples, batch 256,
5 epochs (≈ 100 Adam steps), λ = (3, 10, 10, 10), Adam 1e-3, hidden width H·W = 4096. Its time
includes the SVDs of the pair and moving Φ to the GPU.

The AVI rows with a named z_source use the paper's T_x 0.8, Δτ −0.3 and Algorithm 1 with Φ; the defaults row uses
AVI Capture's and AVI Integrate's widget defaults. Paths timed (interleaved rounds, each starting one path later, medians of per-round ratios against
one stock KSampler run):
* stock: KSampler, 50 steps;
* AVI, z from the seed (the paper's definition): Capture (x: s_x steps, z: s_z steps) → Integrate
  with Φ → stock KSamplerAdvanced from s_x — steps + s_z UNet evaluations;
* AVI, z continued from x: steps + (s_z − s_x) evaluations;
* AVI, z one step from x (fast): steps + 1 evaluations (z is one sampler step σ(s_x) → σ(s_z) with the
  target prompt);
* AVI with every input at its default (z_source "target's x̂0 at x and at t_early (fast)", T_x 0.2, t_early 0.9,
  the difference integration, no Φ): steps + 1 evaluations, the target prompt's two x̂0 predictions made within x's
  sampling at x and at t_early (one call of that prompt alone each, half a cfg step) — the path issue 14's speed bar
  (≤ 1.05×) is about; and the same with those predictions as sampler steps of their own (steps + 2; a noise mask of
  ones forces that path);
* stock split: KSamplerAdvanced to s_x with leftover noise, then from s_x (no AVI): what splitting one
  sampling into two ComfyUI calls costs by itself (at the paper's s_x and at the defaults' step);
* stock again: the same stock KSampler timed a second time as a path: its ratio is the run's own noise (ideally 1);
* AVI, pair already captured: x's first s_x steps + Integrate + resume = steps evaluations; this is
  what each further ρ / Φ / seed in a sweep costs once z exists, and what the paper's 6.7 s vs 6.2 s
  (1.08×) can only be (its z must come from somewhere; the paper does not count it);
* Integrate alone (SVDs + Φ), in milliseconds.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle.harness import conditioning, device_name, random_sd15, start_comfy  # noqa: E402


PATHS = ("seed", "continue", "fast", "default", "default_own_steps", "captured", "split", "split_default", "stock_again")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size/8)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=5000, help="N, draws of the pair per epoch (the paper: 5000)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=0, help="Φ width (0 = H·W, at most 4096, as the paper)")
    parser.add_argument("--cpu", action="store_true", help="smoke-run on the CPU")
    parser.add_argument("--paths", nargs="*", default=None, choices=PATHS,
                        help="time only these paths (stock is always timed): more rounds of the ones a question is about")
    args = parser.parse_args()

    start_comfy(cpu=args.cpu)
    import torch
    import nodes

    from comfyui_disentangle.nodes import avi as avi_nodes

    steps, cfg = args.steps, 7.5
    model = random_sd15(args.dtype)
    pos, target, neg = conditioning(seed=1), conditioning(seed=2), conditioning(seed=3)
    empty = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    capture_node, train_node, integrate_node = avi_nodes.AVICapture(), avi_nodes.AVITrain(), avi_nodes.AVIIntegrate()
    ksampler, advanced = nodes.KSampler(), nodes.KSamplerAdvanced()

    def capture(z_source, t_x=0.8, delta_tau=-0.3, latent=None):
        return capture_node.capture(model, pos, target, neg, latent or empty, 0, steps, cfg, "ddim", "ddim_uniform", t_x,
                                    delta_tau, z_source)["result"]

    defaults = {name: spec[1]["default"] for name, spec in avi_nodes.AVICapture.INPUT_TYPES()["required"].items()
                if name in ("t_x", "delta_tau", "z_source")}
    paper_integration = next(label for label, key in avi_nodes.INTEGRATION_KEYS.items() if key == "paper")

    def resume(latent, start):
        return advanced.sample(model, "disable", 0, steps, cfg, "ddim", "ddim_uniform", pos, neg, latent, start, 10000,
                               "disable")[0]

    def stock():
        return ksampler.sample(model, 0, steps, cfg, "ddim", "ddim_uniform", pos, neg, empty, 1.0)[0]

    with torch.inference_mode():
        x, z, s_x = capture(avi_nodes.Z_SOURCES[0])
        s_z = z["avi_capture"]["step"]

        def train():
            sync()
            t0 = time.perf_counter()
            out = train_node.train(x, z, 0, args.hidden, args.samples, args.epochs, args.batch, 1e-3, 3.0, 10.0, 10.0,
                                   10.0, 0)
            sync()
            return time.perf_counter() - t0, out

        train_runs = [train() for _ in range(args.train_repeats)]
        avi_model = train_runs[-1][1]["result"][0]
        info = avi_model.info
        t_train = statistics.median(t for t, _ in train_runs)

        def integrate(x_, z_):   # the paper's Algorithm 1 with Φ's S
            return integrate_node.integrate(x_, z_, 1.0, 0, avi_nodes.SINGULAR_VALUES[0], avi_model,
                                            integration=paper_integration, gain=1.0)[0]

        def integrate_default(x_, z_):   # every AVI Integrate input at its default (no Φ)
            return integrate_node.integrate(x_, z_, 1.0, 0, "x's own (no Φ)")[0]

        def path(z_source):
            x_, z_, start = capture(z_source)
            return resume(integrate(x_, z_), start)

        def default_path(latent=None):
            x_, z_, start = capture(defaults["z_source"], defaults["t_x"], defaults["delta_tau"], latent)
            return resume(integrate_default(x_, z_), start)

        # a noise mask of ones changes no sample but sends AVI Capture's probes down sampler steps of their own (the
        # path before they were made within x's sampling)
        masked = dict(empty, noise_mask=torch.ones(1, 1, args.size, args.size))

        s_default = capture(defaults["z_source"], defaults["t_x"], defaults["delta_tau"])[2]

        def x_only():   # the pair exists; x of a new ρ/Φ is recomputed as the first s_x steps of the sampling
            x_ = advanced.sample(model, "enable", 0, steps, cfg, "ddim", "ddim_uniform", pos, neg, empty, 0, s_x,
                                 "enable")[0]
            x_ = dict(x, samples=x_["samples"])
            return resume(integrate(x_, z), s_x)

        def split(at):
            x_ = advanced.sample(model, "enable", 0, steps, cfg, "ddim", "ddim_uniform", pos, neg, empty, 0, at,
                                 "enable")[0]
            return resume(x_, at)

        def integrate_only():
            integrate(x, z)
            sync()

        def integrate_default_only():
            integrate_default(x, z)
            sync()

        paths = {
            "stock": stock,
            "seed": lambda: path(avi_nodes.Z_SOURCES[0]),
            "continue": lambda: path(avi_nodes.Z_SOURCES[1]),
            "fast": lambda: path(avi_nodes.Z_SOURCES[2]),
            "default": default_path,
            "default_own_steps": lambda: default_path(masked),
            "captured": x_only,
            "split": lambda: split(s_x),
            "split_default": lambda: split(s_default),
            "stock_again": stock,   # the same stock sampling timed as a path: its ratio is the bench's own spread
        }
        chosen = set(args.paths or PATHS) | {"stock"}
        t = timed_rounds({name: fn for name, fn in paths.items() if name in chosen}, args.repeats, rotate=True)
        t_ints = timed_rounds({"integrate": integrate_only, "default": integrate_default_only}, max(args.repeats, 5))
        t_int, t_int_default = t_ints["integrate"], t_ints["default"]
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")

    med = {k: statistics.median(v) for k, v in t.items()}
    med.update({name: float("nan") for name in PATHS if name not in t})
    ratio = {name: (median_ratio(t[name], t["stock"]) if name in t else float("nan")) for name in PATHS}
    net = avi_model.net
    rows = [
        [f"Φ training: 1 pair, {info['samples_per_pair']} samples × {info['epochs']} epochs, batch {info['batch_size']} "
         f"= {info['steps']} Adam steps, {net.height}×{net.width}, hidden {net.hidden} (loss {info['first_loss']:.4g} → "
         f"{info['final_loss']:.4g})", "", t_train, "", "≤ 60 s"],
        [f"stock KSampler, {steps} steps, cfg {cfg}", steps, med["stock"], 1.0, ""],
        [f"AVI, z from the seed (paper): x {s_x} + z {s_z} steps, Integrate, resume {steps - s_x}", steps + s_z,
         med["seed"], ratio["seed"], "≤ 1.05"],
        [f"AVI, z continued from x: x {s_x} + z {s_z - s_x} steps, Integrate, resume {steps - s_x}", steps + s_z - s_x,
         med["continue"], ratio["continue"], "≤ 1.05"],
        [f"AVI, z one step from x (fast): x {s_x} steps + 1 step for z, Integrate, resume {steps - s_x}", steps + 1,
         med["fast"], ratio["fast"], "≤ 1.05"],
        [f"**AVI defaults** (z_source '{defaults['z_source']}', T_x {defaults['t_x']}: x {s_default} steps, 2 of them "
         f"also evaluating the target prompt alone (at x and at t_early), Integrate with its defaults, resume "
         f"{steps - s_default})", steps + 1, med["default"], ratio["default"], "≤ 1.05"],
        ["AVI defaults, the 2 target-prompt predictions as sampler steps of their own (a noise mask of ones: the path "
         "before they were made within x's steps)", steps + 2, med["default_own_steps"],
         ratio["default_own_steps"], ""],
        [f"stock split, no AVI: KSamplerAdvanced 0→{s_x} (leftover noise), {s_x}→{steps}", steps, med["split"],
         ratio["split"], ""],
        [f"stock split at the defaults' step: KSamplerAdvanced 0→{s_default}, {s_default}→{steps}", steps,
         med["split_default"], ratio["split_default"], ""],
        ["stock KSampler again, timed as a path (the bench's own spread: ideally 1)", steps, med["stock_again"],
         ratio["stock_again"], ""],
        [f"AVI, pair already captured: x {s_x} steps, Integrate, resume {steps - s_x}", steps, med["captured"],
         ratio["captured"], "paper 1.08"],
        ["AVI Integrate alone (channel SVDs + Φ), ms", "", statistics.median(t_int) * 1000, "", ""],
        ["AVI Integrate alone, defaults (SVD of z − x per channel), ms", "", statistics.median(t_int_default) * 1000, "", ""],
    ]
    rows = [row for row in rows if not (isinstance(row[2], float) and math.isnan(row[2]))]   # paths not timed
    spread = max((max(v) - min(v)) / statistics.median(v) for v in t.values())
    print_table(
        f"AVI benchmark: SD1.5 architecture (random weights), {args.size}², {args.dtype}, {steps} steps, ddim/ddim_uniform, "
        f"T_x 0.8, Δτ −0.3, {device_name()}, torch {torch.__version__}, peak {peak:.2f} GiB",
        ["run", "UNet evaluations", "seconds", "ratio to stock", "target"], rows)
    print(f"Φ training: median of {args.train_repeats} runs ({', '.join(f'{r[0]:.2f}' for r in train_runs)} s). "
          f"Paths: {args.repeats} interleaved rounds, each starting one path later; ratios are medians of per-round ratios; largest spread "
          f"(max−min)/median: {spread:.1%}")


if __name__ == "__main__":
    main()
