"""Disentanglement metrics on data with discrete ground-truth factors: FactorVAE score, DCI, and the
per-factor PCA step DisDiff applies to vector-valued codes before both.

Plain torch (no sklearn, no scipy); the settings follow ``disentanglement_lib`` as the DisDiff
reference code binds them (``evaluate.py`` of ThomasMrY/DisDiff).

* **PCA step** (DisDiff Sec. 5.1, after Du et al. 2021): each factor's code z^c is a vector (e.g. 32
  channels); it is reduced to one scalar, its projection on the first principal component of z^c
  over the evaluated data set (mean removed). :func:`fit_group_pca`, :func:`pca_first_components`.
* **FactorVAE score** (Kim & Mnih 2018, Sec. 4): code dimensions are normalised by their standard
  deviation over the data (``num_variance_estimate`` = 10000 draws) and dimensions with std <
  ``prune_threshold`` (0.05) are dropped. One vote: pick a factor k, draw a batch of L = 64 points
  that share the value of factor k, and take d* = argmin_d Var_batch(z_d) / Var_data(z_d). The
  classifier maps each dimension d to the factor with most training votes (10000 votes); the score
  is its accuracy on 5000 fresh votes. :func:`factor_vae_score`.
* **DCI** (Eastwood & Williams 2018): per factor j a classifier predicts the factor from the codes;
  its feature importances give column j of R (codes × factors). With P_ij = R_ij / Σ_k R_ik,
  disentanglement D = Σ_i ρ_i (1 − H_K(P_i·)), ρ_i = Σ_j R_ij / Σ R (H_K: entropy in base K = number
  of factors); completeness C = Σ_j ρ_j (1 − H_D(P̃_·j)) with P̃ normalised per factor (base D =
  number of codes); informativeness = mean prediction accuracy on held-out points (as
  ``disentanglement_lib`` reports it; Eastwood & Williams state it as the prediction error, 1 − this).
  The regressors are **gradient-boosted trees**, as in ``disentanglement_lib`` and the DisDiff code
  (sklearn's ``GradientBoostingClassifier`` defaults: 100 stages, depth 3, learning rate 0.1,
  multinomial deviance, Friedman-MSE splits, Newton leaf values, impurity-decrease importances),
  implemented here exactly in torch (:func:`gradient_boosted_importance`; no subsampling, so the fit
  is deterministic; the seed only picks the data). One difference: two-class factors get two trees per
  stage (multinomial form) where sklearn grows one; the split importances are the same.
  10000 training and 5000 test points. :func:`dci_scores`.

Data come from a :class:`CodeSource`: :class:`CodeTable` (precomputed codes with their factor rows,
e.g. the encoded data set; batches that fix one factor are drawn among the rows with that value) or
:class:`GeneratedCodes` (a ``represent(factors) -> codes`` callable and the factor sizes; batches are
made by sampling factor rows and overwriting one column). All randomness comes from one
``torch.Generator`` seeded by ``seed``: same seed, same data, same score.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import Tensor

# Settings of disentanglement_lib as bound by DisDiff's evaluate.py.
FACTOR_VAE_DEFAULTS = {"batch_size": 64, "num_train": 10000, "num_eval": 5000, "num_variance_estimate": 10000,
                       "prune_threshold": 0.05}
DCI_DEFAULTS = {"num_train": 10000, "num_test": 5000}
GBT_DEFAULTS = {"stages": 100, "learning_rate": 0.1, "max_depth": 3}


# --------------------------------------------------------------------------------------------
# The PCA step (DisDiff: vector codes → one scalar per factor)
# --------------------------------------------------------------------------------------------

class GroupPCA(NamedTuple):
    """First principal component of each code group: ``mean`` [G, C], ``direction`` [G, C] (unit,
    largest-magnitude entry positive), ``explained_variance_ratio`` [G]."""
    mean: Tensor
    direction: Tensor
    explained_variance_ratio: Tensor

    def transform(self, codes: Tensor) -> Tensor:
        """Scalars [N, G]: the projection of each group's mean-removed code on its direction."""
        codes = check_group_codes(codes, "codes")
        if codes.shape[1:] != self.mean.shape:
            raise ValueError(f"codes have groups × dims {tuple(codes.shape[1:])}, the PCA was fitted on "
                             f"{tuple(self.mean.shape)}")
        mean, direction = self.mean.to(codes.device), self.direction.to(codes.device)
        return ((codes.double() - mean) * direction).sum(-1)


