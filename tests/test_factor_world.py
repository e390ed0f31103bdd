"""CPU tests of toy_world/factor_world.py: determinism, factor-exactness, geometry, captions, input checks."""
import itertools
import re

import pytest
import torch

from comfyui_disentangle.toy_world import factor_world as fw

SIZES = fw.FACTOR_SIZES


def _rows(n, seed=0):
    return fw.sample_factors(n, torch.Generator().manual_seed(seed))


def _with_value(rows, column, value):
    rows = rows.clone()
    rows[:, column] = value
    return rows


# --------------------------------------------------------------------------------------------
# Factors and vocabulary
# --------------------------------------------------------------------------------------------

def test_factor_names_sizes_and_words():
    assert fw.FACTORS == (("floor_hue", 10), ("wall_hue", 10), ("object_hue", 10), ("scale", 8), ("shape", 4), ("orientation", 15))
    assert fw.FACTOR_NAMES == ("floor_hue", "wall_hue", "object_hue", "scale", "shape", "orientation")
    assert fw.FACTOR_SIZES == (10, 10, 10, 8, 4, 15) and fw.NUM_FACTORS == 6
    assert fw.SHAPE_NAMES == ("cube", "cylinder", "sphere", "capsule")
    for words, size in ((fw.HUE_NAMES, 10), (fw.SCALE_WORDS, 8), (fw.SHAPE_NAMES, 4)):
        assert len(words) == size == len(set(words))
        assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    assert len(fw.ORIENTATION_WORDS) == 15 == len(set(fw.ORIENTATION_WORDS))
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", p) for p in fw.ORIENTATION_WORDS)
    assert fw.ORIENTATION_WORDS[0] == "turned far left" and fw.ORIENTATION_WORDS[7] == "facing front"
    assert fw.ORIENTATION_WORDS[14] == "turned far right"
    # no word names two different factors
    groups = [set(fw.HUE_NAMES), set(fw.SCALE_WORDS), set(fw.SHAPE_NAMES), {w for p in fw.ORIENTATION_WORDS for w in p.split()}]
    for a, b in itertools.combinations(groups, 2):
        assert not a & b


def test_scale_and_orientation_levels_are_evenly_spaced():
    assert fw.SCALE_FRACTIONS[0] == pytest.approx(0.18) and fw.SCALE_FRACTIONS[-1] == pytest.approx(0.45)
    assert fw.ORIENTATION_DEGREES[0] == pytest.approx(-30) and fw.ORIENTATION_DEGREES[7] == pytest.approx(0)
    for levels in (fw.SCALE_FRACTIONS, fw.ORIENTATION_DEGREES):
        steps = [b - a for a, b in zip(levels, levels[1:])]
        assert steps == pytest.approx([steps[0]] * len(steps))


def test_hues_are_saturated_and_pairwise_far_apart():
    rgb = fw.HUE_RGB
    assert rgb.shape == (10, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb.max(1).values - rgb.min(1).values).min() >= 0.40  # saturated
    distance = torch.cdist(rgb, rgb) + torch.eye(10) * 10
    assert distance.min() >= 0.40  # ≥ 100/255 in RGB between any two hues


# --------------------------------------------------------------------------------------------
# Rendering: shape, determinism
# --------------------------------------------------------------------------------------------

def test_render_shape_dtype_and_range():
    images = fw.render(_rows(32))
    assert images.shape == (32, 3, 64, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert fw.render(_rows(0)).shape == (0, 3, 64, 64)


def test_render_is_deterministic_across_calls_and_batch_positions():
    rows = _rows(64, seed=1)
    first, second = fw.render(rows), fw.render(rows.clone())
    assert torch.equal(first, second)
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fw.render(rows[shuffled]), first[shuffled])
    repeated = rows[5:6].expand(37, -1)  # one row at many positions, odd batch size
    images = fw.render(repeated)
    assert all(torch.equal(images[k], first[5]) for k in range(37))
    assert torch.equal(fw.render(rows[5:6])[0], first[5])


# --------------------------------------------------------------------------------------------
# Factor-exactness
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column, region", [(fw.FLOOR_HUE, fw.REGION_FLOOR), (fw.WALL_HUE, fw.REGION_WALL),
                                            (fw.OBJECT_HUE, fw.REGION_OBJECT)])
def test_a_hue_changes_exactly_the_pixels_of_its_region(column, region):
    rows = _rows(48, seed=3)
    regions = fw.region_of_pixels(rows)
    before = fw.render(rows)
    for value in range(SIZES[column]):
        changed = _with_value(rows, column, value)
        assert torch.equal(fw.region_of_pixels(changed), regions)  # layout untouched: only colour changes
        after = fw.render(changed)
        differs = (after != before).any(1)
        same_value = rows[:, column] == value
        assert torch.equal(differs[same_value], torch.zeros_like(differs[same_value]))
        assert torch.equal(differs[~same_value], (regions == region)[~same_value])


