"""Latent-space reconstruction PSNR: DDIM Inversion vs the stock FlipSigmas route (issue 2).

Invert a VAE-encoded image, reconstruct with stock KSamplerAdvanced (add_noise off, ddim,
ddim_uniform, same steps and prompt), compare latents. Tiny random-weight models built from
ComfyUI's classes (harness/host.py); "tame" scales the UNet's ε by 0.1, a smooth ODE like a
trained denoiser's, "raw" is the random network as built. Runs on the CPU in about a minute.

    COMFYUI_PATH=/path/to/ComfyUI python bench/reconstruction.py
"""
from __future__ import annotations

import sys

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle import harness  # noqa: E402
from comfyui_disentangle.harness.reconstruction import encode, image_latent, psnr_table, tame  # noqa: E402


def main():
    if not harness.host_available():
        sys.exit(harness.SKIP_REASON)
    harness.start_host()
    rows = []
    for kind in ("sd1", "sd1_v", "sdxl"):
        model, clip, vae = harness.tiny_models(kind)
        positive, negative = encode(clip, "a photo"), encode(clip, "blurry")
        latent = image_latent(vae)
        for label, m in (("tame", tame(model)), ("raw", model)):
            for cfg in (1.0, 4.0):
                for r in psnr_table(m, positive, negative, latent, (10, 25, 50), cfg, refine=(0, 2)):
                    rows.append([kind, label, cfg] + r)
    print_table("Latent PSNR (dB) of invert → stock KSamplerAdvanced, tiny models, CPU",
                ["model", "ODE", "cfg", "steps", "inversion", "UNet calls/step", "PSNR dB"], rows)


if __name__ == "__main__":
    main()
