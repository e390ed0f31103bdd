"""LAMBDA_SCHEDULE nodes: make, load, save, draw, and mix conditioning with a schedule."""
from __future__ import annotations

import os

import comfy.samplers
import folder_paths
import numpy as np
import safetensors.torch
import torch

from ..core import lambda_schedule as ls
from ..core.conditioning import check_embedding_pair, mix_embeddings, mix_pooled
from .comfy_boundary import sampling_sigmas, step_progress_for_model
from .common import (CATEGORY, LAMBDA_SCHEDULE, LAMBDA_SCHEDULE_FOLDER, InputError, check_conditioning, check_finite,
                     check_int, core_input_errors, free_save_path, load_safetensors, read_safetensors_header, writing)
from .plot import draw_schedule

SCHEDULE_CATEGORY = f"{CATEGORY}/lambda"
VALUE = {"min": -10.0, "max": 10.0, "step": 0.01}
SCHEDULE_TOOLTIP = "λ over diffusion time: the weight of the styled prompt, c_t = λ_t·styled + (1−λ_t)·neutral."
MAX_SCHEDULE_JSON_BYTES = 1 << 20   # a 1000-knot schedule is ~55 kB of JSON
MAX_STEPS = ls.MAX_STEP_VALUES
PLOT_WIDTH, PLOT_HEIGHT = (128, 4096), (96, 4096)


class _ScheduleMaker:
    """Shared outputs of the nodes that make a LAMBDA_SCHEDULE."""

    CATEGORY = SCHEDULE_CATEGORY
    RETURN_TYPES = (LAMBDA_SCHEDULE,)
    OUTPUT_TOOLTIPS = (SCHEDULE_TOOLTIP,)
    FUNCTION = "make"


class LambdaScheduleConstant(_ScheduleMaker):
    DESCRIPTION = "λ_t = value at every step (value 1 = the styled prompt alone, 0 = the neutral prompt alone)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0, **VALUE, "tooltip": "λ at every step: 1 = the styled prompt alone, 0 = the neutral prompt alone, in between a mix; outside [0, 1] extrapolates."})}}

    def make(self, value):
        return (ls.constant(check_finite("value", value)),)


class LambdaScheduleSwitch(_ScheduleMaker):
    DESCRIPTION = (
        "Neutral prompt for the first steps, styled prompt after (Wu et al. Sec. 3.2: early steps fix "
        "the layout, later steps the attribute). The switch stays at the same diffusion time for "
        "other step counts."
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS, "tooltip": "Step count the switch step refers to."}),
            "switch_step": ("INT", {"default": 20, "min": 0, "max": MAX_STEPS, "tooltip": "Number of steps that use value_before."}),
            "value_before": ("FLOAT", {"default": 0.0, **VALUE, "tooltip": "λ for the first switch_step steps (0 = the neutral prompt: it lays out the image)."}),
            "value_after": ("FLOAT", {"default": 1.0, **VALUE, "tooltip": "λ for the remaining steps (1 = the styled prompt: it adds the attribute)."}),
        }}

    def make(self, steps, switch_step, value_before, value_after):
        steps, switch_step = check_int("steps", steps, 1, MAX_STEPS), check_int("switch_step", switch_step)
        before, after = check_finite("value_before", value_before), check_finite("value_after", value_after)
        with core_input_errors("switch_step", "steps"):   # 0 ≤ switch_step ≤ steps: core's check
            return (ls.switch_at_step(steps, switch_step, before, after),)


class LambdaScheduleRamp(_ScheduleMaker):
    DESCRIPTION = "start_value up to start_step, a linear ramp to end_value at end_step, constant after."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "steps": ("INT", {"default": 50, "min": 1, "max": MAX_STEPS, "tooltip": "Step count start_step and end_step refer to; the ramp stays at the same diffusion time for other step counts."}),
            "start_value": ("FLOAT", {"default": 0.0, **VALUE, "tooltip": "λ up to start_step."}),
            "end_value": ("FLOAT", {"default": 1.0, **VALUE, "tooltip": "λ from end_step on."}),
            "start_step": ("INT", {"default": 0, "min": 0, "max": MAX_STEPS, "tooltip": "Step where the linear ramp from start_value begins."}),
            "end_step": ("INT", {"default": -1, "min": -1, "max": MAX_STEPS, "tooltip": "Step where the ramp reaches end_value (-1 = the last step)."}),
        }}

    def make(self, steps, start_value, end_value, start_step, end_step):
        steps = check_int("steps", steps, 1, MAX_STEPS)
        start_step, end_step = check_int("start_step", start_step), check_int("end_step", end_step, -1)  # -1: the last
        start_value, end_value = check_finite("start_value", start_value), check_finite("end_value", end_value)
        with core_input_errors("start_step", "end_step"):   # 0 ≤ start_step ≤ end_step ≤ steps − 1: core's check
            return (ls.linear_ramp(steps, start_value, end_value, start_step, None if end_step == -1 else end_step),)


