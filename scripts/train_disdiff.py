"""Train DisDiff on the factor world on top of the toy world's frozen model (issue 11).

Renders ``--images`` factor-world scenes (128 px; ``--images 480000`` is the whole grid), encodes them
with the toy VAE, and calls core's ``train_disdiff`` through ``nodes.disdiff.train_from_latents`` (the
Train DisDiff node's path) with the empty prompt as the frozen unconditional model. bf16 autocast and
a CUDA-graphed step on a GPU. Prints images/s.

Along the way (``--eval-every``) it scores the codes of ``--eval-images`` held-out scenes with DisDiff's
protocol (PCA step, FactorVAE, DCI) and logs the gradient share of each loss term on G and E
and what the fields do — x̂0 error removed, factor fields alike or not, codes used or not
(``--diagnose``, ``core.disdiff.field_diagnosis``); at the start it scores two references on the same scenes, a random linear
projection of the latents and the untrained encoder. Everything goes to ``<out stem>_log.json``; the
final codes to ``<out stem>_codes.safetensors`` (``bench/disdiff_metrics.py`` reads them).

``--encoder-input image`` (an option measured in issue 11): the encoder reads the scenes decoded by the
toy VAE's frozen decoder (its ``first_stage_model.decode`` of ``process_latent_out`` latents, as
VAEDecode before its clamp), resized to ``--image-side`` px, as the reference code does, in training
and in the held-out evaluation alike.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/train_disdiff.py --seed 0 --minutes 8 --out out/disdiff/seed0.safetensors
    COMFYUI_PATH=/path/to/ComfyUI torchrun --standalone --nproc_per_node 8 scripts/train_disdiff.py --seed 0 --out out/disdiff/s0.safetensors
    COMFYUI_PATH=/path/to/ComfyUI python scripts/train_disdiff.py --cpu --steps 20 --batch 8 --images 256 --eval-images 512 --out /tmp/dd.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import time

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from comfyui_disentangle.harness import device_name, start_comfy  # noqa: E402


def image_decoder_for(args, node, model, vae):
    """For ``--encoder-input image``: the toy VAE's frozen, differentiable decoder on the training device
    (model-space latent → image in [-1, 1]; a float32 copy outside inference mode), else None."""
    if args.encoder_input != "image":
        return None
    return node.vae_image_decoder(vae, model.get_model_object("latent_format"), model.load_device, trainable_copy=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100000, help="step limit (the time budget may end it first)")
    p.add_argument("--minutes", type=float, default=0.0, help="training time budget (0: none)")
    p.add_argument("--batch", type=int, default=128, help="global batch (split over torchrun's processes)")
    p.add_argument("--lr", type=float, default=1e-3, help="2e-4 left G's fields unlearned after 5,000 steps (README)")
    p.add_argument("--warmup", type=int, default=500, help="linear warm-up steps (the measured runs used 500)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=100000, help="training scenes rendered (480000: every combination)")
    p.add_argument("--eval-images", type=int, default=10000, help="held-out scenes whose codes are scored")
    p.add_argument("--num-factors", type=int, default=6)
    p.add_argument("--code-dim", type=int, default=32)
    p.add_argument("--encoder-width", type=int, default=128)
    p.add_argument("--decoder-width", type=float, default=1.0)
    p.add_argument("--encoder-input", default="latent", choices=["latent", "image"],
                   help="what E reads: the latent x0, or x0 decoded by the frozen toy VAE (the reference's way)")
    p.add_argument("--image-side", type=int, default=64, help="--encoder-input image: the decoded image's side in px")
    p.add_argument("--dis-weight", type=float, default=0.05, help="λ of eq. 13")
    p.add_argument("--weighting", default="paper", choices=["paper", "normalized", "constant"])
    p.add_argument("--logits", default="distance", choices=["distance", "scale_free"])
    p.add_argument("--loss-type", default="l1", choices=["l1", "l2"])
    p.add_argument("--recon-weighting", default="eps", choices=["eps", "x0"],
                   help="eq. 8's error in ε-space (the paper) or on x̂0 (core.disdiff.reconstruction_weights)")
    p.add_argument("--detach-codes", action="store_true", help="disentangling loss reaches G only, on every path")
    p.add_argument("--no-cuda-graph", action="store_true", help="eager steps (for comparison)")
    p.add_argument("--channels-last", action="store_true", help="G's convolutions in the NHWC layout")
    p.add_argument("--log-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=0, help="score held-out codes every that many steps (0: end only)")
    p.add_argument("--diagnose", action="store_true", help="log the gradient share of each loss term at each evaluation")
    p.add_argument("--checkpoint-every", type=int, default=2000)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--release", default="", help="also write a float16 copy without optimizer state here")
    p.add_argument("--no-references", action="store_true", help="skip the random-projection / untrained rows")
    p.add_argument("--out", required=True, help="checkpoint path (.safetensors)")
    p.add_argument("--cpu", action="store_true")
    return p.parse_args(argv)


def main():
    args = parse_args()
    distributed = "RANK" in os.environ
    start_comfy(cpu=args.cpu)
    import torch
    if distributed:
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available() and not args.cpu:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() and not args.cpu else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    main_rank = rank == 0

    def say(*a):
        if main_rank:
            print(*a, flush=True)

    import comfy.model_management as mm
    import nodes as comfy_nodes  # noqa: F401  (ComfyUI's node registry, for CLIPTextEncode)
    from comfyui_disentangle.core import disdiff as dd
    from comfyui_disentangle.core import disdiff_train as dtrain
    from comfyui_disentangle.evaluation import disentangle_metrics as dm
    from comfyui_disentangle.toy_world import factor_world as fw
    from comfyui_disentangle.nodes import disdiff as node
    from comfyui_disentangle.nodes.comfy_boundary import alphas_cumprod
    from comfyui_disentangle.nodes.toy_world import load_toy_world, scene_latents

    t_start = time.perf_counter()
    with torch.inference_mode():
        model, clip, vae = load_toy_world("toy_world")
        empty = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
        if args.images >= fw.num_combinations():
            train_factors = fw.factor_grid()
        else:
            train_factors = fw.sample_factors(args.images, generator=torch.Generator().manual_seed(1000 + args.seed))
        eval_factors = fw.sample_factors(args.eval_images, generator=torch.Generator().manual_seed(999_999))
        latents = scene_latents(vae, model, train_factors)
        eval_latents = scene_latents(vae, model, eval_factors)
    image_decoder = image_decoder_for(args, node, model, vae)
    say(f"{len(train_factors)} training + {args.eval_images} held-out scenes encoded in "
        f"{time.perf_counter() - t_start:.1f} s on {device_name()}, {world} process(es)")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem = os.path.splitext(args.out)[0]
    log = {"args": vars(args), "device": device_name(), "world": world, "history": [], "evals": [], "diagnostics": []}
    metric_device = mm.get_torch_device()

    def score(codes, label, step):
        scores = dm.score_group_codes(codes, eval_factors, seed=args.seed, device=metric_device)
        scores.pop("importance")
        entry = {"label": label, "step": step, **scores}
        say(f"[{label} @ {step}] FactorVAE {scores['factor_vae']:.3f}  DCI D {scores['dci_disentanglement']:.3f} "
            f"C {scores['dci_completeness']:.3f} I {scores['dci_informativeness']:.3f}")
        return entry

    if main_rank and not args.no_references and not args.resume:
        g = torch.Generator().manual_seed(args.seed)
        flat = eval_latents.flatten(1)
        proj = torch.randn(flat.shape[1], args.num_factors * args.code_dim, generator=g) / flat.shape[1] ** 0.5
        log["evals"].append(score((flat @ proj).view(-1, args.num_factors, args.code_dim), "random projection", 0))
        node.load_frozen(model)
        with torch.inference_mode():
            config = dd.make_config(latents[:1].to(model.load_device), node.make_frozen(model, empty),
                                    num_factors=args.num_factors, code_dim=args.code_dim,
                                    encoder_width=args.encoder_width, decoder_width=args.decoder_width,
                                    encoder_input=args.encoder_input, image_side=args.image_side,
                                    extra={"latent_format": "SD15"})
        with torch.inference_mode(False):
            torch.manual_seed(args.seed)
            untrained = node.DisDiffModel(dd.DisDiff(config))
        with torch.inference_mode():
            codes = node.encode_codes(untrained, eval_latents, image_decoder)
            log["evals"].append(score(codes.cpu(), "untrained encoder", 0))

    budget = args.minutes * 60
    t0 = time.perf_counter()
    stages = sorted({s for s in range(args.eval_every, args.steps, args.eval_every)} if args.eval_every else set())

    def callback(step, total, entry):
        log["history"].append(entry)
        say(f"step {step}: loss {entry['loss']:.4f} recon {entry['recon']:.4f} L_in {entry['invariant']:.3f} "
            f"L_va {entry['variant']:.3f} γ {entry['weight']:.2e}  {entry['images_per_s']:.0f} images/s"
            f"{'' if entry.get('cuda_graph') else ' (eager)'}")
        return budget > 0 and time.perf_counter() - t0 > budget

    train_kw = {"dis_weight": args.dis_weight, "warmup": args.warmup, "detach_codes": args.detach_codes,
                "weighting": args.weighting, "logits": args.logits, "loss_type": args.loss_type,
                "recon_weighting": args.recon_weighting,
                "weight_decay": args.weight_decay, "cuda_graph": False if args.no_cuda_graph else None,
                "channels_last": args.channels_last, "image_decoder": image_decoder}
    points = stages + [args.steps]
    resume, disdiff, reached = args.resume, None, 0
    # one call of train_disdiff per evaluation stage: each resumes the previous checkpoint (one resume path)
    for point in points:
        with torch.inference_mode():
            disdiff, hist = node.train_from_latents(
                model, empty, latents, num_factors=args.num_factors, code_dim=args.code_dim, steps=point,
                batch_size=args.batch, learning_rate=args.lr, seed=args.seed, checkpoint_path=args.out,
                checkpoint_every=args.checkpoint_every, resume=resume, log_every=args.log_every, callback=callback,
                encoder_width=args.encoder_width, decoder_width=args.decoder_width, encoder_input=args.encoder_input,
                image_side=args.image_side, train_kw=train_kw)
        resume = True
        steps_done = [h["step"] for h in hist if "step" in h]
        notes = [h["note"] for h in hist if "note" in h]
        if notes:
            say(*notes)
        reached = steps_done[-1] if steps_done else reached
        if main_rank:
            with torch.inference_mode():
                codes = node.encode_codes(disdiff, eval_latents, image_decoder)
            log["evals"].append(score(codes.cpu(), "DisDiff", reached))
            if args.diagnose:
                node.load_frozen(model)
                frozen = node.make_frozen(model, empty)
                device = mm.get_torch_device()
                with torch.inference_mode(False), torch.enable_grad():
                    # a copy with ordinary tensors: the trained weights may be inference tensors by now
                    # (moved between devices by the node under inference mode), which autograd refuses
                    net = dd.DisDiff(disdiff.model.config, image_decoder)
                    net.load_state_dict({k: v.clone() for k, v in disdiff.model.state_dict().items()})
                    net = net.to(device).train()
                    lat = latents[:4096].clone().to(device)
                    ab_dev = alphas_cumprod(model).clone().to(device)
                    shares = dtrain.gradient_shares(
                        net, frozen, lat, ab_dev, batch_size=args.batch, seed=reached,
                        autocast_dtype=torch.bfloat16 if device.type == "cuda" else None,
                        **{k: train_kw[k] for k in dtrain.LOSS_OPTIONS})
                net.eval()
                shares["step"] = reached
                log["diagnostics"].append(shares)
                say(f"[gradients @ {reached}] (γ·L_in + γ·L_va) / L_r: on G {shares['share_G']:.3g}, on E "
                    f"{shares['share_E']:.3g}; unweighted L_in {shares['invariant']:.3f} L_va {shares['variant']:.3f} "
                    f"γ {shares['weight']:.2e}")
                # what the fields do (bench/disdiff_diagnose.py's measures) on 64 held-out scenes
                with torch.inference_mode():
                    held = eval_latents[:64].to(device)
                    for t_diag in (150, 500, 850):
                        noise = torch.randn(held.shape, generator=torch.Generator().manual_seed(t_diag)).to(device)
                        d = dd.field_diagnosis(net, frozen, held, t_diag, ab_dev, noise)
                        d["step"] = reached
                        log.setdefault("fields", []).append(d)
                        say(f"[fields @ {reached}, t {t_diag}] x̂0 error removed {d['error_removed']:+.1%} (the bias "
                            f"alone {d['bias_removed']:+.1%}), cos(G^c, G^c') {d['field_cosine']:.3f}, code use "
                            f"{d['code_use']:.3f}")
            with open(f"{stem}_log.json", "w") as f:
                json.dump(log, f, indent=1)
        if reached < point or (budget > 0 and time.perf_counter() - t0 > budget):
            break

    seconds = time.perf_counter() - t0
    rates = [h["images_per_s"] for h in log["history"][1:]] or [h["images_per_s"] for h in log["history"]]
    rate = sorted(rates)[len(rates) // 2] if rates else float("nan")
    if main_rank:
        from safetensors.torch import save_file
        with torch.inference_mode():
            codes = node.encode_codes(disdiff, eval_latents, image_decoder)
        meta = {"seed": str(args.seed), "step": str(reached), "factor_names": json.dumps(list(fw.FACTOR_NAMES)),
                "factor_sizes": json.dumps(list(fw.FACTOR_SIZES))}
        save_file({"codes": codes.float().contiguous().cpu(), "factors": eval_factors.contiguous()},
                  f"{stem}_codes.safetensors", metadata=meta)
        if args.release:
            dd.save_checkpoint(args.release, disdiff.model, step=reached,
                               info={"seed": args.seed, "images": len(train_factors), "args": vars(args)},
                               dtype=torch.float16)
        log["summary"] = {"seed": args.seed, "steps": reached, "train_seconds": round(seconds, 1),
                          "images_per_s": round(rate, 1), "batch": args.batch, "world": world,
                          "device": device_name(), "checkpoint": args.out}
        with open(f"{stem}_log.json", "w") as f:
            json.dump(log, f, indent=1)
        say(json.dumps(log["summary"]))
        say(f"training throughput: {rate:.0f} images/s (global batch {args.batch}, {reached} steps in {seconds:.0f} s, "
            f"{world} × {device_name()})")
    if distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    mm.soft_empty_cache()


if __name__ == "__main__":
    main()
