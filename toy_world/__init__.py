"""The toy world, plain torch, no ComfyUI import: the factor-world data set with six known factors
(``factor_world``) and the shipped factor classifiers that judge generated images (``factor_judges``).

The node pack itself imports it only in ``nodes/toy_world.py`` (the toy world's loader and scene
node); the benches, scripts/ and evaluation/ use it to measure the methods with ground truth.
"""
