"""Small PNG plots with Pillow (ComfyUI ships it; no matplotlib needed): line plots and heatmaps."""
from __future__ import annotations

import math

from PIL import Image, ImageDraw

BACKGROUND, AXIS, GRID, TEXT = (255, 255, 255), (60, 60, 60), (225, 225, 225), (20, 20, 20)
COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / count))
    for mult in (1, 2, 5, 10):
        if (hi - lo) / (step * mult) <= count:
            step *= mult
            break
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def line_plot(path: str, title: str, xlabel: str, ylabel: str, series: dict, hlines: dict | None = None,
              size=(760, 460), ylim=None, log_y: bool = False) -> None:
    """``series``: {label: (xs, ys)}; ``hlines``: {label: y} drawn dashed. Saved as PNG."""
    width, height = size
    left, right, top, bottom = 70, width - 200, 34, height - 46
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    tr = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xs = [x for xs_, _ in series.values() for x in xs_]
    ys = [tr(y) for _, ys_ in series.values() for y in ys_ if math.isfinite(y)] + [tr(y) for y in (hlines or {}).values()]
    x0, x1 = min(xs), max(xs)
    y0, y1 = ylim if ylim else (min(ys), max(ys))
    if y1 <= y0:
        y0, y1 = y0 - 1, y1 + 1
    pad = 0.04 * (y1 - y0)
    y0, y1 = (y0, y1) if ylim else (y0 - pad, y1 + pad)

    def xy(x, y):
        return (left + (x - x0) / ((x1 - x0) or 1) * (right - left), bottom - (tr(y) - y0) / (y1 - y0) * (bottom - top))

    for t in _ticks(y0, y1):
        py = bottom - (t - y0) / (y1 - y0) * (bottom - top)
        draw.line([(left, py), (right, py)], fill=GRID)
        draw.text((4, py - 6), _fmt(10 ** t if log_y else t), fill=TEXT)
    for t in _ticks(x0, x1, 8):
        px = xy(t, 10 ** y0 if log_y else y0)[0]
        draw.line([(px, bottom), (px, bottom + 4)], fill=AXIS)
        draw.text((px - 8, bottom + 6), _fmt(t), fill=TEXT)
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXIS)
    draw.text((left, 8), title, fill=TEXT)
    draw.text(((left + right) // 2 - 3 * len(xlabel), bottom + 24), xlabel, fill=TEXT)
    draw.text((4, top - 18), ylabel, fill=TEXT)
    legend_y = top
    for k, (label, (xs_, ys_)) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = [xy(x, y) for x, y in zip(xs_, ys_) if math.isfinite(y)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.line([(right + 12, legend_y + 6), (right + 32, legend_y + 6)], fill=colour, width=3)
        draw.text((right + 38, legend_y), label[:26], fill=TEXT)
        legend_y += 16
    for label, y in (hlines or {}).items():
        py = xy(x0, y)[1]
        for px in range(left, right, 12):
            draw.line([(px, py), (min(px + 6, right), py)], fill=AXIS, width=1)
        draw.text((right + 12, legend_y), f"-- {label}"[:30], fill=AXIS)
        legend_y += 16
    image.save(path)


def _colour(v: float) -> tuple[int, int, int]:
    """White → dark blue for v in [0, 1]."""
    v = min(max(v, 0.0), 1.0)
    return (int(255 - 225 * v), int(255 - 190 * v), int(255 - 95 * v))


def heatmaps(path: str, title: str, panels: dict, xlabel: str, ylabel: str, cell: int = 14, vmax: float | None = None) -> None:
    """One heatmap per panel side by side, ``panels``: {label: matrix (rows × cols list of lists or tensor)};
    a common colour scale from 0 to ``vmax`` (default: the largest value)."""
    mats = {k: [list(map(float, row)) for row in m] for k, m in panels.items()}
    vmax = vmax or max(max(max(r) for r in m) for m in mats.values()) or 1.0
    rows = max(len(m) for m in mats.values())
    cols = max(len(m[0]) for m in mats.values())
    pw, ph = cols * cell + 60, rows * cell + 70
    image = Image.new("RGB", (pw * len(mats) + 80, ph + 60), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((10, 6), title, fill=TEXT)
    for p, (label, m) in enumerate(mats.items()):
        ox, oy = 40 + p * pw, 60
        draw.text((ox, oy - 14), label[: pw // 6], fill=TEXT)
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                draw.rectangle([ox + j * cell, oy + i * cell, ox + (j + 1) * cell - 1, oy + (i + 1) * cell - 1],
                               fill=_colour(v / vmax))
        for i in range(0, len(m), max(1, len(m) // 4)):
            draw.text((ox - 22, oy + i * cell), str(i), fill=TEXT)
        for j in range(0, len(m[0]), max(1, len(m[0]) // 4)):
            draw.text((ox + j * cell, oy + len(m) * cell + 2), str(j), fill=TEXT)
        draw.text((ox, oy + len(m) * cell + 16), xlabel, fill=TEXT)
    draw.text((10, 22), f"rows: {ylabel}; colour 0 (white) … {_fmt(vmax)} (blue)", fill=TEXT)
    image.save(path)
