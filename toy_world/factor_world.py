"""Factor world: a procedural, deterministic Shapes3D-like data set with six known factors.

A 64×64 RGB scene shows one object standing on a floor in front of a wall. Every image is a pure
function of its factor row ``[floor_hue, wall_hue, object_hue, scale, shape, orientation]``
(:data:`FACTORS`), and each factor owns its pixels:

* wall pixels (rows above :data:`HORIZON_ROW`) depend only on ``wall_hue``, floor pixels only on
  ``floor_hue``, object pixels only on ``object_hue`` (times a fixed shading); no shadow;
* which pixels are object pixels depends only on ``(scale, shape, orientation)``.

The 480 object appearances (one per scale, shape and orientation) are ray-cast once, lazily, with
an orthographic camera looking down by :data:`CAMERA_ELEVATION_DEG` and a fixed light from the
upper left. Each gives, per pixel, a region (wall, floor or object), a gain and a lift; a scene is
then ``pixel = hue_rgb[region] · gain + lift``, composed by gather and broadcast.

Orientation is a turn about the vertical axis, −30° … +30° (positive: the object's front turns to
the viewer's right). The cube shows it in its outline and face shading. A turn of a body of
revolution (cylinder, sphere, capsule) is invisible by itself, so these are painted two-tone: the
body's right half (seen from its front) is darker, and the split, a meridian through the front,
moves across the body as it turns (by r·sin θ; on the cylinder's lid the split line turns).
Their outline does not depend on orientation; their shading does.
"""
from __future__ import annotations

import functools
import math
import time
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------------------------
# Factors and their words
# --------------------------------------------------------------------------------------------

FACTORS = (("floor_hue", 10), ("wall_hue", 10), ("object_hue", 10), ("scale", 8), ("shape", 4), ("orientation", 15))
FACTOR_NAMES = tuple(name for name, _ in FACTORS)
FACTOR_SIZES = tuple(size for _, size in FACTORS)
NUM_FACTORS = len(FACTORS)
FLOOR_HUE, WALL_HUE, OBJECT_HUE, SCALE, SHAPE, ORIENTATION = range(NUM_FACTORS)

HUES = (
    ("red", (0.90, 0.08, 0.08)),
    ("orange", (1.00, 0.50, 0.00)),
    ("yellow", (1.00, 0.95, 0.10)),
    ("lime", (0.55, 1.00, 0.15)),
    ("green", (0.00, 0.55, 0.12)),
    ("cyan", (0.05, 0.90, 0.95)),
    ("blue", (0.10, 0.22, 0.95)),
    ("purple", (0.50, 0.08, 0.78)),
    ("magenta", (1.00, 0.10, 0.85)),
    ("pink", (1.00, 0.55, 0.72)),
)
HUE_NAMES = tuple(name for name, _ in HUES)
HUE_RGB = torch.tensor([rgb for _, rgb in HUES], dtype=torch.float32)

SHAPE_NAMES = ("cube", "cylinder", "sphere", "capsule")
CUBE, CYLINDER, SPHERE, CAPSULE = range(len(SHAPE_NAMES))

# Silhouette height at orientation 0 as a fraction of the image height, evenly spaced.
SCALE_FRACTIONS = tuple(0.18 + k * (0.45 - 0.18) / 7 for k in range(8))
SCALE_WORDS = ("tiny", "small", "compact", "medium", "sizable", "large", "huge", "giant")

ORIENTATION_DEGREES = tuple(-30.0 + k * 60.0 / 14 for k in range(15))
_TURN_AMOUNTS = ("far", "sharply", "strongly", "", "partly", "slightly", "barely")
ORIENTATION_WORDS = (
    tuple(" ".join(w for w in ("turned", amount, "left") if w) for amount in _TURN_AMOUNTS)
    + ("facing front",)
    + tuple(" ".join(w for w in ("turned", amount, "right") if w) for amount in reversed(_TURN_AMOUNTS))
)

# --------------------------------------------------------------------------------------------
# Scene layout and lighting
# --------------------------------------------------------------------------------------------

IMAGE_SIZE = 64
HORIZON_ROW = 30  # rows < HORIZON_ROW are wall, rows ≥ HORIZON_ROW floor (where no object covers them)
BASE_ROW = 53  # the object's foot point (its vertical axis meets the floor) lies on the top edge of this row
CAMERA_ELEVATION_DEG = 20.0

# Region codes, in the order of the hue columns of a factor row (so HUE_RGB[factors[:, :3]][region]).
REGION_FLOOR, REGION_WALL, REGION_OBJECT = FLOOR_HUE, WALL_HUE, OBJECT_HUE