def test_each_pixel_is_its_region_hue_through_a_fixed_gain_and_lift():
    """pixel = hue·gain + lift: floor and wall gains depend on the row only, object gain and lift on
    the appearance only, so a region's colour carries its own hue factor and nothing else."""
    rows = _rows(16, seed=4)
    images = fw.render(rows)
    regions = fw.region_of_pixels(rows)
    tables = fw.object_tables()
    row_gain = fw._background_gain().float()[:, None].expand(64, 64)
    for b in range(16):
        appearance = fw.appearance_index(rows[b:b + 1])[0]
        gain, lift = tables.gain[appearance].view(64, 64), tables.lift[appearance].view(64, 64)
        for region, column in ((fw.REGION_FLOOR, fw.FLOOR_HUE), (fw.REGION_WALL, fw.WALL_HUE), (fw.REGION_OBJECT, fw.OBJECT_HUE)):
            where = regions[b] == region
            expected = fw.HUE_RGB[rows[b, column]][:, None] * gain[where] + lift[where]
            assert torch.allclose(images[b][:, where], expected, atol=1e-6)
            if region != fw.REGION_OBJECT:
                assert torch.equal(gain[where], row_gain[where]) and not lift[where].any()


@pytest.mark.parametrize("column", [fw.SCALE, fw.SHAPE, fw.ORIENTATION])
def test_geometry_factors_change_only_pixels_of_the_old_or_new_object(column):
    rows = _rows(40, seed=5)
    before, mask_before = fw.render(rows), fw.object_mask(rows)
    for value in range(SIZES[column]):
        changed = _with_value(rows, column, value)
        after, mask_after = fw.render(changed), fw.object_mask(changed)
        differs = (after != before).any(1)
        assert not (differs & ~(mask_before | mask_after)).any()


def test_object_pixels_depend_only_on_scale_shape_orientation():
    rows = _rows(200, seed=6)
    masks = fw.object_mask(rows)
    for column in (fw.FLOOR_HUE, fw.WALL_HUE, fw.OBJECT_HUE):
        other = _with_value(rows, column, (rows[:, column] + 1) % SIZES[column])
        assert torch.equal(fw.object_mask(other), masks)
    table = fw.object_tables().region.view(-1, 64, 64) == fw.REGION_OBJECT
    assert torch.equal(masks, table[fw.appearance_index(rows)])


@pytest.mark.parametrize("column", range(fw.NUM_FACTORS))
def test_every_value_of_a_factor_gives_a_different_image(column):
    base = _rows(6, seed=7)
    for row in base:
        variants = row.repeat(SIZES[column], 1)
        variants[:, column] = torch.arange(SIZES[column])
        images = fw.render(variants).flatten(1)
        assert torch.unique(images, dim=0).shape[0] == SIZES[column]


# --------------------------------------------------------------------------------------------
# Geometry of the 480 object appearances
# --------------------------------------------------------------------------------------------

def _appearance_rows():
    """One row per appearance, in table order (scale, shape, orientation), hues fixed."""
    grid = torch.cartesian_prod(torch.arange(SIZES[fw.SCALE]), torch.arange(SIZES[fw.SHAPE]), torch.arange(SIZES[fw.ORIENTATION]))
    return torch.cat([torch.tensor([[0, 1, 2]]).expand(len(grid), 3), grid], 1)


def test_all_480_object_appearances_are_distinct():
    rows = _appearance_rows()
    assert torch.equal(fw.appearance_index(rows), torch.arange(fw.num_object_appearances()))
    tables = fw.object_tables()
    appearance = torch.cat([tables.region.float(), tables.gain, tables.lift], 1)
    assert torch.unique(appearance, dim=0).shape[0] == 480
    images = fw.render(rows).flatten(1)
    assert torch.unique(images, dim=0).shape[0] == 480


def test_masks_distinct_across_scale_and_shape_and_across_cube_orientations():
    masks = fw.object_mask(_appearance_rows()).view(8, 4, 15, -1)
    for orientation in range(15):
        assert torch.unique(masks[:, :, orientation].reshape(32, -1), dim=0).shape[0] == 32
    cubes = masks[2:, fw.CUBE]  # from the third scale up every turn of the cube moves its outline
    assert torch.unique(cubes.reshape(-1, 4096), dim=0).shape[0] == cubes.shape[0] * 15
    # bodies of revolution: the turn shows in the shading (two-tone paint), see the module docstring
    gain = fw.object_tables().gain.view(8, 4, 15, -1)
    for shape in (fw.CYLINDER, fw.SPHERE, fw.CAPSULE):
        steps = (gain[:, shape, 1:] - gain[:, shape, :-1]).abs().amax(-1)
        assert steps.min() > 0.01