class LambdaScheduleFromList(_ScheduleMaker):
    DESCRIPTION = "One λ per step, as a comma-separated list (e.g. the 50 weights of a learned schedule)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("STRING", {"default": "0, 0, 0, 1, 1, 1", "multiline": True, "tooltip": f"At most {MAX_STEPS} values. λ_1, …, λ_N: one weight of the styled prompt per step, comma-separated (N values = N knots at DDIM-uniform spacing; other step counts read the nearest knot)."})}}

    def make(self, values):
        with core_input_errors("values"):
            return (ls.parse_value_list(values),)


def _schedule_files():
    return folder_paths.get_filename_list(LAMBDA_SCHEDULE_FOLDER)


def load_schedule_file(path: str, shown: str) -> ls.LambdaSchedule:
    """A schedule file read with its size checked first (a crafted file cannot make the prompt allocate)."""
    if path.lower().endswith(".safetensors"):
        header = read_safetensors_header(path, shown, "schedule_name")
        for key in ("progress", "values"):
            shape = header.shape(key)
            if shape is not None and (len(shape) != 1 or shape[0] > ls.MAX_KNOTS):
                raise ValueError(f"'{key}' must be a list of at most {ls.MAX_KNOTS} values, got shape {list(shape)}")
        tensors, metadata = load_safetensors(path, shown, "schedule_name", header=header)
        return ls.LambdaSchedule.from_tensors(tensors, metadata)
    if os.path.getsize(path) > MAX_SCHEDULE_JSON_BYTES:
        raise ValueError(f"the file is larger than the {MAX_SCHEDULE_JSON_BYTES >> 20} MiB a λ schedule can take")
    with open(path, encoding="utf-8") as f:
        try:
            text = f.read()
        except UnicodeDecodeError:
            raise ValueError("the file is not UTF-8 text") from None
    return ls.LambdaSchedule.from_json(text)


def save_schedule_file(schedule: ls.LambdaSchedule, path: str) -> None:
    if path.lower().endswith(".safetensors"):
        tensors, metadata = schedule.to_tensors()
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(schedule.to_json())


class LambdaScheduleLoad:
    DESCRIPTION = f"Loads a λ schedule (.json or .safetensors) from models/{LAMBDA_SCHEDULE_FOLDER}."
    CATEGORY = SCHEDULE_CATEGORY
    RETURN_TYPES = (LAMBDA_SCHEDULE,)
    OUTPUT_TOOLTIPS = (SCHEDULE_TOOLTIP,)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"schedule_name": (_schedule_files(), {"tooltip": f"Files in models/{LAMBDA_SCHEDULE_FOLDER}."})}}

    def load(self, schedule_name):
        path = folder_paths.get_full_path_or_raise(LAMBDA_SCHEDULE_FOLDER, schedule_name)
        try:
            return (load_schedule_file(path, schedule_name),)
        except InputError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"schedule_name: {schedule_name} is not a readable λ schedule: {e}") from None
        except OSError as e:
            raise InputError(f"schedule_name: {schedule_name} cannot be read ({e.strerror or type(e).__name__})") from None


