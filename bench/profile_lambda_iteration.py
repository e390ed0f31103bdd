"""Where one λ-optimisation iteration spends its time (SD1.5 architecture, random weights, GPU).

Times, in interleaved rounds: stock sampling; our sampling path without gradients; one iteration
with the default settings and with each speed option; then a torch.profiler table of the top CUDA
kernels of one iteration.

    COMFYUI_PATH=/path/to/ComfyUI python bench/profile_lambda_iteration.py [--steps 50] [--top 25]
"""
from __future__ import annotations

import argparse
import statistics

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import median_ratio, print_table, timed_rounds  # noqa: E402
from comfyui_disentangle.harness import device_name, random_sd15, random_sd_vae, start_comfy  # noqa: E402
from lambda_optim import Case, loss_models  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    pack = start_comfy()
    import torch
    import comfyui_disentangle.nodes.clip_loss  # noqa: F401
    loss_model, perceptual = loss_models(pack)
    case = Case(pack, random_sd15("fp16"), random_sd_vae(), loss_model, perceptual, args.size, args.steps, 7.5)
    edit = case.edit()
    lam = torch.linspace(0, 1, edit.steps)

    def forward_only():
        with torch.inference_mode(False), torch.no_grad():
            return edit.sample(lam)

    def with_benchmark():
        torch.backends.cudnn.benchmark = True
        try:
            return case.iteration(edit)
        finally:
            torch.backends.cudnn.benchmark = False

    fns = {"stock": case.stock, "forward": forward_only, "iteration": lambda: case.iteration(edit),
           "iteration, cudnn.benchmark": with_benchmark}
    t = timed_rounds(fns, args.repeats)
    rows = [[name, statistics.median(v), median_ratio(v, t["stock"])] for name, v in t.items()]
    print_table(f"One iteration, SD1.5 {args.size}², {args.steps} steps, {device_name()}", ["run", "seconds", "× stock"], rows)

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        case.iteration(edit)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70))


if __name__ == "__main__":
    main()