def check_group_codes(codes, name: str = "codes") -> Tensor:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.ndim != 3:
        raise ValueError(f"{name} must have shape [N, groups, dims] (e.g. [N, n_factors, 32]), got {tuple(codes.shape)}")
    if codes.shape[0] < 2 or codes.shape[1] < 1 or codes.shape[2] < 1:
        raise ValueError(f"{name} needs at least 2 points, 1 group and 1 dim, got {tuple(codes.shape)}")
    if not codes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {codes.dtype}")
    return codes


def fit_group_pca(codes: Tensor, chunk: int = 65536) -> GroupPCA:
    """Per-group PCA (first component) of vector codes [N, G, C], in float64 (DisDiff's
    ``PCA(n_components=1)`` per factor code, fitted on the whole evaluated data set)."""
    codes = check_group_codes(codes)
    if not bool(torch.isfinite(codes).all()):
        raise ValueError("codes contain NaN or inf")
    n, g, c = codes.shape
    mean = codes.double().mean(0)
    cov = torch.zeros(g, c, c, dtype=torch.float64, device=codes.device)
    for start in range(0, n, chunk):
        x = codes[start:start + chunk].double() - mean
        cov += torch.einsum("ngc,ngd->gcd", x, x)
    cov /= max(n - 1, 1)
    values, vectors = torch.linalg.eigh(cov)  # ascending
    direction = vectors[..., -1]  # [G, C]
    pick = direction.abs().argmax(-1, keepdim=True)
    direction = torch.where(direction.gather(-1, pick) < 0, -direction, direction)
    total = values.clamp(min=0).sum(-1)
    ratio = torch.where(total > 0, values[..., -1].clamp(min=0) / total.clamp(min=1e-300), torch.zeros_like(total))
    return GroupPCA(mean, direction, ratio)


def pca_first_components(codes: Tensor) -> Tensor:
    """Vector codes [N, G, C] → scalars [N, G] (fit and transform on the same codes, as DisDiff)."""
    return fit_group_pca(codes).transform(codes)


# --------------------------------------------------------------------------------------------
# Where codes come from
# --------------------------------------------------------------------------------------------

