"""ComfyUI-Disentangle: edit one attribute of an image with the disentanglement that
pretrained diffusion models already have.

ComfyUI loads this folder as a package (module name = folder path); everything inside uses
relative imports. ``core/`` holds the algorithms (plain torch), ``nodes/`` the ComfyUI adapters.
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"  # web/js/templates.js: the template browser shows workflows/index.json

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
