"""Is AVI Capture's x the stock sampling's? max |x − stock| / max |stock| per sampler, for the paths that lead to it.

    COMFYUI_PATH=/path/to/ComfyUI python bench/avi_probe_exactness.py [--cpu]

x is AVI Capture's latent at the resume step; stock is KSamplerAdvanced (0 → resume step, leftover noise) with the
same seed. The default z_source predicts the target prompt within x's sampling (nodes/avi.py ProbingGuider), so x
should be stock's to rounding: these rows take that path apart on a tiny random-weight SD1 model (fp16 on a GPU):
ComfyUI's own CFGGuider driven as AVI Capture drives it (no probes), ProbingGuider without probe steps, AVI Capture's
default (with the plain model, and with a clone carrying a unet function wrapper, as the tests count calls: on an
H200 the test saw dpmpp_2m's x off by ~1% there), and AVI Capture with a noise mask of ones (the probes as sampler
steps of their own).
"""
from __future__ import annotations

import argparse

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle.harness import call, device_name, start_comfy  # noqa: E402

STEPS, CFG, SEED = 20, 4.0, 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--samplers", nargs="*", default=["ddim", "euler", "heun", "euler_ancestral", "dpmpp_2m",
                                                          "dpmpp_2m_sde", "lms"])
    args = parser.parse_args()
    start_comfy(cpu=args.cpu)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import torch

    from comfyui_disentangle import harness
    from comfyui_disentangle.harness.reconstruction import encode
    from comfyui_disentangle.nodes import avi

    model, clip, _ = harness.tiny_models("sd1")
    pos, target, neg = (encode(clip, t) for t in ("a photo of a house", "a photo of a snowy house", ""))
    empty = call("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    rows = []
    with torch.inference_mode():
        for sampler in args.samplers:
            def capture(latent, patcher=model):
                return avi.AVICapture().capture(patcher, pos, target, neg, latent, SEED, STEPS, CFG, sampler, "normal",
                                                0.3, -0.3, avi.DEFAULT_Z_SOURCE, 0.9)["result"]

            wrapped = model.clone()   # as tests/test_avi_probes.py counts UNet calls
            wrapped.set_model_unet_function_wrapper(lambda apply, a: apply(a["input"], a["timestep"], **a["c"]))

            x, _, s_x = capture(empty)
            stock = call("KSamplerAdvanced", model=model, add_noise="enable", noise_seed=SEED, steps=STEPS, cfg=CFG,
                         sampler_name=sampler, scheduler="normal", positive=pos, negative=neg, latent_image=empty,
                         start_at_step=0, end_at_step=s_x, return_with_leftover_noise="enable")[0]["samples"]
            masked = capture(dict(empty, noise_mask=torch.ones(1, 1, 64, 64)))[0]
            sigmas = avi.sampling_sigmas(model, STEPS, sampler, "normal")[:s_x + 1]
            noise = comfy.sample.prepare_noise(empty["samples"], SEED)

            def guided(guider):
                return guider.sample(noise, empty["samples"], comfy.samplers.sampler_object(sampler), sigmas,
                                     seed=SEED).to(mm.intermediate_device())

            plain = comfy.samplers.CFGGuider(model)
            plain.set_conds(pos, neg)
            plain.set_cfg(CFG)
            probing = avi.ProbingGuider(model, [])
            probing.set_conds(pos, neg, target)
            probing.set_cfg(CFG)
            scale = float(stock.abs().max())

            def off(t):
                return f"{float((t - stock).abs().max()) / scale:.2e}"

            rows.append([sampler, s_x, off(guided(plain)), off(guided(probing)), off(x["samples"]),
                         off(capture(empty, wrapped)[0]["samples"]), off(masked["samples"])])
    print_table(f"AVI Capture's x against stock KSamplerAdvanced (max |Δ| / max |stock|), tiny SD1 "
                f"({model.model_dtype()}), {STEPS} steps, cfg {CFG}, {device_name()}",
                ["sampler", "resume step", "CFGGuider as Capture drives it", "ProbingGuider, no probes",
                 "AVI Capture default (probes within)", "the same, model a clone with a unet wrapper",
                 "AVI Capture, noise mask of ones (probes as own steps)"], rows)


if __name__ == "__main__":
    main()
