"""Train the toy world's models on a GPU (issue 3). Seeded and time-boxed; writes safetensors.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/train_toy_world.py --out weights

Each phase runs a fixed number of optimiser steps (PHASE_STEPS, the shipped run's), seeded; time
is only a safety cap. What it trains, all on the factor world (toy_world/factor_world.py), images rendered at 64×64 and shown
to the diffusion model at 128×128 (nearest ×2) so that stock ComfyUI sizes hold (8× VAE, a
128×128 EmptyLatentImage gives the 16×16 latents):

1. factor classifiers (a small CNN, six heads): the judges of bench/quality.py;
2. a KL autoencoder, ComfyUI's ``AutoencoderKL`` class, its latent rescaled so that SD1's latent
   scale factor (0.18215) gives unit variance;
3. a text encoder (ComfyUI's ``SDClipModel`` with ComfyUI's SD1 tokenizer, small width) and a UNet
   (ComfyUI's ``UNetModel``, SD1 layout, small width), trained together with the ε loss on SD1's
   noise schedule, 10 % caption dropout (so the empty prompt is the unconditional model);
4. optionally a small open_clip model (both towers) trained contrastively on the captions.

The configs are stored as JSON in each file's safetensors metadata; nodes/toy_world.py rebuilds
the models from them with ComfyUI's classes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from comfyui_disentangle.harness import start_comfy  # noqa: E402

MODEL_SIZE = 128  # pixels the diffusion model sees (factor-world renders are 64×64)
LATENT_SCALE = 0.18215  # SD1 latent format

VAE_CONFIG = {
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": MODEL_SIZE, "in_channels": 3, "out_ch": 3,
                 "ch": 32, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "embed_dim": 4,
}
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": MODEL_SIZE // 8, "in_channels": 4, "out_channels": 4,
    "model_channels": 64, "channel_mult": [1, 1, 2], "num_res_blocks": [1, 1, 1],
    "transformer_depth": [0, 1, 1], "transformer_depth_output": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "context_dim": 48, "num_heads": -1, "num_head_channels": 32, "use_linear_in_transformer": False,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
TEXT_CONFIG = {"hidden_size": 48, "intermediate_size": 192, "num_attention_heads": 4, "num_hidden_layers": 3,
               "projection_dim": 48}
# Optimiser steps of each phase: those of the runs that made the shipped weights (weights/train_log.json;
# the two classifier phases took 4094 steps together there, split evenly here).
PHASE_STEPS = {"classifier": 2047, "vae": 1368, "classifier_on_reconstructions": 2047, "diffusion": 3474,
               "clip_loss_model": 1365}

CLIP_LOSS_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 96, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3},
}


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

class Pool:
    """Pre-rendered factor-world images (uint8, on the device), their factors and caption tokens."""

    def __init__(self, fw, tokenize, n: int, device, seed: int):
        import torch
        g = torch.Generator().manual_seed(seed)
        self.factors = fw.sample_factors(n, generator=g)
        chunks = [(fw.render(self.factors[i:i + 4096]) * 255).round().to(torch.uint8) for i in range(0, n, 4096)]
        self.images = torch.cat(chunks).to(device)
        captions = fw.caption(self.factors, generator=g)
        self.captions = captions
        self.tokens = torch.tensor([tokenize(c) for c in captions], dtype=torch.int32, device=device)
        self.empty = torch.tensor(tokenize(""), dtype=torch.int32, device=device)
        self.factors = self.factors.to(device)
        self.n = n

    def batch(self, size: int, generator):
        import torch
        idx = torch.randint(0, self.n, (size,), generator=generator, device="cpu").to(self.images.device)
        return idx, self.images[idx].float() / 255.0


def to_model_pixels(images):
    """64×64 renders → the 128×128 the diffusion model sees (nearest ×2), in [−1, 1]."""
    import torch.nn.functional as F
    return F.interpolate(images, scale_factor=MODEL_SIZE // 64, mode="nearest") * 2 - 1


def from_model_pixels(x):
    """Decoded 128×128 in [−1, 1] → 64×64 in [0, 1] (2×2 average) for the classifiers."""
    import torch.nn.functional as F
    return (F.avg_pool2d(x, MODEL_SIZE // 64) + 1).clamp(0, 2) / 2


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------

def factor_classifier(sizes):
    from comfyui_disentangle.toy_world.factor_judges import FactorClassifier
    return FactorClassifier(sizes)


def build_vae():
    from comfy.ldm.models.autoencoder import AutoencoderKL
    return AutoencoderKL(ddconfig=dict(VAE_CONFIG["ddconfig"]), embed_dim=VAE_CONFIG["embed_dim"])


def build_unet(device):
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    cfg = {k: v for k, v in UNET_CONFIG.items() if k not in ("use_temporal_attention", "use_temporal_resblock")}
    return UNetModel(**cfg, dtype=torch.float32, device=device, operations=comfy.ops.disable_weight_init)


def autograd_safe_clip_layers():
    """ComfyUI's CLIPLayer adds its residuals in place (fine for inference, rejected by autograd).
    For training, the same two residual updates without the in-place write."""
    import comfy.clip_model

    def forward(self, x, mask=None, optimized_attention=None):
        x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
        return x + self.mlp(self.layer_norm2(x))

    comfy.clip_model.CLIPLayer.forward = forward


def build_text_encoder(device):
    import torch
    import comfy.sd1_clip
    autograd_safe_clip_layers()
    te = comfy.sd1_clip.SDClipModel(device=device, dtype=torch.float32, textmodel_json_config=None,
                                    model_options={"model_name": "clip_l", "clip_l_model_config": dict(TEXT_CONFIG)})
    for p in te.parameters():
        p.requires_grad_(True)
    te.transformer.train()
    return te


def init_weights(module, seed):
    """ComfyUI's ops skip torch's init: give every parameter a seeded, sensible start."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif p.ndim >= 2:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(max(1, p[0].numel())))
                else:
                    p.zero_()


