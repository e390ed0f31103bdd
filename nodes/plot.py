"""Drawing a λ schedule with PIL (ComfyUI ships Pillow)."""
from __future__ import annotations

from PIL import Image, ImageDraw

from ..core.lambda_schedule import LambdaSchedule

BACKGROUND, AXIS, CURVE, DOT, TEXT = (24, 24, 28), (110, 110, 120), (90, 170, 255), (255, 190, 60), (220, 220, 230)


def draw_schedule(schedule: LambdaSchedule, step_progress, step_values, width: int, height: int) -> Image.Image:
    """λ(p) as a step curve over progress p ∈ [0, 1], with one dot per sampler step."""
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 44, width - 12, 14, height - 26
    values = list(schedule.values) + list(step_values)
    lo, hi = min(min(values), 0.0), max(max(values), 1.0)
    span = hi - lo or 1.0

    def xy(p, v):
        return left + p * (right - left), bottom - (v - lo) / span * (bottom - top)

    for v in {lo, 0.0, 1.0, hi}:
        y = xy(0, v)[1]
        draw.line([(left, y), (right, y)], fill=(50, 50, 58))
        draw.text((4, y - 6), f"{v:.2g}", fill=TEXT)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    draw.text((left, bottom + 8), "noise", fill=TEXT)
    draw.text((right - 30, bottom + 8), "clean", fill=TEXT)
    draw.text((width // 2 - 40, bottom + 8), f"lambda ({len(step_values)} steps)", fill=TEXT)

    points = []
    for seg in schedule.segments():
        points += [xy(seg.start, seg.value), xy(seg.end, seg.value)]
    draw.line(points, fill=CURVE, width=2)
    for p, v in zip(step_progress, step_values):
        x, y = xy(p, v)
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=DOT)
    return image


def draw_loss_curve(losses, title: str, x_label: str, width: int = 512, height: int = 256) -> Image.Image:
    """Loss over iterations/steps as a line with its first, best and last values; a log y axis when the
    (positive) values span more than 50×. Non-finite values are left out of the line and counted in the title."""
    import math
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 56, width - 12, 24, height - 26
    points = [(k, float(v)) for k, v in enumerate(losses) if math.isfinite(float(v))]
    bad = len(losses) - len(points)
    draw.text((left, 6), title + (f"  ({bad} non-finite)" if bad else ""), fill=TEXT)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    draw.text((left, bottom + 8), "1", fill=TEXT)
    draw.text((right - 40, bottom + 8), f"{len(losses)}", fill=TEXT)
    draw.text((width // 2 - 30, bottom + 8), x_label, fill=TEXT)
    if not points:
        return image
    values = [v for _, v in points]
    log = min(values) > 0 and max(values) / min(values) > 50
    f = math.log10 if log else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    span = hi - lo or 1.0
    last = max(len(losses) - 1, 1)

    def xy(k, v):
        return left + k / last * (right - left), bottom - (f(v) - lo) / span * (bottom - top)

    for v in sorted({min(values), max(values)}):
        y = xy(0, v)[1]
        draw.line([(left, y), (right, y)], fill=(50, 50, 58))
        draw.text((4, y - 6), f"{v:.3g}", fill=TEXT)
    if log:
        draw.text((4, top - 18), "log", fill=TEXT)
    line = [xy(k, v) for k, v in points]
    if len(line) == 1:
        x, y = line[0]
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=CURVE)
    else:
        draw.line(line, fill=CURVE, width=2)
    k_best = min(points, key=lambda p: p[1])
    x, y = xy(*k_best)
    draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=DOT)
    draw.text((min(x + 6, right - 90), max(y - 14, top)), f"best {k_best[1]:.4g}", fill=DOT)
    return image


def image_tensor(image: Image.Image):
    """A PIL image as a ComfyUI IMAGE batch of one [1, H, W, 3] in [0, 1]."""
    import numpy as np
    import torch
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