class LambdaScheduleSave:
    DESCRIPTION = f"Saves a λ schedule to models/{LAMBDA_SCHEDULE_FOLDER} (JSON or safetensors), never overwriting a file."
    CATEGORY = SCHEDULE_CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "schedule": (LAMBDA_SCHEDULE, {"tooltip": "The λ schedule to save."}),
            "filename_prefix": ("STRING", {"default": "lambda_schedule", "tooltip": f"File name start in models/{LAMBDA_SCHEDULE_FOLDER} (subfolders allowed); a counter is appended."}),
            "format": (["json", "safetensors"], {"default": "json", "tooltip": "json (readable, editable) or safetensors; Load λ Schedule reads both."}),
        }}

    def save(self, schedule, filename_prefix, format):
        if not isinstance(schedule, ls.LambdaSchedule):
            raise InputError("schedule: not a LAMBDA_SCHEDULE")
        if format not in ("json", "safetensors"):
            raise InputError(f"format must be json or safetensors, got {format!r}")
        path, saved = free_save_path(LAMBDA_SCHEDULE_FOLDER, filename_prefix, format)
        with writing("filename_prefix", saved):
            save_schedule_file(schedule, path)
        return {"ui": {"text": [f"saved {saved}"]}, "result": ()}


class LambdaSchedulePlot:
    DESCRIPTION = (
        "Draws a λ schedule: λ over diffusion progress (left = pure noise, right = clean), with a dot "
        "at each step the given scheduler takes. Connect a model to place the dots with its own σ schedule."
    )
    CATEGORY = SCHEDULE_CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The plot: λ over diffusion progress (noise → clean) with a dot per sampler step.",)
    FUNCTION = "plot"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "schedule": (LAMBDA_SCHEDULE, {"tooltip": "The λ schedule to draw."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Sampler steps to mark with dots."}),
                "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "ddim_uniform", "tooltip": "Scheduler whose steps the dots mark (the model's σ schedule when a model is connected)."}),
                "width": ("INT", {"default": 512, "min": PLOT_WIDTH[0], "max": PLOT_WIDTH[1], "tooltip": "Plot width in pixels."}),
                "height": ("INT", {"default": 256, "min": PLOT_HEIGHT[0], "max": PLOT_HEIGHT[1], "tooltip": "Plot height in pixels."}),
            },
            "optional": {"model": ("MODEL", {"tooltip": "Places the step dots with this model's σ schedule."})},
        }

    def plot(self, schedule, steps, scheduler, width, height, model=None):
        check_int("steps", steps, 1, 1000)
        width, height = check_int("width", width, *PLOT_WIDTH), check_int("height", height, *PLOT_HEIGHT)
        if not isinstance(schedule, ls.LambdaSchedule):
            raise InputError("schedule: not a LAMBDA_SCHEDULE")
        if model is not None:
            step_values, step_progress = resample_for_model(schedule, model, scheduler, steps)
        else:
            step_progress = ls.step_progress(steps)
            step_values = [schedule.value_at(p) for p in step_progress]
        image = draw_schedule(schedule, step_progress, step_values, width, height)
        return (torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None],)


def resample_for_model(schedule: ls.LambdaSchedule, model, scheduler: str, steps: int):
    """(λ at each step, progress of each step) for this model's σ schedule and scheduler."""
    sampling = model.get_model_object("model_sampling")
    sigmas = sampling_sigmas(model, steps, None, scheduler)[:-1].tolist()
    return schedule.values_for_sigmas(sigmas, sampling.percent_to_sigma), step_progress_for_model(model, sigmas)


def _with_range(meta: dict, start: float, end: float) -> dict | None:
    """Intersect an entry's own timestep range with [start, end]; None if empty."""
    lo = max(start, float(meta.get("start_percent", 0.0)))
    hi = min(end, float(meta.get("end_percent", 1.0)))
    if lo > hi:
        return None
    out = dict(meta)
    out["start_percent"], out["end_percent"] = lo, hi
    return out


def mix_conditioning(neutral, styled, schedule: ls.LambdaSchedule) -> list:
    """One CONDITIONING entry per run of equal λ, each active over its progress range.

    ComfyUI activates an entry for σ_end ≤ σ ≤ σ_start; ranges tile [0, 1] and meet only at their
    edges, so every step of any scheduler sees exactly one entry, the one that
    ``LambdaSchedule.values_for_sigmas`` names (a step falling exactly on an edge would see the
    average of two: edges sit midway between knots, away from the steps of DDIM spacing).
    """
    c0 = neutral[0][0]
    p0 = neutral[0][1].get("pooled_output")
    out = []
    for tensor, meta in styled:
        check_embedding_pair(c0, tensor)
        for seg in schedule.segments():
            entry_meta = _with_range(meta, seg.start, seg.end)
            if entry_meta is None:
                continue
            pooled = mix_pooled(p0, meta.get("pooled_output"), seg.value)
            if pooled is not None:
                entry_meta["pooled_output"] = pooled
            out.append([mix_embeddings(c0, tensor, seg.value), entry_meta])
    return out


