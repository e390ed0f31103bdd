"""ComfyUI's template browser: workflows/index.json (the frontend's template index format) gives every
workflow a title and a one-line description, in order from first steps to advanced, with the ones that
need a Stable Diffusion checkpoint marked and last; each has a thumbnail <name>.jpg made from its own
output (scripts/run_workflows.py --thumbnails). web/js/templates.js shows the index in the browser;
tests/test_frontend_e2e.py checks it there."""
from __future__ import annotations

import json
import os

from PIL import Image

WORKFLOW_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
NAMES = sorted(f[:-5] for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json") and f != "index.json")


def index() -> list[dict]:
    with open(os.path.join(WORKFLOW_DIR, "index.json"), encoding="utf-8") as f:
        return json.load(f)


def needs_checkpoint(name: str) -> bool:
    with open(os.path.join(WORKFLOW_DIR, name + ".json"), encoding="utf-8") as f:
        return any(n["type"] == "CheckpointLoaderSimple" for n in json.load(f)["nodes"])


def test_index_lists_every_workflow_once_with_a_title_and_a_one_line_description():
    categories = index()
    assert len(categories) == 1 and categories[0]["title"] and categories[0]["type"] == "image"
    templates = categories[0]["templates"]
    assert sorted(t["name"] for t in templates) == NAMES
    for t in templates:
        assert t["title"] and t["title"] != t["name"] and len(t["title"]) <= 60, t["title"]
        description = t["description"]
        assert 30 <= len(description) <= 160 and "\n" not in description, description
        assert "-" not in description and "_" not in description, f"the frontend turns - and _ into spaces: {description}"
        assert (t["mediaType"], t["mediaSubtype"]) == ("image", "jpg")


def test_order_goes_from_first_steps_to_advanced_and_marks_the_checkpoint_ones():
    templates = index()[0]["templates"]
    assert templates[0]["name"] == "toy_world_lambda_mix" and templates[0]["title"].startswith("First steps")
    marks = [needs_checkpoint(t["name"]) for t in templates]
    assert marks == sorted(marks), "the workflows that need a checkpoint come after the offline ones"
    for t, needs in zip(templates, marks):
        assert ("checkpoint needed" in t["title"]) == needs, t["title"]
        assert ("Needs SD 1.5 checkpoint" in t["tags"]) == needs and ("checkpoint" in t["description"]) == needs


def test_every_workflow_has_a_thumbnail_from_its_output():
    for name in NAMES:
        path = os.path.join(WORKFLOW_DIR, name + ".jpg")
        assert os.path.isfile(path), f"{name}.jpg is missing: run scripts/run_workflows.py --thumbnails"
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (512, 512)
            assert b"run_workflows.py --thumbnails" in image.info.get("comment", b""), name
            colours = image.convert("RGB").resize((64, 64)).getcolors(64 * 64) or []
            assert len(colours) > 200, f"{name}.jpg looks like a placeholder ({len(colours)} colours)"
