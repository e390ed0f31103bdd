"""Disentanglement table on the factor world (issue 6): FactorVAE score and DCI, mean ± std over seeds,
computed as DisDiff computes them (per-factor-code PCA, then disentanglement_lib's settings).

    python bench/disentangle_metrics.py --seeds 0 1 2 --steps 4000            # GPU (bf16 autocast)
    python bench/disentangle_metrics.py --seeds 0 1 --steps 20 --batch-size 16 --eval-size 3000 \\
        --fv-train 500 --fv-eval 500 --fv-variance 1000 --dci-train 500 --dci-test 200 --gbt-stages 10  # CPU smoke

Row "autoencoder": a plain conv autoencoder with DisDiff's code size (6 groups × 32,
evaluation/autoencoder_baseline.py) trained ``--steps`` steps with each seed, then scored. ``--load FILE``
scores saved autoencoders instead (one per seed). Other encoders (DisDiff's) are scored with
``evaluate_encoder`` of evaluation/disentangle_metrics.py and printed with :func:`print_summary`;
ComfyUI is not needed. The rows are evaluation/autoencoder_baseline.py's ``score_baseline``.
"""
from __future__ import annotations

import argparse
import json
import sys

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from common import print_table  # noqa: E402
from comfyui_disentangle.evaluation import autoencoder_baseline as ab  # noqa: E402
from comfyui_disentangle.evaluation import disentangle_metrics as dm  # noqa: E402


def print_summary(rows: list[list], extra_headers: tuple[str, ...] = ()) -> None:
    header = ["model", "seeds"] + [title for _, title in dm.COLUMNS] + list(extra_headers)
    print_table("Disentanglement on the factor world (after DisDiff's per-group PCA; mean ± std over seeds)", header, rows)


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000, help="autoencoder training steps per seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", type=int, default=32, help="autoencoder base channels")
    p.add_argument("--group-dim", type=int, default=32, help="channels per factor code (DisDiff: 32)")
    p.add_argument("--load", nargs="+", default=None, help="score these saved autoencoders (one per seed) instead of training")
    p.add_argument("--save-dir", default=None, help="save each trained autoencoder here (safetensors)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--eval-size", type=int, default=None, help="rows of the factor grid to encode (default: all 480000)")
    p.add_argument("--encode-batch", type=int, default=2048)
    p.add_argument("--fv-train", type=int, default=dm.FACTOR_VAE_DEFAULTS["num_train"])
    p.add_argument("--fv-eval", type=int, default=dm.FACTOR_VAE_DEFAULTS["num_eval"])
    p.add_argument("--fv-variance", type=int, default=dm.FACTOR_VAE_DEFAULTS["num_variance_estimate"])
    p.add_argument("--fv-batch", type=int, default=dm.FACTOR_VAE_DEFAULTS["batch_size"])
    p.add_argument("--dci-train", type=int, default=dm.DCI_DEFAULTS["num_train"])
    p.add_argument("--dci-test", type=int, default=dm.DCI_DEFAULTS["num_test"])
    p.add_argument("--gbt-stages", type=int, default=100)
    p.add_argument("--json", default=None, help="write every seed's results here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    import torch
    args = _args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.load is not None and len(args.load) != len(args.seeds):
        sys.exit(f"--load gave {len(args.load)} files for {len(args.seeds)} seeds")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fv = {"num_train": args.fv_train, "num_eval": args.fv_eval, "num_variance_estimate": args.fv_variance,
          "batch_size": args.fv_batch}
    dci = {"num_train": args.dci_train, "num_test": args.dci_test, "gbt_stages": args.gbt_stages}
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {device_name}; eval set: {args.eval_size or 'full grid (480000)'}; FactorVAE {fv}; DCI {dci}")
    results = []
    for index, seed in enumerate(args.seeds):
        results.append(ab.score_baseline(seed, args.steps, device=device, load=args.load[index] if args.load else None,
                                         save_dir=args.save_dir, width=args.width, group_dim=args.group_dim,
                                         batch_size=args.batch_size, learning_rate=args.lr, eval_size=args.eval_size,
                                         encode_batch=args.encode_batch, factor_vae=fv, dci=dci,
                                         log=lambda line: print(line, flush=True)))
    name = f"autoencoder ({ab.DEFAULT_CONFIG['groups']}×{args.group_dim}, {args.steps} steps)" if args.load is None else "autoencoder (loaded)"
    extra = {"recon MSE": [r["reconstruction_mse"] for r in results], "train s": [r["seconds_train"] for r in results]}
    print_summary([dm.summary_row(name, results, extra)], tuple(extra))
    out = {"device": device_name, "args": vars(args), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
