"""CPU tests of evaluation/disentangle_metrics.py: FactorVAE score and DCI on synthetic codes with known
answers, the DisDiff PCA step, the gradient-boosted-tree importances, determinism, input errors.

Expected levels (F factors, each uniform and independent):
* code_i = factor_i + small noise: FactorVAE 1 (fixing factor k leaves only noise in code k, so the
  argmin is always k) and D = C = 1 (code i is useless for every factor but i).
* codes = H·f / 2 with H a 4×4 Hadamard matrix and f the standardised factors: every code mixes
  every factor with weight ±1/2, so fixing any factor removes the same 1/4 of every code's variance;
  the argmin is then equally likely for every code whatever the factor, and the eval accuracy of
  any classifier is Σ_k (1/F) Σ_{i: c(i)=k} (1/F) = 1/F = 0.25. By the same symmetry every code is
  equally important for every factor: R ∝ 1, so D = C = 0.
* codes = Q·f with Q a random rotation: in between. With importances ∝ Q_ik² (a linear model), each
  row of Q² is Dirichlet(½, …, ½), so E[D] = 1 − (ψ(F/2 + 1) − ψ(3/2)) / ln F ≈ 0.36 for F = 4;
  the trees' importances are flatter (0.2–0.3 seen). FactorVAE: each factor votes mostly for the
  code with the largest |Q_ik|, so the score lies above 1/F and below 1 unless those codes differ.
* codes independent of the factors (pure noise): the argmin does not depend on the factor, so the
  FactorVAE score is 1/F; DCI importances are noise of equal size: D, C near 0; accuracy near the
  majority-class rate.
"""
from __future__ import annotations

import math

import pytest
import torch

from comfyui_disentangle.evaluation import disentangle_metrics as dm

SIZES = (6, 6, 6, 6)
SMALL_FV = dict(num_train=600, num_eval=2000, num_variance_estimate=2000)
SMALL_DCI = dict(num_train=500, num_test=300, gbt_stages=10)


def _noisy(scale, seed=0):
    g = torch.Generator().manual_seed(seed)

    def represent(factors):
        return factors.double() + scale * torch.randn(factors.shape, generator=g, dtype=torch.float64)
    return represent


def _standardised(factors, sizes=SIZES):
    s = torch.tensor(sizes, dtype=torch.float64)
    return (factors.double() - (s - 1) / 2) / torch.sqrt((s * s - 1) / 12)


HADAMARD = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64)


def test_perfectly_disentangled_code_scores_one():
    source = dm.GeneratedCodes(_noisy(0.05), SIZES)
    fv = dm.factor_vae_score(source, seed=1, **SMALL_FV)
    assert fv["num_active_dims"] == 4
    assert fv["eval_accuracy"] >= 0.99 and fv["train_accuracy"] >= 0.99
    dci = dm.dci_scores(source, seed=1, **SMALL_DCI)
    assert dci["disentanglement"] >= 0.95
    assert dci["completeness"] >= 0.95
    assert dci["informativeness"] >= 0.95
    r = dci["importance"]
    assert r.shape == (4, 4)
    assert torch.equal(r.argmax(0), torch.arange(4))  # code j matters most for factor j


def test_hadamard_mixed_code_scores_chance():
    source = dm.GeneratedCodes(lambda f: _standardised(f) @ HADAMARD.T / 2, SIZES)
    fv = dm.factor_vae_score(source, seed=2, **SMALL_FV)
    # chance 1/F = 0.25; the eval accuracy's std over 2000 votes is ~0.01
    assert abs(fv["eval_accuracy"] - 0.25) < 0.06, fv
    dci = dm.dci_scores(source, seed=2, **SMALL_DCI)
    assert dci["disentanglement"] < 0.1, dci["importance"]
    assert dci["completeness"] < 0.1
    # the information is there (the trees combine codes), it is just not disentangled; chance is 1/6
    assert dci["informativeness"] > 0.35