WALL_GAIN = (0.70, 0.90)  # top row, row above the horizon
FLOOR_GAIN = (0.76, 1.00)  # horizon row, bottom row

LIGHT_DIRECTION = (-0.30, 0.85, 0.45)  # world: x right, y up, z towards the camera
AMBIENT = 0.32
SPECULAR = 0.55
SHININESS = 40.0
PAINT_EDGE_WIDTH = 0.04  # softness of the two-tone split, in body radii
PAINT_DARKENING = 0.45  # the dark half has (1 − PAINT_DARKENING) of the diffuse light
EDGE_SHADE = 0.80  # gain factor of object pixels on the silhouette (keeps it visible on a same-hue background)

# Shape proportions: cylinder height / radius, capsule straight part / radius.
CYLINDER_HEIGHT_OVER_RADIUS = 2.6
CAPSULE_LENGTH_OVER_RADIUS = 2.2


def num_combinations() -> int:
    """480,000: every factor row."""
    return math.prod(FACTOR_SIZES)


def num_object_appearances() -> int:
    """480: one per (scale, shape, orientation)."""
    return FACTOR_SIZES[SCALE] * FACTOR_SIZES[SHAPE] * FACTOR_SIZES[ORIENTATION]


def appearance_index(factors: Tensor) -> Tensor:
    """Index into the object tables of each row: (scale·4 + shape)·15 + orientation."""
    return (factors[:, SCALE] * FACTOR_SIZES[SHAPE] + factors[:, SHAPE]) * FACTOR_SIZES[ORIENTATION] + factors[:, ORIENTATION]


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def check_factors(factors) -> Tensor:
    """``factors`` as a LongTensor [B, 6], or a ValueError naming what is wrong."""
    factors = torch.as_tensor(factors)
    if factors.dtype == torch.bool or factors.is_floating_point() or factors.is_complex():
        raise ValueError(f"factors must be integers (a LongTensor), got dtype {factors.dtype}")
    if factors.ndim != 2 or factors.shape[1] != NUM_FACTORS:
        raise ValueError(f"factors must have shape [B, {NUM_FACTORS}] (columns {', '.join(FACTOR_NAMES)}), "
                         f"got {list(factors.shape)}")
    factors = factors.long()
    for column, (name, size) in enumerate(FACTORS):
        values = factors[:, column]
        if values.numel() and (values.min() < 0 or values.max() >= size):
            bad = values[(values < 0) | (values >= size)][0].item()
            raise ValueError(f"factor {name!r} (column {column}) must lie in [0, {size - 1}], got {bad}")
    return factors


def _check_row_or_batch(factors) -> tuple[Tensor, bool]:
    factors = torch.as_tensor(factors)
    single = factors.ndim == 1
    return check_factors(factors[None] if single else factors), single


# --------------------------------------------------------------------------------------------
# Ray casting the 480 object appearances (once, in float64)
# --------------------------------------------------------------------------------------------

class ObjectTables(NamedTuple):
    region: Tensor  # [480, 4096] int64: REGION_FLOOR / REGION_WALL / REGION_OBJECT
    gain: Tensor  # [480, 4096] float32: pixel = hue · gain + lift
    lift: Tensor  # [480, 4096] float32: 0 off the object


def _rotate_y(v: Tensor, angle: Tensor) -> Tensor:
    """Rotate vectors [..., 3] about the vertical axis; ``angle`` broadcasts against v[..., 0]."""
    c, s = torch.cos(angle), torch.sin(angle)
    x, y, z = v.unbind(-1)
    x, y, z, c, s = torch.broadcast_tensors(x, y, z, c, s)
    return torch.stack((x * c + z * s, y, -x * s + z * c), -1)


def _camera_rays() -> tuple[Tensor, Tensor]:
    """Origins [4096, 3] and the common direction [3] of the orthographic camera, in pixels."""
    phi = math.radians(CAMERA_ELEVATION_DEG)
    right = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    up = torch.tensor([0.0, math.cos(phi), -math.sin(phi)], dtype=torch.float64)
    forward = torch.tensor([0.0, -math.sin(phi), -math.cos(phi)], dtype=torch.float64)
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float64) + 0.5
    v, u = torch.meshgrid(BASE_ROW - centres, centres - IMAGE_SIZE / 2, indexing="ij")
    origins = u.reshape(-1, 1) * right + v.reshape(-1, 1) * up - 4.0 * IMAGE_SIZE * forward
    return origins, forward


