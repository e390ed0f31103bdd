"""The shipped workflows as a user meets them on the canvas (read from the files; no ComfyUI needed):
no two nodes overlap, each stage is a titled group that holds its nodes, the saved view shows the
whole graph on a 1920×1080 screen at a zoom where the frontend still draws text, outputs sit in the
output groups, and the checkpoint loaders carry the frontend's model metadata (the missing-model
dialog at load). tests/test_frontend_e2e.py checks the same in the real frontend."""
from __future__ import annotations

import itertools
import json
import os

import pytest

from comfyui_disentangle.scripts import build_workflows as wb

WORKFLOW_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
NAMES = sorted(f for f in os.listdir(WORKFLOW_DIR) if f.endswith(".json") and f != "index.json")
OUTPUT_TYPES = {"SaveImage", "PreviewImage"}
MODEL_FILE_WIDGETS = {"CheckpointLoaderSimple": "checkpoints", "DisentangleLoadClipLoss": "clip_loss"}


def load(name: str) -> dict:
    with open(os.path.join(WORKFLOW_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def inside(box, outer) -> bool:
    x, y, w, h = box
    ox, oy, ow, oh = outer
    return ox <= x and oy <= y and x + w <= ox + ow and y + h <= oy + oh


@pytest.mark.parametrize("name", NAMES)
def test_no_two_nodes_overlap(name):
    workflow = load(name)
    pairs = wb.overlapping(wb.node_boxes(workflow))
    titles = {n["id"]: n.get("title") or n["type"] for n in workflow["nodes"]}
    assert not pairs, [(titles[a], titles[b]) for a, b in pairs]


@pytest.mark.parametrize("name", NAMES)
def test_every_node_is_in_one_titled_group_and_groups_do_not_overlap(name):
    workflow = load(name)
    groups = workflow["groups"]
    assert len(groups) >= 3 and all(g["title"].strip() for g in groups)
    for n, box in wb.node_boxes(workflow).items():
        holders = [g["title"] for g in groups if inside(box, g["bounding"])]
        assert len(holders) == 1, f"node {n} is in groups {holders}"
    for a, b in itertools.combinations(groups, 2):
        assert not wb.overlapping({0: a["bounding"], 1: b["bounding"]}), (a["title"], b["title"])


@pytest.mark.parametrize("name", NAMES)
def test_every_stage_is_explained_by_its_title_and_the_workflow_by_notes(name):
    workflow = load(name)
    notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
    assert notes and all(len(n["widgets_values"][0]) > 40 for n in notes)
    assert all(len(g["title"]) > 12 for g in workflow["groups"])


@pytest.mark.parametrize("name", NAMES)
def test_saved_view_shows_the_whole_graph_on_a_1920x1080_screen(name):
    workflow = load(name)
    ds = workflow["extra"]["ds"]
    scale, (ox, oy) = ds["scale"], ds["offset"]
    boxes = list(wb.node_boxes(workflow).values()) + [g["bounding"] for g in workflow["groups"]]
    left = min(b[0] for b in boxes)
    top = min(b[1] for b in boxes)
    right = max(b[0] + b[2] for b in boxes)
    bottom = max(b[1] + b[3] for b in boxes)
    screen = [(left + ox) * scale, (top + oy) * scale, (right + ox) * scale, (bottom + oy) * scale]
    assert any(x - 1 <= screen[0] and y - 1 <= screen[1] and screen[2] <= x + w + 1 and screen[3] <= y + h + 1
               for x, y, w, h in wb.VIEWS), f"the graph spans {screen} canvas pixels"
    assert scale >= wb.MIN_READABLE_SCALE, f"zoom {scale}: the frontend would draw the nodes without text"


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_in_an_output_group(name):
    workflow = load(name)
    boxes = wb.node_boxes(workflow)
    output_groups = [g for g in workflow["groups"] if g["color"] == wb.STAGE_COLORS["output"]]
    assert output_groups
    for n in workflow["nodes"]:
        if n["type"] in OUTPUT_TYPES and n["type"] != "PreviewImage":
            assert any(inside(boxes[n["id"]], g["bounding"]) for g in output_groups), n.get("title") or n["type"]


@pytest.mark.parametrize("name", NAMES)
def test_model_loaders_carry_the_frontends_model_metadata(name):
    """Each file a loader needs from the user's models folder is described (name = the widget's value,
    folder, download URL), so the frontend's missing-model dialog lists it when the workflow loads."""
    for node in load(name)["nodes"]:
        folder = MODEL_FILE_WIDGETS.get(node["type"])
        if folder is None:
            continue
        models = node["properties"].get("models") or []
        names = {m["name"]: m for m in models}
        value = node["widgets_values"][0]
        assert value in names, f"{node['type']}: no model metadata for {value!r}"
        model = names[value]
        assert model["directory"] == folder and model["url"].startswith("https://huggingface.co/"), model


def test_node_sizes_are_at_least_what_the_frontend_computes():
    """frontend_size against the sizes comfyui-frontend-package 1.27.10's computeSize gave for fresh nodes,
    plus the 212 a node grows by when it shows a live preview while it runs (samplers, λ optimisation)."""
    measured = {"KSampler": (210, 262), "KSamplerAdvanced": (262, 334), "EmptyLatentImage": (210, 106),
                "CLIPTextEncode": (224, 88), "SaveImage": (210, 58), "PreviewImage": (142, 26), "VAEDecode": (140, 46),
                "LoadImage": (229, 102), "DisentangleOptimizeLambda": (237, 584), "DisentangleAVITrain": (210, 342),
                "DisentangleAVICapture": (210, 330), "DisentangleFactorWorldScene": (210, 222)}
    grows = {"KSampler", "KSamplerAdvanced", "DisentangleOptimizeLambda", "DisentangleAVICapture"}
    measured = {k: (w, h + 212 if k in grows else h) for k, (w, h) in measured.items()}
    for name in NAMES:
        for node in load(name)["nodes"]:
            want = measured.get(node["type"])
            if want:
                assert node["size"][0] >= want[0] and node["size"][1] >= want[1], (name, node["type"], node["size"])
