"""Evaluation of the methods, plain torch, no ComfyUI import, never imported by ``nodes/``:
disentanglement metrics (``disentangle_metrics``: FactorVAE, DCI with a torch gradient-boosting
classifier, DisDiff's per-factor PCA, the benches' table rows) and the plain-autoencoder baseline
(``autoencoder_baseline``).
"""