# --------------------------------------------------------------------------------------------
# Training phases
# --------------------------------------------------------------------------------------------

def train_classifier(pool, fw, device, steps, seconds, seed, log, extra_images=None):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    clf = factor_classifier(fw.FACTOR_SIZES).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0, step, max_steps = time.time(), 0, steps
    while step < max_steps and time.time() - t0 < seconds:
        idx, x = pool.batch(256, g)
        if extra_images is not None and step % 2 == 1:
            x = extra_images[idx]
        x = x + 0.03 * torch.randn_like(x)  # robustness to decoding error
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = clf(x)
        loss = sum(F.cross_entropy(l.float(), pool.factors[idx, k]) for k, l in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    log.setdefault("classifier", {}).setdefault("steps", []).append(step)
    log["classifier"]["loss"] = float(loss.detach())
    return clf.eval()


def classifier_accuracy(clf, images, factors):
    import torch
    with torch.no_grad():
        logits = clf(images)
    return [float((l.argmax(1) == factors[:, k]).float().mean()) for k, l in enumerate(logits)]


def train_vae(pool, device, steps, seconds, seed, log):
    import torch
    torch.manual_seed(seed)
    vae = build_vae().to(device)
    init_weights(vae, seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, step, max_steps = time.time(), 0, steps
    while step < max_steps and time.time() - t0 < seconds:
        _, x = pool.batch(64, g)
        x = to_model_pixels(x)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            moments = vae.quant_conv(vae.encoder(x))
            mean, logvar = moments.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30, 20)
            z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
            rec = vae.decoder(vae.post_quant_conv(z))
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        loss = (rec.float() - x).abs().mean() + ((rec.float() - x) ** 2).mean() + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
    log["vae"] = {"steps": step, "loss": float(loss.detach()), "kl": float(kl.detach())}
    return vae.eval()


def encode_mean(vae, x):
    moments = vae.quant_conv(vae.encoder(x))
    return moments.chunk(2, dim=1)[0]


def rescale_latents(vae, pool, device, log):
    """Fold a scale into the VAE so that raw latents have std 1/0.18215, as SD1's latent format expects."""
    import torch
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        _, x = pool.batch(512, g)
        std = float(encode_mean(vae, to_model_pixels(x)).std())
        k = (1.0 / LATENT_SCALE) / std
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[:half] *= k
        vae.quant_conv.bias[:half] *= k
        vae.quant_conv.bias[half:] += 2 * math.log(k)  # log-variance of k·z
        vae.post_quant_conv.weight /= k
    log["vae"]["latent_std_before"] = std
    log["vae"]["scale_folded"] = k


def load_reused(folder, fw, device, log):
    """The VAE and factor classifier of an earlier run (their training is independent of the UNet's)."""
    import torch
    from safetensors.torch import load_file
    vae = build_vae()
    vae.load_state_dict({k: v.float() for k, v in load_file(os.path.join(folder, "toy_world_vae.safetensors")).items()})
    clf = factor_classifier(fw.FACTOR_SIZES)
    clf.load_state_dict(load_file(os.path.join(folder, "toy_world_factor_classifier.safetensors")))
    log["reused"] = folder
    return vae.to(device).eval(), clf.to(device).eval()


def diffusion_schedule(device):
    """ᾱ_t of SD1 (ComfyUI's ModelSamplingDiscrete, 'linear' = scaled linear β)."""
    import torch
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float().to(device)


def encode_pool(pool, vae):
    """Latents (scaled, fp16) of every pool image, encoded once: the VAE is frozen from here on."""
    import torch
    parts = []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=pool.images.is_cuda):
        for i in range(0, pool.n, 2048):
            x = to_model_pixels(pool.images[i:i + 2048].float() / 255)
            parts.append((encode_mean(vae, x).float() * LATENT_SCALE).half())
    pool.latents = torch.cat(parts)