def test_object_lies_inside_the_frame_and_grows_with_scale():
    masks = fw.object_mask(_appearance_rows()).view(8, 4, 15, 64, 64)
    assert masks.flatten(0, 2).any((1, 2)).all()  # never empty
    border = torch.zeros(64, 64, dtype=torch.bool)
    border[:3], border[-3:], border[:, :3], border[:, -3:] = True, True, True, True
    assert not (masks & border).any()
    rows_hit = masks.any(-1)  # [scale, shape, orientation, 64]
    height = 64 - rows_hit.int().argmax(-1) - rows_hit.flip(-1).int().argmax(-1)
    front = height[:, :, 7].float()  # facing front
    target = torch.tensor(fw.SCALE_FRACTIONS)[:, None] * 64
    assert (front - target).abs().max() <= 1.5
    assert (height[1:] > height[:-1]).all()


def test_object_rests_on_the_floor_at_the_image_centre():
    masks = fw.object_mask(_appearance_rows())
    rows = torch.arange(64)
    lowest = torch.where(masks.any(-1), rows, -1).amax(-1)
    assert (lowest >= fw.HORIZON_ROW).all()  # the base is on the floor, below the horizon
    assert (lowest >= fw.BASE_ROW - 1).all() and (lowest <= fw.BASE_ROW + 5).all()
    assert masks[:, fw.BASE_ROW - 1, 31:33].all()  # the foot point is covered by the object
    assert not masks[:, fw.BASE_ROW + 6:].any()
    left = torch.where(masks.any(-2), rows, 64).amin(-1)
    right = torch.where(masks.any(-2), rows, -1).amax(-1)
    centre = (left + right + 1) / 2
    assert ((centre - 32).abs() <= 3).all()


# --------------------------------------------------------------------------------------------
# Factor rows
# --------------------------------------------------------------------------------------------

def test_sample_factors_is_uniform_in_range_and_seeded():
    rows = _rows(20000, seed=8)
    assert rows.shape == (20000, 6) and rows.dtype == torch.long
    assert torch.equal(rows, _rows(20000, seed=8)) and not torch.equal(rows, _rows(20000, seed=9))
    for column, size in enumerate(SIZES):
        counts = torch.bincount(rows[:, column], minlength=size)
        assert len(counts) == size
        assert (counts.float() / 20000 - 1 / size).abs().max() < 0.02
    fw.check_factors(rows)


def test_factor_grid_is_every_row_in_lexicographic_order():
    grid = fw.factor_grid()
    assert fw.num_combinations() == 480000 and grid.shape == (480000, 6)
    weights = torch.tensor([4800 * 10, 4800, 480, 60, 15, 1])
    assert torch.equal((grid * weights).sum(1), torch.arange(480000))
    assert grid[0].tolist() == [0] * 6 and grid[-1].tolist() == [s - 1 for s in SIZES]
    assert grid[1].tolist() == [0, 0, 0, 0, 0, 1]


def test_random_batch_and_iterate_batches():
    images, rows, captions = fw.random_batch(12, torch.Generator().manual_seed(10))
    assert torch.equal(images, fw.render(rows)) and len(captions) == 12
    again = fw.random_batch(12, torch.Generator().manual_seed(10))
    assert torch.equal(again[1], rows) and again[2] == captions
    batches = list(fw.iterate_batches(4, torch.Generator().manual_seed(11), num_batches=3))
    assert len(batches) == 3 and all(b[0].shape == (4, 3, 64, 64) for b in batches)
    assert not torch.equal(batches[0][1], batches[1][1])


def test_images_per_second_runs():
    assert fw.images_per_second(batch=8, seconds=0.02) > 0


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def test_full_caption_names_every_factor():
    row = torch.tensor([4, 6, 0, 5, 1, 5])
    assert fw.full_caption(row) == "a large red cylinder on a green floor in front of a blue wall, turned slightly left"
    assert fw.full_caption(torch.tensor([1, 2, 1, 0, 3, 7])) == (
        "a tiny orange capsule on an orange floor in front of a yellow wall, facing front")
    rows = _rows(300, seed=12)
    for row, text in zip(rows.tolist(), fw.full_caption(rows)):
        head, floor, wall, turn = re.fullmatch(r"an? (\w+ \w+ \w+) on an? (\w+) floor in front of an? (\w+) wall, (.+)", text).groups()
        assert head == f"{fw.SCALE_WORDS[row[3]]} {fw.HUE_NAMES[row[2]]} {fw.SHAPE_NAMES[row[4]]}"
        assert (floor, wall, turn) == (fw.HUE_NAMES[row[0]], fw.HUE_NAMES[row[1]], fw.ORIENTATION_WORDS[row[5]])


