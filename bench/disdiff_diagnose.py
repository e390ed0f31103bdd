"""What a trained DisDiff's G does at all (issue 11): per noise level, how much of the frozen model's
x̂0 error the full field Σ_c G^c removes, and how factor-specific each G^c's change of x̂0 is.

    COMFYUI_PATH=/path/to/ComfyUI python bench/disdiff_diagnose.py [--checkpoint weights/toy_world_disdiff.safetensors]

Rows per t: ‖x0 − x̂0_θ‖ (the frozen, unconditioned model's error: what G must close for the codes to
steer sampling), ‖x0 − x̂0_ψ‖ with all factors (eq. 6, S = all), the share of the error removed (next to the share that one constant correction, the mean residual
over the scenes, removes: the frozen model's bias),
‖Δx̂0‖ = ‖x̂0_ψ − x̂0_θ‖, and ‖Δx̂0^c‖ of one factor's field alone relative to the full change. If G
removes little of the error where x̂0_θ is far from x0 (large t), sampling from the seed with all
factors imposed cannot reconstruct the source, whatever the codes hold. Two more columns: the mean
cosine between different factors' fields G^c, G^c' of one scene (1: every factor's field is the same,
so no factor can be singled out), and how much ΣG changes when each scene gets another scene's codes
(0: G ignores the codes). Last line: how far codes spread across scenes, relative to their norm.
"""
from __future__ import annotations

import argparse
import os

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle.harness import device_name, start_comfy  # noqa: E402

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=os.path.join(PACK_ROOT, "weights", "toy_world_disdiff.safetensors"))
    p.add_argument("--scenes", type=int, default=64)
    p.add_argument("--ts", type=int, nargs="+", default=[50, 150, 300, 500, 700, 850, 950])
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args()
    start_comfy(cpu=args.cpu)
    import torch
    import nodes as comfy_nodes
    import comfy.model_management as mm
    from comfyui_disentangle.core import disdiff as dd
    from comfyui_disentangle.toy_world import factor_world as fw
    from comfyui_disentangle.nodes import disdiff as node
    from comfyui_disentangle.nodes.comfy_boundary import alphas_cumprod
    from comfyui_disentangle.nodes.toy_world import load_toy_world, scene_latents


    with torch.inference_mode():
        model, clip, vae = load_toy_world("toy_world")
        empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        factors = fw.sample_factors(args.scenes, generator=torch.Generator().manual_seed(4242))
        x0 = scene_latents(vae, model, factors)
        node.load_frozen(model)
        frozen = node.make_frozen(model, empty)
        device = mm.get_torch_device()
        net = dd.load_checkpoint(args.checkpoint).model.to(device).float().eval()
        ab_all = alphas_cumprod(model).to(device)
        x0 = x0.to(device)
        n = net.config.num_factors
        rows = []
        gen = torch.Generator(device="cpu").manual_seed(0)
        for t_int in args.ts:
            noise = torch.randn(x0.shape, generator=gen).to(device)
            d = dd.field_diagnosis(net, frozen, x0, t_int, ab_all, noise)
            rows.append([t_int, f"{d['error_frozen']:.3f}", f"{d['error_all']:.3f}", f"{d['error_removed']:+.1%}",
                         f"{d['bias_removed']:+.1%}", " ".join(f"{v:.2f}" for v in d["field_shares"]),
                         f"{d['field_cosine']:.3f}", f"{d['code_use']:.3f}"])
        z = net.encode(x0).float()
    print_table(f"DisDiff field diagnosis, {os.path.basename(args.checkpoint)}, {args.scenes} held-out scenes, "
                f"{device_name()}", ["t", "‖x0−x̂0_θ‖", "‖x0−x̂0_ψ‖ (all factors)", "error removed", "removed by the mean residual",
                 "‖G^c‖/‖ΣG‖ per factor", "cos(G^c, G^c')", "‖ΣG(other scene's z) − ΣG‖/‖ΣG‖"], rows)
    spread = (z - z.mean(0)).flatten(1).norm(dim=1).mean().item() / z.flatten(1).norm(dim=1).mean().item()
    per_factor = [((z[:, c] - z[:, c].mean(0)).norm(dim=1).mean() / z[:, c].norm(dim=1).mean()).item() for c in range(n)]
    print(f"codes: spread across scenes / norm = {spread:.4f} (per factor " + " ".join(f"{v:.4f}" for v in per_factor) + ")")


if __name__ == "__main__":
    main()