def train_diffusion(pool, vae, device, steps, seconds, seed, log, batch=512, lr_max=4e-4):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(seed)
    unet = build_unet(device)
    init_weights(unet, seed + 1)
    te = build_text_encoder(device)
    init_weights(te, seed + 2)
    with torch.no_grad():  # CLIP's token and position embeddings: small, like CLIP's init
        te.transformer.text_model.embeddings.token_embedding.weight.normal_(0, 0.02)
        te.transformer.text_model.embeddings.position_embedding.weight.normal_(0, 0.01)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-2)
    alpha_bar = diffusion_schedule(device)
    g = torch.Generator().manual_seed(seed)
    t0, step, max_steps = time.time(), 0, steps
    while step < max_steps and time.time() - t0 < seconds:
        idx = torch.randint(0, pool.n, (batch,), generator=g).to(device)
        tokens = pool.tokens[idx].long()
        drop = torch.rand(len(idx), device=device) < 0.1
        tokens = torch.where(drop[:, None], pool.empty.long()[None], tokens)
        z0 = pool.latents[idx].float()
        t = torch.randint(0, 1000, (len(idx),), device=device)
        ab = alpha_bar[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(z0)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
        lr = lr_max * min(1.0, (step + 1) / 300)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            context = te.transformer(tokens, None, intermediate_output=None, final_layer_norm_intermediate=True,
                                     dtype=torch.float32)[0]
            pred = unet(zt, t.float(), context=context.float())
        loss = F.mse_loss(pred.float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
    log["diffusion"] = {"steps": step, "loss_last": float(loss.detach()), "batch": batch, "lr": lr_max,
                        "seconds": time.time() - t0, "capped": step < max_steps}
    return unet.eval(), te.eval()


def train_clip_loss_model(pool, device, steps, seconds, seed, log):
    """A small open_clip model (image + text towers), contrastive on the captions."""
    import torch
    import torch.nn.functional as F
    try:
        import open_clip
    except ImportError as e:
        log["clip_loss_model"] = {"skipped": f"open_clip not importable: {e}"}
        return None
    torch.manual_seed(seed)
    model = open_clip.CLIP(**CLIP_LOSS_CONFIG).to(device)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    texts = tokenizer(pool.captions).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.1)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=device).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(seed)
    t0, step, max_steps = time.time(), 0, steps
    while step < max_steps and time.time() - t0 < seconds:
        idx, x = pool.batch(512, g)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            img, txt, scale = model((x - mean) / std, texts[idx])
            logits = scale * img.float() @ txt.float().T
        labels = torch.arange(len(idx), device=device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    log["clip_loss_model"] = {"steps": step, "loss": float(loss.detach())}
    return model.eval()


# --------------------------------------------------------------------------------------------
# Evaluation: does the text steer each attribute?
# --------------------------------------------------------------------------------------------

def text_control_accuracy(fw, unet, te, vae, clf, tokenize, device, n=256, steps=30, cfg=5.0, seed=123):
    """Generate from full captions of random factors; classify; per-factor accuracy."""
    import torch
    from comfyui_disentangle.core.ddim import ddim_uniform_sigmas, sample_ddim, sigma_from_alpha_bar
    g = torch.Generator().manual_seed(seed)
    factors = fw.sample_factors(n, generator=g)
    captions = [fw.full_caption(f) for f in factors]
    tokens = torch.tensor([tokenize(c) for c in captions], device=device).long()
    empty = torch.tensor([tokenize("")] * n, device=device).long()
    alpha_bar = diffusion_schedule(device)
    sigma_table = sigma_from_alpha_bar(alpha_bar.double().cpu())
    sigmas = ddim_uniform_sigmas(sigma_table, steps)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        ctx = te.transformer(torch.cat([tokens, empty]), None, intermediate_output=None,
                             final_layer_norm_intermediate=True, dtype=torch.float32)[0].float()

        def denoise(x, sigma):
            s = sigma.view(-1, 1, 1, 1).float()
            xin = x / (1 + s**2).sqrt()
            t = timestep_from_sigma(sigma.float(), sigma_table.float().to(device))
            eps = unet(torch.cat([xin, xin]), torch.cat([t, t]), context=ctx).float()
            cond, uncond = eps.chunk(2)
            return x - s * (uncond + cfg * (cond - uncond))

        x = torch.randn(n, 4, MODEL_SIZE // 8, MODEL_SIZE // 8, generator=g).to(device) * float(sigmas[0])
        z = sample_ddim(denoise, x, sigmas)
        images = from_model_pixels(vae.decoder(vae.post_quant_conv(z / LATENT_SCALE)).float())
    acc = classifier_accuracy(clf, images, factors.to(device))
    return dict(zip(fw.FACTOR_NAMES, acc)), images, captions


def timestep_from_sigma(sigma, sigma_table):
    """Nearest discrete timestep of each σ (ComfyUI's ModelSamplingDiscrete.timestep)."""
    return (sigma.log()[None] - sigma_table.log()[:, None]).abs().argmin(0).float()


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------

def save(path, tensors, metadata):
    import torch
    from safetensors.torch import save_file
    save_file({k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous().cpu()
               for k, v in tensors.items()}, path, metadata={k: json.dumps(v) for k, v in metadata.items()})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="safety cap on the total training time (a capped phase is marked in the log)")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="scale every phase's step count (e.g. 0.001 for a smoke run)")
    parser.add_argument("--pool", type=int, default=120_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse", help="folder with toy_world_vae / _factor_classifier safetensors to keep (skips those phases)")
    parser.add_argument("--skip-clip", action="store_true", help="do not train the open_clip loss model")
    parser.add_argument("--eval-samples", type=int, default=512, help="generations judged for text control")
    parser.add_argument("--cpu", action="store_true", help="smoke-run on the CPU")
    args = parser.parse_args()

    start_comfy(cpu=args.cpu)
    import torch
    import comfy.sd1_clip
    from comfyui_disentangle.toy_world import factor_world as fw

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None, tokenizer_data={})

    def tokenize(text):
        return [t for t, _ in tokenizer.tokenize_with_weights(text)["l"][0]]

    os.makedirs(args.out, exist_ok=True)
    budget = args.minutes * 60
    log = {"seed": args.seed, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    t_start = time.time()
    pool = Pool(fw, tokenize, args.pool, device, args.seed)
    log["pool"] = {"images": args.pool, "seconds": time.time() - t_start}

    steps = {name: max(1, round(n * args.steps_scale)) for name, n in PHASE_STEPS.items()}
    log["phase_steps_asked"] = steps

    def cap():  # seconds left under the safety cap
        return max(budget - (time.time() - t_start), 0.0)

    if args.reuse:
        vae, clf = load_reused(args.reuse, fw, device, log)
    else:
        clf = train_classifier(pool, fw, device, steps["classifier"], cap(), args.seed, log)
        vae = train_vae(pool, device, steps["vae"], cap(), args.seed, log)
        rescale_latents(vae, pool, device, log)
        with torch.no_grad():  # let the judges see decoded images too
            parts = []
            for i in range(0, pool.n, 2048):
                x = to_model_pixels(pool.images[i:i + 2048].float() / 255)
                parts.append(from_model_pixels(vae.decoder(vae.post_quant_conv(encode_mean(vae, x)))).float())
            recon = torch.cat(parts)
        clf = train_classifier(pool, fw, device, steps["classifier_on_reconstructions"], cap(), args.seed + 1, log,
                               extra_images=recon)
        idx = torch.arange(min(4096, pool.n), device=device)
        log["classifier"]["accuracy_clean"] = dict(zip(fw.FACTOR_NAMES, classifier_accuracy(clf, pool.images[idx].float() / 255, pool.factors[idx])))
        log["classifier"]["accuracy_vae_recon"] = dict(zip(fw.FACTOR_NAMES, classifier_accuracy(clf, recon[idx], pool.factors[idx])))
        del recon
    encode_pool(pool, vae)
    unet, te = train_diffusion(pool, vae, device, steps["diffusion"], cap(), args.seed, log)
    clip_model = None if args.skip_clip else train_clip_loss_model(pool, device, steps["clip_loss_model"], cap(), args.seed, log)

    acc, images, captions = text_control_accuracy(fw, unet, te, vae, clf, tokenize, device, n=args.eval_samples)
    log["text_control_accuracy"] = acc
    log["total_seconds"] = time.time() - t_start

    meta = {"format": "comfyui-disentangle/toy-world", "version": 1, "image_size": MODEL_SIZE,
            "latent_scale": LATENT_SCALE}
    save(os.path.join(args.out, "toy_world_unet.safetensors"), unet.state_dict(), {**meta, "unet_config": UNET_CONFIG})
    if not args.reuse:
        save(os.path.join(args.out, "toy_world_vae.safetensors"), vae.state_dict(), {**meta, "vae_config": VAE_CONFIG})
    save(os.path.join(args.out, "toy_world_text_encoder.safetensors"), te.transformer.state_dict(),
         {**meta, "text_config": TEXT_CONFIG})
    clf_meta = {**meta, "factor_names": list(fw.FACTOR_NAMES), "factor_sizes": list(fw.FACTOR_SIZES)}
    from safetensors.torch import save_file
    if not args.reuse:
        save_file({k: v.float().contiguous().cpu() for k, v in clf.state_dict().items()},
                  os.path.join(args.out, "toy_world_factor_classifier.safetensors"),
                  metadata={k: json.dumps(v) for k, v in clf_meta.items()})
    if clip_model is not None:
        save(os.path.join(args.out, "toy_world_clip.safetensors"), clip_model.state_dict(),
             {**meta, "open_clip_config": CLIP_LOSS_CONFIG})
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    rows = min(8, len(images) // 8)
    grid = images[:rows * 8].clamp(0, 1)
    grid = grid.view(rows, 8, 3, 64, 64).permute(0, 3, 1, 4, 2).reshape(rows * 64, 8 * 64, 3)
    from PIL import Image
    Image.fromarray((grid.cpu().numpy() * 255).astype("uint8")).save(os.path.join(args.out, "samples.png"))
    with open(os.path.join(args.out, "samples.txt"), "w") as f:
        f.write("\n".join(captions[:64]))
    print(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