def _kept_factors(text):
    """Which factors a caption names, read back from its structure."""
    head = re.split(r" on | in front of |,", text)[0].split()
    return [
        " floor" in text,
        " wall" in text,
        any(w in fw.HUE_NAMES for w in head),
        any(w in fw.SCALE_WORDS for w in head),
        head[-1] in fw.SHAPE_NAMES,
        ", " in text,
    ]


def test_caption_omissions_are_independent_with_keep_prob():
    rows = _rows(2000, seed=13)
    for keep_prob in (0.7, 0.3):
        captions = fw.caption(rows, torch.Generator().manual_seed(14), keep_prob=keep_prob)
        kept = torch.tensor([_kept_factors(c) for c in captions], dtype=torch.float)
        assert (kept.mean(0) - keep_prob).abs().max() < 0.04  # 4σ at n = 2000
        both = (kept[:, fw.FLOOR_HUE] * kept[:, fw.SHAPE]).mean()
        assert abs(both - keep_prob**2) < 0.04


def test_kept_words_name_the_right_values_and_come_from_the_vocabulary():
    rows = _rows(500, seed=15)
    vocabulary = fw.caption_vocabulary()
    for row, text in zip(rows.tolist(), fw.caption(rows, torch.Generator().manual_seed(16))):
        assert set(text.replace(",", " ").split()) <= vocabulary
        words = text.replace(",", "").split()
        assert text.startswith(("a ", "an ")) and ("object" in words) != (fw.SHAPE_NAMES[row[4]] in words)
        kept = _kept_factors(text)
        if kept[fw.SCALE]:
            assert fw.SCALE_WORDS[row[3]] in words
        if kept[fw.ORIENTATION]:
            assert text.endswith(", " + fw.ORIENTATION_WORDS[row[5]])
        if kept[fw.FLOOR_HUE]:
            assert f"{fw.HUE_NAMES[row[0]]} floor" in text
        if kept[fw.WALL_HUE]:
            assert f"{fw.HUE_NAMES[row[1]]} wall" in text
        if kept[fw.OBJECT_HUE]:
            assert f"{fw.HUE_NAMES[row[2]]} {'object' if 'object' in words else fw.SHAPE_NAMES[row[4]]}" in text


def test_caption_is_seeded_and_handles_rows_and_extremes():
    rows = _rows(50, seed=17)
    first = fw.caption(rows, torch.Generator().manual_seed(18))
    assert first == fw.caption(rows, torch.Generator().manual_seed(18))
    assert first != fw.caption(rows, torch.Generator().manual_seed(19))
    assert isinstance(fw.caption(rows[0], torch.Generator().manual_seed(1)), str)
    assert fw.caption(rows, keep_prob=1.0) == fw.full_caption(rows)
    assert set(fw.caption(rows, keep_prob=0.0)) == {"an object"}


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 6), "integers"),
    (torch.zeros(2, 6, dtype=torch.bool), "integers"),
    (torch.zeros(6, dtype=torch.long), r"shape \[B, 6\]"),
    (torch.zeros(2, 5, dtype=torch.long), r"shape \[B, 6\]"),
    (torch.zeros(2, 6, 1, dtype=torch.long), r"shape \[B, 6\]"),
    (torch.tensor([[0, 0, 0, 8, 0, 0]]), r"'scale' \(column 3\) must lie in \[0, 7\], got 8"),
    (torch.tensor([[0, 0, 0, 0, 0, 15]]), "'orientation'"),
    (torch.tensor([[0, -1, 0, 0, 0, 0]]), r"'wall_hue' .* got -1"),
    (torch.tensor([[10, 0, 0, 0, 0, 0]]), "'floor_hue'"),
    (torch.tensor([[0, 0, 0, 0, 4, 0]]), "'shape'"),
    (torch.tensor([[0, 0, 11, 0, 0, 0]], dtype=torch.int32), "'object_hue'"),
])
def test_render_rejects_bad_factors(bad, message):
    for function in (fw.render, fw.object_mask):
        with pytest.raises(ValueError, match=message):
            function(bad)


def test_other_input_checks():
    assert fw.render(torch.tensor([[0, 0, 0, 0, 0, 0]], dtype=torch.int32)).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="keep_prob"):
        fw.caption(torch.zeros(6, dtype=torch.long), keep_prob=1.5)
    with pytest.raises(ValueError, match="'shape'"):
        fw.caption(torch.tensor([0, 0, 0, 0, 9, 0]))
    with pytest.raises(ValueError, match="integers"):
        fw.full_caption(torch.zeros(6))
    with pytest.raises(ValueError, match="n must be"):
        fw.sample_factors(-1)