class CodeSource:
    """Draws (codes [n, D], factors [n, F]) and batches that share one factor's value."""
    num_factors: int

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def draw_fixed(self, votes: int, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(codes [votes, batch, D], factor index [votes]): each vote's batch shares that factor's value."""
        raise NotImplementedError


def _check_factors(factors, name: str = "factors") -> Tensor:
    if not isinstance(factors, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(factors).__name__}")
    if factors.ndim != 2 or factors.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, n_factors], got {tuple(factors.shape)}")
    if factors.is_floating_point() or factors.is_complex() or factors.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer factor values, got {factors.dtype}")
    if factors.numel() and int(factors.min()) < 0:
        raise ValueError(f"{name} must be ≥ 0")
    return factors.long()


def _check_codes_2d(codes, name: str = "codes") -> Tensor:
    if not isinstance(codes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, code_dims] (apply the PCA step to [N, groups, dims] "
                         f"codes first), got {tuple(codes.shape)}")
    if not codes.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {codes.dtype}")
    if not bool(torch.isfinite(codes).all()):
        raise ValueError(f"{name} contain NaN or inf")
    return codes


class CodeTable(CodeSource):
    """Precomputed codes [N, D] and their factor rows [N, F] (e.g. a whole encoded data set).

    Points are drawn uniformly with replacement; a batch that fixes factor k takes the value of
    factor k of one uniformly drawn row, then draws its points among the rows with that value. On a
    full factor grid this is the sampling of ``disentanglement_lib``.
    """

    def __init__(self, codes: Tensor, factors: Tensor):
        codes = _check_codes_2d(codes)
        factors = _check_factors(factors)
        if codes.shape[0] != factors.shape[0]:
            raise ValueError(f"codes have {codes.shape[0]} rows but factors {factors.shape[0]}")
        if codes.shape[0] < 2:
            raise ValueError("a code table needs at least 2 rows")
        self.codes, self.factors = codes, factors.cpu()
        self.num_factors = factors.shape[1]
        # rows sorted by each factor's value; start and count of each value's run
        self._order = torch.argsort(self.factors, dim=0, stable=True).T.contiguous()  # [F, N]
        sizes = int(self.factors.max()) + 1
        counts = torch.stack([torch.bincount(self.factors[:, k], minlength=sizes) for k in range(self.num_factors)])
        self._counts = counts  # [F, max value + 1]
        self._starts = torch.cumsum(counts, 1) - counts

    def _gather(self, rows: Tensor) -> Tensor:
        return self.codes[rows.to(self.codes.device)]

    def draw(self, n, generator):
        rows = torch.randint(self.codes.shape[0], (n,), generator=generator)
        return self._gather(rows), self.factors[rows]

    def draw_fixed(self, votes, batch, generator):
        k = torch.randint(self.num_factors, (votes,), generator=generator)
        anchor = torch.randint(self.codes.shape[0], (votes,), generator=generator)
        value = self.factors[anchor, k]
        count, start = self._counts[k, value], self._starts[k, value]
        offset = (torch.rand(votes, batch, generator=generator, dtype=torch.float64) * count[:, None]).long()
        offset = torch.minimum(offset, count[:, None] - 1)
        rows = self._order[k[:, None], start[:, None] + offset]
        return self._gather(rows), k


class GeneratedCodes(CodeSource):
    """Codes made on demand: ``represent(factors [n, F] long) -> codes [n, D]`` (e.g. render, encode,
    PCA), with independent uniform factors of ``factor_sizes`` unless ``sample_factors(n, generator)``
    is given. ``chunk`` bounds the rows per ``represent`` call."""

    def __init__(self, represent: Callable[[Tensor], Tensor], factor_sizes,
                 sample_factors: Callable[[int, torch.Generator], Tensor] | None = None, chunk: int = 8192):
        sizes = tuple(int(s) for s in factor_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"factor_sizes must be positive, got {factor_sizes}")
        self.represent, self.factor_sizes, self.num_factors = represent, sizes, len(sizes)
        self._sample = sample_factors
        self.chunk = int(chunk)

    def _factors(self, n, generator):
        if self._sample is not None:
            f = _check_factors(self._sample(n, generator), "sample_factors(...)")
            if f.shape != (n, self.num_factors):
                raise ValueError(f"sample_factors({n}) returned shape {tuple(f.shape)}, expected {(n, self.num_factors)}")
            return f
        return torch.stack([torch.randint(s, (n,), generator=generator) for s in self.factor_sizes], 1)

    def _codes(self, factors):
        parts = []
        for start in range(0, factors.shape[0], self.chunk):
            part = factors[start:start + self.chunk]
            c = self.represent(part)
            if not isinstance(c, Tensor) or c.ndim != 2 or c.shape[0] != part.shape[0]:
                raise ValueError(f"represent(factors [{part.shape[0]}, F]) must return codes [{part.shape[0]}, D], got "
                                 f"{tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__}")
            parts.append(c)
        return _check_codes_2d(torch.cat(parts), "represent(...) codes")

    def draw(self, n, generator):
        factors = self._factors(n, generator)
        return self._codes(factors), factors

    def draw_fixed(self, votes, batch, generator):
        k = torch.randint(self.num_factors, (votes,), generator=generator)
        factors = self._factors(votes * batch, generator).view(votes, batch, -1)
        first = factors[torch.arange(votes), 0, k]
        factors[torch.arange(votes)[:, None], torch.arange(batch)[None], k[:, None]] = first[:, None]
        codes = self._codes(factors.view(votes * batch, -1))
        return codes.view(votes, batch, -1), k


def as_source(source) -> CodeSource:
    """A CodeSource, or a (codes, factors) pair → CodeTable."""
    if isinstance(source, CodeSource):
        return source
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return CodeTable(*source)
    raise TypeError("expected a CodeSource (CodeTable / GeneratedCodes) or a (codes, factors) pair")


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_count(value, name, minimum=1):
    if int(value) < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# FactorVAE score
# --------------------------------------------------------------------------------------------

def factor_vae_score(source, seed: int = 0, batch_size: int = 64, num_train: int = 10000, num_eval: int = 5000,
                     num_variance_estimate: int = 10000, prune_threshold: float = 0.05,
                     votes_per_chunk: int = 1024) -> dict:
    """FactorVAE score (Kim & Mnih 2018) of scalar codes; see the module docstring.

    Returns ``{"score": eval accuracy, "train_accuracy", "eval_accuracy", "num_active_dims"}``; the
    score is 0 when no code dimension has std ≥ ``prune_threshold``.
    """
    source = as_source(source)
    batch_size = _check_count(batch_size, "batch_size", 2)
    num_train, num_eval = _check_count(num_train, "num_train"), _check_count(num_eval, "num_eval")
    num_variance_estimate = _check_count(num_variance_estimate, "num_variance_estimate", 2)
    g = _generator(seed)
    codes, _ = source.draw(num_variance_estimate, g)
    codes = _check_codes_2d(codes).double()
    global_var = codes.var(0, unbiased=False)
    active = global_var.sqrt() >= prune_threshold
    num_active = int(active.sum())
    if num_active == 0:
        return {"score": 0.0, "train_accuracy": 0.0, "eval_accuracy": 0.0, "num_active_dims": 0}
    active_var = global_var[active]

    def votes(n):
        table = torch.zeros(source.num_factors, num_active, dtype=torch.float64)
        done = 0
        while done < n:
            m = min(votes_per_chunk, n - done)
            batch_codes, k = source.draw_fixed(m, batch_size, g)
            local_var = batch_codes.double()[..., active.to(batch_codes.device)].var(1, unbiased=True)
            d = (local_var / active_var.to(local_var.device)).argmin(-1).cpu()
            table.index_put_((k, d), torch.ones(m, dtype=torch.float64), accumulate=True)
            done += m
        return table

    train, evaluation = votes(num_train), votes(num_eval)
    classifier = train.argmax(0)  # the factor each active dimension votes for
    dims = torch.arange(num_active)
    train_acc = float(train[classifier, dims].sum() / train.sum())
    eval_acc = float(evaluation[classifier, dims].sum() / evaluation.sum())
    return {"score": eval_acc, "train_accuracy": train_acc, "eval_accuracy": eval_acc, "num_active_dims": num_active}


# --------------------------------------------------------------------------------------------
# Gradient-boosted trees (sklearn GradientBoostingClassifier defaults), for DCI importances
# --------------------------------------------------------------------------------------------

def _tree_leaves(x: Tensor, feature: Tensor, threshold: Tensor, depth: int) -> Tensor:
    """Leaf index [n, K] of each point in K complete binary trees (heap arrays [K, 2^depth − 1])."""
    n, k_trees = x.shape[0], feature.shape[0]
    node = torch.zeros(n, k_trees, dtype=torch.long, device=x.device)
    for level in range(depth):
        heap = node + (2 ** level - 1)
        f = feature.gather(1, heap.T).T  # [n, K]
        t = threshold.gather(1, heap.T).T
        node = 2 * node + (x.gather(1, f) > t).long()
    return node


def _best_splits(order, last_of_tie, node, member, weighted, count, total, max_block):
    """Best Friedman-MSE split of every node of K trees at one level: (gain, feature, sorted position)
    each [K, M]; gain −1 where no split separates two distinct values.

    For each feature, the points are scanned in sorted order; a candidate split lies right after a
    point, for that point's node, with n_l, g_l the node's count and residual sum up to it. The gain
    n_l·n_r/n · (mean_l − mean_r)² = (g_l·n − g·n_l)² / (n·n_l·n_r) is the impurity decrease.
    """
    d, n = order.shape
    k, m = count.shape
    device = order.device
    best = torch.full((k * m,), -1.0, dtype=torch.float64, device=device)
    best_pos = torch.zeros(k * m, dtype=torch.long, device=device)
    trees = torch.arange(k, device=device)
    step = max(1, max_block // max(1, n * k * m))
    for f0 in range(0, d, step):
        o = order[f0:f0 + step]  # [f, n]
        f = o.shape[0]
        own = node[o]  # [f, n, K]: node of the point at each sorted position
        nl_all = member[o].cumsum(1)  # [f, n, K, M]
        nl = nl_all.gather(-1, own[..., None]).squeeze(-1)
        gl = weighted[o].cumsum(1).gather(-1, own[..., None]).squeeze(-1)
        n_node, g_node = count[trees, own], total[trees, own]
        nr = n_node - nl
        valid = nr > 0.5
        if last_of_tie is not None:  # split only after the node's last point of a run of equal values
            end = last_of_tie[f0:f0 + f]
            nl_end = nl_all.gather(1, end[:, :, None, None].expand_as(nl_all)).gather(-1, own[..., None]).squeeze(-1)
            valid &= nl_end == nl
        gain = (gl * n_node - g_node * nl) ** 2 / (n_node * nl * nr).clamp(min=1e-300)
        gain = torch.where(valid, gain, torch.full_like(gain, -1.0))
        key = (trees * m + own).flatten()
        chunk_best = torch.full_like(best, -1.0).scatter_reduce(0, key, gain.flatten(), "amax")
        pos = (torch.arange(f, device=device)[:, None, None] * n + torch.arange(n, device=device)[None, :, None]).expand_as(own)
        hit = (gain.flatten() == chunk_best[key]) & valid.flatten()
        chunk_pos = torch.full_like(best_pos, f * n).scatter_reduce(0, key[hit], pos.flatten()[hit], "amin")
        better = chunk_best > best
        best = torch.where(better, chunk_best, best)
        best_pos = torch.where(better, chunk_pos + f0 * n, best_pos)
    return best.view(k, m), (best_pos // n).view(k, m), (best_pos % n).view(k, m)


def gradient_boosted_importance(x_train: Tensor, y_train: Tensor, x_test: Tensor | None = None,
                                stages: int = 100, learning_rate: float = 0.1, max_depth: int = 3,
                                max_block: int = 1 << 24) -> tuple[Tensor, Tensor, Tensor | None]:
    """Fit a multinomial gradient-boosted tree classifier and return (feature importances [D]
    (sum 1, or all 0 if no tree split), train predictions [n], test predictions [m] or None).

    sklearn's ``GradientBoostingClassifier()`` algorithm: raw scores start at the log class priors;
    each stage fits one depth-``max_depth`` regression tree per class to the residual y_k − p_k with
    exact greedy Friedman-MSE splits (threshold midway between neighbouring values), sets each leaf to
    the Newton step (K−1)/K · Σ r / Σ p(1 − p), and adds ``learning_rate`` × the tree. A feature's
    importance is its total impurity decrease per tree (over the root's count), averaged over the
    trees that split, then normalised. Deterministic (no subsampling, ties go to the lower feature
    and position). ``max_block`` bounds the elements of one split-search tensor (memory).
    """
    x = x_train.double()
    n, d = x.shape
    classes, y = torch.unique(y_train.to(x.device), return_inverse=True)
    k = classes.numel()
    xt = None if x_test is None else x_test.to(x.device).double()
    if k == 1:
        return (torch.zeros(d, dtype=torch.float64), classes[y].cpu(),
                None if xt is None else classes[0].expand(xt.shape[0]).cpu())
    onehot = torch.nn.functional.one_hot(y, k).double()
    raw = torch.log(onehot.mean(0)).expand(n, k).clone()
    raw_test = None if xt is None else torch.log(onehot.mean(0)).expand(xt.shape[0], k).clone()
    order = torch.argsort(x, dim=0).T.contiguous()  # [D, n]
    xs = x.gather(0, order.T).T  # [D, n] sorted values
    boundary = torch.zeros(d, n, dtype=torch.bool, device=x.device)
    boundary[:, :-1] = xs[:, :-1] < xs[:, 1:]  # a split after position i separates distinct values
    last_of_tie = None  # [D, n]: the last sorted position holding the same value (only if values repeat)
    if not bool(boundary[:, :-1].all()):
        dense_rank = torch.cat([torch.zeros(d, 1, dtype=torch.long, device=x.device), boundary[:, :-1].long().cumsum(1)], 1)
        last_of_tie = torch.searchsorted(dense_rank, dense_rank, right=True) - 1
    n_heap = 2 ** max_depth - 1
    importance_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
    relevant_trees = torch.zeros((), dtype=torch.float64, device=x.device)  # trees whose root split (no host sync)
    for _ in range(stages):
        p = torch.softmax(raw, 1)
        residual = onehot - p
        node = torch.zeros(n, k, dtype=torch.long, device=x.device)
        feature = torch.zeros(k, n_heap, dtype=torch.long, device=x.device)
        threshold = torch.full((k, n_heap), math.inf, dtype=torch.float64, device=x.device)
        tree_importance = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        root_split = torch.zeros(k, dtype=torch.bool, device=x.device)
        for level in range(max_depth):
            m = 2 ** level
            member = torch.nn.functional.one_hot(node, m).double()  # [n, K, M]
            weighted = member * residual[..., None]
            count, total = member.sum(0), weighted.sum(0)  # [K, M]
            best, best_f, best_i = _best_splits(order, last_of_tie, node, member, weighted, count, total, max_block)
            split = best > 1e-12 * count.clamp(min=1)
            v = xs[best_f, best_i]  # [K, M]
            xf = x.gather(1, best_f.reshape(1, -1).expand(n, -1)).view(n, k, m)
            above = torch.where((member > 0) & (xf > v), xf, torch.full_like(xf, math.inf))
            nxt = above.min(0).values
            thr = torch.where(split & torch.isfinite(nxt), (v + nxt) / 2, torch.full_like(v, math.inf))
            heap = slice(m - 1, 2 * m - 1)
            feature[:, heap] = torch.where(split, best_f, torch.zeros_like(best_f))
            threshold[:, heap] = thr
            tree_importance.scatter_add_(1, best_f, torch.where(split, best, torch.zeros_like(best)) / n)
            if level == 0:
                root_split = split[:, 0]
            node = 2 * node + (x.gather(1, feature[:, heap].gather(1, node.T).T) > thr.gather(1, node.T).T).long()
        leaves = torch.nn.functional.one_hot(node, 2 ** max_depth).double()  # [n, K, L]
        numerator = (leaves * residual[..., None]).sum(0)
        denominator = (leaves * (p * (1 - p))[..., None]).sum(0)
        leaf_value = torch.where(denominator > 1e-150, (k - 1) / k * numerator / denominator.clamp(min=1e-150),
                                 torch.zeros_like(numerator))  # [K, L]
        raw += learning_rate * leaf_value.gather(1, node.T).T
        if raw_test is not None:
            test_leaves = _tree_leaves(xt, feature, threshold, max_depth)
            raw_test += learning_rate * leaf_value.gather(1, test_leaves.T).T
        importance_sum += (tree_importance * root_split[:, None]).sum(0)
        relevant_trees += root_split.sum()
    importance = importance_sum / relevant_trees.clamp(min=1)
    if importance.sum() > 0:
        importance = importance / importance.sum()
    pred_train = classes[raw.argmax(1)].cpu()
    pred_test = None if raw_test is None else classes[raw_test.argmax(1)].cpu()
    return importance.cpu(), pred_train, pred_test


# --------------------------------------------------------------------------------------------
# DCI
# --------------------------------------------------------------------------------------------

def _one_minus_entropy(p: Tensor, dim: int) -> Tensor:
    """1 − H(p / Σp) in base ``p.shape[dim]`` along ``dim`` (+1e-11 as disentanglement_lib); 1 if that size is 1."""
    size = p.shape[dim]
    if size == 1:
        return torch.ones(p.shape[1 - dim], dtype=torch.float64)
    q = p + 1e-11
    q = q / q.sum(dim, keepdim=True)
    return 1 + (q * q.log()).sum(dim) / math.log(size)


def dci_from_importance(importance: Tensor) -> dict:
    """Disentanglement and completeness of an importance matrix R [codes, factors] (R ≥ 0)."""
    r = importance.double().cpu()
    if r.ndim != 2 or min(r.shape) < 1:
        raise ValueError(f"importance must have shape [codes, factors], got {tuple(r.shape)}")
    if bool((r < 0).any()):
        raise ValueError("importance must be non-negative")
    weights_r = r if r.sum() > 0 else torch.ones_like(r)
    code_weight = weights_r.sum(1) / weights_r.sum()
    factor_weight = weights_r.sum(0) / weights_r.sum()
    d = float((_one_minus_entropy(r, 1) * code_weight).sum())
    c = float((_one_minus_entropy(r, 0) * factor_weight).sum())
    return {"disentanglement": d, "completeness": c}


def dci_scores(source, seed: int = 0, num_train: int = 10000, num_test: int = 5000, gbt_stages: int = 100,
               learning_rate: float = 0.1, max_depth: int = 3, device=None) -> dict:
    """DCI (Eastwood & Williams 2018) with gradient-boosted-tree importances; see the module docstring.

    Returns disentanglement, completeness, informativeness (= test accuracy averaged over factors),
    informativeness_train, per-factor test accuracies and the importance matrix [codes, factors].
    ``device``: where the trees are grown (default: the codes' device).
    """
    source = as_source(source)
    num_train, num_test = _check_count(num_train, "num_train", 2), _check_count(num_test, "num_test")
    _check_count(gbt_stages, "gbt_stages")
    g = _generator(seed)
    x_train, y_train = source.draw(num_train, g)
    x_test, y_test = source.draw(num_test, g)
    x_train, x_test = _check_codes_2d(x_train), _check_codes_2d(x_test)
    if device is not None:
        x_train, x_test = x_train.to(device), x_test.to(device)
    n_codes, n_factors = x_train.shape[1], y_train.shape[1]
    importance = torch.zeros(n_codes, n_factors, dtype=torch.float64)
    acc_train, acc_test = [], []
    for j in range(n_factors):
        imp, pred_train, pred_test = gradient_boosted_importance(
            x_train, y_train[:, j], x_test, stages=gbt_stages, learning_rate=learning_rate, max_depth=max_depth)
        importance[:, j] = imp
        acc_train.append(float((pred_train == y_train[:, j].cpu()).double().mean()))
        acc_test.append(float((pred_test == y_test[:, j].cpu()).double().mean()))
    out = dci_from_importance(importance)
    out.update(informativeness=sum(acc_test) / n_factors, informativeness_train=sum(acc_train) / n_factors,
               accuracy_per_factor=acc_test, importance=importance)
    return out


# --------------------------------------------------------------------------------------------
# The factor world: score any image encoder as DisDiff is scored
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_factor_world(encode_images: Callable[[Tensor], Tensor], factors: Tensor, image_size: int = 64,
                        batch_size: int = 1024, device=None, groups: int | None = None) -> Tensor:
    """Codes [N, groups, dims] (float32, CPU) of the factor-world renders of ``factors`` [N, 6].

    ``encode_images(images [B, 3, S, S] in [0, 1] on ``device``)`` may return [B, groups, dims] or
    [B, D]; a 2-D code is split into ``groups`` equal groups (default: one group per dimension).
    """
    from ..toy_world import factor_world as fw
    factors = _check_factors(factors)
    parts = []
    for start in range(0, factors.shape[0], int(batch_size)):
        rows = factors[start:start + int(batch_size)]
        images = fw.render(rows) if image_size == fw.IMAGE_SIZE else fw.render_at(rows, image_size)
        if device is not None:
            images = images.to(device, non_blocking=True)
        codes = encode_images(images)
        if not isinstance(codes, Tensor) or codes.shape[0] != rows.shape[0] or codes.ndim not in (2, 3):
            raise ValueError(f"encode_images must return codes [B, groups, dims] or [B, D] for B = {rows.shape[0]}, "
                             f"got {tuple(codes.shape) if isinstance(codes, Tensor) else type(codes).__name__}")
        if codes.ndim == 2:
            g = codes.shape[1] if groups is None else int(groups)
            if codes.shape[1] % g:
                raise ValueError(f"a code of {codes.shape[1]} dims cannot be split into {g} groups")
            codes = codes.view(codes.shape[0], g, -1)
        elif groups is not None and codes.shape[1] != int(groups):
            raise ValueError(f"encode_images returned {codes.shape[1]} code groups, expected {groups}")
        parts.append(codes.float().cpu())
    return torch.cat(parts)


def evaluate_encoder(encode_images: Callable[[Tensor], Tensor], seed: int = 0, *, eval_size: int | None = None,
                     image_size: int = 64, batch_size: int = 1024, device=None, groups: int | None = None,
                     metric_device=None, factor_vae: dict | None = None, dci: dict | None = None) -> dict:
    """FactorVAE and DCI of an image encoder on the factor world, after DisDiff's PCA step.

    The evaluated set is the full factor grid (480,000 scenes; DisDiff encodes all of Shapes3D) or,
    with ``eval_size``, that many distinct rows drawn with ``seed``. Each code group [N, dims] is
    reduced to its first principal component over that set, then both metrics run on the
    [N, groups] scalars with ``seed`` and the settings of :data:`FACTOR_VAE_DEFAULTS` /
    :data:`DCI_DEFAULTS` (override with ``factor_vae`` / ``dci`` dicts; ``dci`` may hold
    ``gbt_stages``). ``device``: where images go for ``encode_images``; ``metric_device``: where
    the trees are grown (e.g. "cuda"). Returns the headline numbers and the full metric dicts.
    """
    import time
    from ..toy_world import factor_world as fw
    t0 = time.perf_counter()
    if eval_size is None:
        factors = fw.factor_grid()
    else:
        total = math.prod(fw.FACTOR_SIZES)
        if not 2 <= int(eval_size) <= total:
            raise ValueError(f"eval_size must lie in [2, {total}], got {eval_size}")
        factors = fw.factor_grid()[torch.randperm(total, generator=_generator(seed))[:int(eval_size)]]
    codes = encode_factor_world(encode_images, factors, image_size, batch_size, device, groups)
    pca = fit_group_pca(codes)
    scalars = pca.transform(codes)
    t_encode = time.perf_counter() - t0
    if metric_device is not None:
        scalars = scalars.to(metric_device)
    table = CodeTable(scalars, factors)
    fv = factor_vae_score(table, seed=seed, **{**FACTOR_VAE_DEFAULTS, **(factor_vae or {})})
    d = dci_scores(table, seed=seed, **{**DCI_DEFAULTS, **(dci or {})})
    return {
        "factor_vae": fv["score"], "dci_disentanglement": d["disentanglement"], "dci_completeness": d["completeness"],
        "dci_informativeness": d["informativeness"], "num_active_dims": fv["num_active_dims"],
        "pca_explained_variance": pca.explained_variance_ratio.tolist(), "eval_size": int(factors.shape[0]),
        "code_shape": list(codes.shape[1:]), "seconds_encode": t_encode,
        "seconds_metrics": time.perf_counter() - t0 - t_encode,
        "factor_vae_details": fv, "dci_details": {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in d.items()},
    }


def score_group_codes(codes: Tensor, factors: Tensor, seed: int = 0, device=None) -> dict:
    """DisDiff's protocol on vector codes [M, N, D] of scenes with factor rows [M, F]: the PCA step,
    then FactorVAE and DCI with disentanglement_lib's settings. Returns the four scores, the PCA's
    explained variance per code and the DCI importance matrix."""
    pca = fit_group_pca(codes.float())
    scalars = pca.transform(codes.float())
    if device is not None:
        scalars = scalars.to(device)
    table = CodeTable(scalars, factors.long())
    fv = factor_vae_score(table, seed=seed, **FACTOR_VAE_DEFAULTS)
    d = dci_scores(table, seed=seed, **DCI_DEFAULTS)
    return {"factor_vae": fv["score"], "dci_disentanglement": d["disentanglement"],
            "dci_completeness": d["completeness"], "dci_informativeness": d["informativeness"],
            "pca_explained_variance": [round(float(v), 3) for v in pca.explained_variance_ratio],
            "importance": d["importance"].tolist()}


# --------------------------------------------------------------------------------------------
# Table rows (bench/disentangle_metrics.py, bench/disdiff_metrics.py)
# --------------------------------------------------------------------------------------------

COLUMNS = (("factor_vae", "FactorVAE"), ("dci_disentanglement", "DCI D"), ("dci_completeness", "DCI C"),
           ("dci_informativeness", "DCI I (acc)"))


def mean_std(values) -> str:
    """"mean ± std" of the values to 3 decimals (std 0 for one value, "—" for none)."""
    import statistics
    values = [float(v) for v in values]
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def summary_row(name: str, results: list[dict], extra: dict | None = None) -> list:
    """One table row: name, seeds, mean ± std of each metric of :data:`COLUMNS` (and of ``extra`` lists)."""
    row = [name, len(results)] + [mean_std([r[key] for r in results]) for key, _ in COLUMNS]
    return row + [mean_std(v) for v in (extra or {}).values()]

