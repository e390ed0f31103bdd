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