class MixConditioningBySchedule:
    DESCRIPTION = (
        "c_t = λ_t·styled + (1−λ_t)·neutral at every step (Wu et al. 2023). Outputs one CONDITIONING "
        "for stock KSampler / KSamplerAdvanced / SamplerCustom: one entry per run of equal λ over its "
        "timestep range. Token lengths and pooled outputs are matched as ConditioningAverage does."
    )
    CATEGORY = SCHEDULE_CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("c_t = λ_t·c1 + (1−λ_t)·c0 as timestep-ranged entries: the positive input of a stock sampler.",)
    FUNCTION = "mix"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "neutral": ("CONDITIONING", {"tooltip": "c0, the neutral prompt, e.g. 'a photo of a person'. Only its first entry is used."}),
            "styled": ("CONDITIONING", {"tooltip": "c1, the styled prompt (the neutral one plus the attribute), e.g. 'a photo of a smiling person'."}),
            "schedule": (LAMBDA_SCHEDULE, {"tooltip": SCHEDULE_TOOLTIP}),
        }}

    def mix(self, neutral, styled, schedule):
        check_conditioning(neutral, "neutral")
        check_conditioning(styled, "styled")
        if not isinstance(schedule, ls.LambdaSchedule):
            raise InputError("schedule: not a LAMBDA_SCHEDULE")
        with core_input_errors("neutral/styled"):
            return (mix_conditioning(neutral, styled, schedule),)


class LambdaScheduleToText:
    DESCRIPTION = "The λ each step of a scheduler gets, as text (a comma list you can edit and feed back)."
    CATEGORY = SCHEDULE_CATEGORY
    RETURN_TYPES = ("STRING",)
    OUTPUT_TOOLTIPS = ("λ of each step, comma-separated: edit it and feed it to λ Schedule (From List).",)
    OUTPUT_NODE = True
    FUNCTION = "resample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "schedule": (LAMBDA_SCHEDULE, {"tooltip": "The λ schedule to read."}),
            "model": ("MODEL", {"tooltip": "The model whose σ schedule the steps follow."}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000, "tooltip": "Sampler steps."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "ddim_uniform", "tooltip": "Sampler scheduler."}),
        }}

    def resample(self, schedule, model, steps, scheduler):
        check_int("steps", steps, 1, 10000)
        if not isinstance(schedule, ls.LambdaSchedule):
            raise InputError("schedule: not a LAMBDA_SCHEDULE")
        values, _ = resample_for_model(schedule, model, scheduler, steps)
        text = ", ".join(f"{v:g}" for v in values)
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "DisentangleLambdaConstant": LambdaScheduleConstant,
    "DisentangleLambdaSwitch": LambdaScheduleSwitch,
    "DisentangleLambdaRamp": LambdaScheduleRamp,
    "DisentangleLambdaFromList": LambdaScheduleFromList,
    "DisentangleLambdaLoad": LambdaScheduleLoad,
    "DisentangleLambdaSave": LambdaScheduleSave,
    "DisentangleLambdaPlot": LambdaSchedulePlot,
    "DisentangleLambdaToText": LambdaScheduleToText,
    "DisentangleMixConditioning": MixConditioningBySchedule,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DisentangleLambdaConstant": "λ Schedule (Constant)",
    "DisentangleLambdaSwitch": "λ Schedule (Switch at Step)",
    "DisentangleLambdaRamp": "λ Schedule (Linear Ramp)",
    "DisentangleLambdaFromList": "λ Schedule (From List)",
    "DisentangleLambdaLoad": "Load λ Schedule",
    "DisentangleLambdaSave": "Save λ Schedule",
    "DisentangleLambdaPlot": "Plot λ Schedule",
    "DisentangleLambdaToText": "λ Schedule per Step (Text)",
    "DisentangleMixConditioning": "Mix Conditioning by λ Schedule",
}
