"""ComfyUI adapters: translate MODEL / CONDITIONING / LATENT into core's tensors and back."""
from . import avi, clip_loss, disdiff, inversion, lambda_optim, perceptual, schedules, toy_world
from .common import LAMBDA_SCHEDULE_FOLDER, register_model_folder

register_model_folder(LAMBDA_SCHEDULE_FOLDER, {".json", ".safetensors"})
register_model_folder(clip_loss.CLIP_LOSS_FOLDER, {".safetensors"})
register_model_folder(perceptual.LPIPS_FOLDER, {".safetensors"})
register_model_folder(avi.AVI_FOLDER, {".safetensors"})
register_model_folder(toy_world.TOY_WORLD_FOLDER, {".safetensors"}, extra_paths=(toy_world.PACK_WEIGHTS,))
register_model_folder(disdiff.DISDIFF_FOLDER, {".safetensors"}, extra_paths=(toy_world.PACK_WEIGHTS,))

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (inversion, schedules, lambda_optim, clip_loss, perceptual, toy_world, avi, disdiff):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
