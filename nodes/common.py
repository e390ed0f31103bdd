"""Glue shared by the node adapters: input checks with clear messages, model folders, progress."""
from __future__ import annotations

import os

import torch

import comfy.model_management
import comfy.model_sampling
import comfy.utils
import folder_paths

CATEGORY = "disentangle"
LAMBDA_SCHEDULE = "LAMBDA_SCHEDULE"
INVERSION_TRAJECTORY = "INVERSION_TRAJECTORY"
LAMBDA_SCHEDULE_FOLDER = "lambda_schedules"


class InputError(ValueError):
    """A node input is not usable; the message names the input."""


def register_model_folder(name: str, extensions: set[str], extra_paths: tuple[str, ...] = ()) -> None:
    """Register ``models/<name>`` (and ``extra_paths``) with ``folder_paths``; extra_model_paths.yaml may add more."""
    wanted = [os.path.join(folder_paths.models_dir, name), *extra_paths]
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([], set())
    paths, exts = folder_paths.folder_names_and_paths[name]
    paths.extend(p for p in wanted if p not in paths)
    exts.update(extensions)


def free_save_path(folder_name: str, filename_prefix: str, extension: str) -> tuple[str, str]:
    """``(path, shown name)`` of the first ``<prefix>_NNNNN.<extension>`` not yet taken in the first folder
    registered as ``folder_name`` (subfolders in the prefix allowed, as SaveImage does): saving never overwrites."""
    folder = folder_paths.get_folder_paths(folder_name)[0]
    full_folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder)
    os.makedirs(full_folder, exist_ok=True)
    while True:
        filename = f"{name}_{counter:05}.{extension}"
        path = os.path.join(full_folder, filename)
        if not os.path.exists(path):
            return path, os.path.join(subfolder, filename) if subfolder else filename
        counter += 1


def check_steps(steps: int, name: str = "steps") -> None:
    if int(steps) < 1:
        raise InputError(f"{name} must be at least 1, got {steps}")


def check_conditioning(conditioning, name: str) -> None:
    if not isinstance(conditioning, list) or len(conditioning) == 0:
        raise InputError(f"{name}: the CONDITIONING is empty (connect a CLIP Text Encode output)")
    for entry in conditioning:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and hasattr(entry[0], "shape") and isinstance(entry[1], dict)):
            raise InputError(f"{name}: not a CONDITIONING (expected a list of [tensor, dict] pairs)")


def latent_channels(model) -> int:
    return int(model.get_model_object("latent_format").latent_channels)


def check_latent(model, latent: dict, name: str = "latent"):
    """The latent's samples, after checking they fit the model; returns the tensor."""
    if not isinstance(latent, dict) or "samples" not in latent:
        raise InputError(f"{name}: not a LATENT (no 'samples')")
    samples = latent["samples"]
    if samples.ndim != 4:
        raise InputError(f"{name}: expected an image latent [batch, channels, height, width], got shape {tuple(samples.shape)}")
    expected = latent_channels(model)
    if samples.shape[1] != expected:
        raise InputError(
            f"{name} has {samples.shape[1]} channels but the model expects {expected}: "
            "encode the image with this model's VAE"
        )
    if not torch.isfinite(samples).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return samples


def check_vp_model(model, what: str) -> None:
    """DDIM maths needs a variance-preserving (ε / v / EDM) model, not a flow-matching one."""
    sampling = model.get_model_object("model_sampling")
    if isinstance(sampling, comfy.model_sampling.CONST):
        raise InputError(f"model: {what} needs an ε- or v-prediction diffusion model; this is a flow-matching model")


def progress_callback(total: int):
    """``callback(i, ...)`` that advances a ComfyUI progress bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(total)

    def callback(i, *_):
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(i + 1, total)

    return callback
