"""FactorVAE and DCI of trained DisDiff encoders on the factor world (issue 6), from the code dumps
``bench/train_disdiff.py`` writes (``<checkpoint stem>_codes.safetensors``: codes [M, N, D] of M
held-out scenes and their factors [M, 6]), after DisDiff's per-factor-code PCA. One row per file
and the mean ± std, in the table format of ``bench/disentangle_metrics.py`` (whose autoencoder
baseline rows can be added with ``--baseline-json``).

    python bench/disdiff_metrics.py out/disdiff/seed*_codes.safetensors [--baseline-json out/ae.json]
"""
from __future__ import annotations

import argparse
import json
import os

import _pack_alias  # noqa: E402,F401  (registers comfyui_disentangle: harness/alias.py)
from disentangle_metrics import print_summary  # noqa: E402
from comfyui_disentangle.evaluation import disentangle_metrics as dm  # noqa: E402
from comfyui_disentangle.evaluation.disentangle_metrics import COLUMNS, summary_row  # noqa: E402


def score_codes(path: str, seed: int, device=None) -> dict:
    from safetensors.torch import load_file
    data = load_file(path)
    scores = dm.score_group_codes(data["codes"], data["factors"], seed=seed, device=device)
    return {"file": os.path.basename(path), "rows": int(data["codes"].shape[0]), **scores}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("codes", nargs="+", help="code dumps of train_disdiff.py, one per seed")
    p.add_argument("--baseline-json", default=None, help="results of bench/disentangle_metrics.py --json")
    p.add_argument("--json", default=None, help="write the per-file results here")
    p.add_argument("--device", default=None)
    args = p.parse_args()
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = [score_codes(path, seed, device) for seed, path in enumerate(args.codes)]
    for r in results:
        print(r["file"], r["rows"], "rows:", {k: round(float(r[k]), 3) for k, _ in COLUMNS},
              "PCA explained variance per code:", r["pca_explained_variance"])
    rows = [summary_row("DisDiff (ours, on the toy world's frozen model)", results)]
    if args.baseline_json:
        with open(args.baseline_json) as f:
            baseline = json.load(f)
        baseline = baseline if isinstance(baseline, list) else baseline.get("results", baseline.get("seeds", []))
        rows.append(summary_row("plain autoencoder, same code size", baseline))
    print_summary(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
