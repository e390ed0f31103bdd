"""CPU tests of the autoencoder baseline (evaluation/autoencoder_baseline.py), the factor-world encoder
evaluation and the disentanglement bench at smoke-test sizes."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from comfyui_disentangle.evaluation import autoencoder_baseline as ab
from comfyui_disentangle.evaluation import disentangle_metrics as dm
from comfyui_disentangle import harness

TINY = dict(width=8, image_size=32)  # small and fast on a CPU; renders are area-downsampled to 32 px


def test_code_shape_matches_disdiff_and_decode_shape():
    model = ab.build_autoencoder(0)
    assert model.code_shape == (6, 32) and model.config["image_size"] == 64
    tiny = ab.build_autoencoder(0, **TINY)
    images = torch.rand(2, 3, 64, 64)
    codes = tiny.encode(images)
    assert codes.shape == (2, 6, 32)
    assert tiny.decode(codes).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        ab.build_autoencoder(0, image_size=40)
    with pytest.raises(ValueError, match="unknown autoencoder config"):
        ab.build_autoencoder(0, depth=3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        tiny.encode(torch.rand(2, 64, 64))


def test_same_seed_same_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = ab.build_autoencoder(3, **TINY), ab.build_autoencoder(3, **TINY), ab.build_autoencoder(4, **TINY)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_loss_decreases_in_a_few_steps_and_callback_sees_every_step():
    model = ab.build_autoencoder(0, **TINY)
    before = ab.reconstruction_mse(model, n=64)
    seen = []
    log = ab.train_autoencoder(model, 20, batch_size=8, learning_rate=3e-3, seed=0,
                               callback=lambda step, steps, loss: seen.append((step, steps, float(loss))))
    assert [s for s, _, _ in seen] == list(range(1, 21)) and all(t == 20 for _, t, _ in seen)
    losses = log["losses"]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    after = ab.reconstruction_mse(model, n=64)  # the same 64 held-out scenes
    assert after < 0.85 * before, (before, after, losses)  # ~0.74 seen
    assert log["final_loss"] == losses[-1] == pytest.approx(seen[-1][2])
    assert not model.training


def test_training_is_deterministic_given_the_seed():
    runs = []
    for _ in range(2):
        model = ab.build_autoencoder(1, **TINY)
        runs.append((ab.train_autoencoder(model, 3, batch_size=4, seed=5)["losses"], model))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(p, q) for p, q in zip(runs[0][1].parameters(), runs[1][1].parameters()))


def test_save_load_round_trip(tmp_path):
    model = ab.build_autoencoder(2, **TINY)
    ab.train_autoencoder(model, 2, batch_size=4, seed=0)
    path = str(tmp_path / "ae.safetensors")
    ab.save_autoencoder(model, path, {"seed": 2, "note": "test"})
    loaded, meta = ab.load_autoencoder(path)
    assert loaded.config == model.config
    assert json.loads(meta["seed"]) == 2 and meta["note"] == "test"
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(images), model.encode(images))
        assert torch.equal(loaded(images), model(images))
    from safetensors.torch import save_file
    other = str(tmp_path / "other.safetensors")
    save_file({"x": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match="not an autoencoder-baseline file"):
        ab.load_autoencoder(other)


SMOKE_METRICS = dict(factor_vae=dict(num_train=200, num_eval=200, num_variance_estimate=400),
                     dci=dict(num_train=300, num_test=100, gbt_stages=4))


def test_evaluate_encoder_scores_a_ground_truth_encoder_high_and_a_constant_one_zero():
    from comfyui_disentangle.toy_world import factor_world as fw
    judge_path = os.path.join(harness.PACK_ROOT, "weights", "toy_world_factor_classifier.safetensors")
    from comfyui_disentangle.toy_world.factor_judges import load_factor_classifier
    judge, _ = load_factor_classifier(judge_path)

    def oracle(images):  # the factor indices, read back by the shipped classifiers: one scalar per factor
        return judge.predict(images).float()[..., None] + 0.01 * torch.randn(images.shape[0], fw.NUM_FACTORS, 1)
    r = dm.evaluate_encoder(oracle, seed=0, eval_size=600, batch_size=300, **SMOKE_METRICS)
    assert r["eval_size"] == 600 and r["code_shape"] == [6, 1]
    assert r["factor_vae"] >= 0.9 and r["dci_disentanglement"] >= 0.8, r
    flat = dm.evaluate_encoder(lambda x: torch.zeros(x.shape[0], 12), seed=0, eval_size=300, groups=6, **SMOKE_METRICS)
    assert flat["code_shape"] == [6, 2] and flat["factor_vae"] == 0.0 and flat["num_active_dims"] == 0
    with pytest.raises(ValueError, match="must return codes"):
        dm.evaluate_encoder(lambda x: torch.zeros(3), seed=0, eval_size=10)
    with pytest.raises(ValueError, match="cannot be split into 5 groups"):
        dm.evaluate_encoder(lambda x: torch.zeros(x.shape[0], 12), seed=0, eval_size=10, groups=5)
    with pytest.raises(ValueError, match="eval_size"):
        dm.evaluate_encoder(lambda x: torch.zeros(x.shape[0], 12), seed=0, eval_size=1)


SMALL_BASELINE = dict(width=8, batch_size=8, eval_size=600, encode_batch=300, device="cpu",
                      factor_vae=dict(num_train=200, num_eval=200, num_variance_estimate=400),
                      dci=dict(num_train=300, num_test=100, gbt_stages=4))


def test_baseline_rows_train_save_reload_and_summarise(tmp_path):
    lines = []
    results = [ab.score_baseline(seed, 3, save_dir=str(tmp_path), log=lines.append, **SMALL_BASELINE) for seed in (0, 1)]
    assert any("seed 1: step 3/3" in line for line in lines) and any("FactorVAE" in line for line in lines)
    for seed, r in zip((0, 1), results):
        for key in ("factor_vae", "dci_disentanglement", "dci_completeness", "dci_informativeness"):
            assert 0.0 <= r[key] <= 1.0
        assert r["code_shape"] == [6, 32] and r["eval_size"] == 600 and r["seed"] == seed and r["train_steps"] == 3
    saved = [str(tmp_path / f"autoencoder_baseline_seed{s}.safetensors") for s in (0, 1)]
    assert all(os.path.isfile(p) for p in saved)
    again = ab.score_baseline(1, 3, load=saved[1], log=lines.append, **SMALL_BASELINE)
    first = results[1]  # the saved model scores the same
    assert again["factor_vae"] == first["factor_vae"] and again["dci_disentanglement"] == first["dci_disentanglement"]
    assert again["reconstruction_mse"] == pytest.approx(first["reconstruction_mse"]) and again["train_steps"] == 0
    assert dm.mean_std([0.5, 0.7]) == "0.600 ± 0.141" and dm.mean_std([]) == "—"
    row = dm.summary_row("autoencoder", results, {"recon MSE": [r["reconstruction_mse"] for r in results]})
    assert row[:2] == ["autoencoder", 2] and len(row) == 2 + len(dm.COLUMNS) + 1
    assert row[2] == dm.mean_std([r["factor_vae"] for r in results])


def test_bench_runs_as_a_script_on_cpu_with_small_flags(tmp_path):
    """bench/disentangle_metrics.py as a user runs it (a subprocess: tests never import bench/)."""
    import subprocess
    import sys
    out_json = str(tmp_path / "out.json")
    small = ["--device", "cpu", "--width", "8", "--batch-size", "8", "--eval-size", "600", "--encode-batch", "300",
             "--fv-train", "200", "--fv-eval", "200", "--fv-variance", "400", "--dci-train", "300", "--dci-test", "100",
             "--gbt-stages", "4"]
    path = os.path.join(harness.PACK_ROOT, "bench", "disentangle_metrics.py")
    done = subprocess.run([sys.executable, path, "--seeds", "0", "--steps", "3", "--json", out_json] + small,
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert "Disentanglement on the factor world" in done.stdout and "| autoencoder (6×32, 3 steps) | 1" in done.stdout
    results = json.load(open(out_json))["results"]
    assert len(results) == 1 and results[0]["seed"] == 0 and 0.0 <= results[0]["factor_vae"] <= 1.0


def test_bench_script_starts_standalone():
    """As a script, outside pytest's package alias (catches import-time errors)."""
    import subprocess
    import sys
    path = os.path.join(harness.PACK_ROOT, "bench", "disentangle_metrics.py")
    done = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert "--gbt-stages" in done.stdout and "--eval-size" in done.stdout