def _hit_sphere(o: Tensor, d: Tensor, centre_y: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest ray parameter (inf on a miss) and outward normal; d is a unit vector."""
    centre = torch.zeros_like(o)
    centre[..., 1] = centre_y
    oc = o - centre
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - radius**2)
    t = torch.where(disc >= 0, -b - disc.clamp(min=0).sqrt(), math.inf)
    normal = (o + t[..., None].nan_to_num(posinf=0.0) * d - centre) / radius[..., None]
    return t, normal


def _hit_tube(o: Tensor, d: Tensor, radius: Tensor, y0: Tensor, y1: Tensor) -> tuple[Tensor, Tensor]:
    """Side of the vertical cylinder x² + z² = r², y0 ≤ y ≤ y1."""
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = o[..., 0] * d[..., 0] + o[..., 2] * d[..., 2]
    c = o[..., 0] ** 2 + o[..., 2] ** 2 - radius**2
    disc = b * b - a * c
    t = (-b - disc.clamp(min=0).sqrt()) / a
    y = o[..., 1] + t * d[..., 1]
    t = torch.where((disc >= 0) & (y >= y0) & (y <= y1), t, math.inf)
    p = o + t[..., None].nan_to_num(posinf=0.0) * d
    normal = torch.stack((p[..., 0], torch.zeros_like(t), p[..., 2]), -1) / radius[..., None]
    return t, normal


def _hit_disc_top(o: Tensor, d: Tensor, radius: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Top cap (seen from above) of a vertical cylinder at height y."""
    t = (y - o[..., 1]) / d[..., 1]
    p = o + t[..., None] * d
    t = torch.where(p[..., 0] ** 2 + p[..., 2] ** 2 <= radius**2, t, math.inf)
    normal = torch.zeros_like(o)
    normal[..., 1] = 1.0
    return t, normal


def _hit_box(o: Tensor, d: Tensor, half: Tensor) -> tuple[Tensor, Tensor]:
    """Box |x|, |z| ≤ half, 0 ≤ y ≤ 2·half (slab method)."""
    lo = torch.stack((-half, torch.zeros_like(half), -half), -1)
    hi = torch.stack((half, 2 * half, half), -1)
    d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (lo - o) / d, (hi - o) / d
    t_near, axis = torch.minimum(t1, t2).max(-1)
    t_far = torch.maximum(t1, t2).min(-1).values
    t = torch.where(t_near <= t_far, t_near, math.inf)
    normal = torch.nn.functional.one_hot(axis, 3).to(o.dtype) * -torch.sign(d)
    return t, normal


def _nearest(*hits: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    t = torch.stack([h[0] for h in hits])
    normals = torch.stack([h[1] for h in hits])
    best = t.argmin(0)
    return t.gather(0, best[None])[0], normals.gather(0, best[None, ..., None].expand(1, *normals.shape[1:]))[0]


def _cast_shape(shape: int, o: Tensor, d: Tensor, height: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Hit parameter, local normal and body radius for one shape; ``height`` is its silhouette height."""
    phi = math.radians(CAMERA_ELEVATION_DEG)
    cos_phi, sin_phi = math.cos(phi), math.sin(phi)
    if shape == CUBE:
        half = height / (cos_phi + sin_phi) / 2
        return (*_hit_box(o, d, half), half)
    if shape == CYLINDER:
        r = height / (CYLINDER_HEIGHT_OVER_RADIUS * cos_phi + 2 * sin_phi)
        top = CYLINDER_HEIGHT_OVER_RADIUS * r
        return (*_nearest(_hit_tube(o, d, r, torch.zeros_like(r), top), _hit_disc_top(o, d, r, top)), r)
    if shape == SPHERE:
        r = height / 2
        return (*_hit_sphere(o, d, r, r), r)
    r = height / (CAPSULE_LENGTH_OVER_RADIUS * cos_phi + 2)
    top = r + CAPSULE_LENGTH_OVER_RADIUS * r
    return (*_nearest(_hit_tube(o, d, r, r, top), _hit_sphere(o, d, r, r), _hit_sphere(o, d, top, r)), r)


def _background_gain() -> Tensor:
    """Per-row gain [64] of the wall (above the horizon) and the floor (below)."""
    rows = torch.arange(IMAGE_SIZE, dtype=torch.float64)
    wall = WALL_GAIN[0] + (WALL_GAIN[1] - WALL_GAIN[0]) * rows / (HORIZON_ROW - 1)
    floor = FLOOR_GAIN[0] + (FLOOR_GAIN[1] - FLOOR_GAIN[0]) * (rows - HORIZON_ROW) / (IMAGE_SIZE - 1 - HORIZON_ROW)
    return torch.where(rows < HORIZON_ROW, wall, floor)


def _silhouette_edge(mask: Tensor) -> Tensor:
    """Object pixels [N, 64, 64] with a 4-neighbour off the object."""
    padded = torch.nn.functional.pad(mask, (1, 1, 1, 1), value=False)
    inner = padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    return mask & ~inner


@functools.lru_cache(maxsize=1)
def object_tables() -> ObjectTables:
    """Region, gain and lift of every pixel for each of the 480 object appearances (cached)."""
    origins, forward = _camera_rays()
    n_scale, n_shape, n_orient = FACTOR_SIZES[SCALE], FACTOR_SIZES[SHAPE], FACTOR_SIZES[ORIENTATION]
    heights = torch.tensor(SCALE_FRACTIONS, dtype=torch.float64) * IMAGE_SIZE
    angles = torch.tensor(ORIENTATION_DEGREES, dtype=torch.float64).deg2rad()
    light = torch.tensor(LIGHT_DIRECTION, dtype=torch.float64)
    light = light / light.norm()
    halfway = light - forward
    halfway = halfway / halfway.norm()

    t_all, normal_all, paint_all = [], [], []
    height = heights[:, None, None].expand(n_scale, n_orient, 1)
    angle = angles[None, :, None].expand(n_scale, n_orient, 1)
    o = _rotate_y(origins, -angle)  # [scale, orient, 4096, 3] in the object's frame
    d = _rotate_y(forward.expand_as(o), -angle)
    for shape in range(n_shape):
        t, normal, radius = _cast_shape(shape, o, d, height)
        hit = o + t[..., None].nan_to_num(posinf=0.0) * d
        dark_paint = torch.zeros_like(t)
        if shape != CUBE:  # two-tone paint: the body's right half (local x > 0) is darker
            dark_paint = torch.sigmoid(hit[..., 0] / (PAINT_EDGE_WIDTH * radius))
        t_all.append(t)
        normal_all.append(_rotate_y(normal, angle))
        paint_all.append(dark_paint)
    # [scale, shape, orient, 4096]
    t = torch.stack(t_all, 1)
    normal = torch.stack(normal_all, 1)
    dark_paint = torch.stack(paint_all, 1)

    mask = torch.isfinite(t).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    diffuse = AMBIENT + (1 - AMBIENT) * (normal @ light).clamp(min=0)
    diffuse = diffuse * (1 - PAINT_DARKENING * dark_paint)
    specular = SPECULAR * (normal @ halfway).clamp(min=0) ** SHININESS
    diffuse = diffuse.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    diffuse = torch.where(_silhouette_edge(mask), diffuse * EDGE_SHADE, diffuse)
    specular = specular.reshape(-1, IMAGE_SIZE, IMAGE_SIZE)

    rows = torch.arange(IMAGE_SIZE)[:, None].expand(IMAGE_SIZE, IMAGE_SIZE)
    background_region = torch.where(rows < HORIZON_ROW, REGION_WALL, REGION_FLOOR)
    background_gain = _background_gain()[:, None].expand(IMAGE_SIZE, IMAGE_SIZE)
    region = torch.where(mask, REGION_OBJECT, background_region)
    gain = torch.where(mask, (1 - specular) * diffuse, background_gain)
    lift = torch.where(mask, specular, torch.zeros(()))
    flat = (-1, IMAGE_SIZE * IMAGE_SIZE)
    return ObjectTables(region.reshape(flat).long().contiguous(), gain.reshape(flat).float().contiguous(),
                        lift.reshape(flat).float().contiguous())


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def render(factors: Tensor) -> Tensor:
    """Images [B, 3, 64, 64] in [0, 1] (float32) of factor rows [B, 6]; a pure function of each row."""
    factors = check_factors(factors)
    tables = object_tables()
    index = appearance_index(factors)
    palette = HUE_RGB[factors[:, :3]].transpose(1, 2)  # [B, rgb, region]
    region = tables.region[index].unsqueeze(1).expand(-1, 3, -1)
    image = torch.gather(palette, 2, region)
    image = image * tables.gain[index].unsqueeze(1)
    image = image + tables.lift[index].unsqueeze(1)
    return image.clamp_(0.0, 1.0).view(-1, 3, IMAGE_SIZE, IMAGE_SIZE)


def render_at(factors: Tensor, size: int) -> Tensor:
    """``render`` upscaled to ``size`` pixels (a multiple of 64) by nearest neighbour, e.g. 128 for
    the toy world's diffusion model."""
    if size % IMAGE_SIZE:
        raise ValueError(f"size must be a multiple of {IMAGE_SIZE}, got {size}")
    return F.interpolate(render(factors), scale_factor=size // IMAGE_SIZE, mode="nearest")


def region_of_pixels(factors: Tensor) -> Tensor:
    """LongTensor [B, 64, 64]: REGION_FLOOR, REGION_WALL or REGION_OBJECT for each pixel."""
    factors = check_factors(factors)
    return object_tables().region[appearance_index(factors)].view(-1, IMAGE_SIZE, IMAGE_SIZE)


def object_mask(factors: Tensor) -> Tensor:
    """BoolTensor [B, 64, 64]: which pixels show the object."""
    return region_of_pixels(factors) == REGION_OBJECT


# --------------------------------------------------------------------------------------------
# Factor rows
# --------------------------------------------------------------------------------------------

def sample_factors(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` factor rows, each factor uniform and independent."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    return torch.stack([torch.randint(size, (n,), generator=generator) for size in FACTOR_SIZES], 1)


def factor_grid() -> Tensor:
    """All 480,000 factor rows [480000, 6], in lexicographic order of (floor_hue, …, orientation)."""
    return torch.cartesian_prod(*[torch.arange(size) for size in FACTOR_SIZES])


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _caption_text(row: list[int], kept: list[bool]) -> str:
    words = [SCALE_WORDS[row[SCALE]]] if kept[SCALE] else []
    words += [HUE_NAMES[row[OBJECT_HUE]]] if kept[OBJECT_HUE] else []
    words += [SHAPE_NAMES[row[SHAPE]] if kept[SHAPE] else "object"]
    text = _with_article(" ".join(words))
    if kept[FLOOR_HUE]:
        text += " on " + _with_article(f"{HUE_NAMES[row[FLOOR_HUE]]} floor")
    if kept[WALL_HUE]:
        text += " in front of " + _with_article(f"{HUE_NAMES[row[WALL_HUE]]} wall")
    if kept[ORIENTATION]:
        text += ", " + ORIENTATION_WORDS[row[ORIENTATION]]
    return text


def caption(factors, generator: torch.Generator | None = None, keep_prob: float = 0.7) -> str | list[str]:
    """English caption(s) of a factor row [6] (→ str) or batch [B, 6] (→ list of str).

    Each factor is named independently with probability ``keep_prob`` (draws from ``generator``);
    the object noun is always there ("object" when the shape is left out). E.g.
    "a large red cylinder on a green floor in front of a blue wall, turned slightly left".
    """
    if not 0.0 <= keep_prob <= 1.0:
        raise ValueError(f"keep_prob must lie in [0, 1], got {keep_prob}")
    factors, single = _check_row_or_batch(factors)
    kept = torch.rand(factors.shape, generator=generator) < keep_prob
    texts = [_caption_text(row, keep) for row, keep in zip(factors.tolist(), kept.tolist())]
    return texts[0] if single else texts


def full_caption(factors) -> str | list[str]:
    """The caption that names all six factors (deterministic)."""
    factors, single = _check_row_or_batch(factors)
    texts = [_caption_text(row, [True] * NUM_FACTORS) for row in factors.tolist()]
    return texts[0] if single else texts


def caption_vocabulary() -> frozenset[str]:
    """Every word a caption can contain (commas aside)."""
    fixed = "a an object on floor in front of wall".split()
    phrases = HUE_NAMES + SHAPE_NAMES + SCALE_WORDS + ORIENTATION_WORDS
    return frozenset(fixed + [w for p in phrases for w in p.split()])


# --------------------------------------------------------------------------------------------
# Batches and speed
# --------------------------------------------------------------------------------------------

def random_batch(batch_size: int, generator: torch.Generator | None = None,
                 keep_prob: float = 0.7) -> tuple[Tensor, Tensor, list[str]]:
    """(images [B, 3, 64, 64], factors [B, 6], captions) of uniformly drawn factor rows."""
    factors = sample_factors(batch_size, generator)
    return render(factors), factors, caption(factors, generator, keep_prob)


def iterate_batches(batch_size: int, generator: torch.Generator | None = None, keep_prob: float = 0.7,
                    num_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
    """:func:`random_batch` again and again (``num_batches`` times, or for ever)."""
    count = 0
    while num_batches is None or count < num_batches:
        yield random_batch(batch_size, generator, keep_prob)
        count += 1


def images_per_second(batch: int = 256, seconds: float = 1.0, num_threads: int | None = 1) -> float:
    """Rendering throughput on ``num_threads`` CPU threads (None: leave torch's setting)."""
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        factors = sample_factors(batch, torch.Generator().manual_seed(0))
        render(factors)  # builds the tables
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            render(factors)
            count += batch
        return count / elapsed
    finally:
        torch.set_num_threads(previous)