def test_random_rotation_scores_between_chance_and_one():
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=torch.float64))
    rotated = dm.GeneratedCodes(lambda f: _standardised(f) @ q.T, SIZES)
    perfect = dm.GeneratedCodes(_noisy(0.05), SIZES)
    fv_rot = dm.factor_vae_score(rotated, seed=3, **SMALL_FV)["eval_accuracy"]
    d_rot = dm.dci_scores(rotated, seed=3, **SMALL_DCI)["disentanglement"]
    d_perfect = dm.dci_scores(perfect, seed=3, **SMALL_DCI)["disentanglement"]
    assert fv_rot > 0.3  # above chance (1/F): each factor mostly moves one code, the one with the largest |Q_ik|
    assert 0.05 < d_rot < 0.6 and d_rot < d_perfect - 0.3


def test_uninformative_code_scores_chance():
    g = torch.Generator().manual_seed(4)
    source = dm.GeneratedCodes(lambda f: torch.randn(f.shape[0], 4, generator=g, dtype=torch.float64), SIZES)
    fv = dm.factor_vae_score(source, seed=4, **SMALL_FV)
    assert abs(fv["eval_accuracy"] - 0.25) < 0.06, fv
    dci = dm.dci_scores(source, seed=4, **SMALL_DCI)
    assert dci["disentanglement"] < 0.1 and dci["completeness"] < 0.1
    assert dci["informativeness"] < 1 / 6 + 0.08  # 6 equally likely values: chance 1/6


def test_code_table_matches_generated_sampling():
    """A precomputed table of the full grid gives the same expected levels as the callable."""
    grid = torch.cartesian_prod(*[torch.arange(s) for s in SIZES])
    codes = _noisy(0.05)(grid)
    fv = dm.factor_vae_score((codes, grid), seed=5, **SMALL_FV)
    assert fv["eval_accuracy"] >= 0.99
    mixed = _standardised(grid) @ HADAMARD.T / 2
    assert abs(dm.factor_vae_score((mixed, grid), seed=5, **SMALL_FV)["eval_accuracy"] - 0.25) < 0.06
    # fixed-factor batches really share the factor's value
    table = dm.CodeTable(grid.double(), grid)  # code = factor row itself
    batch, k = table.draw_fixed(50, 16, torch.Generator().manual_seed(0))
    values = batch[torch.arange(50), :, k]  # [50, 16]
    assert torch.equal(values, values[:, :1].expand_as(values))
    assert (batch.var(1).sum(-1) > 0).all()  # the other factors vary


