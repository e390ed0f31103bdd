"""ComfyUI adapters: translate MODEL / CONDITIONING / LATENT into core's tensors and back."""
from . import inversion, schedules
from .common import LAMBDA_SCHEDULE_FOLDER, register_model_folder

register_model_folder(LAMBDA_SCHEDULE_FOLDER, {".json", ".safetensors"})

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (inversion, schedules):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