def test_pruned_dimensions_and_all_pruned():
    grid = torch.cartesian_prod(*[torch.arange(s) for s in SIZES])
    codes = torch.cat([_noisy(0.05)(grid), torch.full((grid.shape[0], 2), 3.0)], 1)
    fv = dm.factor_vae_score((codes, grid), seed=0, **SMALL_FV)
    assert fv["num_active_dims"] == 4 and fv["eval_accuracy"] >= 0.99
    tiny = dm.factor_vae_score((codes * 1e-3, grid), seed=0, **SMALL_FV)
    assert tiny == {"score": 0.0, "train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}


# --------------------------------------------------------------------------------------------
# The PCA step
# --------------------------------------------------------------------------------------------

def test_pca_recovers_a_factor_along_a_random_direction():
    g = torch.Generator().manual_seed(6)
    n, groups, dims = 3000, 6, 32
    factors = torch.randint(10, (n, groups), generator=g).double()
    directions = torch.nn.functional.normalize(torch.randn(groups, dims, generator=g, dtype=torch.float64), dim=-1)
    offset = torch.randn(groups, dims, generator=g, dtype=torch.float64)
    codes = factors[..., None] * directions + offset + 0.1 * torch.randn(n, groups, dims, generator=g, dtype=torch.float64)
    pca = dm.fit_group_pca(codes.float())
    scalars = pca.transform(codes.float())
    assert scalars.shape == (n, groups)
    for c in range(groups):
        corr = torch.corrcoef(torch.stack([scalars[:, c], factors[:, c]]))[0, 1]
        assert abs(float(corr)) > 0.99
        assert abs(float(pca.direction[c] @ directions[c])) > 0.999
    assert (pca.explained_variance_ratio > 0.9).all()
    assert torch.allclose(scalars.mean(0), torch.zeros(groups, dtype=torch.float64), atol=1e-5)
    # the same as the first right singular vector of the centred data (sign fixed)
    x = codes[:, 2] - codes[:, 2].mean(0)
    v = torch.linalg.svd(x, full_matrices=False).Vh[0]
    v = v if v[v.abs().argmax()] > 0 else -v
    assert torch.allclose(pca.direction[2], v, atol=1e-5)
    assert torch.allclose(dm.pca_first_components(codes), scalars, atol=1e-4)
    # and the metrics see a disentangled code after the step
    fv = dm.factor_vae_score((scalars, factors.long()), seed=0, num_train=300, num_eval=300, num_variance_estimate=1000)
    assert fv["eval_accuracy"] >= 0.99


def test_pca_of_one_dim_groups_is_centring():
    codes = torch.randn(100, 3, 1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(dm.pca_first_components(codes), (codes[..., 0] - codes[..., 0].mean(0)).double(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Importances and DCI formulas
# --------------------------------------------------------------------------------------------

def test_dci_from_importance_known_matrices():
    assert dm.dci_from_importance(torch.eye(4)) == pytest.approx({"disentanglement": 1.0, "completeness": 1.0}, abs=1e-6)
    perm = torch.eye(3)[[2, 0, 1]]
    assert dm.dci_from_importance(perm) == pytest.approx({"disentanglement": 1.0, "completeness": 1.0}, abs=1e-6)
    assert dm.dci_from_importance(torch.ones(5, 3)) == pytest.approx({"disentanglement": 0.0, "completeness": 0.0}, abs=1e-6)
    # two codes, two factors: code 0 splits 3:1, code 1 only factor 1 (base-2 entropies)
    r = torch.tensor([[3.0, 1.0], [0.0, 4.0]])
    h = lambda *p: -sum(x * math.log2(x) for x in p if x > 0)  # noqa: E731
    d = 0.5 * (1 - h(0.75, 0.25)) + 0.5 * 1.0
    c = (3 / 8) * 1.0 + (5 / 8) * (1 - h(0.2, 0.8))
    out = dm.dci_from_importance(r)
    assert out["disentanglement"] == pytest.approx(d, abs=1e-6) and out["completeness"] == pytest.approx(c, abs=1e-6)
    # a code that matters for nothing does not count
    assert dm.dci_from_importance(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))["disentanglement"] == pytest.approx(1.0, abs=1e-6)


def test_gradient_boosted_importance_separable_and_ties():
    g = torch.Generator().manual_seed(7)
    n = 400
    y = torch.randint(3, (n,), generator=g)
    x = torch.stack([y.double() + 0.1 * torch.rand(n, generator=g, dtype=torch.float64),  # informative
                     torch.full((n,), 5.0, dtype=torch.float64),  # constant: never split
                     torch.randint(2, (n,), generator=g).double()], 1)  # two tied values, noise
    imp, pred_train, pred_test = dm.gradient_boosted_importance(x, y, x[:50], stages=10)
    assert imp.shape == (3,) and float(imp.sum()) == pytest.approx(1.0)
    assert imp[1] == 0 and imp[0] > 0.95
    assert torch.equal(pred_train, y) and torch.equal(pred_test, y[:50])
    # one class only: nothing to learn
    imp1, p1, _ = dm.gradient_boosted_importance(x, torch.zeros(n, dtype=torch.long), None, stages=3)
    assert float(imp1.abs().sum()) == 0 and (p1 == 0).all()
    # unseen labels keep their values (classes are remapped internally)
    imp2, p2, _ = dm.gradient_boosted_importance(x, y * 10 + 7, None, stages=10)
    assert torch.equal(p2, y * 10 + 7) and torch.allclose(imp2, imp)


def test_gradient_boosted_importance_feature_chunks_agree():
    g = torch.Generator().manual_seed(8)
    y = torch.randint(4, (300,), generator=g)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    x[:, 3] += y
    x[:, 1] += (y % 2) * 2
    whole = dm.gradient_boosted_importance(x, y, x, stages=8)
    chunked = dm.gradient_boosted_importance(x, y, x, stages=8, max_block=300 * 4 * 4)  # one feature at a time
    assert torch.allclose(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1]) and torch.equal(whole[2], chunked[2])
    assert whole[0].argmax() == 3


# --------------------------------------------------------------------------------------------
# Determinism and errors
# --------------------------------------------------------------------------------------------

def test_same_seed_same_scores_other_seed_other_data():
    source = lambda: dm.GeneratedCodes(_noisy(1.0, seed=9), SIZES)  # noqa: E731  (fresh noise stream)
    a = dm.factor_vae_score(source(), seed=11, num_train=200, num_eval=200, num_variance_estimate=500)
    b = dm.factor_vae_score(source(), seed=11, num_train=200, num_eval=200, num_variance_estimate=500)
    assert a == b
    grid = torch.cartesian_prod(*[torch.arange(s) for s in SIZES])
    codes = _noisy(3.0)(grid)
    x = dm.dci_scores((codes, grid), seed=11, num_train=300, num_test=100, gbt_stages=5)
    y = dm.dci_scores((codes, grid), seed=11, num_train=300, num_test=100, gbt_stages=5)
    z = dm.dci_scores((codes, grid), seed=12, num_train=300, num_test=100, gbt_stages=5)
    assert torch.equal(x["importance"], y["importance"]) and x["disentanglement"] == y["disentanglement"]
    assert not torch.equal(x["importance"], z["importance"])
    fa = dm.factor_vae_score((codes, grid), seed=1, num_train=100, num_eval=100, num_variance_estimate=200)
    fb = dm.factor_vae_score((codes, grid), seed=2, num_train=100, num_eval=100, num_variance_estimate=200)
    assert fa != fb


def test_clear_errors_for_bad_inputs():
    grid = torch.cartesian_prod(*[torch.arange(s) for s in SIZES])
    codes = grid.double()
    with pytest.raises(ValueError, match="codes have 1296 rows but factors 1295"):
        dm.CodeTable(codes, grid[:-1])
    with pytest.raises(ValueError, match="PCA step"):
        dm.CodeTable(torch.zeros(1296, 4, 8), grid)
    with pytest.raises(ValueError, match="integer factor values"):
        dm.CodeTable(codes, grid.double())
    with pytest.raises(ValueError, match="floating-point"):
        dm.CodeTable(grid, grid)
    with pytest.raises(ValueError, match="NaN or inf"):
        dm.CodeTable(torch.full((1296, 4), math.nan), grid)
    with pytest.raises(ValueError, match=r"\[N, groups, dims\]"):
        dm.fit_group_pca(torch.zeros(10, 4))
    pca = dm.fit_group_pca(torch.randn(10, 2, 3))
    with pytest.raises(ValueError, match="fitted on"):
        pca.transform(torch.randn(10, 3, 3))
    bad = dm.GeneratedCodes(lambda f: torch.zeros(f.shape[0], 2, 3), SIZES)
    with pytest.raises(ValueError, match="must return codes"):
        dm.factor_vae_score(bad, num_train=10, num_eval=10, num_variance_estimate=10)
    with pytest.raises(ValueError, match="batch_size"):
        dm.factor_vae_score((codes, grid), batch_size=1)
    with pytest.raises(TypeError, match="CodeSource"):
        dm.dci_scores(codes)
    with pytest.raises(ValueError, match="factor_sizes"):
        dm.GeneratedCodes(lambda f: f.double(), (3, 0))
